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


@pytest.mark.slow
def test_served_deployments_run_pipeline_and_single_stage_rerun(tmp_path):
    """What the UI does: create flow runs of the served deployments through the API."""
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    env.pop("PREFECT_API_URL")
    serve_log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "serve", "--port", str(port), "-o", f"run_root={tmp_path / 'runs'}",
         "-o", "spark.master=local[2]"],
        cwd=REPO, env=env, stdout=open(serve_log, "w"), stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"
    stack = contextlib.ExitStack()
    try:
        from infra.prefect_server import healthy

        deadline = time.time() + 300
        while not healthy(api):
            assert serve.poll() is None, serve_log.read_text()
            assert time.time() < deadline, "server did not start"
            time.sleep(2)
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # talk to the served server, not a harness another test of this module may have left active
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api}))

        overrides = {"run_root": str(tmp_path / "runs"), "spark.master": "local[2]"}
        deadline = time.time() + 400
        while True:  # deployments appear once `serve` has registered them
            try:
                run = run_deployment("pipeline/refinery-pipeline", timeout=600,
                                     parameters={"stages": ["ingest"], "overrides": overrides, "run_id": "ui-run"})
                break
            except Exception as exc:  # ObjectNotFound until serve has registered the deployments
                assert serve.poll() is None, serve_log.read_text()
                assert time.time() < deadline, f"deployments were not registered: {exc}"
                time.sleep(3)
        assert run.state.is_completed(), run.state
        assert (tmp_path / "runs" / "ui-run" / "ingest" / "manifest.json").is_file()
        rerun = run_deployment("ingest/refinery-ingest", timeout=600, parameters={
            "run_id": "ui-rerun", "from_run": "ui-run", "overrides": overrides,
            "params": {"input_paths": [str(REPO / "tests/data/warc")], "max_record_bytes": 100000}, "force": True,
        })
        assert rerun.state.is_completed(), rerun.state
        import json

        manifest = json.loads((tmp_path / "runs" / "ui-rerun" / "ingest" / "manifest.json").read_text())
        assert manifest["config"]["max_record_bytes"] == 100000
        assert manifest["metrics"]["drop_reasons"].get("too_large", 0) >= 1
    finally:
        stack.close()
        serve.terminate()
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
