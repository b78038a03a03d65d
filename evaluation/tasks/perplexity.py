"""Perplexity and bits-per-byte of a text corpus (WikiText-2 test by default) with disjoint rolling
windows of ``max_length`` tokens (lm-eval's ``loglikelihood_rolling``).

Documents are split at WikiText's top-level `` = Title = `` lines (a file without them is one
document); a ``.jsonl`` / ``.json`` file (gzipped or not) holds one document per line in its
``text`` field (web text such as Dolma's samples). Reported: ``word_perplexity`` (per whitespace word, lm-eval's wikitext metric),
``byte_perplexity``, ``bits_per_byte`` and ``token_perplexity``.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

from evaluation.data import EvalDataError, Loaded, select
from evaluation.tasks import TaskResult

_TITLE = re.compile(r"^ = [^=].* = $")


def load(path: str | Path) -> Loaded[str]:
    """Documents of a (optionally gzipped) text file; lines that are not valid UTF-8 are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"text file {str(path)!r} does not exist")
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if path.name.removesuffix(".gz").endswith((".jsonl", ".json")):
        return _load_json_lines(raw, path.name)
    docs: list[list[str]] = [[]]
    loaded: Loaded[str] = Loaded(items=[])
    for lineno, bline in enumerate(raw.splitlines(keepends=True), 1):
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as exc:
            loaded.malformed += 1
            if len(loaded.malformed_examples) < 5:
                loaded.malformed_examples.append(f"{path.name}:{lineno}: {exc}")
            continue
        if _TITLE.match(line.rstrip("\n")) and any(part.strip() for part in docs[-1]):
            docs.append([])
        docs[-1].append(line)
    loaded.items = [d for d in ("".join(parts).strip() for parts in docs) if d]
    return loaded


def _load_json_lines(raw: bytes, name: str) -> Loaded[str]:
    """One document per JSON line (its ``text``); lines that do not parse or have no text are counted."""
    loaded: Loaded[str] = Loaded(items=[])
    for lineno, bline in enumerate(raw.splitlines(), 1):
        if not bline.strip():
            continue
        try:
            text = json.loads(bline).get("text")
        except (ValueError, AttributeError) as exc:
            text, error = None, f"{name}:{lineno}: {exc}"
        else:
            error = f"{name}:{lineno}: no text field"
        if isinstance(text, str) and text.strip():
            loaded.items.append(text.strip())
            continue
        loaded.malformed += 1
        if len(loaded.malformed_examples) < 5:
            loaded.malformed_examples.append(error)
    return loaded


def score(docs: list[str], model, window: int | None = None, progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    scored = model.loglikelihood_rolling(docs, window=window, progress=progress)
    samples = [
        {"doc": i, "loglikelihood": lp, "tokens": n, "words": len(re.split(r"\s+", d)), "bytes": len(d.encode("utf-8"))}
        for i, (d, (lp, n)) in enumerate(zip(docs, scored))
    ]
    ll = sum(s["loglikelihood"] for s in samples)
    tokens, words, nbytes = (max(1, sum(s[k] for s in samples)) for k in ("tokens", "words", "bytes"))
    metrics = {
        "word_perplexity": math.exp(-ll / words),
        "byte_perplexity": math.exp(-ll / nbytes),
        "bits_per_byte": -ll / nbytes / math.log(2),
        "token_perplexity": math.exp(-ll / tokens),
    }
    return metrics, samples


def evaluate(
    model, path: str | Path, window: int | None = None, limit: int | None = None, seed: int | None = None,
    progress: bool = True, task: str = "perplexity",
) -> TaskResult:
    loaded = load(path)
    docs = select(loaded.items, limit, seed)
    metrics, samples = score(docs, model, window, progress)
    return TaskResult(task, metrics, len(docs), loaded.malformed, loaded.malformed_examples, samples)
