"""Deliberate faults for testing the loss-spike guard (``pretrain.fault_injection``), kept out of the
training step: the trainer arms the injector for each step and lets it corrupt that step's batch or
loss. A fault fires the first ``times`` times its step is trained (once by default, so the step
re-trained after the rollback is clean).
"""

from __future__ import annotations

from typing import Iterable


class FaultInjector:
    """The configured faults by step; ``arm(step)`` selects the one (if any) the next train step gets."""

    def __init__(self, faults: Iterable, vocab_size: int):
        self._pending = {f.step: [f, f.times] for f in faults}
        self._vocab_size = vocab_size
        self.active = None

    def arm(self, step: int) -> None:
        entry = self._pending.get(step)
        self.active = entry[0] if entry else None
        if entry:
            entry[1] -= 1
            if entry[1] == 0:
                del self._pending[step]

    def corrupt_batch(self, batch: dict) -> dict:
        """``garbage_tokens``: tokens and labels replaced by random ids (seeded by the step)."""
        if self.active is None or self.active.kind != "garbage_tokens":
            return batch
        import torch

        g = torch.Generator().manual_seed(self.active.step)
        return {**batch,
                "tokens": torch.randint(0, self._vocab_size, batch["tokens"].shape, generator=g),
                "labels": torch.randint(0, self._vocab_size, batch["labels"].shape, generator=g)}

    def loss_scale(self) -> float:
        """``scale_loss``: its factor; ``nan_loss``: NaN; otherwise 1."""
        if self.active is None:
            return 1.0
        return {"scale_loss": self.active.factor, "nan_loss": float("nan")}.get(self.active.kind, 1.0)
