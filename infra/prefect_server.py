"""Prefect environment defaults and a local Prefect server (SQLite) started and stopped by Refinery."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator


def configure_prefect_env(home: str | Path | None = None) -> None:
    """Defaults set before Prefect is imported: a project-local PREFECT_HOME, no analytics, loopback only."""
    os.environ.setdefault("PREFECT_HOME", str(Path(home or Path.cwd() / ".prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_UI_SHOW_PROMOTIONAL_CONTENT", "false")


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def prefect_server(host: str = "127.0.0.1", port: int = 4200, startup_timeout: float = 180) -> Iterator[str]:
    """Use the server already at PREFECT_API_URL / host:port, or start one for the duration of the block."""
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
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
