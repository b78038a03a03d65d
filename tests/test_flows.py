"""Prefect: typed stage flows, the pipeline flow (skip on rerun, logs streamed, artifacts), and
deployments served by `refinery serve` that a UI/API call can launch."""

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_stage_flow_form_is_generated_from_the_stage_config():
    from flows.stages import STAGE_FLOWS

    schema = STAGE_FLOWS["ingest"].parameters.model_dump()
    props = schema["properties"]
    assert {"run_id", "from_run", "config_file", "params", "overrides", "force"} <= set(props)
    ingest_def = schema["definitions"]["IngestConfig"]["properties"]
    assert ingest_def["max_record_bytes"]["default"] == 50_000_000
    assert "WARC" in ingest_def["input_paths"]["description"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    previous = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    with prefect_test_harness(server_startup_timeout=240):
        yield
    if previous is None:
        os.environ.pop("PREFECT_HOME")
    else:
        os.environ["PREFECT_HOME"] = previous


@pytest.mark.slow
def test_paths_with_a_space_a_hash_a_quote_and_non_ascii_run_through_the_pipeline(harness, tmp_path):
    """Input folder and run root with characters a file URI percent-encodes: the stages run, their assets
    are published under percent-free keys (the exact URI in the metadata), and a rerun skips them."""
    import json
    import shutil

    from flows.pipeline import pipeline
    from flows.stages import asset_key
    from prefect.types.names import validate_valid_asset_key

    inputs = tmp_path / "crawl #1 'ü'"
    inputs.mkdir()
    shutil.copy(REPO / "tests" / "data" / "warc" / "whirlwind.warc.gz", inputs / "whirl wind.warc.gz")
    root = tmp_path / "rüns & \"runs\""
    overrides = {"run_root": str(root), "spark.master": "local[1]", "ingest.input_paths": [str(inputs)]}
    first = pipeline(stages=["ingest", "extract"], run_id="odd-paths", overrides=overrides)
    assert {s["status"] for s in first["stages"].values()} == {"completed"}
    manifest = (root / "odd-paths" / "extract" / "manifest.json").read_text()
    assert json.loads(manifest)["metrics"]["kept"] > 0
    for uri in re.findall(r'"uri": "([^"]+)"', manifest):
        assert validate_valid_asset_key(asset_key(uri))
    again = pipeline(stages=["ingest", "extract"], run_id="odd-paths", overrides=overrides)
    assert {s["status"] for s in again["stages"].values()} == {"skipped"}


@pytest.mark.slow
def test_pipeline_runs_ingest_then_skips_it_and_publishes_artifacts(harness, tmp_path, monkeypatch, capsys):
    from prefect.client.orchestration import get_client

    import flows.cli
    import flows.stages
    from flows import registry
    from flows.pipeline import pipeline
    from flows.stages import StageFailed

    loads = []
    monkeypatch.setattr(flows.stages, "load_config", lambda *a, **k: loads.append(a) or registry.load_config(*a, **k))
    overrides = {"run_root": str(tmp_path / "runs"), "spark.master": "local[2]"}
    first = pipeline(stages=["ingest"], overrides=overrides)
    assert first["stages"]["ingest"]["status"] == "completed"
    assert len(loads) == 1  # the pipeline validates the config once; its stages get that object
    monkeypatch.setattr(flows.cli, "load_config", lambda *a, **k: loads.append(a) or registry.load_config(*a, **k))
    assert flows.cli.main(["run", "--stages", "ingest", "--run-id", first["run_id"],
                           *(f"-o{k}={v}" for k, v in overrides.items())]) == 0  # the CLI: the same pipeline flow
    assert re.search(r"ingest\s+skipped", capsys.readouterr().out)
    assert len(loads) == 2  # the CLI validated once and handed its object to the pipeline
    other = pipeline(stages=["ingest"], overrides=overrides)
    assert other["stages"]["ingest"]["status"] == "reused"

    async def read():
        async with get_client() as client:
            arts = await client.read_artifacts()
            logs = await client.read_logs()
            return arts, logs

    import asyncio

    artifacts, logs = asyncio.run(read())
    assert {a.key for a in artifacts} >= {"ingest-funnel", "ingest-summary"}
    assert any("refinery.ingest: stage ingest: done" in log.message for log in logs)  # child output streamed
    missing = str(tmp_path / "missing")
    with pytest.raises(StageFailed, match="does not exist") as failed:
        pipeline(stages=["ingest"], overrides={**overrides, "ingest.input_paths": [missing]})
    assert failed.value.reason.startswith("stage 'ingest' failed (exit 2): error: ")
    assert "last log lines:" in str(failed.value)  # the flow run's state message in the UI
    # refused before anything starts (a from_run that does not exist, a bad override): named and tagged by
    # its run id, one ERROR line, a failure artifact, the reason as the state message, no traceback
    from prefect.exceptions import FailedRun

    with pytest.raises(FailedRun, match="from_run 'nope': run 'nope' does not exist"):
        pipeline(stages=["ingest"], overrides=overrides, from_run="nope", run_id="refused-1")
    with pytest.raises(FailedRun, match="config error"):
        pipeline(stages=["ingest"], overrides={**overrides, "ingest.no_such_key": 1}, run_id="refused-2")

    async def failure_shown():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            return {a.key: a for a in await client.read_artifacts()}, runs, await client.read_logs()

    artifacts, runs, _ = asyncio.run(failure_shown())
    artifact = artifacts["ingest-failure"]
    assert "**Reason:** error: " in artifact.data and "does not exist" in artifact.data
    assert "## Last" in artifact.data and "```" in artifact.data  # the stage process's last log lines
    assert "**Reason:** from_run 'nope'" in artifacts["pipeline-failure"].data or \
        "**Reason:** config error" in artifacts["pipeline-failure"].data
    refused = {r.name: r for r in runs if r.name in ("refused-1", "refused-2")}
    assert set(refused) == {"refused-1", "refused-2"}
    assert all(r.state.is_failed() and "run:" + r.name in r.tags for r in refused.values())
    assert "does not exist" in refused["refused-1"].state.message
    assert refused["refused-2"].state.message.startswith("config error")
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def refused_logs():
        async with get_client() as client:
            flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in refused.values()]))
            return await client.read_logs(log_filter=flt, limit=200)

    deadline = time.time() + 60  # run logs reach the server in batches, after the run has ended
    found = asyncio.run(refused_logs())
    while sum(log.level >= 40 for log in found) < 2 and time.time() < deadline:
        time.sleep(1)
        found = asyncio.run(refused_logs())
    assert sum(log.level >= 40 for log in found) == 2  # one ERROR line each
    assert not any("Traceback" in log.message for log in found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One `refinery serve` for the tests below (starting a server and registering 23 deployments takes a
# minute): short scheduler and runner loops for the schedule and cancel tests, and one flow run at a time
# per worker (`--limit 1`), so two workers (the two-worker test) each take one of runs created at once.
SERVE_ENV = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}


def _serve_cmd(port: int, explorer_port: int, runs: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--explorer-port", str(explorer_port),
            "--limit", "1", "-o", f"run_root={runs}", "-o", "spark.master=local[2]"]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`refinery serve -o run_root=TMP` in a subprocess: api and explorer urls, its log, pid, port and run root."""
    from types import SimpleNamespace

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from infra.prefect_server import healthy

    root = tmp_path_factory.mktemp("served")
    port, explorer_port = _free_port(), _free_port()
    auth = f"refinery:{secrets.token_urlsafe(12)}"  # what a worker on another home is given
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), **SERVE_ENV, "PREFECT_API_AUTH_STRING": auth}
    env.pop("PREFECT_API_URL", None)
    serve_log = root / "serve.log"
    serve = subprocess.Popen(_serve_cmd(port, explorer_port, root / "runs"), cwd=REPO, env=env,
                             stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 300
        while not healthy(api):
            assert serve.poll() is None, serve_log.read_text()
            assert time.time() < deadline, "server did not start"
            time.sleep(2)
        # talk to the served server, not a harness another test of this module may have left active
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}):
            yield SimpleNamespace(api=api, explorer=f"http://127.0.0.1:{explorer_port}", log=serve_log,
                                  pid=serve.pid, root=root, runs=root / "runs", auth=auth)
    finally:
        _stop(serve)


def _wait_for_deployment(name: str, serve_log: Path):
    from prefect.client.orchestration import get_client

    deadline = time.time() + 400
    while True:  # deployments appear once `serve` has registered them
        try:
            with get_client(sync_client=True) as client:
                return client.read_deployment_by_name(name)
        except Exception as exc:  # ObjectNotFound until serve has registered the deployments
            assert time.time() < deadline, f"deployments were not registered: {exc}\n{serve_log.read_text()}"
            time.sleep(3)


@pytest.mark.slow
def test_served_flow_refuses_jvm_options_and_another_config_file_from_the_api(server):
    """The security review's attack: a flow run created through the API with JVM options that run a shell
    command (and one with another config file) fails with one line before any stage starts."""
    from prefect.deployments import run_deployment

    _wait_for_deployment("ingest/stage-ingest", server.log)
    marker = server.root / "PWNED"
    attack = {"run_root": str(server.runs), "spark.conf": {
        "spark.driver.extraJavaOptions": f"-Xmx2m -XX:OnOutOfMemoryError=touch {marker}"}}
    run = run_deployment("ingest/stage-ingest", timeout=600,
                         parameters={"run_id": "ui-pwn", "force": True, "overrides": attack})
    assert run.state.is_failed() and "cannot be set from a flow parameter" in run.state.message, run.state
    secret = server.root / "secret.yaml"
    secret.write_text("API_TOKEN: [sk-live-0123\n")
    other = run_deployment("ingest/stage-ingest", timeout=600,
                           parameters={"run_id": "ui-secret", "config_file": str(secret)})
    assert other.state.is_failed() and "reads its config_file from" in other.state.message, other.state
    assert "sk-live" not in other.state.message
    assert not marker.exists() and not (server.runs / "ui-pwn").exists()


@pytest.mark.slow
def test_the_served_api_refuses_requests_without_the_password_or_from_another_host(server):
    """The security review's first finding: one cross-origin POST without the credential ran a flow. Now
    it is refused (Prefect's CSRF check answers first: 403; auth: 401), as is any request whose Host header
    is not the server's (DNS rebinding: 400), on the API and the explorer alike; CORS names only the UI's
    origin. With the password a client reads the deployments."""
    import base64
    import urllib.error
    import urllib.request

    from prefect.client.orchestration import get_client

    deployment = _wait_for_deployment("ingest/stage-ingest", server.log)
    port = server.api.split(":")[-1].split("/")[0]

    def status(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers)

    with get_client(sync_client=True) as client:
        runs_before = len(client.read_flow_runs(limit=200))
    attack = {"Origin": "http://evil.example", "Content-Type": "application/json"}
    code, _ = status(f"{server.api}/deployments/{deployment.id}/create_flow_run", "POST", attack, b"{}")
    assert code in (401, 403)
    basic = "Basic " + base64.b64encode(server.auth.encode()).decode()
    assert status(f"{server.api}/deployments/filter", "POST", {**attack, "X-CSRF-Token": "x"}, b"{}")[0] in (401, 403)
    assert status(f"{server.api}/flows/filter", "POST", {"Content-Type": "application/json", "Authorization": "Basic eDp5"},
                  b"{}")[0] in (401, 403)
    assert status(f"{server.api}/health", headers={"Host": f"rebound.example:{port}"})[0] == 400
    assert status(f"{server.explorer}/", headers={"Host": "rebound.example"})[0] == 400
    assert status(f"{server.explorer}/")[0] == 200
    _, preflight = status(f"{server.api}/flows/filter", "OPTIONS",
                          {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST", "Authorization": basic})
    assert preflight.get("access-control-allow-origin") in (None, "")
    _, preflight = status(f"{server.api}/flows/filter", "OPTIONS",
                          {"Origin": f"http://127.0.0.1:{port}", "Access-Control-Request-Method": "POST"})
    assert preflight.get("access-control-allow-origin") == f"http://127.0.0.1:{port}"
    with get_client(sync_client=True) as client:  # the fixture's settings carry the password
        assert len(client.read_flow_runs(limit=200)) == runs_before  # the refused POST created no run


@pytest.mark.slow
def test_served_deployments_run_pipeline_and_single_stage_rerun(server):
    """What the UI does: create flow runs of the served deployments through the API."""
    import json
    import urllib.request

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.registry import load_config
    from infra.config import DEFAULT_CONFIG

    _wait_for_deployment("pipeline/refinery-pipeline", server.log)
    # `serve -o run_root=...` is honoured: no overrides passed here
    run = run_deployment("pipeline/refinery-pipeline", timeout=600, parameters={"stages": ["ingest"], "run_id": "ui-run"})
    assert run.state.is_completed(), run.state
    assert (server.runs / "ui-run" / "ingest" / "manifest.json").is_file()
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(run.id)
        children = client.read_flow_runs()
        artifacts = client.read_artifacts()
    assert parent.name == "ui-run" and "run:ui-run" in parent.tags
    assert any(r.name == "ui-run/ingest" and "stage:ingest" in r.tags for r in children)
    summary = [a for a in artifacts if a.key == "refinery-run-summary"]
    assert summary and "ingest" in summary[0].data and f"{server.explorer}/run/ui-run" in summary[0].data

    # the stage form untouched (deployment defaults): exactly the served config, nothing reset
    untouched = run_deployment("ingest/stage-ingest", timeout=600, parameters={"run_id": "ui-untouched", "force": True})
    assert untouched.state.is_completed(), untouched.state
    manifest = json.loads((server.runs / "ui-untouched" / "ingest" / "manifest.json").read_text())
    served_config = load_config(DEFAULT_CONFIG, {"run_root": str(server.runs), "spark.master": "local[2]"})
    assert manifest["config"] == served_config.ingest.model_dump(mode="json")

    # a partial edit merges into the section
    rerun = run_deployment("ingest/stage-ingest", timeout=600, parameters={
        "run_id": "ui-rerun", "from_run": "ui-run", "params": {"max_record_bytes": 100000}, "force": True,
    })
    assert rerun.state.is_completed(), rerun.state
    manifest = json.loads((server.runs / "ui-rerun" / "ingest" / "manifest.json").read_text())
    assert manifest["config"] == {**served_config.ingest.model_dump(mode="json"), "max_record_bytes": 100000}
    assert manifest["metrics"]["drop_reasons"].get("too_large", 0) >= 1
    page = urllib.request.urlopen(f"{server.explorer}/run/ui-rerun", timeout=30).read().decode()
    assert "<svg" in page and "ui-rerun/ingest" in page


@pytest.mark.slow
def test_a_schedule_added_like_the_ui_does_fires_and_the_run_completes(server):
    """Prefect's scheduler (real server, short loop) creates a run from an interval schedule with a
    parameter override, and the served deployment runs it to completion."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule

    deployment = _wait_for_deployment("pipeline/refinery-pipeline", server.log)
    with get_client(sync_client=True) as client:
        saved = time.time()  # "Save schedule"
        [schedule] = client.create_deployment_schedules(
            deployment.id, [(IntervalSchedule(interval=timedelta(seconds=5)), True)],
            parameters={"stages": ["ingest"]},
        )
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        started = None
        deadline = time.time() + 420
        while True:
            runs = [r for r in client.read_flow_runs(deployment_filter=only_this) if r.auto_scheduled]
            if started is None and any(r.state and not r.state.is_scheduled() for r in runs):
                started = time.time()  # one run is under way: stop further ones piling up
                client.update_deployment_schedule(deployment.id, schedule.id, active=False)
            done = [r for r in runs if r.state and r.state.is_completed()]
            if done:
                break
            assert not [r for r in runs if r.state and r.state.is_final()], [r.state for r in runs]
            assert time.time() < deadline, f"no scheduled run completed; serve log:\n{server.log.read_text()[-3000:]}"
            time.sleep(2)
        # leave the shared server without this test's schedule or runs it created but never started
        client.delete_deployment_schedule(deployment.id, schedule.id)
        for r in client.read_flow_runs(deployment_filter=only_this):
            if r.auto_scheduled and r.state and r.state.is_scheduled():
                client.delete_flow_run(r.id)
    print(f"schedule saved -> scheduled run completed: {time.time() - saved:.0f} s "
          f"(run started after {started - saved:.0f} s)")
    assert done[0].parameters["stages"] == ["ingest"]
    run_id = done[0].name
    assert (server.runs / run_id / "ingest" / "manifest.json").is_file()
    assert "InvalidRequestError" not in server.log.read_text()


def _stage_processes(root_pid: int) -> list:
    """Stage processes (``python -m flows.stage_process``) among a serve process's descendants."""
    import psutil

    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if "flows.stage_process" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_cancelling_a_run_from_the_ui_stops_the_stage_process_tree(server):
    """Cancel (what the UI's Cancel button does): the served flow run's stage process, Spark's JVM and its
    workers stop within seconds, and the stage leaves no temp dir and no manifest."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    deployment = _wait_for_deployment("ingest/stage-ingest", server.log)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"run_id": "c1", "force": True})

        def stage_tree():
            found = []
            for p in _stage_processes(server.pid):
                try:
                    found += [p, *p.children(recursive=True)]
                except psutil.Error:
                    pass
            return found

        deadline = time.time() + 300
        while not any("java" in p.name() for p in stage_tree()):
            assert time.time() < deadline, f"the stage never started\n{server.log.read_text()[-2000:]}"
            time.sleep(0.5)
        tree = stage_tree()
        cancelled_at = time.time()
        client.set_flow_run_state(run.id, State(type=StateType.CANCELLING), force=True)
        gone, alive = psutil.wait_procs(tree, timeout=60)
        stopped_after = time.time() - cancelled_at
        assert not alive, [" ".join(p.cmdline()[:3]) for p in alive]
        deadline = time.time() + 60
        while client.read_flow_run(run.id).state.type != StateType.CANCELLED:
            assert time.time() < deadline, client.read_flow_run(run.id).state
            time.sleep(1)
    print(f"cancel -> stage process tree gone in {stopped_after:.1f} s")
    assert not list((server.runs / "c1").glob(".tmp-*"))
    assert not (server.runs / "c1" / "ingest" / "manifest.json").exists()


@pytest.mark.slow
def test_two_serve_workers_take_one_run_each_and_every_run_completes_once(server):
    """A second `refinery serve` on the same server (PREFECT_API_URL) is a second worker for the same
    deployments. Each takes at most one flow run at a time (`--limit 1`), so of three runs
    created at once each worker takes one and the third waits; every run completes exactly once, on one
    worker, and the lineage catalog stays consistent."""
    from catalog_checks import assert_catalog_consistent
    from prefect.client.orchestration import get_client

    from infra.runstore import read_manifest

    env = {**os.environ, "PREFECT_HOME": str(server.root / "prefect2"), **SERVE_ENV, "PREFECT_API_URL": server.api,
           "PREFECT_API_AUTH_STRING": server.auth}
    log = server.root / "serve2.log"
    second = subprocess.Popen(_serve_cmd(0, 0, server.runs), cwd=REPO, env=env, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT)
    try:
        deployment = _wait_for_deployment("ingest/stage-ingest", server.log)
        deadline = time.time() + 300
        while "serving" not in log.read_text():  # the second worker has registered the deployments
            assert second.poll() is None, log.read_text()
            assert time.time() < deadline, log.read_text()
            time.sleep(1)
        time.sleep(10)  # the second runner has registered its deployments and polls
        run_ids = ["w1", "w2", "w3"]
        with get_client(sync_client=True) as client:
            flow_runs = {rid: client.create_flow_run_from_deployment(
                deployment.id, parameters={"run_id": rid, "force": True}).id for rid in run_ids}
            ran_on: dict[str, set] = {rid: set() for rid in run_ids}  # run id -> the workers whose stage process ran it
            deadline = time.time() + 600
            while True:
                for worker, pid in (("first", server.pid), ("second", second.pid)):
                    for proc in _stage_processes(pid):
                        try:
                            cmd = proc.cmdline()
                        except Exception:
                            continue
                        rid = cmd[cmd.index("--run-id") + 1]
                        if rid in ran_on:
                            ran_on[rid].add(worker)
                states = {rid: client.read_flow_run(fid).state for rid, fid in flow_runs.items()}
                if all(s and s.is_final() for s in states.values()):
                    break
                assert time.time() < deadline, {rid: s.type for rid, s in states.items()}
                time.sleep(0.5)
            runs_of = {rid: client.read_flow_run(fid) for rid, fid in flow_runs.items()}
    finally:
        _stop(second)
    print("runs per worker:", {rid: sorted(w) for rid, w in ran_on.items()})
    assert all(r.state.is_completed() for r in runs_of.values()), {rid: r.state for rid, r in runs_of.items()}
    assert all(r.run_count == 1 for r in runs_of.values())  # no run was started twice
    assert all(len(w) == 1 for w in ran_on.values()), ran_on  # each ran on exactly one worker
    assert {w for ws in ran_on.values() for w in ws} == {"first", "second"}, ran_on
    manifests = {rid: read_manifest(server.runs, rid, "ingest") for rid in run_ids}  # verifies files and sizes
    assert not list(server.runs.glob("w*/.tmp-*"))
    assert len({m["outputs"]["data"]["hash"] for m in manifests.values()}) == 1  # same content on either worker
    assert_catalog_consistent(server.runs, manifests)
