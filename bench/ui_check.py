"""Headless-browser check of what a user does in the Prefect UI served by `refinery serve`.

Starts `refinery serve` (own PREFECT_HOME, run root in a temp dir, free ports) and drives Debian's
Chromium with selenium:
  0. the UI asks for the password `refinery serve` generated (PREFECT_HOME/refinery-api-auth); it is typed
     into the login form (API calls of this script send it too, with a CSRF token);
  1. the deployments page lists the pipeline and every stage deployment;
  2. the `stage-ingest` custom-run form is opened and submitted untouched; the run must complete
     and resolve to exactly the served config (no lineage diff);
  3. a pipeline run (ingest only) shows its summary artifact on the parent run, named after the run id;
  4. the lineage explorer shows the run's graph;
  5. a two-arm sweep started from the `refinery-sweep` deployment completes, ingest reused by both arms.
  6. an untouched rerun of ingest: the explorer's diff says "no differences";
  7. the run summary artifact's "report (charts)" link opens the report (served by the explorer);
  8. a pipeline run with a bad override: named after its run id, Failed with the reason as its state message and
     as its first ERROR line (Prefect's runner adds its own "Engine execution exited" line and traceback);
  9. a `curation` pipeline run, then a trace from the tokenize page's shard list to a WARC record.
Screenshots go to --out-dir (default bench/out/ui). Needs chromium + chromium-driver (`make ui-check`).

    python bench/ui_check.py [--out-dir bench/out/ui]

Last line: `ui_checks_passed <n>/9`.
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
CHECKS = 9
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


API_HEADERS: dict[str, str] = {}  # the served API's password and a CSRF token, as Prefect's client sends them


def api_login(api: str, home: Path) -> bool:
    """Read the password `refinery serve` generated into its PREFECT_HOME and fetch a CSRF token."""
    import base64
    import uuid

    path = home / "refinery-api-auth"
    if not path.exists():
        return False
    auth = "Basic " + base64.b64encode(path.read_text().strip().encode()).decode()
    client = str(uuid.uuid4())
    req = urllib.request.Request(f"{api}/csrf-token?client={client}", headers={"Authorization": auth})
    with urllib.request.urlopen(req, timeout=30) as resp:
        token = json.loads(resp.read())["token"]
    API_HEADERS.update({"Authorization": auth, "Prefect-Csrf-Token": token, "Prefect-Csrf-Client": client})
    return True


def api_post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **API_HEADERS})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        sys.exit("chromium / chromedriver not found: `make ui-check` installs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1440,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(predicate, timeout: float, what: str, every: float = 2.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
        except OSError:  # the API answered too slowly (a busy 2-core machine): ask again
            value = None
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def flow_runs(api: str) -> list[dict]:
    return api_post(f"{api}/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 50})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "out" / "ui"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    port, explorer_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="refinery-ui-"))
    run_root = work / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    env["PREFECT_HOME"] = str(work / "prefect")
    overrides = [f"run_root={run_root}", "spark.master=local[2]"]
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--explorer-port", str(explorer_port),
         *(a for o in overrides for a in ("-o", o))],
        cwd=REPO, env=env, stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT)
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    passed = 0
    driver = None
    try:
        from selenium.webdriver.common.by import By

        from flows.registry import all_stages, load_config
        from infra.config import DEFAULT_CONFIG

        expected = 2 + len(all_stages())  # the pipeline, the sweep and one per stage

        def deployments() -> list[dict]:
            try:
                found = api_post(f"{api}/deployments/filter", {})
            except OSError:
                return []
            return found if len(found) >= expected else []

        wait_for(lambda: api_login(api, work / "prefect"), 300, "the API password written by `refinery serve`")
        deps = {d["name"]: d for d in wait_for(deployments, 400, "the served deployments")}
        driver = browser()

        # 0. log in as a user does: the UI asks for the password `refinery serve` printed
        driver.get(f"{ui}/deployments")
        field = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "input[type=password]"), 60, "the login form")[0]
        driver.save_screenshot(str(out / "0-login.png"))
        field.send_keys((work / "prefect" / "refinery-api-auth").read_text().strip())
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Login").click()
        wait_for(lambda: "/login" not in driver.current_url, 60, "the UI past its login page")

        # 1. deployments page
        driver.get(f"{ui}/deployments")
        wait_for(lambda: "Deployments" in driver.page_source and "refinery-" in driver.page_source, 60,
                 "the deployments page")
        time.sleep(2)
        driver.save_screenshot(str(out / "1_deployments.png"))
        counted = f"{expected} Deployments" in driver.page_source  # the list is paginated (10 a page)
        print(f"1. deployments page: '{expected} Deployments' shown: {counted} -> {out / '1_deployments.png'}")
        passed += counted

        # 2. custom run of stage-ingest, form untouched
        before = {r["id"] for r in flow_runs(api)}
        driver.get(f"{ui}/deployments/deployment/{deps['stage-ingest']['id']}/run")
        wait_for(lambda: driver.find_elements(By.XPATH, "//button[normalize-space()='Submit']"), 60, "the run form")
        time.sleep(2)
        driver.save_screenshot(str(out / "2_ingest_custom_run_form.png"))
        driver.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()
        new = wait_for(lambda: [r for r in flow_runs(api) if r["id"] not in before], 60, "the submitted run")[0]
        done = wait_for(lambda: next((r for r in flow_runs(api) if r["id"] == new["id"]
                                      and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")), None),
                        600, "the submitted run to finish", every=5)
        driver.get(f"{ui}/runs/flow-run/{done['id']}")
        time.sleep(4)
        driver.save_screenshot(str(out / "2_ingest_run.png"))
        run_id = done["name"].split("/")[0]
        manifest = json.loads((run_root / run_id / "ingest" / "manifest.json").read_text())
        served = load_config(DEFAULT_CONFIG, [*overrides])
        same = manifest["config"] == served.ingest.model_dump(mode="json")
        print(f"2. untouched ingest form -> run {done['name']} {done['state_type']}; "
              f"config {'equals' if same else 'DIFFERS FROM'} the served config")
        passed += done["state_type"] == "COMPLETED" and same

        # 3. a pipeline run: named after the run id, summary artifact on the parent
        body = {"parameters": {"stages": ["ingest"], "run_id": "ui-check-run"}}
        parent = api_post(f"{api}/deployments/{deps['refinery-pipeline']['id']}/create_flow_run", body)
        finished = wait_for(lambda: next((r for r in flow_runs(api) if r["id"] == parent["id"]
                                          and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")), None),
                            600, "the pipeline run", every=5)
        driver.get(f"{ui}/runs/flow-run/{parent['id']}?tab=Artifacts")
        time.sleep(5)
        driver.save_screenshot(str(out / "3_pipeline_run_artifacts.png"))
        arts = api_post(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": ["refinery-run-summary"]}}})
        ok = finished["state_type"] == "COMPLETED" and finished["name"] == "ui-check-run" and bool(arts)
        if arts:
            driver.get(f"{ui}/artifacts/artifact/{arts[0]['id']}")
            time.sleep(4)
            driver.save_screenshot(str(out / "3_run_summary_artifact.png"))
        print(f"3. pipeline run {finished['name']} {finished['state_type']}; run summary artifact: {bool(arts)}")
        passed += ok

        # 4. the lineage explorer
        driver.get(f"http://127.0.0.1:{explorer_port}/run/ui-check-run")
        nodes = driver.find_elements(By.CSS_SELECTOR, "svg g.node")
        driver.save_screenshot(str(out / "4_explorer_run.png"))
        print(f"4. lineage explorer: {len(nodes)} nodes in the run's graph")
        passed += len(nodes) >= 2

        # 5. a small sweep from the refinery-sweep deployment (what its Run form submits)
        body = {"parameters": {"axes": {"extract.timeout_s": [5, 10]}, "stages": ["ingest", "extract"],
                               "parallel": 2, "name": "ui-sweep"}}
        sweep_run = api_post(f"{api}/deployments/{deps['refinery-sweep']['id']}/create_flow_run", body)
        finished = wait_for(lambda: next((r for r in flow_runs(api) if r["id"] == sweep_run["id"]
                                          and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")), None),
                            900, "the sweep run", every=5)
        summary = json.loads((run_root / "sweeps" / "ui-sweep" / "sweep.json").read_text()) \
            if (run_root / "sweeps" / "ui-sweep" / "sweep.json").is_file() else {}
        driver.get(f"{ui}/runs/flow-run/{sweep_run['id']}")
        time.sleep(4)
        driver.save_screenshot(str(out / "5_sweep_run.png"))
        ok = finished["state_type"] == "COMPLETED" and len(summary.get("arms", [])) == 2
        print(f"5. sweep from the UI deployment: {finished['state_type']}, arms {len(summary.get('arms', []))}, "
              f"stage executions {summary.get('stage_executions')}")
        passed += ok

        def finish(flow_run_id: str, what: str, timeout: float = 900) -> dict:
            return wait_for(lambda: next((r for r in flow_runs(api) if r["id"] == flow_run_id and r["state_type"]
                                          in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")), None),
                            timeout, what, every=5)

        explorer = f"http://127.0.0.1:{explorer_port}"
        # 6. an untouched rerun of ingest on the run of step 2: the explorer's diff says nothing differs
        rerun = api_post(f"{api}/deployments/{deps['stage-ingest']['id']}/create_flow_run",
                         {"parameters": {"run_id": "ui-rerun"}})
        finish(rerun["id"], "the untouched rerun")
        driver.get(f"{explorer}/diff?a={run_id}&b=ui-rerun")
        time.sleep(1)
        driver.save_screenshot(str(out / "6_diff_untouched_rerun.png"))
        summary_line = driver.find_element(By.CSS_SELECTOR, ".diff-summary").text
        ok = summary_line.startswith("no differences")
        print(f"6. diff of the untouched rerun: '{summary_line}'")
        passed += ok

        # 7. the run summary artifact's report link opens the report
        driver.get(f"{ui}/artifacts/artifact/{arts[0]['id']}") if arts else None
        link = wait_for(lambda: driver.find_elements(By.PARTIAL_LINK_TEXT, "report (charts)"), 60, "the report link")[0]
        href = link.get_attribute("href")
        driver.get(href)
        time.sleep(1)
        driver.save_screenshot(str(out / "7_report_from_artifact.png"))
        ok = href.startswith(explorer) and driver.title.startswith("Refinery report")
        print(f"7. report link in the run summary artifact: {href} -> '{driver.title}'")
        passed += ok

        # 8. a bad override: a named, failed run with one ERROR line and no traceback
        bad = api_post(f"{api}/deployments/{deps['refinery-pipeline']['id']}/create_flow_run",
                       {"parameters": {"stages": ["ingest"], "run_id": "ui-bad-override",
                                       "overrides": {"ingest.no_such_key": 1}}})
        bad = finish(bad["id"], "the run with a bad override")
        logs = api_post(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [bad["id"]]}}, "sort": "TIMESTAMP_ASC"})
        errors = [entry["message"] for entry in logs if entry["level"] >= 40]
        # Prefect's runner ends every failed deployment run with its own line (and the FailedRun traceback)
        ours = [e for e in errors if not e.startswith("Engine execution exited with unexpected exception")]
        driver.get(f"{ui}/runs/flow-run/{bad['id']}")
        time.sleep(4)
        driver.save_screenshot(str(out / "8_bad_override_run.png"))
        ok = (bad["state_type"] == "FAILED" and bad["name"] == "ui-bad-override" and len(ours) == 1
              and errors[0] == ours[0] and bad["state"]["message"] == ours[0])
        print(f"8. bad override: run {bad['name']} {bad['state_type']}, state message {bad['state']['message']!r}; "
              f"Refinery's ERROR lines: {len(ours)}, Prefect runner's: {len(errors) - len(ours)}")
        passed += ok

        # 9. curation to token shards, then a trace from the tokenize page's shard list
        cur = api_post(f"{api}/deployments/{deps['refinery-pipeline']['id']}/create_flow_run",
                       {"parameters": {"stages": ["curation"], "run_id": "ui-curation"}})
        cur = finish(cur["id"], "the curation run", timeout=1500)
        driver.get(f"{explorer}/stage/ui-curation/tokenize")
        shard_links = driver.find_elements(By.CSS_SELECTOR, "a[href^='/trace?']")
        if shard_links:
            shard_links[0].click()
            time.sleep(1)
        driver.save_screenshot(str(out / "9_trace_from_shard_list.png"))
        ok = cur["state_type"] == "COMPLETED" and bool(shard_links) and "WARC record" in driver.page_source
        print(f"9. curation run {cur['state_type']}; {len(shard_links)} shard links; trace page names a WARC record: "
              f"{'WARC record' in driver.page_source}")
        passed += ok
    finally:
        if driver is not None:
            driver.quit()
        serve.terminate()
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
        print(f"serve log: {work / 'serve.log'}")
    print(f"ui_checks_passed {passed}/{CHECKS}")
    return 0 if passed == CHECKS else 1


if __name__ == "__main__":
    sys.exit(main())
