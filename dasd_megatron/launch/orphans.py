"""Trainer ranks exit when their launcher is gone, however it died (SIGKILL included): no orphaned ranks.

The chain of a multi-process run is ``dasd train --nproc N`` (the CLI) -> torchrun's agent -> N worker ranks. torchrun
starts each worker in its own session, so a signal to the launcher's process group (Ctrl-C aside, e.g. ``kill -9
-<pgid>``, a job scheduler killing the step) kills the CLI and the agent but not the workers: they were re-parented
to init and lived on (each ~0.5 GB on CPU; on a GPU machine each kept its GPU memory and its ports, blocking the
resume). `install_launcher_watch`, called by every rank at start (`dasd_megatron.parallel.initialize_parallel`):

* sets ``PR_SET_PDEATHSIG=SIGKILL``: the kernel kills the rank the moment the agent dies (the agent forks the workers
  from its main thread, so this fires on the agent's exit, not on some thread's);
* starts a daemon thread that polls, every `poll_s`, the agent (our parent: re-parented means it is gone) and the
  ``dasd`` CLI (``$DASD_LAUNCHER_PID``, set by `dasd_megatron.cli._relaunch_under_torchrun`; it may die alone, e.g.
  ``kill -9 <cli pid>``, and the agent would then keep the ranks running). When either is gone it kills the rank's
  own process group (the rank leads it: torchrun's new session), which takes the rank's children along (reward
  workers, multiprocessing's resource tracker, helpers); the agent, if still alive, sees its workers fail and exits;
* starts a tiny reaper process in the rank's group that kills the group as soon as the rank is gone: a rank killed
  outright (the parent-death SIGKILL, the OOM killer, ``kill -9``) gets no chance to take its children along, and
  they do not all notice by themselves (spawned reward workers were seen to outlive their rank).

The rollout servers a rank starts follow it: the built-in server watches ``$DASD_PARENT_PID``, SGLang runs under
`sglang_rollout.supervise` (see `sglang_rollout.manager`).

Processes not started by torchrun (a plain single-process ``dasd train``, tests that spawn ranks themselves) have
no such launcher: nothing is installed there.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Optional

from sglang_rollout.supervise import ProcessWatch, set_parent_death_signal

log = logging.getLogger(__name__)

LAUNCHER_PID_ENV = "DASD_LAUNCHER_PID"
"""The ``dasd`` CLI's pid, for the ranks it relaunched under torchrun."""

__all__ = ["LAUNCHER_PID_ENV", "install_launcher_watch", "LauncherWatch"]

_installed: Optional["LauncherWatch"] = None
_lock = threading.Lock()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _is_torchrun_agent(pid: int) -> bool:
    cmd = _cmdline(pid)
    return any(m in cmd for m in (b"torch.distributed.run", b"torchrun", b"torch.distributed.launch"))


class LauncherWatch:
    """The watches of this rank (see module docstring); `gone()` names the first launcher that is gone, if any."""

    def __init__(self, watches: list[tuple[str, ProcessWatch]], poll_s: float):
        self.watches = watches
        self.poll_s = poll_s
        self.pdeathsig = False
        self.reaper_pid: Optional[int] = None
        self._thread: Optional[threading.Thread] = None

    def gone(self) -> Optional[str]:
        for what, w in self.watches:
            if not w.alive():
                return f"{what} (pid {w.pid})"
        return None

    def start(self) -> "LauncherWatch":
        self._thread = threading.Thread(target=self._run, name="dasd-launcher-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        ev = threading.Event()
        while True:
            what = self.gone()
            if what is not None:
                _die(what)
                return
            ev.wait(self.poll_s)


def _die(what: str) -> None:
    rank = os.environ.get("RANK", "?")
    msg = (f"dasd rank {rank} (pid {os.getpid()}): its launcher {what} is gone; exiting so that no orphaned rank "
           "keeps its memory, GPU and ports (rerun the same command to resume from the last checkpoint)")
    try:
        print(msg, file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - stderr may be a closed pipe: exit all the same
        pass
    me = os.getpid()
    try:
        if os.getpgrp() == me:  # torchrun started us in a new session: the group is ours and our children's
            os.killpg(me, signal.SIGKILL)
    finally:
        os.kill(me, signal.SIGKILL)


_REAPER = """
import os, signal, sys, time
rank, pgid = int(sys.argv[1]), int(sys.argv[2])
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)  # it goes when the rank goes, and takes the rest of the group along
while os.getppid() == rank:
    time.sleep(0.2)
os.killpg(pgid, signal.SIGKILL)
"""


def _start_group_reaper() -> Optional[int]:
    """A process in our group that kills the group once we are gone (only when we lead the group)."""
    import subprocess

    me = os.getpid()
    if os.getpgrp() != me:
        return None
    proc = subprocess.Popen([sys.executable, "-S", "-c", _REAPER, str(me), str(me)], stdin=subprocess.DEVNULL,
                            close_fds=True)
    return proc.pid


def install_launcher_watch(*, poll_s: float = 0.5, environ=None) -> Optional[LauncherWatch]:
    """Make this rank exit when its launcher is gone (see module docstring); idempotent. None when not a
    torchrun worker and not started by the ``dasd`` CLI."""
    global _installed
    env = os.environ if environ is None else environ
    with _lock:
        if _installed is not None:
            return _installed
        under_torchrun = "TORCHELASTIC_RUN_ID" in env
        launcher = int(env.get(LAUNCHER_PID_ENV, "0") or 0)
        if not under_torchrun and not launcher:
            return None
        watches: list[tuple[str, ProcessWatch]] = []
        pdeathsig = False
        if under_torchrun:
            pdeathsig = set_parent_death_signal(signal.SIGKILL)
            agent = os.getppid()
            # the agent may have died between our fork and the prctl (then our parent is init or a subreaper)
            if agent == 1 or (launcher and not _is_torchrun_agent(agent)):
                _die(f"torchrun agent (it exited before this rank started; now parent pid {agent})")
            watches.append(("torchrun agent", ProcessWatch(agent, as_parent=True)))
        if launcher and launcher != os.getpid():
            watches.append(("dasd CLI", ProcessWatch(launcher)))
        w = LauncherWatch(watches, poll_s)
        w.pdeathsig = pdeathsig
        what = w.gone()
        if what is not None:
            _die(what)
        if under_torchrun:
            w.reaper_pid = _start_group_reaper()
        _installed = w.start()
        log.debug("launcher watch: %s (PDEATHSIG %s, reaper %s)", [f"{n} pid {x.pid}" for n, x in watches],
                  pdeathsig, w.reaper_pid)
        return _installed
