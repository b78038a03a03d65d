"""Lineage catalog under concurrency: processes writing and reading one SQLite catalog at once."""

import multiprocessing as mp
import sqlite3

import pytest

from infra.lineage import DB_NAME, LineageCatalog

N_RUNS = 60


def _manifest(run_id: str, stage: str, upstream: str | None) -> dict:
    out = f"file:///runs/{run_id}/{stage}/data"
    inputs = {"source": {"uri": "file:///warcs", "hash": "sha256:w"}}
    if upstream:
        inputs["up/data"] = {"uri": f"file:///runs/{run_id}/{upstream}/data", "hash": f"sha256:{run_id}-{upstream}",
                             "run_id": run_id, "stage": upstream}
    return {
        "run_id": run_id, "stage": stage, "cache_key": f"key-{stage}", "cached_from": None, "config": {"x": 1},
        "inputs": inputs, "metrics": {}, "code_version": {}, "timings": {"started_at": "t0", "finished_at": "t1"},
        "outputs": {"data": {"uri": out, "hash": f"sha256:{run_id}-{stage}", "files": {"a": 1}, "run_id": run_id, "stage": stage}},
    }


def _hammer(root: str, worker: str, start, errors) -> None:
    """Open the catalog (racing the other process to create it), then write and read stage runs."""
    start.wait()
    try:
        catalog = LineageCatalog(root)
        for i in range(N_RUNS):
            run_id = f"{worker}-{i:03d}"
            catalog.record_stage_run(_manifest(run_id, "ingest", None))
            catalog.record_stage_run(_manifest(run_id, "extract", "ingest"))
            assert catalog.find_cached("key-extract")
            assert sorted(r["stage"] for r in catalog.stage_runs(run_id)) == ["extract", "ingest"]
    except BaseException as exc:  # reported to the parent
        errors.put(f"{worker}: {type(exc).__name__}: {exc}")
        raise


@pytest.mark.slow
def test_two_processes_hammering_one_catalog_stay_consistent(tmp_path):
    ctx = mp.get_context("spawn")  # fork copies a test process full of threads (Prefect, pytest-timeout): not safe
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, start, errors)) for w in ("a", "b")]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=300)
    failures = [errors.get() for _ in range(errors.qsize())]
    assert not failures and [p.exitcode for p in procs] == [0, 0], failures

    catalog = LineageCatalog(tmp_path)
    assert len(catalog.runs()) == 2 * N_RUNS
    with sqlite3.connect(tmp_path / DB_NAME) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("SELECT COUNT(*) FROM stage_runs").fetchone()[0] == 4 * N_RUNS
        # every stage run's outputs and edges were written with it (no half-written entries)
        assert c.execute("SELECT COUNT(*) FROM artifacts WHERE kind='stage_output'").fetchone()[0] == 4 * N_RUNS
        assert c.execute("SELECT COUNT(*) FROM edges").fetchone()[0] == 2 * N_RUNS + 2 * 2 * N_RUNS
        dangling = "SELECT COUNT(*) FROM edges WHERE dst NOT IN (SELECT uri FROM artifacts) OR src NOT IN (SELECT uri FROM artifacts)"
        assert c.execute(dangling).fetchone()[0] == 0


def test_a_write_that_fails_half_way_leaves_nothing(tmp_path):
    catalog = LineageCatalog(tmp_path)
    broken = _manifest("r1", "extract", "ingest")
    del broken["timings"]  # fails after the artifacts and edges were inserted
    with pytest.raises(KeyError):
        catalog.record_stage_run(broken)
    assert catalog.artifact("file:///runs/r1/extract/data") is None and catalog.runs() == []
    assert catalog.parents("file:///runs/r1/extract/data") == []
