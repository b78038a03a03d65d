"""GSM8K: greedy generation, answer extraction, exact match — lm-eval's ``gsm8k`` conventions.

Prompt ``"Question: {question}\\nAnswer:"``; k-shot examples come from the train file, drawn per
item with one ``random.Random(fewshot_seed)`` (lm-eval's sampler), joined by blank lines, or as
user/assistant turns when the chat template is applied. Generation stops at ``Question:``,
``</s>``, ``<|im_end|>`` or EOS, or after ``max_new_tokens``.

Two extractions, as lm-eval's filters: ``strict`` takes the number after ``#### ``, ``flexible``
the last number in the text. Both are compared with the gold number after removing ``,``, ``$``,
a trailing ``.`` and case. An answer with no number scores 0 under the ``[invalid]`` marker.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from evaluation.data import Loaded, load_jsonl, select
from evaluation.tasks import TaskResult

STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")
INVALID = "[invalid]"
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


@dataclass(frozen=True)
class Item:
    question: str
    answer: str  # full reference solution ending in "#### N"


def parse_record(rec: dict) -> Item:
    question, answer = rec["question"], rec["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("empty question")
    if not isinstance(answer, str) or "####" not in answer:
        raise ValueError("answer has no '#### N' final line")
    return Item(question, answer)


def load(path: str | Path) -> Loaded[Item]:
    return load_jsonl(path, parse_record)


def extract_strict(text: str) -> str:
    """The number after the first ``#### `` or ``[invalid]``."""
    m = _STRICT.findall(text)
    return m[0].strip() if m else INVALID


def extract_flexible(text: str) -> str:
    """The last number-like span in the text or ``[invalid]``."""
    matches = _FLEXIBLE.findall(text)
    if not matches:
        return INVALID
    groups = [g for g in matches[-1] if g]
    return groups[0].strip() if groups else INVALID


def normalize(text: str) -> str:
    for pattern in _IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gold_answer(item: Item) -> str:
    return normalize(item.answer)


def doc_to_text(item: Item) -> str:
    return f"Question: {item.question}\nAnswer:"


def build_prompts(items: list[Item], shots: list[Item], k: int, fewshot_seed: int, model=None, chat_template: bool = False) -> list[str]:
    """One prompt per item: k examples from ``shots`` (fresh draw per item) then the question."""
    if k and len(shots) < k:
        raise ValueError(f"{k}-shot needs at least {k} train examples (got {len(shots)})")
    rnd = random.Random(fewshot_seed)
    prompts = []
    for item in items:
        examples = rnd.sample(shots, k) if k else []
        if chat_template:
            messages = []
            for ex in examples:
                messages += [{"role": "user", "content": doc_to_text(ex)}, {"role": "assistant", "content": ex.answer}]
            messages.append({"role": "user", "content": doc_to_text(item)})
            prompts.append(model.chat_prompt(messages))
        else:
            parts = [f"{doc_to_text(ex)} {ex.answer}" for ex in examples] + [doc_to_text(item)]
            prompts.append("\n\n".join(parts))
    return prompts


def score_generations(items: list[Item], generations: list[str]) -> tuple[dict[str, float], list[dict]]:
    samples = []
    for item, gen in zip(items, generations):
        gold = gold_answer(item)
        strict, flexible = extract_strict(gen), extract_flexible(gen)
        samples.append({
            "question": item.question, "gold": gold, "generation": gen,
            "strict": strict, "flexible": flexible,
            "exact_match_strict": float(normalize(strict) == gold),
            "exact_match_flexible": float(normalize(flexible) == gold),
        })
    n = max(1, len(samples))
    metrics = {
        "exact_match_strict": sum(s["exact_match_strict"] for s in samples) / n,
        "exact_match_flexible": sum(s["exact_match_flexible"] for s in samples) / n,
        "no_number": sum(s["flexible"] == INVALID for s in samples) / n,
    }
    return metrics, samples


def evaluate(
    model,
    path: str | Path,
    train_path: str | Path | None = None,
    num_fewshot: int = 0,
    fewshot_seed: int = 1234,
    chat_template: bool = False,
    max_new_tokens: int = 256,
    limit: int | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> TaskResult:
    loaded = load(path)
    items = select(loaded.items, limit, seed)
    notes = list(loaded.malformed_examples)
    shots: list[Item] = []
    if num_fewshot:
        if train_path is None:
            raise ValueError("gsm8k: num_fewshot > 0 needs train_path")
        train = load(train_path)
        shots = train.items
        if train.malformed:
            notes.append(f"train file: {train.malformed} malformed lines skipped")
    prompts = build_prompts(items, shots, num_fewshot, fewshot_seed, model, chat_template)
    generations = model.generate_until(prompts, until=STOP_SEQUENCES, max_new_tokens=max_new_tokens, progress=progress)
    metrics, samples = score_generations(items, generations)
    return TaskResult("gsm8k", metrics, len(items), loaded.malformed, notes, samples)
