"""Quality classifier: data readers, training on real text with held-out precision/recall, and the
train_quality → quality stages on a seeded heuristics output (bundled fixtures, no ../shared/data)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from curation.quality import (
    HQ,
    TrainQualityConfig,
    build_examples,
    fasttext_line,
    missing_sources,
    precision_recall,
    read_texts,
    score_texts,
    train_model,
    training_sources,
)
from infra.runstore import content_hash, listing, write_json_atomic

# a config file with no sections: every stage at its defaults (independent of configs/demo.yaml)
MINIMAL_CONFIG = Path(__file__).parent / "data" / "quality" / "minimal_config.yaml"

FIXTURES = Path(__file__).parent / "data" / "quality"


def fixture_texts(name: str) -> list[str]:
    return list(read_texts(FIXTURES / f"{name}.jsonl.gz"))


def test_readers_and_tokens(tmp_path, shared_data):
    assert fasttext_line("Hello, World!\nNew line") == "hello , world ! new line"
    wiki = list(read_texts(shared_data / "wikitext2_valid_test" / "valid.txt.gz"))
    assert len(wiki) > 500 and not any(t.lstrip().startswith("= ") for t in wiki)
    assert not any("@-@" in t or "<unk>" in t for t in wiki)
    seed = list(read_texts(shared_data / "self_instruct_sft" / "seed_tasks.jsonl"))
    assert len(seed) == 175 and "oatmeal banana protein shake" in seed[0]
    pages = list(read_texts(shared_data / "warc_samples" / "resiliparse_cc-main-2020-34_excerpt.warc.gz"))
    assert 5 <= len(pages) <= 16
    with pytest.raises(ValueError, match="unsupported"):
        list(read_texts(FIXTURES / "SOURCE.md"))


def test_training_sources_fall_back_to_fixtures():
    pos, neg = "tests/data/quality/positives.jsonl.gz", "tests/data/quality/negatives.jsonl.gz"
    cfg = TrainQualityConfig(positives=["/nonexistent/pos"], negatives=["/nonexistent/neg"],
                             fallback_positives=pos, fallback_negatives=neg)
    assert training_sources(cfg) == {"positives_0": pos, "negatives_0": neg}
    with pytest.raises(ValueError, match=r"none of positives \['/nonexistent/pos'\] exists and fallback_positives is not set"):
        training_sources(TrainQualityConfig(positives=["/nonexistent/pos"], fallback_negatives=neg))
    # the fallback is said aloud, and so is a class trained without one of its paths
    assert missing_sources(cfg) == [
        f"missing input: train_quality.positives ['/nonexistent/pos'] do(es) not exist; trained on fallback_positives {pos!r} instead",
        f"missing input: train_quality.negatives ['/nonexistent/neg'] do(es) not exist; trained on fallback_negatives {neg!r} instead",
    ]
    partial = TrainQualityConfig(positives=[pos, "/nonexistent/pos"], negatives=[neg])
    assert missing_sources(partial) == ["missing input: train_quality.positives ['/nonexistent/pos'] do(es) not exist; trained without them"]
    assert missing_sources(TrainQualityConfig(positives=[pos], negatives=[neg])) == []


def test_classifier_separates_clean_text_from_boilerplate(tmp_path):
    cfg = TrainQualityConfig(epoch=10)
    positives, negatives = fixture_texts("positives"), fixture_texts("negatives")
    train, holdout = build_examples(positives, negatives, cfg)
    # balanced training set, held-out lines never seen in training
    labels = [line.split(" ", 1)[0] for line in train]
    assert abs(labels.count(HQ) - len(labels) / 2) <= 1
    assert not set(holdout) & set(train) and len(holdout) > 50
    model, lr = train_model(train, cfg, tmp_path)
    assert lr == cfg.lr
    pr = precision_recall(model, holdout)
    assert pr["holdout_precision"] > 0.85 and pr["holdout_recall"] > 0.85
    hq, lq = score_texts(model, [fasttext_line(positives[5]), fasttext_line("Home | About us | Contact | Login | Cart (0)")])
    assert hq > 0.5 > lq


def test_a_diverging_fasttext_run_is_retried_at_half_the_learning_rate_then_refused(tmp_path):
    train, _ = build_examples(fixture_texts("positives"), fixture_texts("negatives"), TrainQualityConfig())
    model, lr = train_model(train, TrainQualityConfig(epoch=10, lr=20.0), tmp_path)  # NaN at 20, fine at 5
    assert lr in (10.0, 5.0, 2.5) and model.predict("hello world")[0]
    with pytest.raises(RuntimeError, match="NaN"):
        train_model(train, TrainQualityConfig(epoch=10, lr=1000.0), tmp_path, retries=1)
    assert not list(tmp_path.iterdir())  # the training file is removed either way


def seed_stage(run_root, run_id, stage, outputs: dict):
    d = run_root / run_id / stage
    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(d / "manifest.json", {
        "run_id": run_id, "stage": stage, "status": "completed", "cache_key": f"seeded-{stage}", "metrics": {},
        "outputs": {
            n: {"path": str(p), "uri": p.as_uri(), "hash": content_hash(p), "files": listing(p), "run_id": run_id, "stage": stage}
            for n, p in outputs.items()
        },
    })


def test_train_and_score_stages(spark, shared_data, make_config, tmp_path):
    from flows.registry import execute_stage

    base = shared_data / "web_text_samples_dolma"
    docs = [json.loads(line) for name in ("cc_en_head-0091.jsonl.gz", "cc_en_head-0174.jsonl.gz", "provided_documents_000.json.gz")
            for line in gzip.open(base / name, "rt")]
    kept = [(f"k{i:02d}", d.get("id") or f"https://cc.example/{i}", "2024-01-01", d["text"], "en") for i, d in enumerate(docs)]
    kept += [(f"j{i:02d}", f"https://junk.example/{i}", "2024-01-01", t, "en") for i, t in enumerate(fixture_texts("negatives")[:30])]
    rejected = [(f"r{i:02d}", f"https://r.example/{i}", "2024-01-01", t, "en", "too_short") for i, t in enumerate(fixture_texts("negatives")[100:160])]
    data, rej = tmp_path / "h_data", tmp_path / "h_rejected"
    spark.createDataFrame(kept, "doc_id string, url string, fetch_date string, text string, lang string").write.parquet(str(data))
    spark.createDataFrame(rejected, "doc_id string, url string, fetch_date string, text string, lang string, drop_reason string").write.parquet(str(rej))
    run_root = tmp_path / "runs"
    seed_stage(run_root, "r1", "heuristics", {"data": data, "rejected": rej})
    cfg = make_config(path=MINIMAL_CONFIG, overrides={
        "train_quality.positives": ["/nonexistent/positives"], "train_quality.negatives": ["/nonexistent/negatives"],
        "quality.top_fraction": 0.5,
    })
    trained = execute_stage("train_quality", cfg, "r1")
    m = trained["metrics"]
    assert m["rejected_negatives"] == 60 and m["sources"]["positives"] == ["positives.jsonl.gz"]
    assert [w.split(" [")[0] for w in trained["warnings"]] == [
        "missing input: train_quality.positives", "missing input: train_quality.negatives"]
    # model/metrics.json (part of the output's hash) names sources without their location
    assert json.loads(Path(trained["outputs"]["model"]["path"], "metrics.json").read_text())["sources"]["negatives"] == ["negatives.jsonl.gz"]
    assert m["holdout_precision"] > 0.8 and m["holdout_recall"] > 0.8
    assert Path(trained["outputs"]["model"]["path"], "model.bin").is_file()
    scored = execute_stage("quality", cfg, "r1")
    assert scored["metrics"]["rows_in"] == len(kept)
    assert abs(scored["metrics"]["kept"] - len(kept) / 2) <= 2
    out = spark.read.parquet(scored["outputs"]["data"]["path"]).toPandas()
    low = spark.read.parquet(scored["outputs"]["rejected"]["path"]).toPandas()
    assert set(low["drop_reason"]) == {"low_quality"} and "lang" in out.columns
    assert out["quality_score"].min() >= low["quality_score"].max()
    # the junk (boilerplate) documents score lower than the real pages on average
    assert low["doc_id"].str.startswith("j").sum() > out["doc_id"].str.startswith("j").sum()
