"""The guard: the parent of a worker process (``harness.isolation``), on Linux.

It stands between the harness and the worker, so that what the implementation does to "its parent"
lands on the guard, not on the harness, and it is the subreaper of the worker's descendants: a process
the implementation started in a session of its own is still the guard's descendant, and the guard
kills every one of them when the worker ends. Run as a script (``python -S _guard.py STATUS ARGV...``);
it imports nothing but the standard library, so that it starts at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

_PR_SET_CHILD_SUBREAPER = 36
_GUARDED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                    signal.SIGUSR2, signal.SIGALRM}


def main() -> None:
    """Run the worker (``sys.argv[2:]``) as a child; on its end, on a stop request from the harness,
    or on a signal from anyone else, kill the worker and all its descendants, and write what happened
    to ``sys.argv[1]`` as JSON: ``{"exit": code}``, plus ``"note"`` for a signal from the worker."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the harness
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)
    status_path, argv = sys.argv[1], sys.argv[2:]
    harness = os.getppid()
    waited = _GUARDED_SIGNALS | {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    fd = int(argv[-1])
    worker = subprocess.Popen(argv, pass_fds=(fd,), preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK,
                                                                                                 waited))
    os.close(fd)
    status: dict[str, Any] = {}
    while True:
        info = signal.sigtimedwait(waited, 0.5)
        if worker.poll() is not None:
            status["exit"] = worker.returncode
            break
        if info is None or info.si_signo == signal.SIGCHLD:
            continue  # an adopted orphan ended, or nothing happened
        if info.si_pid == harness or info.si_pid == 0:  # the harness (or the kernel) stops the worker
            break
        name = signal.Signals(info.si_signo).name
        status["note"] = (f"the implementation sent {name} to its parent process (process {info.si_pid} "
                          f"signalled pid {os.getpid()}, a guard standing in for the harness)")
        break
    _kill_descendants(worker)
    if "exit" not in status:
        status["exit"] = worker.returncode
    with open(status_path, "w", encoding="utf-8") as fh:
        json.dump(status, fh)


def _kill_descendants(worker: subprocess.Popen) -> None:
    """SIGKILL the worker and every process that has the guard as its parent, again and again: each
    one killed hands its own children to the guard (the subreaper), until none is left."""
    me = os.getpid()
    if worker.poll() is None:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        children = _children_of(me)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:  # reap the dead (zombies are children too)
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
        if not children:
            return
        time.sleep(0.01)


def _children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


if __name__ == "__main__":
    main()
