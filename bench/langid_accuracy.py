"""Language-ID accuracy of the ``langid`` core (fastText lid.176) on Lingua's test sentences.

Reads ``../shared/data/langid_lingua_testdata`` (75 languages, ~1000 sentences each), predicts with
:func:`curation.langid.identify` and prints accuracy per language, over the languages lid.176 has a
label for, and over all sentences (Lingua's ``nb`` = lid.176's ``no``). Last line:
``accuracy <all sentences, all 75 languages>``.

    .venv/bin/python bench/langid_accuracy.py [--kind sentences] [--per-lang N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from curation.langid import identify, load_model  # noqa: E402

LINGUA_TO_LID176 = {"nb": "no"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "langid_lingua_testdata")
    parser.add_argument("--kind", default="sentences", choices=["sentences", "word-pairs", "single-words"])
    parser.add_argument("--per-lang", type=int, default=0, help="at most N texts per language (0 = all)")
    args = parser.parse_args()

    texts: dict[str, list[str]] = defaultdict(list)
    with gzip.open(args.data / "lingua_testdata.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["kind"] == args.kind and (not args.per_lang or len(texts[row["lang"]]) < args.per_lang):
                texts[row["lang"]].append(row["text"])
    model = load_model()
    known = {label.removeprefix("__label__") for label in model.get_labels()}
    correct: dict[str, int] = {}
    started = time.perf_counter()
    for lang, items in sorted(texts.items()):
        want = LINGUA_TO_LID176.get(lang, lang)
        correct[lang] = sum(identify(model, t)[0] == want for t in items)
    seconds = time.perf_counter() - started
    n_total = sum(len(v) for v in texts.values())
    print(f"{args.kind}: {n_total} texts, {len(texts)} languages, {n_total / seconds:.0f} texts/s")
    print("lang  n     accuracy  (* = no lid.176 label)")
    for lang in sorted(texts):
        mark = "" if LINGUA_TO_LID176.get(lang, lang) in known else " *"
        print(f"{lang:<5} {len(texts[lang]):<5} {correct[lang] / len(texts[lang]):.4f}{mark}")
    supported = [lang for lang in texts if LINGUA_TO_LID176.get(lang, lang) in known]
    sup_n = sum(len(texts[lang]) for lang in supported)
    print(f"accuracy_supported_languages {sum(correct[lang] for lang in supported) / sup_n:.4f} ({len(supported)} languages)")
    print(f"macro_accuracy {sum(correct[lang] / len(texts[lang]) for lang in texts) / len(texts):.4f}")
    print(f"accuracy {sum(correct.values()) / n_total:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
