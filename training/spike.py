"""Loss-spike guard: a rolling z-score test on loss and grad norm; NaN/Inf is always a spike.

Pure and framework-free: the training loop feeds it ``(step, loss, grad_norm)`` after each
optimizer step and, on a spike, restores the last validated checkpoint (whose guard state it
loads back), skips the offending samples and appends a :func:`ledger_entry` to the skip ledger.

Test (per metric ``x`` with the last ``window`` accepted values ``h``; OLMo-core uses 6σ over
128 steps)::

    spike  ⇔  x is NaN/Inf  or  (len(h) >= min_history and (x - mean(h)) / max(std(h), min_rel_std·|mean(h)|) > sigma)

Only upward deviations count (a falling loss is not a spike); spikes never enter the history.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    spike: bool
    reason: str = ""


def zscore(value: float, history: list[float], min_rel_std: float) -> float:
    """How many (floored) standard deviations ``value`` lies above the mean of ``history``."""
    n = len(history)
    mean = sum(history) / n
    std = math.sqrt(sum((h - mean) ** 2 for h in history) / n)
    return (value - mean) / max(std, min_rel_std * abs(mean), 1e-12)


class SpikeGuard:
    """Rolling-window z-score spike detector over loss and grad norm."""

    def __init__(self, window: int = 128, sigma: float = 6.0, min_history: int = 16, min_rel_std: float = 0.02):
        if window < 2 or min_history < 2 or min_history > window:
            raise ValueError("need 2 <= min_history <= window")
        self.window, self.sigma, self.min_history, self.min_rel_std = window, sigma, min_history, min_rel_std
        self.loss: deque[float] = deque(maxlen=window)
        self.grad_norm: deque[float] = deque(maxlen=window)

    def check(self, loss: float, grad_norm: float | None) -> Verdict:
        """Judge one step; a non-spike step is added to the history."""
        values = {"loss": loss, "grad_norm": grad_norm}
        for name, value in values.items():
            if value is not None and not math.isfinite(value):
                return Verdict(True, f"{name} is {value}")
        for name, value in values.items():
            history = getattr(self, name)
            if value is None or len(history) < self.min_history:
                continue
            z = zscore(value, list(history), self.min_rel_std)
            if z > self.sigma:
                return Verdict(True, f"{name} {value:.4g} is {z:.1f} sigma above its last {len(history)} steps")
        self.loss.append(float(loss))
        if grad_norm is not None:
            self.grad_norm.append(float(grad_norm))
        return Verdict(False)

    def accept(self, loss: float, grad_norm: float | None) -> None:
        """Add a step judged a spike to the history anyway (a recurring spike is the trend: see
        :func:`recurring`), so the window widens to it."""
        self.loss.append(float(loss))
        if grad_norm is not None:
            self.grad_norm.append(float(grad_norm))

    def state_dict(self) -> dict:
        return {"loss": list(self.loss), "grad_norm": list(self.grad_norm)}

    def load_state_dict(self, state: dict) -> None:
        self.loss = deque(state["loss"], maxlen=self.window)
        self.grad_norm = deque(state["grad_norm"], maxlen=self.window)


def recurring(step: int, ledger: list[dict], max_retries: int, loss: float, grad_norm: float | None) -> bool:
    """Whether a spike at ``step`` is one that rolling back has not removed: ``max_retries`` rollbacks
    since training last got past it (ledger entries at ``step`` or later), each retrained with other
    samples, spiked again. Then the model's trajectory, not its data, is the cause, and another rollback
    would only repeat it. NaN/Inf never counts as recurring."""
    finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
    return finite and sum(1 for e in ledger if e["step"] >= step) >= max_retries


def to_ranges(indices: list[int]) -> list[list[int]]:
    """Sorted sample indices → ``[[start, end), ...]`` (end exclusive)."""
    ranges: list[list[int]] = []
    for i in sorted(set(indices)):
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def in_ranges(index: int, ranges: list[list[int]]) -> bool:
    return any(start <= index < end for start, end in ranges)


def ledger_entry(step: int, verdict: Verdict, loss: float, grad_norm: float | None, samples: list[int],
                 rolled_back_to: int, lr_cut: float, lr_cut_steps: int, sample_documents: list[dict]) -> dict:
    """One skip-ledger record: what spiked, which samples are skipped from now on, the documents each of
    them takes its tokens from (``[{"sample", "documents": [[shard, sequence], ...]}]``) and where
    training resumed."""
    return {
        "step": step, "reason": verdict.reason,
        "loss": loss if math.isfinite(loss) else str(loss),
        "grad_norm": grad_norm if grad_norm is None or math.isfinite(grad_norm) else str(grad_norm),
        "skipped_samples": to_ranges(samples), "num_skipped": len(set(samples)),
        "rolled_back_to": rolled_back_to, "lr_cut": lr_cut, "lr_cut_steps": lr_cut_steps,
        "sample_documents": sample_documents,
    }
