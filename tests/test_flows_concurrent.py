"""Two `refinery run` invocations started at once on one run root (issue 16, part 4): both complete, each
run has its own complete stage, and the lineage catalog holds both, consistently."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_run_root_both_complete(tmp_path):
    from infra.lineage import DB_NAME, LineageCatalog
    from infra.runstore import read_manifest

    runs = tmp_path / "runs"
    procs = {}
    for run_id in ("c1", "c2"):
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / f"prefect-{run_id}"), "PYTHONPATH": str(REPO)}
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "flows.cli", "run", "--stages", "ingest", "--run-id", run_id,
               "-o", f"run_root={runs}", "-o", "spark.master=local[1]"]
        procs[run_id] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
    for run_id, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{run_id}:\n{out[-3000:]}"

    manifests = {r: read_manifest(runs, r, "ingest") for r in procs}  # verifies every output file and size
    assert manifests["c1"]["outputs"]["data"]["hash"] == manifests["c2"]["outputs"]["data"]["hash"]
    assert not list(runs.glob("*/.tmp-*"))
    catalog = LineageCatalog(runs)
    assert catalog.runs() == ["c1", "c2"]
    for run_id, manifest in manifests.items():
        recorded = catalog.stage_run(run_id, "ingest")
        assert recorded["cache_key"] == manifest["cache_key"]
        for out in manifest["outputs"].values():
            assert catalog.artifact(out["uri"])["hash"] == out["hash"]
    with sqlite3.connect(runs / DB_NAME) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        dangling = "SELECT COUNT(*) FROM edges WHERE dst NOT IN (SELECT uri FROM artifacts) OR src NOT IN (SELECT uri FROM artifacts)"
        assert c.execute(dangling).fetchone()[0] == 0
