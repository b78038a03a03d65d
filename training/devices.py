"""Where training computes: one place that picks the device and moves models and batches onto it.

Every trainer — pretrain (megatron-core), the learner tasks (sft, reward, dpo) and the RL stages
(grpo, ppo) — asks :func:`compute_device` where to put its models and reads a batch's target from
the model with :func:`model_device`, so a CUDA machine trains on its GPU by the same code path that
runs on the CPU here. ``CUDA_VISIBLE_DEVICES=""`` keeps a GPU machine on the CPU.
"""

from __future__ import annotations


def compute_device():
    """This rank's CUDA device (the launcher or megatron's ``initialize`` set it; device 0 in one
    process) when CUDA is available, else the CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def model_device(model):
    """The device of a model's parameters (the module inside a DeepSpeed engine included)."""
    return next(getattr(model, "module", model).parameters()).device


def to_device(batch: dict, device) -> dict:
    """A {name: tensor} batch with every tensor on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}
