"""Two `refinery run` invocations started at once on one run root (issue 16, part 4): both complete, each
run has its own complete stage, and the lineage catalog holds both, consistently."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_run_root_both_complete(tmp_path):
    from catalog_checks import assert_catalog_consistent

    from infra.lineage import LineageCatalog
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
    assert LineageCatalog(runs).runs() == ["c1", "c2"]
    assert_catalog_consistent(runs, manifests)
