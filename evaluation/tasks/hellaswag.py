"""HellaSwag: 4-way multiple choice by log-likelihood, scored exactly like lm-eval's ``hellaswag``.

Prompt ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``, continuations
``" " + preprocess(ending)``; ``acc`` = argmax of summed log-likelihood, ``acc_norm`` = argmax of
log-likelihood ÷ the ending's character count. The shared-data file has no ``ctx_a``/``ctx_b``:
they are recovered from ``ctx`` (``ctx_b`` = the lower-case tail after the last sentence end).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from evaluation.data import Loaded, load_jsonl, select
from evaluation.tasks import TaskResult

_TAIL = re.compile(r"^(?:(.*[.!?])\s+)?([a-z][^.!?]*)$", re.S)


@dataclass(frozen=True)
class Item:
    ind: int
    query: str
    choices: tuple[str, ...]
    gold: int


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning (WikiHow bracket artefacts, doubled spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def split_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a joined HellaSwag ``ctx``: ctx_b is the lower-case text after the last sentence end."""
    m = _TAIL.match(ctx.strip())
    if not m:
        return ctx, ""
    return (m.group(1) or ""), m.group(2)


def parse_record(rec: dict) -> Item:
    """A raw HellaSwag record (original with ctx_a/ctx_b, or the converted one with ctx) → Item."""
    endings = rec["endings"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        raise ValueError("endings must be a list of at least two non-empty strings")
    gold = int(rec["label"])
    if not 0 <= gold < len(endings):
        raise ValueError(f"label {gold} out of range for {len(endings)} endings")
    if "ctx_a" in rec:
        ctx_a, ctx_b = rec["ctx_a"], rec.get("ctx_b", "")
    else:
        ctx_a, ctx_b = split_ctx(rec["ctx"])
    query = preprocess(rec["activity_label"] + ": " + ctx_a + " " + ctx_b.capitalize())
    return Item(int(rec.get("ind", -1)), query, tuple(preprocess(e) for e in endings), gold)


def load(path: str | Path) -> Loaded[Item]:
    return load_jsonl(path, parse_record)


def score(items: list[Item], model, progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """acc and acc_norm of ``model`` (an EvalModel or anything with ``loglikelihood``) on ``items``."""
    requests = [(item.query, " " + choice) for item in items for choice in item.choices]
    lls = model.loglikelihood(requests, progress=progress)
    samples, pos = [], 0
    for item in items:
        ll = [lls[pos + j][0] for j in range(len(item.choices))]
        pos += len(item.choices)
        norm = [v / len(c) for v, c in zip(ll, item.choices)]
        pred, pred_norm = max(range(len(ll)), key=ll.__getitem__), max(range(len(norm)), key=norm.__getitem__)
        samples.append({
            "ind": item.ind, "gold": item.gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": ll,
            "acc": float(pred == item.gold), "acc_norm": float(pred_norm == item.gold),
        })
    n = max(1, len(samples))
    metrics = {"acc": sum(s["acc"] for s in samples) / n, "acc_norm": sum(s["acc_norm"] for s in samples) / n}
    return metrics, samples


def evaluate(model, path: str | Path, limit: int | None = None, seed: int | None = None, progress: bool = True) -> TaskResult:
    loaded = load(path)
    items = select(loaded.items, limit, seed)
    metrics, samples = score(items, model, progress)
    return TaskResult("hellaswag", metrics, len(items), loaded.malformed, loaded.malformed_examples, samples)
