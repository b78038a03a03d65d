"""ingest → extract → langid → heuristics through the executor on the bundled WARC sample (one Spark session)."""

from collections import Counter

import pyarrow.parquet as pq
import pytest

from curation.filters import FILTERS, all_signals, first_failure
from curation.heuristics import HeuristicsConfig, rules_for
from flows.registry import execute_stage

INPUTS = ["tests/data/warc", "tests/data/curation/whirlwind.warc.wet.gz"]
STAGES = ("ingest", "extract", "langid", "heuristics")


def _rows(manifest, output):
    return pq.read_table(manifest["outputs"][output]["path"]).to_pylist()


@pytest.mark.slow
def test_pipeline_funnel_ledger_and_threshold_rerun(spark, make_config):
    config = make_config({"ingest.input_paths": INPUTS, "langid.languages": ["en"]})
    manifests = {name: execute_stage(name, config, "r1") for name in STAGES}
    ingest, extract, langid, heur = (manifests[s] for s in STAGES)

    # extract: every HTML record ingest kept is either extracted or a recorded drop; no raw bytes carried on
    assert extract["metrics"]["rows_in"] == ingest["metrics"]["kept"] > 50
    kept = _rows(extract, "data")
    assert len(kept) == extract["metrics"]["kept"] > 40
    assert "content" not in kept[0] and all(r["text"] and r["source"] for r in kept)
    wet = [r for r in kept if r["record_type"] == "conversion"]
    assert len(wet) == 1 and "Escopete" in wet[0]["text"] and wet[0]["title"] is None
    assert any(r["title"] for r in kept) and any(r["lang_hint"] for r in kept)
    # the gb2312 and windows-1251 pages of the Common Crawl excerpt decode into real CJK / Cyrillic text
    cc = [r for r in kept if "cc-main-2020-34" in r["warc_file"]]
    assert any(sum("\u4e00" <= c <= "\u9fff" for c in r["text"]) > 20 for r in cc)
    assert any(sum("\u0400" <= c <= "\u04ff" for c in r["text"]) > 20 for r in cc)
    assert all(r["signals"]["text_chars"] == len(r["text"]) for r in kept)

    # langid: lid.176 columns, non-English documents in rejected/ with their language
    lang_rows = _rows(langid, "data") + _rows(langid, "rejected")
    assert all(r["lang"] == "en" and r["lang_score"] >= 0.65 for r in _rows(langid, "data"))
    langs = Counter(r["lang"] for r in lang_rows)
    assert langs["en"] > 30 and {"zh", "ru", "ja"} & set(langs)
    assert {r["drop_reason"] for r in _rows(langid, "rejected")} <= {"lang_not_allowed", "lang_score_low", "lang_undetermined"}

    # heuristics: signals stored for kept and rejected documents; the reason is the first failed rule
    rules = rules_for(HeuristicsConfig())
    rejected = _rows(heur, "rejected")
    assert rejected and heur["metrics"]["signals_cache"] == "miss"
    for row in _rows(heur, "data") + rejected:
        assert row["signals"]["text_chars"] == len(row["text"])  # extraction signals survive the merge
        assert row["signals"]["gopher_n_words"] == all_signals(row["text"])["gopher_n_words"]
        assert first_failure(row["signals"], rules) == row["drop_reason"]

    # funnel: records → ingested → extracted → language kept → after each filter, non-increasing
    funnel = heur["metrics"]["funnel"]
    steps = [r["step"] for r in funnel]
    assert steps == ["records", "ingested (HTML responses)", "extracted", "language kept", *(f"after {f}" for f in FILTERS)]
    counts = [r["documents"] for r in funnel]
    assert counts == sorted(counts, reverse=True) and counts[-1] == heur["metrics"]["kept"] > 0
    assert counts[3] == langid["metrics"]["kept"] and counts[2] == extract["metrics"]["kept"]
    assert heur["tables"]["pipeline_funnel"] == funnel

    # a changed threshold re-applies decisions from the cached signals
    loose = make_config({"ingest.input_paths": INPUTS, "heuristics.gopher_quality.min_doc_words": 10_000})
    again = execute_stage("heuristics", loose, "r1")
    assert again["metrics"]["signals_cache"] == "hit"
    assert again["metrics"]["signals_cache_dir"] == heur["metrics"]["signals_cache_dir"]
    assert again["metrics"]["kept"] < heur["metrics"]["kept"]
    assert again["metrics"]["drop_reasons"]["gopher_quality:min_doc_words"] > heur["metrics"]["drop_reasons"].get(
        "gopher_quality:min_doc_words", 0
    )
