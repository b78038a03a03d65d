"""Same data, same numbers, anywhere: the tiny curation chain run from two checkouts at different
paths (one holding a copy of the data, one a symlink to it) gives equal content hashes for every
stage output through tokenize, and a run from the second checkout into the first's run root reuses
every stage. Only locations differ between the runs, and locations are not data."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from conftest import REPO, TINY_CONFIG

CHAIN = ("ingest", "extract", "langid", "heuristics", "train_quality", "quality", "dedup", "tokenizer", "tokenize")
DATA = ("warc", "quality", "tokenize")  # what configs/tiny.yaml reads for these stages


def _checkouts(tmp_path):
    """Two checkout roots: ``copy`` holds copies of the data folders, ``link`` a symlink to the repo's."""
    copy, link = tmp_path / "one" / "copy", tmp_path / "elsewhere" / "deeper" / "link"
    for d in DATA:
        shutil.copytree(REPO / "tests" / "data" / d, copy / "tests" / "data" / d)
    (link / "tests").mkdir(parents=True)
    (link / "tests" / "data").symlink_to(REPO / "tests" / "data")
    return copy, link


def _run_chain(monkeypatch, checkout, run_root, run_id) -> dict:
    """The chain with configs/tiny.yaml as it is (relative paths) from ``checkout``; strict inputs, so
    no stage may fall back from a configured input (the repository alone must do)."""
    from flows.registry import execute_stage, load_config

    config = load_config(TINY_CONFIG, overrides={
        "run_root": str(run_root), "spark.master": "local[2]", "pipeline.strict_inputs": True,
    })
    with monkeypatch.context() as m:
        m.chdir(checkout)
        return {stage: execute_stage(stage, config, run_id) for stage in CHAIN}


def _hashes(manifests: dict) -> dict:
    return {f"{s}/{o}": out["hash"] for s, m in manifests.items() for o, out in m["outputs"].items()}


@pytest.mark.slow
def test_two_checkouts_give_equal_hashes_and_share_a_run_root(spark, tmp_path, monkeypatch):
    copy, link = _checkouts(tmp_path)
    first = _run_chain(monkeypatch, copy, tmp_path / "runs_one", "r1")
    second = _run_chain(monkeypatch, link, tmp_path / "runs_two", "r2")
    assert all(m["cached_from"] is None for m in second.values())  # really recomputed
    a, b = _hashes(first), _hashes(second)
    assert len(a) >= len(CHAIN) and a == b, {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
    assert not [w for m in first.values() for w in m["warnings"] if w.startswith("missing input:")]

    # no absolute path in the data: provenance names the archive relative to its input
    rows = pq.read_table(first["ingest"]["outputs"]["data"]["path"], columns=["warc_file", "source"]).to_pylist()
    assert rows and all(not r["warc_file"].startswith("/") and r["source"].startswith(r["warc_file"] + "@") for r in rows)
    assert {r["warc_file"] for r in rows} <= {p.name for p in (REPO / "tests" / "data" / "warc").iterdir()}
    # the manifest's inputs still say where the data was
    assert first["ingest"]["inputs"]["archives_0"]["uri"] == (copy / "tests" / "data" / "warc").as_uri()

    # the same config from the other checkout into the first run root: every stage reused from r1
    third = _run_chain(monkeypatch, link, tmp_path / "runs_one", "r3")
    assert {s: m["cached_from"] for s, m in third.items()} == {s: f"r1/{s}" for s in CHAIN}
    assert _hashes(third) == a
