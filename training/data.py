"""Post-training data: chat / preference jsonl → token ids with assistant-only labels, packing.

Record schemas (one JSON object per line, ``.jsonl`` or ``.jsonl.gz``):
- chat: ``{"messages": [{"role", "content"}, ...]}``, ``{"prompt", "response"}``,
  ``{"question", "answer"}`` (GSM8K) or ``{"instruction", "instances": [{"input", "output"}]}`` (Self-Instruct);
- preference: ``{"prompt", "chosen", "rejected"}`` (strings, prompt may be messages),
  ``{"chosen": [messages], "rejected": [messages]}`` or HH-RLHF transcripts
  ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`` (shared prefix, last turn differs).

Text is rendered with the tokenizer's chat template (ChatML when the tokenizer has none); labels are
the token ids of assistant turns (end-of-turn marker included) and IGNORE_INDEX elsewhere.

Truncation policy: a sequence longer than ``max_len`` is cut on the right (the response end goes,
the prompt is kept whole). An example whose prompt leaves fewer than ``min_response_tokens``
response tokens inside ``max_len`` is skipped and counted as ``prompt_too_long``; a pair whose
chosen and rejected are identical (before or after the cut) is skipped as ``identical_pair``.
Bad records are counted skips; a file with no usable record is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from infra import jsonl
from training.losses import IGNORE_INDEX

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_GSM8K_CALC = re.compile(r"<<[^>]*>>")


class DataError(ValueError):
    """A data file that cannot be used at all (missing, empty, nothing valid in it)."""


class BadExample(ValueError):
    """One record that is skipped; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Encoded:
    """One tokenized example: ids and labels of equal length (labels = IGNORE_INDEX off the response)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded


@dataclass
class PreferencePair:
    prompt: list[dict]  # messages up to (not including) the answer
    chosen: str
    rejected: str


@dataclass
class Skips:
    """Counted skips by reason (goes into the stage metrics)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    def as_metrics(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}skipped_{k}": v for k, v in sorted(self.counts.items())}


# ---- reading ---------------------------------------------------------------------------------------


def read_jsonl(path: str | Path, skips: Skips) -> Iterator[dict]:
    """Objects of a ``.jsonl`` / ``.jsonl.gz`` file; bad lines (not a UTF-8 JSON object) are counted as ``bad_json``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    for _, obj in jsonl.read_jsonl(path, on_bad=lambda bad: skips.add("bad_json")):
        yield obj


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadExample("bad_messages", "messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadExample("bad_messages", "each message needs role in system/user/assistant and string content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise BadExample("no_assistant_turn")
    return out


def record_to_conversations(rec: dict) -> list[list[dict]]:
    """One chat record → conversations (Self-Instruct tasks give one per instance)."""
    if "messages" in rec:
        return [_check_messages(rec["messages"])]
    if "prompt" in rec and "response" in rec:
        pairs = [(rec["prompt"], rec["response"])]
    elif "question" in rec and "answer" in rec:
        pairs = [(rec["question"], _GSM8K_CALC.sub("", str(rec["answer"])))]
    elif "instruction" in rec and isinstance(rec.get("instances"), list):
        pairs = [
            (rec["instruction"] + (f"\n\n{inst['input']}" if inst.get("input") else ""), inst.get("output", ""))
            for inst in rec["instances"] if isinstance(inst, dict)
        ]
    else:
        raise BadExample("unknown_schema", f"keys {sorted(rec)[:6]}")
    if not pairs:
        raise BadExample("no_assistant_turn")
    return [
        _check_messages([{"role": "user", "content": str(p)}, {"role": "assistant", "content": str(r)}])
        for p, r in pairs
    ]


def _hh_turns(transcript: str) -> list[dict]:
    parts = _HH_TURN.split("\n\n" + transcript.lstrip("\n"))
    turns = [
        {"role": "user" if role == "Human" else "assistant", "content": text.strip()}
        for role, text in zip(parts[1::2], parts[2::2])
    ]
    if not turns:
        raise BadExample("unknown_schema", "not an HH-RLHF transcript")
    return turns


def record_to_pair(rec: dict) -> PreferencePair:
    """One preference record → (prompt messages, chosen answer, rejected answer)."""
    if not ("chosen" in rec and "rejected" in rec):
        raise BadExample("unknown_schema", f"keys {sorted(rec)[:6]}")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if "prompt" in rec:
        prompt = rec["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_prompt(prompt)
        if isinstance(chosen, list):
            chosen, rejected = _last_assistant(chosen), _last_assistant(rejected)
    else:
        c_turns = _check_messages(chosen) if isinstance(chosen, list) else _hh_turns(str(chosen))
        r_turns = _check_messages(rejected) if isinstance(rejected, list) else _hh_turns(str(rejected))
        if len(c_turns) != len(r_turns) or c_turns[:-1] != r_turns[:-1]:
            raise BadExample("unpaired_dialogues", "chosen and rejected must share all turns but the last")
        if c_turns[-1]["role"] != "assistant" or r_turns[-1]["role"] != "assistant":
            raise BadExample("no_assistant_turn")
        prompt, chosen, rejected = c_turns[:-1], c_turns[-1]["content"], r_turns[-1]["content"]
        if not prompt:
            raise BadExample("unpaired_dialogues", "no prompt before the answers")
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip() or not rejected.strip():
        raise BadExample("no_assistant_turn", "empty chosen or rejected answer")
    if chosen.strip() == rejected.strip():
        raise BadExample("identical_pair")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def _check_prompt(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
    ):
        raise BadExample("bad_messages", "prompt must be a string or a list of messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _last_assistant(messages) -> str:
    msgs = _check_messages(messages)
    if msgs[-1]["role"] != "assistant":
        raise BadExample("no_assistant_turn")
    return msgs[-1]["content"]


def load_records(paths: list[str], parse, skips: Skips) -> list:
    """Parse every record of the files with ``parse`` (record → list of items); counted skips on BadExample."""
    items = []
    for path in paths:
        n_lines = 0
        for rec in read_jsonl(path, skips):
            n_lines += 1
            try:
                items.extend(parse(rec))
            except BadExample as exc:
                skips.add(exc.reason)
        if n_lines == 0:
            raise DataError(f"data file {str(path)!r} has no records")
    if not items:
        raise DataError(f"no usable examples in {', '.join(map(str, paths))} (skips: {dict(skips.counts)})")
    return items


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split by content hash: the same example is held out on every run and machine."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def split_heldout(items: list, key, fraction: float) -> tuple[list, list]:
    train, heldout = [], []
    for item in items:
        (heldout if is_heldout(key(item), fraction) else train).append(item)
    return train, heldout


# ---- templating and tokenization -------------------------------------------------------------------


def prepare_tokenizer(tokenizer) -> None:
    """ChatML template when the tokenizer has none; pad = eos when there is no pad token."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_with_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Full chat text and the character spans of the assistant turns (end-of-turn marker included)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not upto.startswith(prefix):
            raise DataError("the tokenizer's chat template does not render conversations prefix-stably")
        spans.append((len(prefix), len(upto)))
    return _render(tokenizer, messages), spans


def encode_spans(
    tokenizer, text: str, spans: list[tuple[int, int]], max_len: int, min_response_tokens: int = 1
) -> Encoded:
    """Tokenize ``text``; labels are the ids of tokens starting inside ``spans``; the truncation policy applies."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, enc["offset_mapping"])
    ]
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
    if first is None:
        raise BadExample("no_assistant_turn")
    if first + min_response_tokens > max_len:
        raise BadExample("prompt_too_long", f"prompt of {first} tokens, max_len {max_len}")
    return Encoded(ids[:max_len], labels[:max_len])


def encode_conversation(tokenizer, messages: list[dict], max_len: int) -> Encoded:
    text, spans = render_with_spans(tokenizer, messages)
    return encode_spans(tokenizer, text, spans, max_len)


def encode_pair(tokenizer, pair: PreferencePair, max_len: int, min_response_tokens: int = 1) -> EncodedPair:
    """Chosen and rejected conversations sharing the prompt; labels only on the answers."""
    out = []
    for answer in (pair.chosen, pair.rejected):
        messages = [*pair.prompt, {"role": "assistant", "content": answer}]
        prefix = _render(tokenizer, pair.prompt, generation_prompt=True)
        text = _render(tokenizer, messages)
        if not text.startswith(prefix):
            raise DataError("the tokenizer's chat template does not render conversations prefix-stably")
        out.append(encode_spans(tokenizer, text, [(len(prefix), len(text))], max_len, min_response_tokens))
    if out[0].input_ids == out[1].input_ids:
        raise BadExample("identical_pair", "chosen and rejected are identical after truncation")
    return EncodedPair(*out)


def load_preference_pairs(paths: list[str], tokenizer, max_len: int, heldout_fraction: float):
    """Preference files → (train pairs, held-out pairs, metrics) as EncodedPair lists.

    The split is by the content hash of (prompt, chosen, rejected). Texts are never logged.
    """
    skips = Skips()
    pairs = load_records(paths, lambda rec: [record_to_pair(rec)], skips)
    train, heldout = split_heldout(
        pairs, lambda p: json.dumps([p.prompt, p.chosen, p.rejected], sort_keys=True), heldout_fraction
    )
    encoded: dict[str, list[EncodedPair]] = {"train": [], "heldout": []}
    for name, items in (("train", train), ("heldout", heldout)):
        for pair in items:
            try:
                encoded[name].append(encode_pair(tokenizer, pair, max_len))
            except BadExample as exc:
                skips.add(exc.reason)
    metrics = {"train_pairs": len(encoded["train"]), "heldout_pairs": len(encoded["heldout"]), **skips.as_metrics("")}
    return encoded["train"], encoded["heldout"], metrics


# ---- batching --------------------------------------------------------------------------------------


def pack(examples: list[Encoded], max_len: int) -> list[list[Encoded]]:
    """Greedy in-order packing: consecutive examples share a row while their total fits in max_len."""
    rows, row, used = [], [], 0
    for ex in examples:
        if row and used + len(ex.input_ids) > max_len:
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += len(ex.input_ids)
    if row:
        rows.append(row)
    return rows


def collate_packed(rows: list[list[Encoded]], max_len: int, pad_id: int) -> dict:
    """Packed rows → input_ids, labels, position_ids (restart at 0 per example, so attention is block-diagonal).

    The model gets no attention_mask and ``use_cache=False``: transformers then builds the
    block-diagonal causal mask from the position-id resets (with a KV cache it would not). Padding forms its own trailing block with IGNORE_INDEX labels; the first
    token of every example is IGNORE_INDEX so no loss crosses an example boundary.
    """
    import torch

    ids, labels, pos = [], [], []
    for row in rows:
        r_ids, r_lab, r_pos = [], [], []
        for ex in row:
            r_ids += ex.input_ids
            r_lab += [IGNORE_INDEX] + ex.labels[1:]
            r_pos += list(range(len(ex.input_ids)))
        pad = max_len - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_lab + [IGNORE_INDEX] * pad)
        pos.append(r_pos + list(range(pad)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}


def collate_padded(examples: list[Encoded], pad_id: int) -> dict:
    """Right-padded batch with attention_mask (used for chosen/rejected pairs)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    labels = [e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict:
    """Pairs → one padded batch of 2·B rows: chosen first, then rejected."""
    return collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
