"""Settings of the ``pretrain`` stage. No torch or megatron here: the stage shell
(:mod:`training.pretrain_stage`) and the per-rank program (:mod:`training.pretrain`) both read them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from infra.stage import StageConfig


class ModelConfig(StageConfig):
    """Llama-style model sizes (ignored when ``init_from`` names a model: its sizes are used)."""

    num_layers: int = Field(2, ge=1, description="transformer layers (divisible by pp)")
    hidden_size: int = Field(64, ge=8, description="model width")
    num_attention_heads: int = Field(4, ge=1, description="query heads")
    num_query_groups: int = Field(2, ge=1, description="key/value heads (GQA groups); divisible by tp")
    ffn_hidden_size: int = Field(172, ge=1, description="SwiGLU inner width")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")
    tie_embeddings: bool = Field(True, description="share input embedding and output layer")
    init_std: float = Field(0.02, gt=0, description="weight init standard deviation")


class SpikeConfig(StageConfig):
    """Loss-spike guard: rolling z-score on loss and grad norm; NaN/Inf always counts."""

    enabled: bool = Field(True, description="detect spikes and roll back")
    window: int = Field(128, ge=2, description="steps in the rolling window (OLMo-core: 128)")
    sigma: float = Field(6.0, gt=0, description="z-score threshold (OLMo-core: 6)")
    min_history: int = Field(16, ge=2, description="steps seen before the z-test applies")
    min_rel_std: float = Field(0.02, ge=0, description="std floor as a fraction of the mean")
    lr_cut: float = Field(1.0, gt=0, le=1, description="LR multiplier after a rollback (1 = none)")
    lr_cut_steps: int = Field(0, ge=0, description="steps the LR cut lasts")
    max_retries: int = Field(2, ge=0, description="rollbacks for spikes that recur at one step (each retried with "
                                                    "other samples) before that step is accepted as the trend, not "
                                                    "the data's fault; NaN/Inf is never accepted")
    max_rollbacks: int = Field(10, ge=0, description="give up (error) after this many rollbacks")


class FaultInjection(StageConfig):
    """Deliberate fault for testing the spike guard (fires the first ``times`` times ``step`` is trained)."""

    step: int = Field(..., ge=0, description="0-based training step to corrupt")
    kind: Literal["scale_loss", "garbage_tokens", "nan_loss"] = Field("scale_loss", description="what to corrupt")
    factor: float = Field(1000.0, description="loss multiplier for scale_loss")
    times: int = Field(1, ge=1, description="how many trainings of the step it corrupts (>1: a spike that "
                                            "recurs after rollbacks)")


class PretrainConfig(StageConfig):
    """Megatron-core pretraining: parallel layout, model, optimisation, checkpoints, spike guard."""

    renamed = {"train_steps": "steps", "clip_grad": "grad_clip", "dtype": "precision", "save_interval": "save_every",
               "log_interval": "log_every"}

    nproc_per_node: int = Field(1, ge=1, description="processes per node (= tp × pp × dp / nnodes)")
    torchrun_args: list[str] = Field(
        default_factory=list, description="extra torchrun flags, e.g. --nnodes 2 --node_rank 0 --rdzv_endpoint h:29500"
    )
    tp: int = Field(1, ge=1, description="tensor-parallel size")
    pp: int = Field(1, ge=1, description="pipeline-parallel size")
    init_from: str | None = Field(None, description="'smollm2', an HF Llama directory, or null (random init)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="model sizes (random init)")
    seq_length: int = Field(64, ge=8, description="tokens per sample")
    micro_batch_size: int = Field(4, ge=1, description="samples per microbatch per DP rank")
    global_batch_size: int = Field(8, ge=1, description="samples per step over all DP ranks")
    steps: int = Field(100, ge=1, description="optimizer steps")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(3e-4, ge=0, description="final learning rate (cosine decay)")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    adam_beta2: float = Field(0.95, gt=0, lt=1, description="Adam beta2")
    grad_clip: float = Field(1.0, ge=0, description="grad-norm clip (0 = off)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="parameter precision (bf16: GPU only)")
    use_distributed_optimizer: bool = Field(False, description="ZeRO-1 style optimizer sharding (GPU only)")
    seed: int = Field(1234, description="init / data-order seed")
    save_every: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    log_every: int = Field(1, ge=1, description="print a log line every N steps")
    resume_from: str | None = Field(None, description="a checkpoints/ dir to resume from (newest valid one)")
    spike: SpikeConfig = Field(default_factory=SpikeConfig, description="loss-spike guard")
    fault_injection: list[FaultInjection] = Field(default_factory=list, description="test-only faults")


def pretrain_external(cfg: PretrainConfig) -> dict[str, str]:
    """A local init model and a resume directory: hashed into the cache key, recorded in the lineage."""
    paths = {}
    if cfg.init_from and cfg.init_from != "smollm2":
        paths["init_from"] = cfg.init_from
    if cfg.resume_from:
        paths["resume_from"] = cfg.resume_from
    return paths

