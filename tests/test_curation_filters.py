"""Heuristic signals and rules (Gopher quality/repetition, C4, FineWeb) on real text and crafted failures."""

import gzip

import pytest

from curation.filters import (
    FILTERS, RULE_SPECS, all_signals, build_rules, c4_kept_lines, first_failure, gopher_quality_signals,
    gopher_repetition_signals, signal_names,
)
from curation.heuristics import HeuristicsConfig, filter_funnel, rules_for

RULES = rules_for(HeuristicsConfig())


@pytest.fixture(scope="module")
def wiki_paragraphs(shared_data):
    """Real encyclopedic English: WikiText-2 validation paragraphs (detokenised lightly)."""
    text = gzip.decompress((shared_data / "wikitext2_valid_test/valid.txt.gz").read_bytes()).decode()
    paras = [p.strip().replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
             for p in text.split("\n") if len(p.split()) > 60 and not p.strip().startswith("=")]
    return paras


def test_clean_prose_passes_every_filter(wiki_paragraphs):
    doc = "\n".join(wiki_paragraphs[:6])  # one paragraph per line, as trafilatura writes them
    signals = all_signals(doc)
    assert set(signals) == set(signal_names()) and all(isinstance(v, float) for v in signals.values())
    assert first_failure(signals, RULES) is None, {r.reason: signals[r.signal] for r in RULES if r.fails(signals)}
    passed = sum(first_failure(all_signals("\n".join(wiki_paragraphs[i:i + 3])), RULES) is None for i in range(0, 60, 3))
    assert passed >= 16


def test_gopher_quality_numbers():
    s = gopher_quality_signals("The cat sat on the mat, and that is all.\n• one\n• two...\n#tag #tag")
    assert s["gopher_n_words"] == 14 and s["gopher_stop_words"] == 3  # "The" is not a stop word (case-sensitive)
    assert s["gopher_bullet_lines_ratio"] == pytest.approx(2 / 4)
    assert s["gopher_ellipsis_lines_ratio"] == pytest.approx(1 / 4)
    assert s["gopher_hash_word_ratio"] == pytest.approx(2 / 14)


@pytest.mark.parametrize(
    "doc, reason",
    [
        ("Too short to be a document.", "gopher_quality:min_doc_words"),
        (" ".join(["antidisestablishmentarianism", "the", "of"] * 30), "gopher_quality:max_avg_word_length"),
        (" ".join(["123456", "789012", "the", "of", "and", "345678", "901234", "567890"] * 12), "gopher_quality:min_alpha_words_ratio"),
        (" ".join(["Lorem", "dolor", "amet", "sit", "magna"] * 20), "gopher_quality:min_stop_words"),
        ("\n\n".join(["The same line of text is repeated here with the words."] * 20), "gopher_repetition:max_dup_para_frac"),
    ],
)
def test_crafted_failures_name_the_first_failed_rule(doc, reason):
    assert first_failure(all_signals(doc), RULES) == reason


def test_repetition_ngrams_and_c4_line_rules(wiki_paragraphs):
    base = wiki_paragraphs[0]
    spammy = base + "\n" + " ".join(["buy cheap pills now"] * 40)
    rep = gopher_repetition_signals(spammy)
    assert rep["gopher_top_2gram_char_frac"] > 0.2 and rep["gopher_dup_10gram_char_frac"] > 0.1
    assert gopher_repetition_signals(base)["gopher_dup_10gram_char_frac"] < 0.05
    text = "\n".join([
        "This line is fine and ends well.", "Please enable JavaScript to view this page.",
        "We use cookies to improve things.", "No terminal punctuation here", "Too short.",
        "A citation follows here.[12]", "Wait for it...",
    ])
    kept, lorem, curly = c4_kept_lines(text)
    assert kept == ["This line is fine and ends well.", "A citation follows here."] and not lorem and not curly
    assert c4_kept_lines("Lorem ipsum dolor sit amet.\nThe value {a: 1} is set.")[1:] == (True, True)


def test_thresholds_change_decisions_without_new_signals(wiki_paragraphs):
    signals = all_signals("\n".join(wiki_paragraphs[:2]))
    strict = HeuristicsConfig.model_validate({"gopher_quality": {"min_doc_words": 100_000}})
    off = HeuristicsConfig.model_validate({"gopher_quality": {"min_doc_words": None, "max_doc_words": None}})
    assert first_failure(signals, rules_for(strict)) == "gopher_quality:min_doc_words"
    assert len(rules_for(off)) == len(RULE_SPECS) - 2
    no_flags = build_rules({f: {**HeuristicsConfig().model_dump()[f], **({"lorem_ipsum": False} if f == "c4" else {})}
                            for f in FILTERS})
    assert "c4:lorem_ipsum" not in {r.reason for r in no_flags}


def test_filter_funnel_counts_down_in_filter_order():
    counts = {"rows_in": 10, "kept": 4, "dropped": 6,
              "drop_reasons": {"c4:min_sentences": 1, "gopher_quality:min_doc_words": 3, "fineweb:max_short_line_ratio": 2}}
    assert [r["documents"] for r in filter_funnel(counts, FILTERS)] == [7, 7, 6, 4]


def test_each_rule_is_declared_once_and_the_config_is_generated_from_it():
    """Config keys, types, defaults and descriptions come from RULE_SPECS: no key without a rule, no drift."""
    config = HeuristicsConfig()
    sections = {f: type(getattr(config, f)).model_fields for f in FILTERS}
    assert {(f, k) for f, fields in sections.items() for k in fields} == {(s.filter, s.name) for s in RULE_SPECS}
    for spec in RULE_SPECS:
        field = sections[spec.filter][spec.name]
        assert (field.default, field.description) == (spec.default, spec.description)
        assert spec.signal in all_signals("a b c.")
    with pytest.raises(ValueError):  # a flag rule takes a bool, a threshold rule a number or null
        HeuristicsConfig.model_validate({"gopher_quality": {"min_doc_words": "many"}})
    assert HeuristicsConfig.model_validate({"c4": {"lorem_ipsum": False}}).c4.lorem_ipsum is False
