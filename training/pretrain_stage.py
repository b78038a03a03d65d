"""``pretrain`` stage: megatron-core pretraining on the ``tokenize`` shards, launched with torchrun.

The stage writes the job spec, runs ``torchrun --nproc_per_node N -m training.pretrain`` as a
subprocess (its output streamed line by line into ``ctx.log``), exports the newest valid
checkpoint to an HF Llama directory with the ``tokenizer`` stage's files, and plots the loss curve.
Outputs: ``checkpoints/`` (dist_checkpointing), ``hf/``, ``tensorboard/``, ``metrics/``
(metrics.jsonl, skip_ledger.json, loss_curve.png, summary.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from infra.process import run_streaming
from infra.runstore import link_tree
from infra.stage import Stage, StageConfig, StageContext, StageResult
from training.megatron.checkpoint import latest_valid, list_checkpoints, read_metadata
from training.models import stage_model_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


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
    max_rollbacks: int = Field(10, ge=0, description="give up (error) after this many rollbacks")


class FaultInjection(StageConfig):
    """Deliberate fault for testing the spike guard (fires once, the first time ``step`` is trained)."""

    step: int = Field(..., ge=0, description="0-based training step to corrupt")
    kind: Literal["scale_loss", "garbage_tokens", "nan_loss"] = Field("scale_loss", description="what to corrupt")
    factor: float = Field(1000.0, description="loss multiplier for scale_loss")


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
    paths = {}
    if cfg.init_from and cfg.init_from != "smollm2":
        paths["init_from"] = cfg.init_from
    if cfg.resume_from:
        paths["resume_from"] = cfg.resume_from
    return paths


def launch(job: dict, job_dir: Path, nproc: int, torchrun_args: list[str], log) -> None:
    """Run ``torchrun -m training.pretrain`` on a job spec, streaming its output into ``log``."""
    job_dir.mkdir(parents=True, exist_ok=True)
    job_path = job_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *torchrun_args,
        "-m", "training.pretrain", "--job", str(job_path),
    ]
    if not any(a.startswith(("--rdzv", "--master_port", "--nnodes")) for a in torchrun_args):
        cmd[3:3] = ["--standalone"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    log.info("launching: %s", " ".join(cmd))
    rank_errors: list[str] = []  # the ranks' own tracebacks, not torchrun's

    def on_line(line: str) -> None:
        nonlocal rank_errors
        if "Warning" in line or "warnings.warn" in line:
            return
        log.info("%s", line)
        if line.startswith("[rank"):
            rank_errors = (rank_errors + [line])[-20:]

    rc = run_streaming(cmd, on_line, env=env, cwd=REPO_ROOT)
    if rc != 0:
        raise RuntimeError(f"torchrun exited with {rc}; ranks said:\n" + "\n".join(rank_errors))


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(step records, event records) from metrics.jsonl."""
    steps, events = [], []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        (events if "event" in rec else steps).append(rec)
    return steps, events


def plot_loss(steps: list[dict], events: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1.2, label="train loss")
    for e in events:
        if e["event"] == "spike":
            ax.axvline(e["step"], color="red", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("pretraining loss (red: spike rolled back)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run(ctx: StageContext) -> StageResult:
    cfg: PretrainConfig = ctx.config
    shards = ctx.input("tokenize").path("shards")
    tokenizer_dir = ctx.input("tokenizer").path("tokenizer")
    init_dir = None
    if cfg.init_from:
        init_dir = str(stage_model_dir(ctx, "init_from", cfg.init_from))
    # checkpoints, TensorBoard and metrics.jsonl live in the resume dir while training, so a rerun after a
    # crash continues from the newest valid checkpoint; they are hard-linked into the output at the end
    work = ctx.resume_dir or ctx.out_dir / ".work"
    ckpt_dir, tb_dir, metrics_path = work / "checkpoints", work / "tensorboard", work / "metrics.jsonl"
    if cfg.resume_from and not list_checkpoints(ckpt_dir):  # continue from a copy: upstream is never modified
        good, rejected = latest_valid(cfg.resume_from)
        for path, reason in rejected:
            ctx.log.warning("resume_from: %s", reason)
        if good is None:
            raise RuntimeError(f"resume_from {cfg.resume_from}: no valid checkpoint")
        shutil.copytree(good, ckpt_dir / good.name)
    job = {
        "config": cfg.model_dump(mode="json"), "shards": str(shards), "init_from_dir": init_dir,
        "save_dir": str(ckpt_dir), "tensorboard_dir": str(tb_dir), "metrics_path": str(metrics_path),
        "cache_dir": str(work / ".data_cache"),
    }
    launch(job, ctx.out_dir / ".job", cfg.nproc_per_node, cfg.torchrun_args, ctx.log)

    final, _ = latest_valid(ckpt_dir)
    if final is None:
        raise RuntimeError(f"training finished without a valid checkpoint in {ckpt_dir}")
    metrics_dir = ctx.output("metrics")
    metrics_dir.mkdir(parents=True)
    link_tree(ckpt_dir, ctx.output("checkpoints"))
    link_tree(tb_dir, ctx.output("tensorboard"))
    link_tree(metrics_path, metrics_dir / "metrics.jsonl")
    final = ctx.output("checkpoints") / final.name
    ctx.log.info("exporting %s to HF safetensors", final.name)
    subprocess.run(
        [sys.executable, "-m", "training.megatron.convert", "export", "--checkpoint", str(final),
         "--out", str(ctx.output("hf")), "--tokenizer", str(tokenizer_dir)],
        check=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    steps, events = read_metrics(metrics_dir / "metrics.jsonl")
    resumed = [e["step"] for e in events if e["event"] == "resumed"]
    ledger = read_metadata(final).get("skip_ledger", [])
    (metrics_dir / "skip_ledger.json").write_text(json.dumps(ledger, indent=1))
    plot_loss(steps, events, metrics_dir / "loss_curve.png")
    last = steps[-1]
    tps = [s["tokens_per_s"] for s in steps[1:]] or [last["tokens_per_s"]]
    summary = {
        "steps": last["step"], "final_loss": round(last["loss"], 4), "first_loss": round(steps[0]["loss"], 4),
        "tokens_per_s": round(sum(tps) / len(tps), 1), "tokens_seen": last["tokens"],
        "spikes_rolled_back": len(ledger), "checkpoint": final.name,
        "tp": cfg.tp, "pp": cfg.pp, "dp": last["dp"], "init_from": cfg.init_from or "random",
        "skip_ledger": json.dumps(ledger),
    }
    (metrics_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    report = "\n".join(
        ["## pretrain", "", f"![loss curve](metrics/loss_curve.png)", "",
         "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in summary.items() if k != "skip_ledger"]]
        + ([ "", "### skip ledger", "", "| step | reason | skipped samples | rolled back to |", "|---|---|---|---|"]
           + [f"| {e['step']} | {e['reason']} | {e['skipped_samples']} | {e['rolled_back_to']} |" for e in ledger]
           if ledger else [])
    )
    return StageResult(
        metrics={**summary, "resumed_from_steps": json.dumps(resumed)},
        tables={"skip_ledger": [{**e, "skipped_samples": json.dumps(e["skipped_samples"])} for e in ledger]},
        report_md=report,
        images={"loss_curve": "metrics/loss_curve.png"},
    )


STAGES = [
    Stage(
        name="pretrain",
        description="Megatron-core pretraining (TP×PP×DP, torchrun) on the tokenized shards; HF export",
        config_model=PretrainConfig,
        run=run,
        inputs=("tokenize", "tokenizer"),
        external_inputs=pretrain_external,
        version="1",
        resumable=True,
    )
]
