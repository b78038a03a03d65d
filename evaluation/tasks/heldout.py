"""Held-out loss on our own curated data: the validation (or test) documents of the ``tokenize``
stage's Megatron shards — the split's own shards (``blend.json``'s ``blend_per_split``), or, for a
blend with only ``prefixes``, the documents Megatron's dataset builder assigns to the split
(``split`` ``"98,1,1"``: documents ``[round(.98 N), round(.99 N))`` of each shard).

Each document's tokens after the first are scored given all earlier ones (windows of ``window``
tokens); reported are the mean loss in nats per token and its perplexity, and one sample per window.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from evaluation.data import EvalDataError, select
from evaluation.model import rolling_windows
from evaluation.tasks import TaskResult

SPLITS = ("train", "valid", "test")


def split_range(num_docs: int, split: str, which: str) -> tuple[int, int]:
    """Document index range of split ``which`` in a shard of ``num_docs`` documents (Megatron's rule)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[SPLITS.index(which)]
    if bounds is None:
        return 0, 0
    return int(round(bounds[0] * num_docs)), int(round(bounds[1] * num_docs))


def load_documents(shards_dir: str | Path, which: str = "valid") -> tuple[list[list[int]], dict]:
    """Token lists of the ``which`` split of the shards in ``shards_dir/blend.json``: the split's own
    shards where ``blend_per_split`` lists them, else Megatron's document split of ``prefixes``."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shards_dir = Path(shards_dir)
    blend_path = shards_dir / "blend.json"
    if not blend_path.is_file():
        raise EvalDataError(f"{shards_dir} has no blend.json (not a tokenize stage's shards/ output)")
    blend = json.loads(blend_path.read_text())
    per_split = blend.get("blend_per_split")
    entries = (per_split.get(which) or []) if per_split else blend["prefixes"]
    docs: list[list[int]] = []
    for _weight, prefix in entries:
        ds = IndexedDataset(str(shards_dir / prefix))
        doc_idx = ds.document_indices
        n_docs = len(doc_idx) - 1
        lo, hi = (0, n_docs) if per_split else split_range(n_docs, blend.get("split", "98,1,1"), which)
        for d in range(lo, hi):
            seqs = [ds[s] for s in range(int(doc_idx[d]), int(doc_idx[d + 1]))]
            tokens = np.concatenate(seqs).tolist() if seqs else []
            if len(tokens) >= 2:
                docs.append(tokens)
    return docs, blend


def evaluate(
    model, shards_dir: str | Path, which: str = "valid", window: int = 1024, limit: int | None = None,
    seed: int | None = None, progress: bool = True,
) -> TaskResult:
    docs, blend = load_documents(shards_dir, which)
    vocab, model_vocab = int(blend.get("vocab_size", 0)), len(model.tokenizer)
    if vocab != model_vocab:
        raise EvalDataError(
            f"the shards were tokenized with a {vocab}-token vocabulary, the model's tokenizer has {model_vocab}: "
            "not the same tokenizer"
        )
    if not docs:
        raise EvalDataError(f"the shards' {which!r} split holds no document of 2+ tokens")
    docs = select(docs, limit, seed)
    windows, owners = [], []
    window = min(window, model.max_length)
    for i, tokens in enumerate(docs):
        # the first token is the context; every later token is predicted once
        for ctx, cont in rolling_windows(tokens[1:], tokens[0], window):
            windows.append((ctx, cont))
            owners.append(i)
    scores = model.loglikelihood_tokens(windows, progress=progress) if windows else []
    ll = sum(lp for lp, _ in scores)
    n_tokens = sum(len(c) for _, c in windows)
    metrics = {"loss": -ll / n_tokens, "perplexity": math.exp(-ll / n_tokens), "tokens": float(n_tokens)}
    # one record per scoring window (the unit a before → after comparison resamples)
    samples = [{"doc": i, "tokens": len(cont), "loglikelihood": lp} for i, (_, cont), (lp, _) in zip(owners, windows, scores)]
    return TaskResult("heldout", metrics, len(docs), 0, [], samples)
