"""Evaluation tasks: each module has a pure loader/scorer and a ``evaluate(...) -> TaskResult``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskResult:
    """One task's scores: ``metrics`` (name → value), items scored, malformed lines skipped,
    and per-item records (written to ``samples/<task>.jsonl`` by the stage)."""

    task: str
    metrics: dict[str, float]
    n: int
    malformed: int = 0
    notes: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
