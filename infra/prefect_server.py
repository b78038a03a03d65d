"""Prefect environment defaults and a local Prefect server (SQLite) started and stopped by Refinery.

The server Refinery starts is Prefect's own app behind a Host-header check (``python -m
infra.prefect_server``), with Prefect's HTTP Basic authentication, CSRF protection and CORS limited to the
UI's own origin (see :mod:`infra.access`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from infra.access import CREDENTIAL_ENV, allowed_hosts, check_exposure, credential, host_name

ALLOWED_HOSTS_ENV = "REFINERY_ALLOWED_HOSTS"


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
    # a schedule keeps at most 10 future runs (Prefect's default, 100, filled the UI with 61 runs of a
    # 1-minute schedule at once); the scheduler tops it up as runs start
    os.environ.setdefault("PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS", "10")
    # the CLI and workers on this machine send the credential `refinery serve` created here
    with contextlib.suppress(OSError, ValueError):
        value, _ = credential(os.environ["PREFECT_HOME"], create=False)
        if value:
            os.environ.setdefault(CREDENTIAL_ENV, value)


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
    on_error: Callable[[str], None] | None = None, auth: str | None = None, extra_hosts: tuple[str, ...] = (),
) -> Iterator[str]:
    """Use the server already at PREFECT_API_URL / host:port, or start one for the duration of the block.

    A server started here answers only Host headers in :func:`infra.access.allowed_hosts`, and with
    ``auth`` (the credential, :func:`infra.access.credential`; required beyond loopback) only requests
    carrying it (exported to this process's clients as ``PREFECT_API_AUTH_STRING``), with CSRF protection
    on and CORS limited to the UI's own origin. ``on_error`` receives the error
    lines of a server this block started (see :func:`service_errors`).
    """
    configure_prefect_env()
    api_url = os.environ.get("PREFECT_API_URL") or f"http://{host}:{port}/api"
    if healthy(api_url):
        os.environ["PREFECT_API_URL"] = api_url
        yield api_url
        return
    check_exposure(host, auth is not None)
    hosts = allowed_hosts(host, extra_hosts)
    env = {**os.environ, "PREFECT_API_URL": "", "PREFECT_UI_API_URL": api_url,  # the UI calls this server
           "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port), ALLOWED_HOSTS_ENV: ",".join(hosts),
           "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(
               f"http://{name}:{port}" for name in hosts if not name.startswith("::"))}
    if auth is not None:
        os.environ[CREDENTIAL_ENV] = auth
        env.update({"PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true"})
    else:
        env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    log_path = Path(os.environ["PREFECT_HOME"]) / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "infra.prefect_server", "--host", host, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
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


def host_checked(app: Any, hosts: list[str]) -> Any:
    """An ASGI app that answers 400 to HTTP and websocket requests whose Host header is not in ``hosts``."""

    async def guarded(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(header) not in hosts:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": b"invalid Host header"})
                return
        await app(scope, receive, send)

    return guarded


def main() -> None:
    """Run Prefect's server app (API, UI and services) behind :func:`host_checked` (what `prefect server
    start` runs, in the foreground); the allowed names come from ``$REFINERY_ALLOWED_HOSTS``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args()
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import PREFECT_SERVER_API_KEEPALIVE_TIMEOUT, PREFECT_SERVER_LOGGING_LEVEL

    hosts = os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if os.environ.get(ALLOWED_HOSTS_ENV) else allowed_hosts(args.host)
    uvicorn.run(host_checked(create_app(final=True), hosts), host=args.host, port=args.port,
                timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
                log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower())


if __name__ == "__main__":
    main()
