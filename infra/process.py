"""Child processes that stream their output line by line and never outlive the work they belong to.

A child started by :func:`run_streaming` leads its own process group and, on Linux, gets SIGTERM
when the thread that started it dies (``PR_SET_PDEATHSIG``): a killed CLI or a cancelled Prefect
flow run takes its stage process with it, and :func:`stop_own_group_on_sigterm` (installed by the
stage process) passes the signal on to everything the stage started (Spark's JVM and workers,
torchrun, the DeepSpeed launcher). An exception while streaming (Ctrl-C, a cancellation) terminates
the child's group before it propagates.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Callable

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def run_streaming(cmd: list[str], on_line: Callable[[str], None], env: dict | None = None, cwd=None) -> int:
    """Run ``cmd`` (stdout and stderr together), call ``on_line`` for each non-empty line, return the exit code."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
        env=env, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent,
    )
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                on_line(line)
        return proc.wait()
    except BaseException:
        terminate_group(proc)
        raise
    finally:
        proc.stdout.close()


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
