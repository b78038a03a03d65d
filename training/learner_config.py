"""Settings of the post-training learner (sft / reward / dpo): what every such stage shares.

No torch here: the stage shell (:mod:`training.learner_stage`) and the per-rank loop (:mod:`training.learner`)
both read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from infra.stage import StageConfig
from training.models import model_input

class LearnerError(RuntimeError):
    """The learner could not run (bad model source, failed DeepSpeed launch)."""


class LearnerConfig(StageConfig):
    """Fields every post-training stage shares: model source, backend, optimisation, data split."""

    renamed = {"max_steps": "steps"}

    model: str = Field(
        "upstream",
        description="'upstream' (hf/ of the upstream stage: sft<-pretrain, reward/dpo<-sft), 'smollm2', or a local HF dir",
    )
    backend: Literal["torch", "deepspeed"] = Field("torch", description="plain torch in-process, or DeepSpeed ZeRO")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage (deepspeed backend only)")
    num_procs: int = Field(2, ge=1, description="DeepSpeed ranks (CPU processes here, GPUs elsewhere)")
    steps: int = Field(10, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="global batch (rows / pairs) per step, split across ranks")
    eval_batch_size: int = Field(8, ge=1, description="rows / pairs per evaluation forward")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (cosine decay to 0 after warmup)")
    warmup_steps: int = Field(1, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices (not norms/biases)")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    max_len: int = Field(256, ge=8, description="max tokens per sequence (see training.data truncation policy)")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="share of examples held out (by content hash)")
    max_examples: int = Field(0, ge=0, description="use at most this many training examples (0 = all)")
    max_eval_examples: int = Field(64, ge=0, description="evaluate on at most this many held-out examples")
    seed: int = Field(0, description="seed for init, data order and the train/held-out split of ties")
    log_every: int = Field(1, ge=1, description="log a training line every N steps")
    save_every: int = Field(
        50, ge=0,
        description="torch backend: save a resumable checkpoint (weights, optimizer, schedule, RNG) every N steps; "
                    "a rerun after a crash resumes from it (0 = never)",
    )
    train_layers: int = Field(
        0, ge=0,
        description="0 = full fine-tune; N = train only the top N decoder blocks + final norm + untied head "
                    "(reward/dpo then cache the frozen blocks' output once: training.frozen)",
    )

    @model_validator(mode="after")
    def _batch_divides(self):
        if self.backend == "deepspeed" and self.batch_size % self.num_procs:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of num_procs {self.num_procs}")
        return self


# ---- model source ------------------------------------------------------------------------------------


def external_inputs(cfg) -> dict[str, str]:
    """Data files (``data_0``, ``data_1``, ...) and a non-upstream model: hashed, recorded in lineage."""
    return {**{f"data_{i}": p for i, p in enumerate(cfg.data)}, **model_input("model", cfg.model)}
