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

from infra.config import REPO_ROOT
from infra.markdown import markdown_table
from infra.process import run_streaming
from infra.runstore import link_tree
from infra.stage import Stage, StageContext, StageResult
from training.megatron.checkpoint import latest_valid, list_checkpoints, read_metadata
from training.models import stage_model_dir
from training.pretrain_config import PretrainConfig, pretrain_external



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


def skipped_documents(entry: dict, shards: Path) -> list[dict]:
    """The documents of a skip-ledger entry's samples, once each in sample order, with the samples that drew
    on each and, from the shard's sidecar, its doc_id, URL and source (``warc_file@offset``); None where a
    shard has no sidecar (shards not written by the tokenize stage)."""
    from curation.megatron_shards import ShardError, trace_tokens

    documents: dict[tuple, dict] = {}
    for item in entry.get("sample_documents", []):
        for shard, seq in item["documents"]:
            if (shard, seq) not in documents:
                try:
                    found = trace_tokens(shards, shard, seq)
                except ShardError:
                    found = {}
                documents[shard, seq] = {"shard": shard, "seq": seq, "doc_id": found.get("doc_id"),
                                         "url": found.get("url"), "source": found.get("source"), "samples": []}
            documents[shard, seq]["samples"].append(item["sample"])
    return list(documents.values())


def plot_loss(steps: list[dict], events: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1.2, label="train loss")
    for e in events:
        if e["event"] in ("spike", "spike_accepted"):
            ax.axvline(e["step"], color="red" if e["event"] == "spike" else "orange", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("pretraining loss (red: spike rolled back; orange: recurring spike accepted)")
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
    ledger = [{**{k: v for k, v in e.items() if k != "sample_documents"}, "documents": skipped_documents(e, shards)}
              for e in read_metadata(final).get("skip_ledger", [])]  # per-sample documents folded into "documents"
    (metrics_dir / "skip_ledger.json").write_text(json.dumps(ledger, indent=1))
    plot_loss(steps, events, metrics_dir / "loss_curve.png")
    last = steps[-1]
    tps = [s["tokens_per_s"] for s in steps[1:]] or [last["tokens_per_s"]]
    summary = {
        "steps": last["step"], "final_loss": round(last["loss"], 4), "first_loss": round(steps[0]["loss"], 4),
        "tokens_per_s": round(sum(tps) / len(tps), 1), "tokens_seen": last["tokens"],
        "spikes_rolled_back": len(ledger), "spikes_accepted": sum(e["event"] == "spike_accepted" for e in events),
        "checkpoint": final.name,
        "tp": cfg.tp, "pp": cfg.pp, "dp": last["dp"], "init_from": cfg.init_from or "random",
        "skip_ledger": json.dumps(ledger),
    }
    (metrics_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    report = ["## pretrain", "", "![loss curve](metrics/loss_curve.png)", "",
              *markdown_table(["metric", "value"], [(k, v) for k, v in summary.items() if k != "skip_ledger"])]
    if ledger:
        report += ["", "### skip ledger", "", *markdown_table(
            ["step", "reason", "skipped samples", "rolled back to", "documents in the skipped samples"],
            [(e["step"], e["reason"], e["skipped_samples"], e["rolled_back_to"],
              ", ".join(d["doc_id"] or f"{d['shard']}#{d['seq']}" for d in e["documents"])) for e in ledger])]
    return StageResult(
        metrics={**summary, "resumed_from_steps": json.dumps(resumed)},
        tables={"skip_ledger": [{**e, "skipped_samples": json.dumps(e["skipped_samples"]),
                                 "documents": json.dumps(e["documents"])} for e in ledger]},
        report_md="\n".join(report),
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
        execution_metrics=("tokens_per_s", "resumed_from_steps"),
    )
]
