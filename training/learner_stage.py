"""The stage shell of the sft / reward / dpo stages: resolve model and data, run the learner (in this
process, or under the DeepSpeed launcher), report held-out effects."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
from collections import deque
from pathlib import Path

from infra.config import REPO_ROOT
from infra.effects import EFFECTS_TABLE, effect_metrics, format_effect
from infra.markdown import markdown_table
from infra.process import run_streaming
from infra.stage import StageContext, StageResult
from training.learner import RESULT_FILE, train
from training.learner_config import LearnerConfig, LearnerError
from training.models import stage_model_dir


def run_learner(ctx: StageContext, task: str, cfg: LearnerConfig, model_dir: Path, data: list[Path]) -> dict:
    """Train in-process (torch) or under the DeepSpeed launcher, streaming its output into ctx.log."""
    job = {"task": task, "config": cfg.model_dump(mode="json"), "data": [str(p) for p in data],
           "model_dir": str(model_dir), "out_dir": str(ctx.out_dir),
           "resume_dir": str(ctx.resume_dir) if ctx.resume_dir else None}
    ctx.log.info("%s: model %s, backend %s", task, model_dir, cfg.backend)
    if cfg.backend == "torch":
        return train(job, ctx.log)
    work = ctx.out_dir / ".learner"
    work.mkdir(parents=True, exist_ok=True)
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job))
    launch_deepspeed(job_path, cfg.num_procs, ctx.log)
    result = json.loads((work / RESULT_FILE).read_text())
    shutil.rmtree(work)
    return result


def run_stage(ctx: StageContext, task: str, upstream: str) -> StageResult:
    """The whole run() of a post-training stage: resolve model and data, train, report."""
    cfg = ctx.config
    if not cfg.data:
        raise ValueError(f"{ctx.stage}.data is empty: list its JSONL files (configs/tiny.yaml: the bundled tests/data/post)")
    model_dir = stage_model_dir(ctx, "model", cfg.model, upstream)
    data = [ctx.external_inputs[f"data_{i}"] for i in range(len(cfg.data))]
    result = run_learner(ctx, task, cfg, model_dir, data)
    effects = result["effects"]
    metrics = {"model_source": cfg.model if cfg.model != "upstream" else f"upstream:{upstream}", **result["metrics"],
               **effect_metrics(effects)}
    for row in effects:
        ctx.log.info("%s held-out: %s", ctx.stage, format_effect(row))
    lines = [f"## {ctx.stage}", "", "**Held-out, before → after (95% intervals)**", ""]
    lines += [f"- {format_effect(r)}" for r in effects] + [""]
    lines += markdown_table(["metric", "value"], metrics.items(), fmt=lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    return StageResult(metrics=metrics, tables={"train_log": result["train_log"], EFFECTS_TABLE: effects},
                       report_md="\n".join(lines))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_deepspeed(job_path: Path, num_procs: int, log: logging.Logger) -> None:
    """``deepspeed --num_gpus N --module training.learner JOB`` (the launcher's module, so a ``--user``
    install works too); DS_ACCELERATOR, unless set, is cuda where torch sees a GPU, else cpu."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // num_procs)
    accelerator = os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")
    env = {**os.environ, "DS_ACCELERATOR": accelerator,
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs), "--master_port",
           str(_free_port()), "--no_local_rank", "--module", "training.learner", str(job_path)]
    log.info("launching: %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=30)

    def on_line(line: str) -> None:
        tail.append(line)
        log.info("%s", line)

    rc = run_streaming(cmd, on_line, env=env, cwd=REPO_ROOT)
    if rc != 0:
        raise LearnerError(f"deepspeed learner exited with {rc}; last lines:\n" + "\n".join(tail))
