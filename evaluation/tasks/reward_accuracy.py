"""Pairwise accuracy of a reward model (an HF sequence-classification checkpoint, ``num_labels=1``,
as the ``reward`` stage writes): the share of held-out pairs where r(chosen) > r(rejected).

Pairs are JSON lines ``{"chosen": text, "rejected": text}`` (HH-RLHF's format, where both are the
whole dialogue) or ``{"prompt", "chosen", "rejected"}`` (prompt prepended to both). Texts longer
than ``max_length`` tokens keep their end, where the two answers differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evaluation.data import Loaded, load_jsonl, select
from evaluation.model import EvalModelError
from evaluation.tasks import TaskResult
from training.models import PRECISION_DTYPES, ModelSourceError, resolve_model


@dataclass(frozen=True)
class Pair:
    chosen: str
    rejected: str


def parse_record(rec: dict) -> Pair:
    prompt = rec.get("prompt") or ""
    chosen, rejected = rec["chosen"], rec["rejected"]
    if not all(isinstance(x, str) for x in (prompt, chosen, rejected)) or not chosen.strip() or not rejected.strip():
        raise ValueError("chosen/rejected must be non-empty strings")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    return Pair(prompt + chosen, prompt + rejected)


def load(path: str | Path) -> Loaded[Pair]:
    return load_jsonl(path, parse_record)


class RewardModel:
    """A scalar reward model on CPU: ``score(texts)`` → one float per text."""

    def __init__(self, path: str | Path, batch_size: int = 8, max_length: int = 1024, precision: str = "fp32"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.path = resolve_model(path)
        except ModelSourceError as exc:
            raise EvalModelError(f"cannot evaluate reward model {str(path)!r}: {exc}") from None
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=getattr(torch, PRECISION_DTYPES[precision]))
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise EvalModelError(f"{self.path}: a reward model needs num_labels=1 (has {self.model.config.num_labels})")
        pad = self.model.config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            self.model.config.pad_token_id = pad
        self.pad_token_id = pad
        self.batch_size, self.max_length = batch_size, max_length

    def score(self, texts: list[str], progress: bool = True) -> list[float]:
        import torch
        from tqdm.auto import tqdm

        encoded = [self.tokenizer.encode(t, add_special_tokens=False)[-self.max_length :] or [self.pad_token_id] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), self.batch_size), desc="reward", disable=not progress, leave=False):
                idx = order[start : start + self.batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), self.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[r, : len(encoded[i])] = 1
                hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                last = hidden[torch.arange(len(idx)), mask.sum(1) - 1]  # each row's last real token
                values = self.model.score(last).float().squeeze(-1)
                for r, i in enumerate(idx):
                    scores[i] = float(values[r])
        return scores


def evaluate(
    reward_model: RewardModel, path: str | Path, limit: int | None = None, seed: int | None = None, progress: bool = True
) -> TaskResult:
    loaded = load(path)
    pairs = select(loaded.items, limit, seed)
    scores = reward_model.score([t for p in pairs for t in (p.chosen, p.rejected)], progress=progress)
    samples = [
        {"pair": k, "chosen_reward": scores[2 * k], "rejected_reward": scores[2 * k + 1],
         "correct": float(scores[2 * k] > scores[2 * k + 1])}
        for k in range(len(pairs))
    ]
    n = max(1, len(samples))
    metrics = {
        "accuracy": sum(s["correct"] for s in samples) / n,
        "mean_margin": sum(s["chosen_reward"] - s["rejected_reward"] for s in samples) / n,
    }
    return TaskResult("reward_accuracy", metrics, len(pairs), loaded.malformed, loaded.malformed_examples, samples)
