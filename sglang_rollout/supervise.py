"""Run a server command and take it down when the process that launched us is gone (no orphaned servers).

    python -m sglang_rollout.supervise [--parent-pid PID] [--grace-s S] -- python -m sglang.launch_server ...

SGLang does not watch the process that started it: a trainer killed with SIGKILL would leave its servers running,
holding their GPUs and ports. `ServerManager` and the rollout node runner therefore start SGLang under this small
wrapper, which

* starts the command in its own session (process group), with ``PR_SET_PDEATHSIG=SIGKILL`` so the kernel kills it
  the moment the wrapper dies by any means (SIGKILL included); SGLang's own scheduler/detokenizer processes do the
  same towards their parent, so the whole server tree follows;
* polls its launcher (``--parent-pid``, else ``$DASD_PARENT_PID``, else its parent at start) every 0.2 s and, once
  the launcher is gone (exited, killed, or a zombie, or this process was re-parented), stops the command: SIGTERM to
  its process group, SIGKILL after ``--grace-s``;
* forwards SIGTERM/SIGINT/SIGHUP to the command's process group (same escalation), so stopping the wrapper stops
  the server;
* exits with the command's status (128+N for a signal N), after killing anything left in the command's group.

Why not PDEATHSIG on the wrapper itself: it fires when the launcher's *thread* that started us exits, and the
manager restarts servers from short-lived threads. The launcher is polled instead.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
from typing import Optional

__all__ = ["PARENT_PID_ENV", "main", "supervise_argv", "set_parent_death_signal", "process_start_time", "ProcessWatch"]

PARENT_PID_ENV = "DASD_PARENT_PID"
"""Set for every launched server: the launcher's pid. The built-in server exits when that process is gone, SGLang's
supervisor (this module) stops SGLang's process tree."""
_PR_SET_PDEATHSIG = 1


def supervise_argv(cmd: list[str], *, python: str = sys.executable, parent_pid: Optional[int] = None,
                   grace_s: Optional[float] = None) -> list[str]:
    """`cmd` run under this wrapper."""
    out = [python, "-m", "sglang_rollout.supervise"]
    if parent_pid is not None:
        out += ["--parent-pid", str(parent_pid)]
    if grace_s is not None:
        out += ["--grace-s", str(grace_s)]
    return out + ["--", *cmd]


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel (Linux prctl) to send `sig` to this process when the thread that forked it exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def process_start_time(pid: int) -> Optional[int]:
    """The start time (clock ticks since boot) of `pid`, from /proc; None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class ProcessWatch:
    """Whether a process is still the live process it was when the watch started (not gone, a zombie, or a new
    process that got its pid). With `as_parent`, also whether we are still its child (not re-parented)."""

    def __init__(self, pid: int, *, as_parent: bool = False):
        self.pid = pid
        self.as_parent = as_parent
        self.start_time = process_start_time(pid)

    def alive(self) -> bool:
        if self.as_parent and os.getppid() != self.pid:
            return False  # re-parented to init or a subreaper: our parent exited
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        if _state(self.pid) in ("Z", "X"):
            return False  # killed, not yet reaped by its own parent
        st = process_start_time(self.pid)
        return self.start_time is None or st is None or st == self.start_time


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_rollout.supervise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent-pid", type=int, default=None,
                    help=f"the launcher to watch (default: ${PARENT_PID_ENV}, else the parent at start)")
    ap.add_argument("--grace-s", type=float, default=5.0, help="SIGTERM to SIGKILL delay when stopping (5)")
    ap.add_argument("--poll-s", type=float, default=0.2)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given. Fix: python -m sglang_rollout.supervise -- CMD [ARGS...]")
    initial_ppid = os.getppid()
    parent = args.parent_pid or int(os.environ.get(PARENT_PID_ENV, "0") or 0) or initial_ppid
    watch = ProcessWatch(parent, as_parent=parent == initial_ppid)
    if parent <= 1 or not watch.alive():
        print(f"supervise: launcher pid {parent} is already gone; not starting {cmd[0]}", file=sys.stderr, flush=True)
        return 1

    got: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda signum, _frame: got.append(signum))
    child = subprocess.Popen(cmd, start_new_session=True, preexec_fn=set_parent_death_signal)
    why = None
    while True:
        try:
            rc = child.wait(timeout=args.poll_s)
            _killpg(child.pid, signal.SIGKILL)  # whatever the command left in its group
            return _exit_code(rc)
        except subprocess.TimeoutExpired:
            pass
        if got:
            why, sig = f"got signal {got[0]}", got[0]
        elif not watch.alive():
            why, sig = f"launcher pid {parent} is gone", signal.SIGTERM
        if why is not None:
            break
    print(f"supervise: {why}: stopping {cmd[0]} (pid {child.pid}, process group {child.pid})", file=sys.stderr,
          flush=True)
    _killpg(child.pid, sig)
    try:
        rc = child.wait(timeout=args.grace_s)
    except subprocess.TimeoutExpired:
        rc = None
    _killpg(child.pid, signal.SIGKILL)
    if rc is None:
        rc = child.wait()
    return _exit_code(rc) if got else 1


if __name__ == "__main__":
    sys.exit(main())
