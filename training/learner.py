"""The learner shared by the sft / reward / dpo stages: one small loop, two backends.

``backend: torch`` runs in the stage process (AdamW, cosine schedule with warmup, grad clipping).
``backend: deepspeed`` launches ``deepspeed --num_gpus N --module training.learner JOB`` as a
subprocess (``DS_ACCELERATOR=cpu`` over gloo here, CUDA over NCCL where torch sees GPUs) with ZeRO
stage 2 or 3; the same loop runs on every rank. Each step's global batch is split across ranks and every loss is normalised
by the global count (tokens or pairs), so both backends give the same loss on the same seed.

A task (training.sft / reward / dpo) supplies: ``prepare(tokenizer) -> (train, heldout, metrics)``,
``load_model(model_dir, tokenizer)``, ``setup(model, items)`` (e.g. cache reference log-probs),
``loss(model, items, dist) -> (loss_sum, count, stats)``, where stats map a name to a local (sum, count)
pair that the learner reduces across ranks, and ``evaluate(model, items) -> {name: (values, weights)}``,
one value per held-out item, gathered over ranks. The held-out items are scored before and after
training; ``EFFECTS`` names the metrics reported as before → after rows with 95% intervals
(``evaluation.effects``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from evaluation.effects import EFFECTS_TABLE, effect_metrics, effect_row, format_effect
from infra.process import run_streaming
from infra.stage import StageConfig, StageContext, StageResult
from training.models import model_input, stage_model_dir

TASKS = {"sft": "training.sft:SFTTask", "reward": "training.reward:RewardTask", "dpo": "training.dpo:DPOTask"}
RESULT_FILE = "result.json"
STATE_FILE = "learner_state.pt"  # in the stage's resume dir


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


# ---- distributed helpers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collectives run: the rank's GPU under NCCL

    def sum(self, values):
        """Element-wise sum of a tensor over ranks (identity on one process), on the tensor's device."""
        if self.world > 1:
            import torch.distributed as tdist

            reduced = values.to(self.device, copy=True)
            tdist.all_reduce(reduced)
            values = reduced.to(values.device)
        return values


def gather_items(dist: Dist, scores: dict[str, tuple[list, list]]) -> dict[str, tuple[list, list]]:
    """{name: (per-item values, weights)} of this rank → the same over all ranks (rank order)."""
    if dist.world == 1:
        return scores
    import torch.distributed as tdist

    parts: list = [None] * dist.world
    tdist.all_gather_object(parts, scores)
    return {k: ([v for p in parts for v in p[k][0]], [w for p in parts for w in p[k][1]]) for k in scores}


def item_means(scores: dict[str, tuple[list, list]]) -> dict[str, float]:
    """{name: Σ wᵢvᵢ / Σ wᵢ} (NaN with no weight)."""
    out = {}
    for name, (values, weights) in scores.items():
        total = sum(weights)
        out[name] = sum(v * w for v, w in zip(values, weights)) / total if total else float("nan")
    return out


def reduce_stats(dist: Dist, stats: dict[str, tuple]) -> dict[str, float]:
    """{name: (sum, count)} local → {name: global sum / global count}."""
    import torch

    if not stats:
        return {}
    names = sorted(stats)
    flat = torch.tensor([float(v) for n in names for v in stats[n]], dtype=torch.float64)
    flat = dist.sum(flat)
    return {n: (flat[2 * i] / flat[2 * i + 1]).item() if flat[2 * i + 1] else float("nan") for i, n in enumerate(names)}


def step_schedule(n_items: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Global item indices for every step: seeded permutations, epoch after epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        perm = list(range(n_items))
        rng.shuffle(perm)
        order += perm
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def cosine_lr(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup from 0 then cosine decay to 0 (HF get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---- backends ----------------------------------------------------------------------------------------


def _param_groups(model, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class TorchBackend:
    """AdamW (fused kernel: ~10x faster steps than the foreach one on CPU) + LambdaLR + clip_grad_norm_."""

    def __init__(self, model, cfg: LearnerConfig):
        import torch

        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: cosine_lr(s, cfg.warmup_steps, cfg.steps)
        )
        self.clip = cfg.grad_clip

    def step(self, loss) -> float:
        import torch

        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def gathered(self):
        from contextlib import nullcontext

        return nullcontext()


class DeepSpeedBackend:
    """deepspeed.initialize with ZeRO-2/3, the same AdamW and schedule as TorchBackend."""

    def __init__(self, model, cfg: LearnerConfig, dist: Dist):
        import deepspeed
        import torch

        ds_config = {
            "train_batch_size": cfg.batch_size,
            "train_micro_batch_size_per_gpu": cfg.batch_size // dist.world,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=_param_groups(model, cfg.weight_decay),
            optimizer=lambda groups: torch.optim.AdamW(groups, lr=cfg.lr, fused=True),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: cosine_lr(s, cfg.warmup_steps, cfg.steps)
            ),
            config=ds_config,
        )
        self.model = self.engine
        self.zero_stage = cfg.zero_stage

    def step(self, loss) -> float:
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def gathered(self):
        """Full parameters on every rank for saving (ZeRO-3 partitions them)."""
        from contextlib import nullcontext

        if self.zero_stage < 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)


# ---- resume (torch backend) ---------------------------------------------------------------------------


def save_state(path: Path, step: int, model, backend: TorchBackend, rows: list[dict], before: dict) -> None:
    """Everything the loop needs to continue after ``step`` exactly as if uninterrupted; written atomically."""
    import torch

    state = {
        "step": step, "rows": rows, "before": before,
        "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": backend.opt.state_dict(), "scheduler": backend.sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, model, backend: TorchBackend) -> dict:
    """Restore what :func:`save_state` wrote; returns it (step, rows, before)."""
    import torch

    state = torch.load(path, weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    backend.opt.load_state_dict(state["optimizer"])
    backend.sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state


# ---- the loop ----------------------------------------------------------------------------------------


def make_task(name: str, config: dict, data_paths: list[str]):
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(config, data_paths)


def _init_dist(backend: str) -> Dist:
    if backend != "deepspeed":
        return Dist()
    import deepspeed
    import torch.distributed as tdist
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed(dist_backend="nccl")
        return Dist(rank=tdist.get_rank(), world=tdist.get_world_size(), device=accelerator.current_device_name())
    deepspeed.init_distributed(dist_backend="gloo")
    return Dist(rank=tdist.get_rank(), world=tdist.get_world_size())


def train(job: dict, log: logging.Logger) -> dict:
    """Run one training job (every rank); rank 0 writes ``hf/`` and returns the metrics."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from training.data import prepare_tokenizer

    task = make_task(job["task"], job["config"], job["data"])
    cfg: LearnerConfig = task.cfg
    dist = _init_dist(cfg.backend)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    prepare_tokenizer(tokenizer)
    train_items, eval_items, metrics = task.prepare(tokenizer)
    if cfg.max_examples:
        train_items = train_items[: cfg.max_examples]
    eval_items = eval_items[: cfg.max_eval_examples]
    if not train_items:
        raise LearnerError("no training examples left after the held-out split")
    metrics.update(train_items=len(train_items), eval_items=len(eval_items))
    schedule = [ids[dist.rank::dist.world] for ids in step_schedule(len(train_items), cfg.batch_size, cfg.steps, cfg.seed)]
    my_eval = eval_items[dist.rank::dist.world]

    model = task.load_model(job["model_dir"], tokenizer)
    if cfg.train_layers:
        from training.frozen import freeze_bottom

        freeze_bottom(model, cfg.train_layers)
    metrics["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    needed = [train_items[i] for i in sorted({i for ids in schedule for i in ids})]
    task.setup(model, needed, my_eval)
    state_path = Path(job["resume_dir"]) / STATE_FILE if job.get("resume_dir") and cfg.backend == "torch" else None
    resumed = state_path is not None and state_path.is_file()
    if not resumed:
        before = gather_items(dist, task.evaluate(model, my_eval)) if eval_items else {}
    backend = TorchBackend(model, cfg) if cfg.backend == "torch" else DeepSpeedBackend(model, cfg, dist)
    rows, start = [], 0
    if resumed:
        state = load_state(state_path, model, backend)
        rows, start, before = state["rows"], state["step"], state["before"]
        log.info("resumed from step %d (%s)", start, state_path)

    recent = deque((r["loss"] for r in rows), maxlen=10)
    t_loop = time.time()
    bar = tqdm(schedule[start:], desc=f"{job['task']} steps", disable=dist.rank != 0, mininterval=10, file=sys.stdout)
    for step, ids in enumerate(bar, start=start + 1):
        backend.model.train()
        loss_sum, count, stats = task.loss(backend.model, [train_items[i] for i in ids], dist)
        global_count = dist.sum(torch.tensor(float(count), dtype=torch.float64)).item()
        lr = backend.lr()
        grad_norm = backend.step(loss_sum * (dist.world / global_count))
        row = {"step": step, "lr": lr, "grad_norm": grad_norm,
               **reduce_stats(dist, {"loss": (loss_sum.item(), count), **stats})}
        rows.append(row)
        recent.append(row["loss"])
        if dist.rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            log.info("step %d/%d %s", step, cfg.steps, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
        if state_path is not None and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_state(state_path, step, model, backend, rows, before)
    loop_seconds = time.time() - t_loop
    backend.model.eval()
    after = gather_items(dist, task.evaluate(backend.model, my_eval)) if eval_items else {}

    out = Path(job["out_dir"])
    with backend.gathered():
        if dist.rank == 0:
            model.save_pretrained(out / "hf", safe_serialization=True)
            tokenizer.save_pretrained(out / "hf")
    metrics.update({f"eval_{k}_before": v for k, v in item_means(before).items()})
    metrics.update({f"eval_{k}_after": v for k, v in item_means(after).items()})
    effects = [effect_row(job["task"], name, before[name][0], after[name][0], weights=before[name][1], **spec)
               for name, spec in task.EFFECTS.items() if name in before]
    metrics.update(
        backend=cfg.backend if cfg.backend == "torch" else f"deepspeed-zero{cfg.zero_stage}x{dist.world}",
        steps=cfg.steps, train_loss_first=rows[0]["loss"], train_loss_last_10=sum(recent) / len(recent),
        total_seconds=round(time.time() - t0, 1),
        train_steps_per_s=round((cfg.steps - start) / max(1e-9, loop_seconds), 4), resumed_from_step=start,
    )
    return {"metrics": metrics, "train_log": rows, "effects": effects}


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
    import shutil

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
    lines += [f"- {format_effect(r)}" for r in effects] + ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
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

    repo = Path(__file__).resolve().parent.parent
    threads = max(1, (os.cpu_count() or 1) // num_procs)
    accelerator = os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")
    env = {**os.environ, "DS_ACCELERATOR": accelerator,
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs), "--master_port",
           str(_free_port()), "--no_local_rank", "--module", "training.learner", str(job_path)]
    log.info("launching: %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=30)

    def on_line(line: str) -> None:
        tail.append(line)
        log.info("%s", line)

    rc = run_streaming(cmd, on_line, env=env, cwd=repo)
    if rc != 0:
        raise LearnerError(f"deepspeed learner exited with {rc}; last lines:\n" + "\n".join(tail))


def main(argv: list[str] | None = None) -> int:
    """Rank entry under the DeepSpeed launcher: run the job, rank 0 writes result.json next to it."""
    import torch.distributed as tdist

    job_path = Path((argv or sys.argv[1:])[0])
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(json.loads(job_path.read_text()), logging.getLogger("refinery.learner"))
    if tdist.get_rank() == 0:
        tmp = job_path.with_name(RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, job_path.with_name(RESULT_FILE))
    tdist.barrier()
    tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
