"""Find the processes a test started, however deep, by a marker in their environment (children inherit it)."""

from __future__ import annotations

import os
from typing import Optional


def proc_state(pid: int) -> Optional[str]:
    """The one-letter state of `pid` in /proc (R, S, Z, ...), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    return proc_state(pid) not in (None, "Z", "X")


def marked_processes(var: str, marker: str) -> dict[int, str]:
    """pid -> command line of every live process (not this one) whose environment has `var=marker`."""
    tag = f"{var}={marker}".encode()
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if tag not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if alive(int(d)):
            out[int(d)] = cmd
    return out
