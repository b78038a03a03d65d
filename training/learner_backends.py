"""The learner's optimisation backends and distributed helpers: plain torch in one process, or DeepSpeed
ZeRO-2/3 across ranks; plus the torch backend's resumable state. The loop is :mod:`training.learner`."""

from __future__ import annotations

import json
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from infra.runstore import RunStoreError
from training.learner_config import LearnerConfig


@dataclass(frozen=True)
class Dist:
    """A rank's place in the job and the one collective the loop needs (a sum)."""

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


def reduce_stats(dist: Dist, stats: dict[str, tuple]) -> dict[str, float]:
    """{name: (sum, count)} local → {name: global sum / global count}."""
    import torch

    if not stats:
        return {}
    names = sorted(stats)
    flat = torch.tensor([float(v) for n in names for v in stats[n]], dtype=torch.float64)
    flat = dist.sum(flat)
    return {n: (flat[2 * i] / flat[2 * i + 1]).item() if flat[2 * i + 1] else float("nan") for i, n in enumerate(names)}


def cosine_lr(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup from 0 then cosine decay to 0 (HF get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def init_dist(backend: str) -> Dist:
    """This rank's view of the job: one process for torch; DeepSpeed's process group (NCCL on GPUs, gloo on CPU)."""
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
        if self.zero_stage < 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)


# ---- resume (torch backend) ---------------------------------------------------------------------------


def save_state(path: Path, step: int, model, backend: TorchBackend, rows: list[dict], before: dict) -> None:
    """Everything the loop needs to continue after ``step`` exactly as if uninterrupted; written atomically.

    Only tensors and JSON values (the Python RNG state as a list), so :func:`load_state` never unpickles."""
    import torch

    version, internal, gauss = random.getstate()
    state = {
        **json.loads(json.dumps({"step": step, "rows": rows, "before": before})),
        "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": backend.opt.state_dict(), "scheduler": backend.sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class ResumeStateError(RunStoreError):
    """A resume state file that is not plain tensors and JSON values (e.g. a planted pickle): the stage
    process stops with this one line and is not retried."""


def load_state(path: Path, model, backend: TorchBackend) -> dict:
    """Restore what :func:`save_state` wrote (tensors and JSON values only: ``weights_only=True``); returns
    it (step, rows, before)."""
    import pickle

    import torch

    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        why = next((line.strip() for line in str(exc).splitlines() if "nsupported" in line), type(exc).__name__)
        raise ResumeStateError(f"refusing resume state {path}: not plain tensors and JSON values ({why}); "
                               "delete it to start the stage from step 0") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    backend.opt.load_state_dict(state["optimizer"])
    backend.sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    return state
