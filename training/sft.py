"""``sft``: supervised fine-tuning on chat data, loss on assistant tokens only, packed sequences.

Conversations (training.data) are rendered with the tokenizer's chat template, packed greedily
into rows of ``max_len`` tokens with position ids restarting per example (attention stays inside
each example), and trained with next-token cross-entropy normalised by the global count of
supervised tokens. Metric: held-out loss per assistant token before and after.
"""

from __future__ import annotations

import json

from pydantic import Field

from infra.stage import Stage, StageContext, StageResult
from training.learner_config import LearnerConfig, external_inputs
from training.learner_stage import run_stage


class SFTConfig(LearnerConfig):
    """SFT data and packing; optimisation fields come from LearnerConfig."""

    data: list[str] = Field(
        default_factory=list,
        description="required: chat jsonl files (messages | prompt/response | question/answer | instruction/instances)",
    )
    lr: float = Field(2e-5, gt=0, description="peak learning rate")


class SFTTask:
    def __init__(self, config: dict, data_paths: list[str]):
        self.cfg = SFTConfig.model_validate(config)
        self.paths = data_paths

    def prepare(self, tokenizer):
        """Conversations → held-out split by content hash → encoded → packed rows."""
        from training.data import (
            BadExample, Skips, encode_conversation, load_records, pack, record_to_conversations, split_heldout,
        )

        skips = Skips()
        convs = load_records(self.paths, record_to_conversations, skips)
        train, heldout = split_heldout(convs, lambda c: json.dumps(c, sort_keys=True), self.cfg.heldout_fraction)
        encoded = {"train": [], "heldout": []}
        for name, items in (("train", train), ("heldout", heldout)):
            for conv in items:
                try:
                    encoded[name].append(encode_conversation(tokenizer, conv, self.cfg.max_len))
                except BadExample as exc:
                    skips.add(exc.reason)
        self.pad_id = tokenizer.pad_token_id
        metrics = {"train_examples": len(encoded["train"]), "heldout_examples": len(encoded["heldout"]),
                   "train_tokens_supervised": sum(sum(lab != -100 for lab in e.labels) for e in encoded["train"]),
                   **skips.as_metrics("")}
        return pack(encoded["train"], self.cfg.max_len), pack(encoded["heldout"], self.cfg.max_len), metrics

    def load_model(self, model_dir, tokenizer):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def setup(self, model, train_items, eval_items) -> None:
        """Nothing to precompute for SFT."""

    # held-out metrics measured before and after training: kind, which direction is better, unit
    EFFECTS = {"loss": {"kind": "mean", "better": "lower", "unit": "nats per assistant token"}}

    def _forward(self, model, rows):
        """(logits, labels) of packed rows."""
        from training.data import collate_packed
        from training.devices import model_device, to_device

        batch = to_device(collate_packed(rows, self.cfg.max_len, self.pad_id), model_device(model))
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return logits, batch["labels"]

    def loss(self, model, rows, dist):
        from training.losses import sft_loss

        loss_sum, count = sft_loss(*self._forward(model, rows))
        return loss_sum, int(count), {}

    def evaluate(self, model, rows) -> dict:
        """Per packed row: (loss per supervised token, supervised tokens as its weight)."""
        import torch

        from training.losses import token_logps

        losses, tokens = [], []
        with torch.no_grad():
            for i in range(0, len(rows), self.cfg.eval_batch_size):
                logps, mask = token_logps(*self._forward(model, rows[i:i + self.cfg.eval_batch_size]))
                for row_sum, row_count in zip((-logps.sum(-1)).tolist(), mask.sum(-1).tolist()):
                    losses.append(row_sum / max(row_count, 1))
                    tokens.append(float(row_count))
        return {"loss": (losses, tokens)}


def run(ctx: StageContext) -> StageResult:
    return run_stage(ctx, "sft", upstream="pretrain")


STAGES = [
    Stage(
        name="sft",
        description="Supervised fine-tuning (assistant-only loss, packing) → hf/",
        config_model=SFTConfig,
        run=run,
        optional_inputs=("pretrain",),
        external_inputs=external_inputs,
        resumable=True,
    )
]
