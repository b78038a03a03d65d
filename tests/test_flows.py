"""Prefect: typed stage flows, the pipeline flow (skip on rerun, logs streamed, artifacts), and
deployments served by `refinery serve` that a UI/API call can launch."""

import contextlib
import os
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
def test_pipeline_runs_ingest_then_skips_it_and_publishes_artifacts(harness, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline
    from flows.stages import StageFailed

    overrides = {"run_root": str(tmp_path / "runs"), "spark.master": "local[2]"}
    first = pipeline(stages=["ingest"], overrides=overrides)
    assert first["stages"]["ingest"]["status"] == "completed"
    again = pipeline(stages=["ingest"], overrides=overrides, run_id=first["run_id"])
    assert again["stages"]["ingest"]["status"] == "skipped"
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
    with pytest.raises(StageFailed, match="run 'nope' does not exist"):
        pipeline(stages=["ingest"], overrides=overrides, from_run="nope")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(tmp_path, env_extra: dict | None = None):
    """`refinery serve` in a subprocess with `-o run_root=TMP`; yields (api url, explorer url, serve log, pid)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.prefect_server import healthy

    port, explorer_port = _free_port(), _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), **(env_extra or {})}
    env.pop("PREFECT_API_URL", None)
    serve_log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--explorer-port", str(explorer_port),
         "-o", f"run_root={tmp_path / 'runs'}", "-o", "spark.master=local[2]"],
        cwd=REPO, env=env, stdout=open(serve_log, "w"), stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 300
        while not healthy(api):
            assert serve.poll() is None, serve_log.read_text()
            assert time.time() < deadline, "server did not start"
            time.sleep(2)
        # talk to the served server, not a harness another test of this module may have left active
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield api, f"http://127.0.0.1:{explorer_port}", serve_log, serve.pid
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()


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
def test_served_deployments_run_pipeline_and_single_stage_rerun(tmp_path):
    """What the UI does: create flow runs of the served deployments through the API."""
    import json
    import urllib.request

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.registry import load_config
    from infra.config import DEFAULT_CONFIG

    with served(tmp_path) as (_, explorer, serve_log, _):
        _wait_for_deployment("pipeline/refinery-pipeline", serve_log)
        # `serve -o run_root=...` is honoured: no overrides passed here
        run = run_deployment("pipeline/refinery-pipeline", timeout=600, parameters={"stages": ["ingest"], "run_id": "ui-run"})
        assert run.state.is_completed(), run.state
        assert (tmp_path / "runs" / "ui-run" / "ingest" / "manifest.json").is_file()
        with get_client(sync_client=True) as client:
            parent = client.read_flow_run(run.id)
            children = client.read_flow_runs()
            artifacts = client.read_artifacts()
        assert parent.name == "ui-run" and "run:ui-run" in parent.tags
        assert any(r.name == "ui-run/ingest" and "stage:ingest" in r.tags for r in children)
        summary = [a for a in artifacts if a.key == "refinery-run-summary"]
        assert summary and "ingest" in summary[0].data and f"{explorer}/run/ui-run" in summary[0].data

        # the stage form untouched (deployment defaults): exactly the served config, nothing reset
        untouched = run_deployment("ingest/refinery-ingest", timeout=600, parameters={"run_id": "ui-untouched", "force": True})
        assert untouched.state.is_completed(), untouched.state
        manifest = json.loads((tmp_path / "runs" / "ui-untouched" / "ingest" / "manifest.json").read_text())
        served_config = load_config(DEFAULT_CONFIG, {"run_root": str(tmp_path / "runs"), "spark.master": "local[2]"})
        assert manifest["config"] == served_config.ingest.model_dump(mode="json")

        # a partial edit merges into the section
        rerun = run_deployment("ingest/refinery-ingest", timeout=600, parameters={
            "run_id": "ui-rerun", "from_run": "ui-run", "params": {"max_record_bytes": 100000}, "force": True,
        })
        assert rerun.state.is_completed(), rerun.state
        manifest = json.loads((tmp_path / "runs" / "ui-rerun" / "ingest" / "manifest.json").read_text())
        assert manifest["config"] == {**served_config.ingest.model_dump(mode="json"), "max_record_bytes": 100000}
        assert manifest["metrics"]["drop_reasons"].get("too_large", 0) >= 1
        page = urllib.request.urlopen(f"{explorer}/run/ui-rerun", timeout=30).read().decode()
        assert "<svg" in page and "ui-rerun/ingest" in page


@pytest.mark.slow
def test_a_schedule_added_like_the_ui_does_fires_and_the_run_completes(tmp_path):
    """Prefect's scheduler (real server, short loop) creates a run from an interval schedule with a
    parameter override, and the served deployment runs it to completion."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule

    env = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    with served(tmp_path, env) as (_, _, serve_log, _):
        deployment = _wait_for_deployment("pipeline/refinery-pipeline", serve_log)
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
                assert time.time() < deadline, f"no scheduled run completed; serve log:\n{serve_log.read_text()[-3000:]}"
                time.sleep(2)
        print(f"schedule saved -> scheduled run completed: {time.time() - saved:.0f} s "
              f"(run started after {started - saved:.0f} s)")
        assert done[0].parameters["stages"] == ["ingest"]
        run_id = done[0].name
        assert (tmp_path / "runs" / run_id / "ingest" / "manifest.json").is_file()
        assert "InvalidRequestError" not in serve_log.read_text()


@pytest.mark.slow
def test_cancelling_a_run_from_the_ui_stops_the_stage_process_tree(tmp_path):
    """Cancel (what the UI's Cancel button does): the served flow run's stage process, Spark's JVM and its
    workers stop within seconds, and the stage leaves no temp dir and no manifest."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    env = {"PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    with served(tmp_path, env) as (_, _, serve_log, pid):
        deployment = _wait_for_deployment("ingest/refinery-ingest", serve_log)
        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(deployment.id, parameters={"run_id": "c1", "force": True})

            def stage_tree():
                found = []
                for p in psutil.Process(pid).children(recursive=True):
                    try:
                        if "flows.stage_process" in " ".join(p.cmdline()):
                            found += [p, *p.children(recursive=True)]
                    except psutil.Error:
                        pass
                return found

            deadline = time.time() + 300
            while not any("java" in p.name() for p in stage_tree()):
                assert time.time() < deadline, f"the stage never started\n{serve_log.read_text()[-2000:]}"
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
        assert not list((tmp_path / "runs" / "c1").glob(".tmp-*"))
        assert not (tmp_path / "runs" / "c1" / "ingest" / "manifest.json").exists()
