"""A loss spike that names its data: the tiny chain through tokenize, then pretraining with an injected
loss spike (the existing fault injection). The rolled-back step's skipped samples lead — in the stage's
manifest, the explorer's pretrain page and ``refinery lineage show`` — to their documents: doc_id, URL,
WARC record (file@offset) and the curation decisions that let each one in, checked against the curated
data itself."""

from __future__ import annotations

import html
import json

import pyarrow.parquet as pq
import pytest

from conftest import TINY_CONFIG

CHAIN = ("ingest", "extract", "langid", "heuristics", "train_quality", "quality", "dedup", "tokenizer", "tokenize",
         "pretrain")
BAD_STEP, GBS = 20, 8  # tiny.yaml's global batch


@pytest.mark.slow
def test_a_rolled_back_spike_names_its_documents_and_their_warc_records(spark, tmp_path, capsys):
    import flows.cli
    from flows.explorer import Explorer
    from flows.registry import execute_stage, load_config

    run_root = tmp_path / "runs"
    overrides = {"run_root": str(run_root), "spark.master": "local[2]", "pretrain.steps": 24, "pretrain.save_every": 8,
                 "pretrain.fault_injection": [{"step": BAD_STEP, "kind": "scale_loss", "factor": 200.0}]}
    config = load_config(TINY_CONFIG, overrides=overrides)
    manifests = {stage: execute_stage(stage, config, "spiky") for stage in CHAIN}

    ledger = json.loads(manifests["pretrain"]["metrics"]["skip_ledger"])
    assert [e["step"] for e in ledger] == [BAD_STEP], ledger
    docs = ledger[0]["documents"]
    window = set(range(BAD_STEP * GBS, (BAD_STEP + 1) * GBS))
    assert {s for d in docs for s in d["samples"]} == window  # every skipped sample has its documents
    assert len({(d["shard"], d["seq"]) for d in docs}) == len(docs)  # each document once

    # independently: the curated rows the shards were tokenized from
    curated = {r["doc_id"]: r for r in pq.read_table(manifests["dedup"]["outputs"]["data"]["path"]).to_pylist()}
    web = [d for d in docs if d["doc_id"] in curated]
    assert web, docs  # the tiny blend is web pages + WikiText: the window holds web documents
    for d in web:
        row = curated[d["doc_id"]]
        assert (d["url"], d["source"]) == (row["url"], row["source"])
        assert d["source"] == f"{row['warc_file']}@{row['warc_offset']}"

    page = html.unescape(Explorer(run_root).stage("spiky", "pretrain"))
    assert "Spikes rolled back, and the documents they skipped" in page
    for d in web:
        row = curated[d["doc_id"]]
        assert d["doc_id"] in page and d["source"] in page and f"quality_score: {row['quality_score']:.3f}" in page
        assert f"lang: {row['lang']}" in page and f"warc_record_id: {row['warc_record_id']}" in page

    assert flows.cli.main(["lineage", "show", "spiky", "-c", str(TINY_CONFIG), "-o", f"run_root={run_root}"]) == 0
    out = capsys.readouterr().out
    assert f"spike at step {BAD_STEP}" in out
    for d in web:
        assert d["doc_id"] in out and f"WARC {d['source']}" in out and f"lang={curated[d['doc_id']]['lang']}" in out
