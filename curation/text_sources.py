"""Documents from outside the curation pipeline (a second corpus to mix in, extra tokenizer text).

Formats, chosen by file name: Parquet (``text`` plus optional ``doc_id``/``url``/``source``
columns), JSON lines (``.jsonl``/``.json``, optionally ``.gz``; ``text`` plus optional ``id``/
``url``) and plain text (``.txt``, optionally ``.gz``; split into documents by a regex). Each
document gets a stable ``doc_id`` and a ``source`` of the form ``file@position`` so lineage can
point back at it. :func:`valid_text` repairs what tokenizers cannot take (invalid UTF-8, lone
surrogates).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import re
from pathlib import Path
from typing import Iterator

from infra import jsonl

PARQUET = "parquet"
JSONL = "jsonl"
TEXT = "text"
BLANK_LINES = r"\n\s*\n"
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(value: str | bytes | None) -> tuple[str, bool]:
    """``value`` as a str every tokenizer accepts, and whether it had to be repaired.

    Invalid UTF-8 bytes and lone surrogates (one each) become U+FFFD; valid text is returned unchanged.
    """
    if value is None:
        return "", False
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
        try:  # lone surrogates that were written with "surrogatepass": one U+FFFD each, as for str
            value = value.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return value.decode("utf-8", "replace"), True
    try:
        value.encode("utf-8")
        return value, False
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", value), True


def source_format(path: str | Path) -> str:
    """``parquet``, ``jsonl`` or ``text`` from a file or folder name (a folder is Parquet)."""
    p = Path(path)
    name = p.name.lower().removesuffix(".gz")
    if p.is_dir() or name.endswith(".parquet"):
        return PARQUET
    if name.endswith((".jsonl", ".json")):
        return JSONL
    if name.endswith(".txt"):
        return TEXT
    raise ValueError(f"cannot tell the format of {str(path)!r}: use .parquet (or a folder), .jsonl/.json(.gz), .txt(.gz)")


def source_files(path: str | Path) -> list[Path]:
    """The files of a source: the file itself, or the supported files under a folder, sorted."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"source path {str(path)!r} does not exist")
    if p.is_file():
        return [p.resolve()]
    files = []
    for f in sorted(p.rglob("*")):
        if f.is_file() and not f.name.startswith((".", "_")):
            try:
                source_format(f)
            except ValueError:
                continue
            files.append(f.resolve())
    return files


def stable_doc_id(*parts: str) -> str:
    """A 32-hex id from the parts that identify a document (file + position, or a given id)."""
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def doc_hash(doc_id: str) -> int:
    """Spark's ``xxhash64(doc_id)`` (XXH64, seed 42, signed): the value the Spark shell computes too."""
    import xxhash

    h = xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=42)
    return h - (1 << 64) if h >= (1 << 63) else h


def _open_text(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def read_jsonl(path: Path) -> Iterator[dict]:
    """One document per JSON line; lines that are not JSON objects with a ``text`` are not documents and
    are passed over (bad lines included: ``on_bad`` ignores them), lone surrogates are kept for valid_text."""
    for line_no, obj in jsonl.read_jsonl(path, on_bad=lambda bad: None, errors="surrogatepass"):
        if not isinstance(obj.get("text"), str):
            continue
        given = obj.get("id")
        doc_id = stable_doc_id(str(given)) if given is not None else stable_doc_id(str(path), str(line_no))
        url = obj.get("url") or (given if isinstance(given, str) and "://" in given else None)
        yield {"doc_id": doc_id, "url": url, "source": f"{path}@{line_no}", "text": obj["text"]}


def read_text_file(path: Path, separator: str = BLANK_LINES) -> Iterator[dict]:
    """A plain-text file split into documents at ``separator`` (a regex; empty pieces are skipped)."""
    with _open_text(path) as fh:
        text, _ = valid_text(fh.read())
    for i, piece in enumerate(re.split(separator, text)):
        if piece.strip():
            yield {"doc_id": stable_doc_id(str(path), str(i)), "url": None, "source": f"{path}@{i}", "text": piece}


def read_parquet_file(path: Path, first_row: int = 0, rows: int | None = None, batch_size: int = 1024) -> Iterator[dict]:
    """Rows ``first_row ..`` (``rows`` of them, default all) of a Parquet file, ``text`` as bytes;
    ``doc_id``/``source`` are filled in when missing. Only the row groups holding the range are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    if "text" not in names:
        raise ValueError(f"{path} has no 'text' column (has: {', '.join(sorted(names))})")
    end = pf.metadata.num_rows if rows is None else first_row + rows
    groups, row_no, group_start = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if group_start < end and group_start + n > first_row:
            groups.append(g)
            row_no = group_start if row_no is None else row_no
        group_start += n
    if not groups:
        return
    cols = [c for c in ("doc_id", "url", "source", "text") if c in names]
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=cols):
        lo, hi = max(first_row - row_no, 0), min(end - row_no, batch.num_rows)
        if lo < hi:
            part = batch.slice(lo, hi - lo)
            # text as bytes: Parquet strings are not guaranteed to be valid UTF-8 (see valid_text)
            part = part.set_column(cols.index("text"), "text", part.column("text").cast(pa.large_binary()))
            for i, row in enumerate(part.to_pylist()):
                n = row_no + lo + i
                yield {"doc_id": row.get("doc_id") or stable_doc_id(str(path), str(n)), "url": row.get("url"),
                       "source": row.get("source") or f"{path}@{n}", "text": row["text"]}
        row_no += batch.num_rows
        if row_no >= end:
            return


def read_documents(
    path: str | Path, separator: str = BLANK_LINES, first_row: int = 0, rows: int | None = None, batch_size: int = 1024
) -> Iterator[dict]:
    """Documents ``first_row ..`` (``rows`` of them, default all) of one source file, as ``{doc_id, url,
    source, text}`` (pass text through valid_text).

    Ids and sources use the resolved path, so a file reached through a symlink gets the same ids.
    """
    path = Path(path).resolve()
    fmt = source_format(path)
    if fmt == PARQUET:
        yield from read_parquet_file(path, first_row, rows, batch_size)
        return
    docs = read_jsonl(path) if fmt == JSONL else read_text_file(path, separator)
    yield from itertools.islice(docs, first_row, None if rows is None else first_row + rows)
