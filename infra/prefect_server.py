"""Prefect environment defaults and a local Prefect server (SQLite) started and stopped by Refinery."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Iterator


def configure_prefect_env(home: str | Path | None = None) -> None:
    """Defaults set before Prefect is imported: a project-local PREFECT_HOME, no analytics, loopback only."""
    os.environ.setdefault("PREFECT_HOME", str(Path(home or Path.cwd() / ".prefect").resolve()))
    # Prefect creates its home without parents: PREFECT_HOME=/new/dir/prefect would fail its server's start
    with contextlib.suppress(OSError):  # unwritable: Prefect reports it
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_UI_SHOW_PROMOTIONAL_CONTENT", "false")
    # One UI: deployment pages and the "View at" links of flow runs open the classic (V1) UI, which also
    # has the typed custom-run form; the root URL would otherwise open the new (V2) UI.
    os.environ.setdefault("PREFECT_SERVER_UI_V2_ENABLED", "false")


def service_errors(lines: Iterable[str]) -> Iterator[str]:
    """The error lines of a Prefect server log: ERROR/CRITICAL records and each traceback's exception line.

    Prefect's server services (scheduler, late runs, ...) log their failures only there; ``refinery
    serve`` echoes these lines on its console so a failing scheduler is never silent.
    """
    in_traceback = False
    for line in lines:
        line = line.rstrip("\n")
        if "| ERROR" in line or "| CRITICAL" in line:
            yield line
        elif line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line.startswith((" ", "During handling", "The above exception")):
            yield "  " + line
            in_traceback = False


def follow_server_errors(log_path: Path, emit: Callable[[str], None], stop: threading.Event) -> threading.Thread:
    """Echo new error lines of the server log through ``emit`` until ``stop`` is set (a daemon thread)."""

    def lines() -> Iterator[str]:
        with open(log_path, errors="replace") as fh:
            fh.seek(0, os.SEEK_END)
            while not stop.is_set():
                line = fh.readline()
                if line:
                    yield line
                else:
                    time.sleep(0.5)

    def run() -> None:
        for line in service_errors(lines()):
            emit(f"prefect server: {line}")

    thread = threading.Thread(target=run, name="prefect-server-errors", daemon=True)
    thread.start()
    return thread


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def prefect_server(
    host: str = "127.0.0.1", port: int = 4200, startup_timeout: float = 180,
    on_error: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Use the server already at PREFECT_API_URL / host:port, or start one for the duration of the block.

    ``on_error`` receives the error lines of a server this block started (see :func:`service_errors`).
    """
    configure_prefect_env()
    api_url = os.environ.get("PREFECT_API_URL") or f"http://{host}:{port}/api"
    if healthy(api_url):
        os.environ["PREFECT_API_URL"] = api_url
        yield api_url
        return
    log_path = Path(os.environ["PREFECT_HOME"]) / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
            # the UI must call this server's API, not the default port
            env={**os.environ, "PREFECT_API_URL": "", "PREFECT_UI_API_URL": api_url,
                 "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)},
        )
    stop = threading.Event()
    if on_error is not None:
        follow_server_errors(log_path, on_error, stop)
    try:
        deadline = time.time() + startup_timeout
        while not healthy(api_url):
            if proc.poll() is not None:
                raise RuntimeError(f"Prefect server exited with code {proc.returncode}; see {log_path}")
            if time.time() > deadline:
                raise RuntimeError(f"Prefect server did not answer at {api_url} within {startup_timeout:.0f} s; see {log_path}")
            time.sleep(1)
        os.environ["PREFECT_API_URL"] = api_url
        yield api_url
    finally:
        stop.set()
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
