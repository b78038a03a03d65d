"""Headless-browser check of the Prefect UI served by `refinery serve`.

Starts `refinery serve` on a free port, waits until the deployments are registered, opens the UI's
deployments page in headless Debian Chromium, saves a screenshot and counts how many Refinery
deployments the rendered page shows. Needs `chromium` (`make ui-check` installs it with apt).

    python bench/ui_check.py [--out bench/out/ui_deployments.png]

Last line: `deployments_visible <n>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1440,1000", "--virtual-time-budget=20000",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_post(url: str, body: dict) -> list:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def chromium(url: str, *args: str, user_dir: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        sys.exit("chromium not found: install it with `make ui-check` (apt-get install chromium)")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", *args, url],
                          capture_output=True, text=True, timeout=180)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "ui_deployments.png"))
    args = parser.parse_args()
    port = free_port()
    home = tempfile.mkdtemp(prefix="refinery-ui-")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = home
    serve = subprocess.Popen([sys.executable, "-m", "infra.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 400
        names: list[str] = []
        sys.path.insert(0, str(REPO))
        from infra.registry import all_stages

        expected = 1 + len(all_stages())  # the pipeline + one per stage
        while time.time() < deadline:
            try:
                names = [d["name"] for d in api_post(f"{api}/deployments/filter", {})]
                if len(names) >= expected:
                    break
            except OSError:
                pass
            assert serve.poll() is None, "refinery serve exited"
            time.sleep(2)
        print(f"API lists {len(names)} deployments: {', '.join(sorted(names))}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as user_dir:
            chromium(f"http://127.0.0.1:{port}/deployments", f"--screenshot={out}", user_dir=user_dir)
            dom = chromium(f"http://127.0.0.1:{port}/deployments", "--dump-dom", user_dir=user_dir).stdout
            # the custom-run form of one stage deployment: generated from the stage's typed parameters
            deployments = api_post(f"{api}/deployments/filter", {})
            heuristics = next((d for d in deployments if d["name"] == "refinery-heuristics"), None)
            if heuristics:
                form = out.with_name(out.stem + "_heuristics_form.png")
                chromium(f"http://127.0.0.1:{port}/deployments/deployment/{heuristics['id']}/run",
                         f"--screenshot={form}", user_dir=user_dir)
                print(f"run form screenshot: {form}")
        visible = sorted({n for n in names if n in dom})
        print(f"screenshot: {out} ({out.stat().st_size if out.exists() else 0} bytes)")
        print(f"deployments named in the rendered page: {', '.join(visible) or 'none'}")
        print(f"deployments_visible {len(visible)}")
        return 0 if visible else 1
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
