"""Shared assertion for tests that run stages concurrently or kill them: the lineage catalog is intact."""

import sqlite3
from pathlib import Path

from infra.lineage import DB_NAME, LineageCatalog


def assert_catalog_consistent(runs: Path, manifests: dict[str, dict]) -> None:
    """SQLite integrity, no edge to an unknown artifact, and every committed stage (``{run_id: manifest}``)
    recorded with its cache key and output hashes; no stage run recorded without a committed manifest."""
    with sqlite3.connect(runs / DB_NAME) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        dangling = ("SELECT COUNT(*) FROM edges WHERE dst NOT IN (SELECT uri FROM artifacts) "
                    "OR src NOT IN (SELECT uri FROM artifacts)")
        assert c.execute(dangling).fetchone()[0] == 0
    catalog = LineageCatalog(runs)
    assert set(catalog.runs()) >= set(manifests)
    for run_id, manifest in manifests.items():
        recorded = catalog.stage_run(run_id, manifest["stage"])
        assert recorded["cache_key"] == manifest["cache_key"]
        for out in manifest["outputs"].values():
            assert catalog.artifact(out["uri"])["hash"] == out["hash"]
