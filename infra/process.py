"""Child processes that stream their output line by line and never outlive the work they belong to.

A child started by :func:`run_streaming` leads its own process group and, on Linux, gets SIGTERM
when the thread that started it dies (``PR_SET_PDEATHSIG``): a killed CLI or a cancelled Prefect
flow run takes its stage process with it, and :func:`stop_own_group_on_sigterm` (installed by the
stage process) passes the signal on to everything the stage started (Spark's JVM and workers,
torchrun, the DeepSpeed launcher). An exception while streaming (Ctrl-C, a cancellation) terminates
the child's group before it propagates, and so does a wall-clock limit (``timeout_s``): a stage whose JVM
hangs after running out of memory ends instead of waiting to be killed by hand.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from typing import Callable

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def run_streaming(cmd: list[str], on_line: Callable[[str], None], env: dict | None = None, cwd=None,
                  timeout_s: float = 0) -> int:
    """Run ``cmd`` (stdout and stderr together), call ``on_line`` for each non-empty line, return the exit code.
    After ``timeout_s`` seconds (0 = no limit) the child's whole process group is stopped and
    :class:`subprocess.TimeoutExpired` is raised."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
        env=env, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent,
    )
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        terminate_group(proc)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what outlived the leader and still holds the pipe
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, expire) if timeout_s > 0 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                on_line(line)
        rc = proc.wait()
    except BaseException:
        terminate_group(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        proc.stdout.close()
    if expired.is_set():
        raise subprocess.TimeoutExpired(cmd, timeout_s)
    return rc


def terminate_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_own_group_on_sigterm() -> None:
    """In a process started by :func:`run_streaming`: on SIGTERM, pass it to the whole process group
    (what this process started), then unwind with ``SystemExit`` so ``finally`` blocks clean up."""
    if os.getpgrp() != os.getpid():  # not a group leader (started from a shell): leave the shell's group alone
        return

    def stop(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal reaches this process too
        os.killpg(os.getpgrp(), signal.SIGTERM)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
