"""Task-file loading shared by every evaluation task: JSON-lines (plain or .gz), malformed lines
skipped and counted, and subset selection (``limit`` + ``seed``).
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class EvalDataError(ValueError):
    """A task file that cannot be used at all (missing, or no valid item)."""


@dataclass
class Loaded(Generic[T]):
    """Parsed items of one task file plus how many lines were skipped as malformed."""

    items: list[T]
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)


def open_text(path: str | Path):
    """Open a text file, transparently gunzipping ``*.gz``."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"task file {str(path)!r} does not exist")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def load_jsonl(path: str | Path, parse: Callable[[dict], T]) -> Loaded[T]:
    """Parse every non-empty line of a JSON-lines file with ``parse``.

    A line that is not a JSON object, or that ``parse`` rejects (KeyError/ValueError/TypeError),
    is skipped and counted; the first few reasons are kept for the report.
    """
    loaded: Loaded[T] = Loaded(items=[])
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise TypeError(f"expected a JSON object, got {type(record).__name__}")
                loaded.items.append(parse(record))
            except (json.JSONDecodeError, KeyError, ValueError, TypeError, IndexError) as exc:
                loaded.malformed += 1
                if len(loaded.malformed_examples) < 5:
                    loaded.malformed_examples.append(f"{Path(path).name}:{lineno}: {type(exc).__name__}: {exc}")
    return loaded


def select(items: list[T], limit: int | None, seed: int | None) -> list[T]:
    """The evaluated subset: all items, the first ``limit`` (seed None, lm-eval's ``--limit``),
    or ``limit`` items drawn with ``seed`` (kept in file order)."""
    if limit is None or limit >= len(items):
        return list(items)
    if seed is None:
        return items[:limit]
    picked = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in picked]
