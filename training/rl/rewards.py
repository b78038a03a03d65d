"""Rewards for RL: verifiable (numeric answer, answer format), a reward model, and their combination.

Prompt sets: the templated arithmetic generator (bundled, no data needed) or any GSM8K-format JSONL
(``{"question", "answer"}`` with the final answer after ``####``).

A reward function maps (completion text, reference answer, prompt text) to a float. Scoring never
aborts a step: a function that raises gives 0 for that sample and the failure is counted.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from infra.jsonl import BadLine, read_jsonl

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(r"####\s*(" + _NUMBER + r")")
_ANY_NUMBER = re.compile(_NUMBER)
ANSWER_TEMPLATE = re.compile(r"####\s*" + _NUMBER + r"\s*$")


class PromptSetError(ValueError):
    """A prompt set that cannot be trained on (e.g. no verifiable answers)."""


@dataclass(frozen=True)
class PromptExample:
    question: str
    answer: str | None  # the reference final answer (a number as text), None when unknown


def parse_number(text: str) -> Fraction | None:
    """'1,234' / '$5' / '-3.50' → exact Fraction; None when it is not a number."""
    try:
        return Fraction(text.replace(",", "").replace("$", "").rstrip("."))
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str | None:
    """The final answer: the number after the last ``#### ``, else the last number in the text."""
    final = _FINAL.findall(text)
    if final:
        return final[-1]
    numbers = _ANY_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def correctness_reward(completion: str, answer: str | None, prompt: str = "") -> float:
    """1 when the completion's final number equals the reference numerically, else 0."""
    if answer is None:
        raise ValueError("no reference answer for this prompt")
    got, want = extract_answer(completion), parse_number(answer)
    return float(got is not None and want is not None and parse_number(got) == want)


def format_reward(completion: str, answer: str | None = None, prompt: str = "") -> float:
    """1 when the completion ends with the required answer line ``#### <number>``, else 0."""
    return float(bool(ANSWER_TEMPLATE.search(completion.strip())))


R1_LOGIT_CLAMP = 30.0  # α·r_m is clamped here: σ stays strictly inside (0, 1) in float64 and exp never overflows


def r1_shaping(
    model_reward: float, correct: float, alpha: float = 1.0, bonuses: list[tuple[float, float]] = (),
    scale: float = 1.0,
) -> float:
    """DeepSeek-R1 style shaping: a wrong answer always scores strictly below a right one, for any weights.

    r = w·[(c − 1) + s],  s = (σ(α·r_m) + Σ_k b_k) / (1 + Σ_k |w_k|) ∈ (0, 1)
    c = 1 when ``correct`` ≥ 0.5 else 0; w = ``scale`` (the 'correct' weight, > 0); ``bonuses`` are the
    other components as (weight w_k, value f_k clipped to [0, 1]) with b_k = w_k·f_k for w_k ≥ 0 and
    |w_k|·(1 − f_k) for w_k < 0, so each lies in [0, |w_k|]. Right answers score in (0, w), wrong ones in
    (−w, 0). With no bonuses this is the seed formula σ(α·r_m) + (c − 1). A wrong answer's score is
    computed from the complement (1 − s, exact in the same way), so the ordering survives rounding.
    """
    if scale <= 0:
        raise ValueError(f"r1 shaping needs a positive 'correct' weight, got {scale}")
    x = min(max(alpha * model_reward, -R1_LOGIT_CLAMP), R1_LOGIT_CLAMP)
    denominator = 1.0 + sum(abs(w) for w, _ in bonuses)
    clipped = [(w, min(max(f, 0.0), 1.0)) for w, f in bonuses]
    if correct >= 0.5:  # s = (σ(x) + Σ b_k) / D
        kept = sum(w * f if w >= 0 else -w * (1.0 - f) for w, f in clipped)
        return scale * (1.0 / (1.0 + math.exp(-x)) + kept) / denominator
    # c − 1 + s = −(1 − s) = −(σ(−x) + Σ (|w_k| − b_k)) / D
    missed = sum(w * (1.0 - f) if w >= 0 else -w * f for w, f in clipped)
    return -scale * (1.0 / (1.0 + math.exp(x)) + missed) / denominator


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment, added to the reward (0 when ``buffer`` is 0):

    0 for |y| ≤ L − B;  factor·((L − B) − |y|) / B for L − B < |y| ≤ L;  −factor beyond L
    (L = ``max_len``, the generation cap, B = ``buffer``, DAPO's L_cache).
    """
    if not buffer:
        return 0.0
    if buffer > max_len:
        raise ValueError(f"overlong buffer {buffer} exceeds the completion length cap {max_len}")
    if length > max_len:
        return -factor
    return factor * min(0.0, (max_len - buffer - length) / buffer)


class RewardModelScorer:
    """Scores (prompt, completion) with the ``reward`` stage's sequence-classification model (num_labels=1).

    Texts are formatted with the tokenizer's chat template (user prompt, assistant completion) when
    it has one, else concatenated.
    """

    def __init__(self, model_dir: str | Path, batch_size: int = 8, max_len: int = 512):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        from training.devices import compute_device

        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        self.model.to(compute_device()).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {model_dir} has num_labels={self.model.config.num_labels}, expected 1")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        self.batch_size, self.max_len = batch_size, max_len

    def _text(self, prompt: str, completion: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
            )
        return prompt + completion

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        import torch

        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True, max_length=self.max_len
            ).to(self.model.device)
            with torch.no_grad():
                scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


RewardFn = Callable[[str, "str | None", str], float]
VERIFIABLE: dict[str, RewardFn] = {"correct": correctness_reward, "format": format_reward}


@dataclass
class RewardBreakdown:
    """Combined reward per sample, each component's values, and how many calls failed per component."""

    total: list[float]
    components: dict[str, list[float]]
    failures: dict[str, int] = field(default_factory=dict)
    first_errors: dict[str, str] = field(default_factory=dict)


def score_samples(
    prompts: list[str], completions: list[str], answers: list[str | None], weights: dict[str, float],
    reward_model: RewardModelScorer | None = None, r1_alpha: float | None = None,
    functions: dict[str, RewardFn] | None = None,
) -> RewardBreakdown:
    """Weighted sum of the named reward components (``correct``, ``format``, ``reward_model``, or any
    extra ``functions``); with ``r1_alpha`` set, :func:`r1_shaping` of the reward model's score, the
    ``correct`` component (its weight scales the result) and every other weighted component as a bounded
    bonus (the ``reward_model`` weight is not used). A component that raises scores 0 for that sample and
    is counted in ``failures``.
    """
    fns = {**VERIFIABLE, **(functions or {})}
    unknown = set(weights) - set(fns) - {"reward_model"}
    if unknown:
        raise ValueError(f"unknown reward component(s) {sorted(unknown)}; known: {sorted(fns) + ['reward_model']}")
    components: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    first_errors: dict[str, str] = {}
    for name, weight in weights.items():
        if not weight or name == "reward_model":
            continue
        values = []
        for prompt, completion, answer in zip(prompts, completions, answers):
            try:
                values.append(float(fns[name](completion, answer, prompt)))
            except Exception as exc:  # a broken reward must not abort the step: count it, score 0
                failures[name] = failures.get(name, 0) + 1
                first_errors.setdefault(name, f"{type(exc).__name__}: {exc}")
                values.append(0.0)
        components[name] = values
    if weights.get("reward_model") or r1_alpha is not None:
        if reward_model is None:
            raise ValueError("reward_model weight > 0 (or r1 shaping) needs a reward model")
        components["reward_model"] = reward_model.score(prompts, completions)
    if r1_alpha is not None:
        if "correct" not in components:
            raise ValueError("r1 shaping (r1_alpha) needs the 'correct' reward component with a positive weight")
        others = [n for n in components if n not in ("correct", "reward_model")]
        total = [
            r1_shaping(components["reward_model"][i], components["correct"][i], r1_alpha,
                       [(weights[n], components[n][i]) for n in others], weights["correct"])
            for i in range(len(completions))
        ]
    else:
        verifiable = [
            sum(weights[n] * components[n][i] for n in components if n != "reward_model") for i in range(len(completions))
        ]
        total = [v + weights.get("reward_model", 0.0) * components["reward_model"][i] if "reward_model" in components else v
                 for i, v in enumerate(verifiable)]
    return RewardBreakdown(total, components, failures, first_errors)


# ---- prompt sets ---------------------------------------------------------------------------------------

# Appended to every question. SmolLM2-135M answers ~1/3 of the arithmetic prompts correctly with this
# wording; asking for the '#### N' line instead confuses it (0 correct), so the format reward is an option.
INSTRUCTION = "Answer with the number."


ARITHMETIC_TEMPLATES = (
    ("What is {a} plus {b}?", lambda a, b: a + b),
    ("What is {a} minus {b}?", lambda a, b: a - b),
    ("What is {a} times {b}?", lambda a, b: a * b),
    ("Tom has {a} apples and buys {b} more. How many apples does he have now?", lambda a, b: a + b),
    ("A box holds {a} pens. Sara takes {b} of them. How many pens are left?", lambda a, b: a - b),
)
HELDOUT_BUCKETS = 3  # one question in 3 (by a hash of its text) is reserved for evaluation


def is_heldout_question(question: str) -> bool:
    """Whether an arithmetic question belongs to the evaluation split (stable: CRC-32 of its text)."""
    return zlib.crc32(question.encode()) % HELDOUT_BUCKETS == 0


def _arithmetic_example(template: str, fn, a: int, b: int) -> PromptExample:
    if fn(a, b) < 0:
        a, b = b, a
    return PromptExample(template.format(a=a, b=b), str(fn(a, b)))


def arithmetic_prompts(count: int, seed: int = 0, max_operand: int = 10) -> list[PromptExample]:
    """Templated arithmetic word problems (a + b, a − b, a × b) with their exact answers, drawn with
    replacement from the training split (never a question :func:`heldout_arithmetic_prompts` returns);
    bundled, no data needed."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        template, fn = rng.choice(ARITHMETIC_TEMPLATES)
        example = _arithmetic_example(template, fn, rng.randint(2, max_operand), rng.randint(2, max_operand))
        if not is_heldout_question(example.question):
            out.append(example)
    return out


def heldout_arithmetic_prompts(count: int | None = None, max_operand: int = 10) -> list[PromptExample]:
    """The evaluation split of the arithmetic problems: every distinct held-out question in a fixed
    order (template, then operands), the first ``count`` of them (None = all; 118 at ``max_operand`` 10)."""
    seen, out = set(), []
    for template, fn in ARITHMETIC_TEMPLATES:
        for a in range(2, max_operand + 1):
            for b in range(2, max_operand + 1):
                example = _arithmetic_example(template, fn, a, b)
                if example.question not in seen and is_heldout_question(example.question):
                    seen.add(example.question)
                    out.append(example)
    return out[:count] if count else out


def load_gsm8k_jsonl(path: str | Path, limit: int = 0) -> list[PromptExample]:
    """GSM8K-format JSONL (``.gz`` too) → examples; the answer is the text after the final ``####`` (None if
    absent). Strict: a bad line or a row without a ``question`` is a :class:`PromptSetError`."""
    out = []
    try:
        for line_no, row in read_jsonl(path):
            if "question" not in row:
                raise BadLine(path, line_no, "no 'question'")
            final = _FINAL.findall(str(row.get("answer") or ""))
            out.append(PromptExample(row["question"], final[-1].replace(",", "") if final else None))
            if limit and len(out) >= limit:
                break
    except BadLine as bad:
        raise PromptSetError(f"{bad.path}:{bad.line_no}: not a {{'question', 'answer'}} JSON row ({bad.reason})") from None
    return out


def require_verifiable(examples: list[PromptExample], source: str) -> list[PromptExample]:
    """Keep examples with a reference answer; a set with none is an error (nothing to verify against)."""
    kept = [e for e in examples if e.answer is not None]
    if not kept:
        raise PromptSetError(
            f"prompt set {source!r} has no verifiable answers ({len(examples)} prompts, none with a '#### N' answer); "
            "use a GSM8K-format file or set the 'correct' reward weight to 0 and use a reward model"
        )
    return kept
