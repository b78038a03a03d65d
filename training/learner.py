"""The training loop shared by the sft / reward / dpo stages, and its per-rank entry point.

Layout (one shape for the post-training stages): settings in :mod:`training.learner_config`, optimiser and
distributed setup in :mod:`training.learner_backends`, this loop, and the stage shell in
:mod:`training.learner_stage`; each task module (sft / reward / dpo) adds its config fields and loss.

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
(``infra.effects``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import sys
import time
from collections import deque
from pathlib import Path

from infra.effects import effect_row
from training.devices import compute_device
from training.learner_backends import (
    DeepSpeedBackend, TorchBackend, gather_items, init_dist, load_state, reduce_stats, save_state,
)
from training.learner_config import LearnerConfig, LearnerError

TASKS = {"sft": "training.sft:SFTTask", "reward": "training.reward:RewardTask", "dpo": "training.dpo:DPOTask"}
RESULT_FILE = "result.json"  # rank 0's output next to the job file (deepspeed backend)
STATE_FILE = "learner_state.pt"  # in the stage's resume dir


def step_schedule(n_items: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Global item indices for every step: seeded permutations, epoch after epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        perm = list(range(n_items))
        rng.shuffle(perm)
        order += perm
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def item_means(scores: dict[str, tuple[list, list]]) -> dict[str, float]:
    """{name: Σ wᵢvᵢ / Σ wᵢ} (NaN with no weight)."""
    out = {}
    for name, (values, weights) in scores.items():
        total = sum(weights)
        out[name] = sum(v * w for v, w in zip(values, weights)) / total if total else float("nan")
    return out


def make_task(name: str, config: dict, data_paths: list[str]):
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(config, data_paths)


def train(job: dict, log: logging.Logger) -> dict:
    """Run one training job (every rank); rank 0 writes ``hf/`` and returns the metrics."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from training.data import prepare_tokenizer

    task = make_task(job["task"], job["config"], job["data"])
    cfg: LearnerConfig = task.cfg
    dist = init_dist(cfg.backend)
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

    model = task.load_model(job["model_dir"], tokenizer).to(compute_device())  # setup and "before" run there too
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
