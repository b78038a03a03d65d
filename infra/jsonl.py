"""The one reader of JSON-lines files (``.jsonl``, ``.jsonl.gz``, ``.json.gz``) and gz-aware text files.

Bad-line policy, the same for every caller: blank lines are skipped (their numbers still count); a
line that is not UTF-8 or not a JSON object is a :class:`BadLine` (path, 1-based line number, reason).
Without ``on_bad`` the reader raises it — a strict input. With ``on_bad`` the reader hands it over (to
count, report or deliberately ignore) and goes on; a bad line is never dropped unseen.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


class BadLine(ValueError):
    """A line of a JSON-lines file that is not a UTF-8 JSON object."""

    def __init__(self, path: str | Path, line_no: int, reason: str):
        super().__init__(f"{path}:{line_no}: {reason}")
        self.path, self.line_no, self.reason = Path(path), line_no, reason


def open_text(path: str | Path, errors: str = "strict") -> IO[str]:
    """A UTF-8 text file, gunzipped when its name ends in ``.gz``."""
    path = Path(path)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def read_jsonl(path: str | Path, on_bad: Callable[[BadLine], None] | None = None,
               errors: str = "strict") -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every JSON-object line (see the module's bad-line policy).
    ``errors="replace"`` decodes invalid UTF-8 as U+FFFD instead of calling the line bad; a UTF-8 byte
    order mark is ignored. Lines end at ``\\n`` only (a ``\\r`` before it is whitespace)."""
    path = Path(path)
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as fh:
        for line_no, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8-sig", errors)
                if not text.strip():
                    continue
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
                bad = BadLine(path, line_no, f"{type(exc).__name__}: {exc}")
                if on_bad is None:
                    raise bad from None
                on_bad(bad)
                continue
            yield line_no, obj
