"""Who may talk to the HTTP endpoints Refinery serves (the Prefect API/UI and the lineage explorer).

Three rules, shared by both servers:
- **Credential**: a ``user:password`` string (HTTP Basic). ``$PREFECT_API_AUTH_STRING`` when set (Prefect's
  own client setting, so workers and the CLI send it without more configuration), else the file
  ``PREFECT_HOME/refinery-api-auth`` (mode 0600), generated on first use.
- **Host header**: only the names the server is meant to be reached by (loopback names, the bound host,
  configured extra names), which defeats DNS rebinding.
- **Loopback**: binding beyond loopback needs the credential.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import os
import secrets
import stat
from pathlib import Path

CREDENTIAL_ENV = "PREFECT_API_AUTH_STRING"
CREDENTIAL_FILE = "refinery-api-auth"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class AccessError(ValueError):
    """A serving setup that would expose the API: said in one line."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def credential(home: str | Path, create: bool = True) -> tuple[str | None, bool]:
    """The served API's ``user:password`` and whether it was created now (see the module docstring).

    Without ``create``, a missing file gives ``(None, False)``. A file that others may read is refused.
    """
    if os.environ.get(CREDENTIAL_ENV):
        return os.environ[CREDENTIAL_ENV], False
    path = Path(home).expanduser() / CREDENTIAL_FILE
    created = False
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it just now: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(f"refinery:{secrets.token_urlsafe(24)}\n")
            created = True
    if not path.exists():
        return None, False
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise AccessError(f"{path} can be read by other users; run `chmod 600 {path}` (or delete it for a new one)")
    value = path.read_text().strip()
    if ":" not in value:
        raise AccessError(f"{path} must hold one line 'user:password'")
    return value, created


def allowed_hosts(host: str, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Host-header names a server bound to ``host`` answers: loopback names, ``host`` itself, ``extra``."""
    names = [*LOOPBACK_NAMES, *(name.lower() for name in extra)]
    if host not in WILDCARD_HOSTS:
        names.append(host.lower())
    return sorted(set(names))


def host_name(header: str | None) -> str:
    """The name part of a Host header (no port; IPv6 literals keep their brackets)."""
    header = (header or "").strip().lower()
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.split(":")[0]


def refusal(host_header: str | None, authorization: str | None, hosts: list[str],
            expected: str | None) -> tuple[int, str] | None:
    """``(status, reason)`` when a request must be refused, else ``None``.

    400 for a Host header outside ``hosts``; 401 when ``expected`` (a credential) is set and the
    request's HTTP Basic ``authorization`` does not carry it.
    """
    if host_name(host_header) not in hosts:
        return 400, "invalid Host header"
    if expected is None:
        return None
    scheme, _, value = (authorization or "").partition(" ")
    try:
        given = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        given = ""
    if scheme.lower() != "basic" or not hmac.compare_digest(given.encode(), expected.encode()):
        return 401, "unauthorized"
    return None


def check_exposure(host: str, auth: bool) -> None:
    """Refuse to serve beyond loopback without the credential."""
    if not auth and not is_loopback(host):
        raise AccessError(f"refusing to serve on {host!r} without authentication: "
                          "only loopback hosts (127.0.0.1, localhost) may run with --no-auth")
