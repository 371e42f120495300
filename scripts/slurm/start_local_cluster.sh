#!/usr/bin/env bash
# Start a single-node SLURM cluster on this host: munge, mariadb + slurmdbd (accounting: nemo-run polls `sacct`),
# slurmctld and slurmd, from Debian packages. For the end-to-end launch test and for trying recipes on one machine.
#
#   sudo scripts/slurm/start_local_cluster.sh          # install if missing, configure, start; prints the cluster
#   scripts/slurm/stop_local_cluster.sh                # stop what this script started (by pid files)
#
# Idempotent: when the daemons already answer (sinfo shows the node up, sacct works) it only prints and exits 0.
# Needs root (apt-get, system daemons). Exit codes: 0 ready, 3 not root, 4 packages cannot be installed,
# 5 a daemon did not come up (its log file is named in the message).
#
# Environment (all optional):
#   DASD_SLURM_CPUS     CPUs of the node in slurm.conf (default 2)
#   DASD_SLURM_CLUSTER  cluster name (default dasdlocal)
#   DASD_SLURM_ACCOUNT  accounting account created for root (default dasd); pass it as the executor's account
#   DASD_SLURM_STATE    state, spool and log folder (default /var/lib/dasd-slurm)
set -euo pipefail

CPUS=${DASD_SLURM_CPUS:-2}
CLUSTER=${DASD_SLURM_CLUSTER:-dasdlocal}
ACCOUNT=${DASD_SLURM_ACCOUNT:-dasd}
STATE=${DASD_SLURM_STATE:-/var/lib/dasd-slurm}
PARTITION=debug
HOST=$(hostname -s)
LOGS=$STATE/log
DB_PASS=dasd-local-slurmdbd   # a local-only MariaDB account reachable through the unix socket

log() { echo "[slurm-local] $*" >&2; }
die() { echo "[slurm-local] ERROR: $1" >&2; exit "${2:-1}"; }

wait_for() {  # wait_for <seconds> <description> <command...>
    local secs=$1 what=$2; shift 2
    for _ in $(seq "$secs"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    return 1
}

node_up() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }
cluster_ready() { command -v sinfo >/dev/null && node_up && sacct -n -X -S now-1minutes >/dev/null 2>&1; }

if cluster_ready; then
    log "already running: cluster $CLUSTER, node $HOST, partition $PARTITION, account $ACCOUNT"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "must run as root: it installs Debian packages and starts system daemons" 3

# ---- 1. packages ------------------------------------------------------------------------------------------------
missing=()
for bin in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd; do
    command -v "$bin" >/dev/null || missing+=("$bin")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing slurm, munge and mariadb (missing: ${missing[*]})"
    command -v apt-get >/dev/null || die "no apt-get: install slurmctld slurmd slurmdbd slurm-client munge mariadb-server by hand" 4
    pkgs=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2; then
        apt-get update -q >&2 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2 \
            || die "apt-get install ${pkgs[*]} failed" 4
    fi
fi

mkdir -p "$LOGS" "$STATE/ctld" "$STATE/d" /etc/slurm

# ---- 2. munge ---------------------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key; else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 15 munged sh -c 'munge -n | unmunge' || die "munged did not start (see /var/log/munge/munged.log)" 5
fi

# ---- 3. mariadb + accounting database --------------------------------------------------------------------------
if ! mysqladmin ping >/dev/null 2>&1; then
    log "starting mariadb"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOGS/mariadb-install.log" 2>&1
    setsid nohup mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 --innodb-buffer-pool-size=128M \
        >"$LOGS/mariadb.log" 2>&1 </dev/null &
    wait_for 60 mariadb mysqladmin ping || die "mariadb did not start (see $LOGS/mariadb.log)" 5
fi
mysql -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# ---- 4. configuration (rewritten only when it changes; a change restarts the slurm daemons) ----------------------
mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
changed=0
write_if_changed() {  # write_if_changed <path> <mode>   (content on stdin)
    local tmp; tmp=$(mktemp)
    cat >"$tmp"
    if ! cmp -s "$tmp" "$1"; then mv "$tmp" "$1"; changed=1; else rm -f "$tmp"; fi
    chmod "$2" "$1"
}
write_if_changed /etc/slurm/slurm.conf 644 <<CONF
# Written by scripts/slurm/start_local_cluster.sh: one node, no cgroups, accounting through slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$HOST CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
write_if_changed /etc/slurm/slurmdbd.conf 600 <<CONF
# Written by scripts/slurm/start_local_cluster.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=$LOGS/slurmdbd.log
PidFile=/run/slurmdbd.pid
CONF

stop_pidfile() { [ -s "$1" ] && kill "$(cat "$1")" 2>/dev/null && sleep 1 || true; rm -f "$1"; }
if [ "$changed" = 1 ]; then
    log "configuration changed: (re)starting slurm daemons"
    stop_pidfile /run/slurmd.pid; stop_pidfile /run/slurmctld.pid; stop_pidfile /run/slurmdbd.pid
fi

# ---- 5. slurmdbd, cluster/account registration, slurmctld, slurmd -----------------------------------------------
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running /run/slurmdbd.pid; then
    log "starting slurmdbd"
    slurmdbd
fi
wait_for 60 slurmdbd sacctmgr -n show cluster || die "slurmdbd does not answer (see $LOGS/slurmdbd.log)" 5
sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
sacctmgr -i -Q add account "$ACCOUNT" Cluster="$CLUSTER" Description=dasd Organization=dasd >/dev/null 2>&1 || true
sacctmgr -i -Q add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null 2>&1 || true

if ! running /run/slurmctld.pid; then
    log "starting slurmctld"
    slurmctld
fi
wait_for 60 slurmctld scontrol ping || die "slurmctld does not answer (see $LOGS/slurmctld.log)" 5
if ! running /run/slurmd.pid; then
    log "starting slurmd"
    slurmd
fi
if ! wait_for 60 "node $HOST" node_up; then
    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    wait_for 30 "node $HOST" node_up || die "node $HOST is not up: $(sinfo -h -N -o '%N %T %E') (see $LOGS/slurmd.log)" 5
fi
wait_for 30 sacct sacct -n -X -S now-1minutes || die "sacct does not answer (see $LOGS/slurmdbd.log)" 5
log "ready: cluster $CLUSTER, node $HOST ($CPUS CPUs), partition $PARTITION, account $ACCOUNT"
