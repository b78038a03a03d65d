"""The one markdown-table writer for stage reports, run and sweep summaries."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], fmt: Callable[[Any], str] = str) -> list[str]:
    """The lines of a GitHub markdown table: the header, the ``|---|`` rule, one line per row. Each cell is
    ``fmt(cell)`` with ``|`` escaped, so a value holding a pipe stays in its column."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def dict_table(rows: list[dict]) -> list[str]:
    """Rows of dicts as a table; the columns are the union of keys in first-seen order (missing cells empty)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return markdown_table(columns, ([row.get(c, "") for c in columns] for row in rows))
