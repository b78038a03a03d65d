"""Bit-identical reruns: recomputing a curation stage in a new process (its own JVM, as the Prefect
task runs it) gives outputs with the same content hashes, so a downstream stage of the new run
reuses the earlier run's result instead of recomputing it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.runstore import read_manifest

REPO = Path(__file__).resolve().parent.parent
INPUTS = ["tests/data/warc", "tests/data/curation/whirlwind.warc.wet.gz"]
RECOMPUTED = ("ingest", "extract", "langid")


def _run(config_json: Path, stage: str, run_id: str, *extra: str) -> dict:
    """One stage in a child process (``python -m flows.stage_process``); returns its manifest."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "flows.stage_process", "--stage", stage, "--run-id", run_id, "--config-json", str(config_json), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = json.loads(config_json.read_text())["run_root"]
    return read_manifest(Path(root), run_id, stage)


def _hashes(manifest: dict) -> dict:
    return {name: out["hash"] for name, out in manifest["outputs"].items()}


@pytest.mark.slow
def test_forced_recomputation_gives_equal_hashes_and_downstream_hits_the_cache(make_config, tmp_path):
    config = make_config({"ingest.input_paths": INPUTS, "langid.languages": ["en"]})
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(config.model_dump(mode="json")))
    first = {name: _run(config_json, name, "r1") for name in (*RECOMPUTED, "heuristics")}
    timing = first["extract"]["metrics"]  # wall time is a metric, not a column
    assert 0 < timing["extract_seconds_max"] <= timing["extract_seconds_total"]
    for name in RECOMPUTED:
        again = _run(config_json, name, "r2", "--force")
        assert again["cached_from"] is None and "/r2/" in again["outputs"]["data"]["path"]  # really recomputed
        assert _hashes(again) == _hashes(first[name]), name
        assert again["cache_key"] == first[name]["cache_key"]
    downstream = _run(config_json, "heuristics", "r2")
    assert downstream["cached_from"] == "r1/heuristics"
    assert _hashes(downstream) == _hashes(first["heuristics"])
    # the reused stage does not claim the computing run's signal-cache miss, and the diff says "same"
    assert first["heuristics"]["metrics"]["signals_cache"] == "miss" and "signals_cache" not in downstream["metrics"]
    from flows.registry import execution_metrics
    from infra.lineage import LineageCatalog, diff_runs

    root = Path(json.loads(config_json.read_text())["run_root"])
    lines = diff_runs(LineageCatalog(root), "r1", "r2", execution_metrics())
    assert lines[0] == "r1 vs r2: no differences (reused): 4 stage(s) run in both have the same content", lines
    assert "heuristics: same content (r1: computed, r2: reused from r1/heuristics)" in lines
