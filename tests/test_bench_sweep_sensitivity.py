"""The known-answer corpora of bench/sweep_sensitivity.py hold the contamination they claim, the filter
each sweep toggles removes it, the WET file ingests as one row per document, and every arm's config
validates (the bench's sweeps themselves take ~15 minutes each: bench/RESULTS.md). The quality corpus
extracts the English trafilatura pages (~1 minute), hence the slow marks."""

import collections
import importlib.util
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench(shared_data):
    spec = importlib.util.spec_from_file_location("sweep_sensitivity", ROOT / "bench" / "sweep_sensitivity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep_sensitivity"] = module
    spec.loader.exec_module(module)
    if module.SHARED != shared_data:
        pytest.skip(f"the bench reads {module.SHARED}, this test run {shared_data}")
    return module


def test_dedup_corpus_repeats_40_percent_of_documents_5_to_20_times(bench):
    english = bench.english_documents()
    docs = bench.build_corpus("dedup")
    copies = collections.Counter(text for _, text in docs)
    assert set(copies) == set(english) and len({url for url, _ in docs}) == len(docs)
    repeated = [n for n in copies.values() if n > 1]
    assert len(repeated) == round(0.4 * len(english)) and all(6 <= n <= 21 for n in repeated)
    assert bench.build_corpus("dedup") == docs  # seeded


@pytest.mark.slow
def test_contaminants_fail_the_filter_the_sweep_toggles(bench):
    from curation.filters import all_signals, build_rules, first_failure
    from curation.heuristics import HeuristicsConfig

    def rules(**off):
        cfg = HeuristicsConfig().model_dump()
        for key, value in off.items():
            section, name = key.split(".")
            cfg[section][name] = value
        return build_rules({k: v for k, v in cfg.items() if isinstance(v, dict)})

    # the quality corpus holds only English the default heuristics keep: both arms have the same English
    quality_docs = bench.build_corpus("quality")
    assert all(bench.passes_default_heuristics(t) for u, t in quality_docs if "spam" not in u)
    spam = bench.spam_documents(50_000, random.Random(0))
    assert all(first_failure(all_signals(t), rules()) for t in spam)
    _, axes = bench.sweep_setup("quality")
    off = {k.split(".", 1)[1]: v[1] for k, v in axes.items() if k.startswith("heuristics.")}
    assert not any(first_failure(all_signals(t), rules(**off)) for t in spam)
    # the langid sweep relaxes the English stop-word rule: then only langid removes the non-English documents
    foreign = bench.non_english_documents(50_000, random.Random(0))
    assert not any(first_failure(all_signals(t), rules(**{"gopher_quality.min_stop_words": None})) for t in foreign)
    english_chars = sum(len(t) for t in bench.english_documents())
    langid_docs = bench.build_corpus("langid")
    assert sum(len(t) for u, t in langid_docs if u.startswith("http://xx-")) >= 1.5 * english_chars


def test_wet_corpus_ingests_one_row_per_document_and_is_byte_identical_when_rebuilt(bench, tmp_path):
    from curation.ingest import read_archive

    docs = bench.build_corpus("langid")
    bench.write_wet(tmp_path / "a.warc.gz", docs)
    bench.write_wet(tmp_path / "b.warc.gz", docs)
    assert (tmp_path / "a.warc.gz").read_bytes() == (tmp_path / "b.warc.gz").read_bytes()
    rows = list(read_archive(str(tmp_path / "a.warc.gz")))
    assert len(rows) == len(docs) and len({r["doc_id"] for r in rows}) == len(docs)
    assert [r["content"].decode() for r in rows] == [t for _, t in docs]


@pytest.mark.parametrize("effect", ["dedup", "langid", "quality"])
def test_every_arm_of_each_known_effect_sweep_validates(bench, effect, tmp_path):
    from flows.sweep import Axis, plan_sweep

    config = bench.write_sweep_config(tmp_path, effect)
    _, axes = bench.sweep_setup(effect)
    plan = plan_sweep(str(config), {}, [Axis(k, tuple(v)) for k, v in axes.items()], mode="zip", seeds=3)
    assert len(plan.arms) == 6 and plan.first_varying_stage == {"quality": "heuristics"}.get(effect, effect)


def test_detection_needs_the_gap_beyond_twice_the_pooled_sd_and_each_half_of_the_seeds(bench):
    from statistics import stdev

    on, off = [3.00, 3.01, 2.99], [3.10, 3.12, 3.08]
    d = bench.detection(on, off)
    sd = ((stdev(on) ** 2 + stdev(off) ** 2) / 2) ** 0.5
    assert d["detected"] and abs(d["pooled_sd"] - sd) < 1e-12 and abs(d["gap"] - 0.10) < 1e-9
    assert not bench.detection(off, on)["detected"]  # the wrong direction never counts
    assert not bench.detection([3.0], off)["detected"]  # one seed: no spread, no verdict
    seeds_on = {1: 3.00, 2: 3.01, 3: 2.99, 4: 3.00, 5: 3.02, 6: 2.98, 7: 3.0}
    first, second = bench.halves(seeds_on)
    assert first == [3.00, 3.01, 2.99] and second == [3.00, 3.02, 2.98, 3.0]  # odd counts: the second half is larger
