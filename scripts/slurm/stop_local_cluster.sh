#!/usr/bin/env bash
# Stop the daemons scripts/slurm/start_local_cluster.sh started, each by its pid file (never by name).
# Leaves packages, configuration and the accounting database in place, so the next start takes seconds.
set -u
[ "$(id -u)" = 0 ] || { echo "[slurm-local] ERROR: must run as root" >&2; exit 3; }
for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid /run/mysqld/mysqld.pid /run/munge/munged.pid; do
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
        echo "[slurm-local] stopped $(basename "$pidfile" .pid) (pid $pid)" >&2
    fi
done
