"""Task-file loading shared by every evaluation task: JSON-lines (plain or .gz, read by
:mod:`infra.jsonl`), malformed lines skipped and counted, and subset selection (``limit`` + ``seed``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, TypeVar

from infra.jsonl import read_jsonl

T = TypeVar("T")


class EvalDataError(ValueError):
    """A task file that cannot be used at all (missing, or no valid item)."""


@dataclass
class Loaded(Generic[T]):
    """Parsed items of one task file plus how many lines were skipped as malformed."""

    items: list[T]
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)


def load_jsonl(path: str | Path, parse: Callable[[dict], T]) -> Loaded[T]:
    """Parse every non-empty line of a JSON-lines file (plain or ``.gz``) with ``parse``.

    A bad line (not a UTF-8 JSON object, :mod:`infra.jsonl`), or one that ``parse`` rejects
    (KeyError/ValueError/TypeError/IndexError), is skipped and counted; the first few reasons are kept for the report.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"task file {str(path)!r} does not exist")
    loaded: Loaded[T] = Loaded(items=[])

    def skip(line_no: int, reason: str) -> None:
        loaded.malformed += 1
        if len(loaded.malformed_examples) < 5:
            loaded.malformed_examples.append(f"{path.name}:{line_no}: {reason}")

    for line_no, record in read_jsonl(path, on_bad=lambda bad: skip(bad.line_no, bad.reason)):
        try:
            loaded.items.append(parse(record))
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            skip(line_no, f"{type(exc).__name__}: {exc}")
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
