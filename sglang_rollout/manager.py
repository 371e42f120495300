"""Launch and supervise rollout server processes: `sglang.launch_server` on GPUs, the built-in server on CPU.

    cfg = ManagerConfig(servers=(ServerConfig(model_path=..., port=30000, tp_size=2, backend="sglang"), ...))
    with ServerManager(cfg) as mgr:                      # launches all, waits for /health
        client = RolloutClient(mgr.urls, on_server_error=mgr.report_failure)

Each server is a subprocess in its own session (its whole process group is stopped on shutdown; SGLang spawns
scheduler and detokenizer children), with stdout/stderr in its log file. A supervisor thread checks every
server: a process that exited, or that failed `unhealthy_after` health checks in a row (hung), is killed and
started again on the same port, at most `max_restarts` times. Requests that were in flight on it fail with
connection errors in the rollout client, which retries them (same `rid`): that is the "re-send".

A restarted server loads `current_model_path` (the folder of the last disk sync, see `set_weights`) with its
weight version, so it does not silently serve stale weights; with the tensor/distributed transports, register
`on_restart` to re-sync it. LoRA: servers with `ServerConfig.enable_lora` get SGLang's ``--enable-lora
--max-lora-rank N --lora-target-modules ...`` (both backends); after an adapter sync, `set_adapter(name, folder,
version)` makes a restarted server load that PEFT folder at start (``--lora-paths name=folder``) and announce the
version, so rollouts naming the adapter keep working.

No orphans: every server gets ``DASD_PARENT_PID`` (this process). The built-in server watches that pid and exits
when it is gone; SGLang does not, so it runs under `sglang_rollout.supervise`, which stops its whole process tree
when this process is gone (killed by any signal, SIGKILL included).

API key (see `sglang_rollout.auth`): a server bound beyond loopback always has one — `ServerConfig.api_key`, else the
environment's (``DASD_ROLLOUT_API_KEY``/``_FILE``, the run folder's key), else a fresh key that the manager exports
to this process's environment so every `HttpClient` built here sends it (`ServerManager.api_key` has it too). It never goes on a command line: the built-in server gets
it in its environment, SGLang as ``--config <private dir>/...yaml`` (mode 0600; SGLang's own ``--config``, merged
in-process). Log files are created with mode 0600 (some SGLang versions log their arguments, the key included).
Loopback-only servers get a key only when one is configured.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from sglang_rollout import auth
from sglang_rollout.http_client import HttpClient
from sglang_rollout.server_client import ServerClient
from sglang_rollout.supervise import PARENT_PID_ENV, supervise_argv

log = logging.getLogger(__name__)

__all__ = ["ServerConfig", "ManagerConfig", "ServerManager", "ServerStartError", "server_command"]

BACKENDS = ("builtin", "sglang")
#: torchrun's per-worker variables, left out of a server's environment (with every TORCHELASTIC_*): a server
#: launched from a trainer rank is not a worker of the trainer's job, and with TORCHELASTIC_USE_AGENT_STORE=True
#: torch's tcp:// rendezvous (SGLang's own TP group, its weight-update group) never hosts a store
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


class ServerStartError(RuntimeError):
    """A server that did not become healthy (its log tail is in the message)."""


@dataclass(frozen=True)
class ServerConfig:
    """One server process. Fields map to `sglang.launch_server` flags of the same name."""

    model_path: str
    port: int
    backend: str = "builtin"
    host: str = "127.0.0.1"
    tp_size: int = 1
    mem_fraction_static: Optional[float] = None
    enable_memory_saver: bool = False
    #: the server's API key (never put on its command line); None: see the module docstring
    api_key: Optional[str] = None
    log_file: Optional[str] = None
    #: GPUs of this server (CUDA_VISIBLE_DEVICES); None = inherit
    gpu_ids: Optional[tuple[int, ...]] = None
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    #: LoRA (SGLang's --enable-lora, --max-lora-rank, --lora-target-modules: HF names or "all")
    enable_lora: bool = False
    max_lora_rank: Optional[int] = None
    lora_target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from sglang_rollout.contract import LORA_TARGET_MODULES

        def bad(name, rule, fix):
            raise ValueError(f"rollout.servers[].{name}={getattr(self, name)!r}: {rule}. Fix: {fix}")

        if isinstance(self.lora_target_modules, str):
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules.split(",")))
        else:
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        if self.enable_lora:
            if self.max_lora_rank is None or isinstance(self.max_lora_rank, bool) or not (
                    isinstance(self.max_lora_rank, int) and self.max_lora_rank >= 1):
                bad("max_lora_rank", "needs an integer >= 1 with enable_lora (SGLang needs it when no adapter is "
                    "loaded at start)", "use the trainer's LoRA rank (or larger)")
            if not self.lora_target_modules:
                bad("lora_target_modules", "needs at least one module with enable_lora",
                    f"use the trainer's targets as HF names ({', '.join(LORA_TARGET_MODULES)}) or ('all',)")
            unknown = [m for m in self.lora_target_modules if m not in LORA_TARGET_MODULES + ("all",)]
            if unknown:
                bad("lora_target_modules", f"unknown module(s) {unknown}",
                    f"use some of {', '.join(LORA_TARGET_MODULES)}, or all")
        elif self.max_lora_rank is not None or self.lora_target_modules:
            bad("enable_lora", "max_lora_rank / lora_target_modules are set but LoRA is off", "set enable_lora=True")

        if self.backend not in BACKENDS:
            bad("backend", f"expected one of {BACKENDS}", "use 'sglang' on GPUs, 'builtin' on CPU")
        if not 0 < self.port < 65536:
            bad("port", "must be in 1..65535", "pick a free port")
        if self.tp_size < 1:
            bad("tp_size", "must be >= 1", "use the number of GPUs per server")
        if self.backend == "builtin" and self.tp_size != 1:
            bad("tp_size", "the built-in server runs one process", "use tp_size=1 with backend='builtin'")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            bad("mem_fraction_static", "must be in (0, 1)", "use e.g. 0.7 (0.4-0.5 when colocated with training)")
        if self.gpu_ids is not None and len(self.gpu_ids) != self.tp_size:
            bad("gpu_ids", f"needs tp_size={self.tp_size} entries", "list one GPU id per TP rank")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class ManagerConfig:
    servers: tuple[ServerConfig, ...]
    startup_timeout_s: float = 900.0
    health_check_interval_s: float = 2.0
    health_timeout_s: float = 10.0
    #: consecutive failed health checks of a live process before it is treated as hung and restarted
    unhealthy_after: int = 3
    max_restarts: int = 3
    python: str = sys.executable

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("rollout.manager.servers: at least one server is needed")
        ports = [(s.host, s.port) for s in self.servers]
        if len(set(ports)) != len(ports):
            raise ValueError(f"rollout.manager.servers: duplicate host:port in {ports}")
        if self.unhealthy_after < 1 or self.max_restarts < 0:
            raise ValueError("rollout.manager: unhealthy_after must be >= 1 and max_restarts >= 0")


def lora_flags(max_rank: int, target_modules: Sequence[str]) -> list[str]:
    """SGLang's LoRA launch flags (the built-in server takes the same)."""
    return ["--enable-lora", "--max-lora-rank", str(max_rank), "--lora-target-modules", *target_modules]


def server_command(cfg: ServerConfig, *, python: str = sys.executable, model_path: Optional[str] = None,
                   weight_version: Optional[str] = None, sglang_config: Optional[str] = None,
                   lora_paths: Sequence[str] = ()) -> list[str]:
    """The command line that launches `cfg` (a restart passes the current weights' folder and version, and the
    current LoRA adapter as ``lora_paths=["name=folder"]``).

    It never holds the API key: the built-in server reads it from its environment, SGLang from `sglang_config`
    (a YAML file from `auth.write_sglang_config`, passed as ``--config``). `ServerManager` runs SGLang's command
    under `sglang_rollout.supervise`.
    """
    module = "sglang.launch_server" if cfg.backend == "sglang" else "sglang_rollout.builtin_server"
    cmd = [python, "-m", module, "--model-path", model_path or cfg.model_path, "--host", cfg.host,
           "--port", str(cfg.port)]
    if cfg.backend == "sglang":
        cmd += ["--tp-size", str(cfg.tp_size)]
        if cfg.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
        if cfg.enable_memory_saver:
            cmd += ["--enable-memory-saver"]
    if sglang_config is not None:
        if cfg.backend != "sglang":
            raise ValueError("server_command: sglang_config is for backend='sglang' (the built-in server reads "
                             f"${auth.API_KEY_ENV})")
        cmd += ["--config", sglang_config]
    if cfg.enable_lora:  # SGLang's flags, the same for both backends
        cmd += lora_flags(cfg.max_lora_rank, cfg.lora_target_modules)
    if lora_paths:
        if not cfg.enable_lora:
            raise ValueError("server_command: lora_paths for a server without enable_lora")
        cmd += ["--lora-paths", *lora_paths]
    if weight_version is not None:
        cmd += ["--weight-version", weight_version]
    return cmd + list(cfg.extra_args)


@dataclass
class _Proc:
    cfg: ServerConfig
    popen: Optional[subprocess.Popen] = None
    restarts: int = 0
    failed_checks: int = 0
    log_handle: Optional[object] = None
    started_at: float = 0.0
    restarting: bool = False
    api_key: Optional[str] = None


class ServerManager:
    """Starts, health-checks and restarts the configured servers (see module docstring)."""

    def __init__(self, config: ManagerConfig):
        self.config = config
        self._procs = [_Proc(c) for c in config.servers]
        self._http = HttpClient(connect_timeout_s=2.0)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._restart_callbacks: list[Callable[[int, str], None]] = []
        self._restart_threads: list[threading.Thread] = []
        self._launch_lock = threading.Lock()
        self.current_model_path: Optional[str] = None
        self.current_version: Optional[str] = None
        #: (lora_name, PEFT folder) a restarted server loads at start (see `set_adapter`)
        self.current_adapter: Optional[tuple[str, str]] = None
        self.events: list[tuple[float, int, str]] = []  # (time, server index, what happened)
        self._secrets_dir: Optional[str] = None
        shared: list[str] = []
        for p in self._procs:
            p.api_key = p.cfg.api_key
            if p.api_key is None and not auth.is_loopback(p.cfg.host):
                if not shared:
                    shared.append(auth.key_from_env() or self._new_exported_key())
                p.api_key = shared[0]

    @staticmethod
    def _new_exported_key() -> str:
        key = auth.new_key()
        # clients built in this process (RolloutClient, ServerClient(url, HttpClient())) read it from here
        os.environ[auth.API_KEY_ENV] = key
        log.info("rollout servers listen beyond loopback: made an API key for this run (exported as $%s to this "
                 "process; never on a command line)", auth.API_KEY_ENV)
        return key

    # ---- public --------------------------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [p.cfg.url for p in self._procs]

    @property
    def api_key(self) -> Optional[str]:
        """The servers' API key (None: they have none)."""
        return next((p.api_key for p in self._procs if p.api_key), None)

    def clients(self, http: Optional[HttpClient] = None, timeout_s: float = 600.0) -> list[ServerClient]:
        return [ServerClient(u, http or HttpClient(api_key=self.api_key), timeout_s=timeout_s) for u in self.urls]

    def pid(self, index: int) -> Optional[int]:
        p = self._procs[index].popen
        return None if p is None else p.pid

    def returncode(self, index: int) -> Optional[int]:
        """Exit code of server `index`'s current process (`Popen.poll`); None while it runs or before its launch."""
        p = self._procs[index].popen
        return None if p is None else p.poll()

    def restarts(self, index: int) -> int:
        return self._procs[index].restarts

    def on_restart(self, fn: Callable[[int, str], None]) -> None:
        """Call fn(index, url) after a server was restarted and is healthy again."""
        self._restart_callbacks.append(fn)

    def set_weights(self, model_path: str, version: str) -> None:
        """Restarted servers load this folder (e.g. `DiskTransport.last_path`) and announce `version`."""
        self.current_model_path, self.current_version = model_path, version

    def set_adapter(self, lora_name: str, path: str, version: str) -> None:
        """Restarted servers load the PEFT folder `path` (e.g. `AdapterDiskTransport.last_path`) as adapter
        `lora_name` at start (``--lora-paths lora_name=path``) and announce `version`, so rollouts naming the
        adapter keep working. The base weights stay those of `set_weights` (or the configured model)."""
        off = [i for i, p in enumerate(self._procs) if not p.cfg.enable_lora]
        if off:
            raise ValueError(f"set_adapter: servers {off} run without LoRA. Fix: ServerConfig(enable_lora=True, "
                             "max_lora_rank=..., lora_target_modules=...)")
        if not lora_name or "=" in lora_name or not path:
            raise ValueError(f"set_adapter: lora_name={lora_name!r} / path={path!r}: need a name without '=' and a "
                             "folder")
        self.current_adapter, self.current_version = (lora_name, path), version

    def report_failure(self, url: str, error: Exception) -> None:
        """A client saw `url` fail: check it now instead of at the next interval."""
        log.info("server %s reported failing (%s)", url, error)
        self._wake.set()

    def start(self) -> "ServerManager":
        for i in range(len(self._procs)):
            self._launch(i)
        try:
            errors = []
            threads = [threading.Thread(target=lambda i=i: self._wait_healthy_or_record(i, errors), daemon=True)
                       for i in range(len(self._procs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._supervise, name="server-manager", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for t in self._restart_threads:
            t.join(timeout=30)
        with self._launch_lock:
            for p in self._procs:
                self._kill(p)
            if self._secrets_dir is not None:
                shutil.rmtree(self._secrets_dir, ignore_errors=True)
                self._secrets_dir = None

    def __enter__(self) -> "ServerManager":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- processes -----------------------------------------------------------------------------------------

    def _launch(self, i: int) -> None:
        p = self._procs[i]
        sglang = p.cfg.backend == "sglang"
        adapter = [f"{self.current_adapter[0]}={self.current_adapter[1]}"] if self.current_adapter else []
        cmd = server_command(p.cfg, python=self.config.python, model_path=self.current_model_path,
                             weight_version=self.current_version, lora_paths=adapter,
                             sglang_config=self._sglang_config(i, p.api_key) if sglang and p.api_key else None)
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")}
        env.pop(auth.API_KEY_ENV, None)  # a server's key is exactly p.api_key
        env.pop(auth.API_KEY_FILE_ENV, None)
        env.update(dict(p.cfg.env))
        if p.api_key and not sglang:
            env[auth.API_KEY_ENV] = p.api_key
        # servers run in their own session (a signal to the trainer's group does not reach them); the built-in
        # server watches this pid and exits when the process that launched it is gone (killed trainer, no orphans);
        # SGLang runs under the supervise wrapper, which does that for it
        env[PARENT_PID_ENV] = str(os.getpid())
        if sglang:
            cmd = supervise_argv(cmd, python=self.config.python, grace_s=5.0)
        if p.cfg.gpu_ids is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, p.cfg.gpu_ids))
        if p.cfg.log_file:
            os.makedirs(os.path.dirname(os.path.abspath(p.cfg.log_file)), exist_ok=True)
            fd = os.open(p.cfg.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            if p.api_key:
                os.fchmod(fd, 0o600)  # some SGLang versions log their arguments, the key among them
            p.log_handle = os.fdopen(fd, "ab")
            out = p.log_handle
        else:
            out = subprocess.DEVNULL
        p.popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        p.started_at = time.monotonic()
        p.failed_checks = 0
        self.events.append((time.time(), i, f"launched pid {p.popen.pid}"))
        log.info("server %d: launched pid %d: %s", i, p.popen.pid, " ".join(cmd))

    def _sglang_config(self, i: int, key: str) -> str:
        """A private (0700 folder, 0600 file) SGLang --config file that sets the key; removed by `stop`."""
        if self._secrets_dir is None:
            self._secrets_dir = tempfile.mkdtemp(prefix="dasd-rollout-keys-")
        return auth.write_sglang_config(os.path.join(self._secrets_dir, f"server_{i}.yaml"), key)

    def _kill(self, p: _Proc, sig_timeout_s: float = 10.0) -> None:
        proc = p.popen
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # our child leads its own session: its group is ours
                os.killpg(proc.pid, signal.SIGCONT)  # a stopped (hung) process must run to act on SIGTERM
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=sig_timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=sig_timeout_s)
        elif proc is not None:
            try:  # the leader died; stop any children it left in its group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if p.log_handle is not None:
            p.log_handle.close()
            p.log_handle = None

    def _log_tail(self, p: _Proc, n: int = 30) -> str:
        if not p.cfg.log_file or not os.path.isfile(p.cfg.log_file):
            return "(no log_file configured)"
        with open(p.cfg.log_file, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])

    def _wait_healthy(self, i: int) -> None:
        p = self._procs[i]
        client = ServerClient(p.cfg.url, self._http)
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if p.popen.poll() is not None:
                raise ServerStartError(f"server {i} ({p.cfg.url}) exited with code {p.popen.returncode} while "
                                       f"starting. Log tail:\n{self._log_tail(p)}")
            if client.health(timeout_s=self.config.health_timeout_s):
                log.info("server %d healthy at %s after %.1fs", i, p.cfg.url, time.monotonic() - p.started_at)
                return
            time.sleep(0.2)
        raise ServerStartError(f"server {i} ({p.cfg.url}) not healthy within startup_timeout_s="
                               f"{self.config.startup_timeout_s}. Log tail:\n{self._log_tail(p)}")

    def _wait_healthy_or_record(self, i: int, errors: list) -> None:
        try:
            self._wait_healthy(i)
        except BaseException as e:  # noqa: BLE001 - re-raised by start()
            errors.append(e)

    # ---- supervision ---------------------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.health_check_interval_s)
            self._wake.clear()
            for i in range(len(self._procs)):
                if self._stop.is_set():
                    return
                self._check(i)

    def _check(self, i: int) -> None:
        p = self._procs[i]
        if p.restarting:
            return
        why = None
        if p.popen.poll() is not None:
            why = f"process exited with code {p.popen.returncode}"
        elif ServerClient(p.cfg.url, self._http).health(timeout_s=self.config.health_timeout_s):
            p.failed_checks = 0
        else:
            p.failed_checks += 1
            if p.failed_checks >= self.config.unhealthy_after:
                why = f"{p.failed_checks} failed health checks in a row (hung?)"
        if why is not None:  # restart on its own thread: the others stay supervised meanwhile
            p.restarting = True
            t = threading.Thread(target=self._restart, args=(i, why), name=f"restart-{i}", daemon=True)
            self._restart_threads.append(t)
            t.start()

    def _restart(self, i: int, why: str) -> None:
        try:
            self._restart_once(i, why)
        finally:
            self._procs[i].restarting = False

    def _restart_once(self, i: int, why: str) -> None:
        p = self._procs[i]
        if p.restarts >= self.config.max_restarts:
            if p.popen.poll() is not None and not any("giving up" in e[2] for e in self.events if e[1] == i):
                log.error("server %d: %s; max_restarts=%d reached, giving up", i, why, self.config.max_restarts)
                self.events.append((time.time(), i, "giving up"))
            return
        log.warning("server %d (%s): %s; restarting (%d/%d)", i, p.cfg.url, why, p.restarts + 1,
                    self.config.max_restarts)
        self.events.append((time.time(), i, f"restart: {why}"))
        with self._launch_lock:
            if self._stop.is_set():
                return
            self._kill(p)
            p.restarts += 1
            self._launch(i)
        try:
            self._wait_healthy(i)
        except ServerStartError as e:
            log.error("server %d restart failed: %s", i, e)
            self.events.append((time.time(), i, "restart failed"))
            return
        self.events.append((time.time(), i, "healthy again"))
        for fn in self._restart_callbacks:
            try:
                fn(i, p.cfg.url)
            except Exception:  # noqa: BLE001 - a callback must not kill supervision
                log.exception("on_restart callback failed for server %d", i)
