"""Documents from outside the curation pipeline (a second corpus to mix in, extra tokenizer text).

Formats, chosen by file name: Parquet (``text`` plus optional ``doc_id``/``url``/``source``
columns), JSON lines (``.jsonl``/``.json``, optionally ``.gz``; ``text`` plus optional ``id``/
``url``) and plain text (``.txt``, optionally ``.gz``; split into documents by a regex). Each
document gets a stable ``doc_id`` and a ``source`` of the form ``name@position`` so lineage can
point back at it. :func:`valid_text` repairs what tokenizers cannot take (invalid UTF-8, lone
surrogates).

Nothing here depends on where a file sits, so a copy, a symlink or another checkout of a corpus
gives the same documents (and the same tokenize splits, which follow ``doc_id``):

* ``doc_id``: a given id (a Parquet ``doc_id``, a JSON ``id``) is kept (JSON: hashed); otherwise
  :func:`stable_doc_id` of the file's content hash (:func:`infra.runstore.file_content_hash`:
  logical content for Parquet, bytes otherwise) and the document's position in it. Equal files
  give equal ids (they hold the same documents); a changed file gives new ids to all its
  documents. 128 bits of sha256: a chance collision is negligible.
* ``source``: ``name@position`` where ``name`` is the file's path relative to the configured source
  (:func:`source_entries`: the file name for a file, the path below a folder) — never absolute.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from infra import jsonl
from infra.runstore import file_content_hash

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


def source_entries(path: str | Path) -> list[tuple[Path, str]]:
    """``(file, name)`` for the files of a source, sorted by name: the file itself (named by its file
    name), or the supported files under a folder (named by their path below it). Files are resolved
    for reading; names do not depend on where the source is."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"source path {str(path)!r} does not exist")
    if p.is_file():
        return [(p.resolve(), p.name)]
    files = []
    for f in sorted(p.rglob("*")):
        if f.is_file() and not f.name.startswith((".", "_")):
            try:
                source_format(f)
            except ValueError:
                continue
            files.append((f.resolve(), f.relative_to(p).as_posix()))
    return files


def source_files(path: str | Path) -> list[Path]:
    """The files of a source (resolved), in :func:`source_entries` order."""
    return [f for f, _ in source_entries(path)]


def stable_doc_id(*parts: str) -> str:
    """A 32-hex id from the parts that identify a document (file content hash + position, or a given id)."""
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


@lru_cache(maxsize=64)
def _content_id(path: str, size: int, mtime_ns: int) -> str:
    return file_content_hash(Path(path))


def content_id(path: Path) -> str:
    """The content hash that ids of ``path``'s documents derive from (cached per file version)."""
    st = path.stat()
    return _content_id(str(path), st.st_size, st.st_mtime_ns)


def _position_ids(path: Path) -> Callable[[int], str]:
    """``position -> doc_id`` for a file's documents; the content hash is computed on first use only."""
    digest: list[str] = []

    def doc_id(position: int) -> str:
        if not digest:
            digest.append(content_id(path))
        return stable_doc_id(digest[0], str(position))

    return doc_id


def doc_hash(doc_id: str) -> int:
    """Spark's ``xxhash64(doc_id)`` (XXH64, seed 42, signed): the value the Spark shell computes too."""
    import xxhash

    h = xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=42)
    return h - (1 << 64) if h >= (1 << 63) else h


def _open_text(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def read_jsonl(path: Path, name: str | None = None) -> Iterator[dict]:
    """One document per JSON line; lines that are not JSON objects with a ``text`` are not documents and
    are passed over (bad lines included: ``on_bad`` ignores them), lone surrogates are kept for valid_text."""
    name, position_id = name or path.name, _position_ids(path)
    for line_no, obj in jsonl.read_jsonl(path, on_bad=lambda bad: None, errors="surrogatepass"):
        if not isinstance(obj.get("text"), str):
            continue
        given = obj.get("id")
        doc_id = stable_doc_id(str(given)) if given is not None else position_id(line_no)
        url = obj.get("url") or (given if isinstance(given, str) and "://" in given else None)
        yield {"doc_id": doc_id, "url": url, "source": f"{name}@{line_no}", "text": obj["text"]}


def read_text_file(path: Path, separator: str = BLANK_LINES, name: str | None = None) -> Iterator[dict]:
    """A plain-text file split into documents at ``separator`` (a regex; empty pieces are skipped)."""
    name, position_id = name or path.name, _position_ids(path)
    with _open_text(path) as fh:
        text, _ = valid_text(fh.read())
    for i, piece in enumerate(re.split(separator, text)):
        if piece.strip():
            yield {"doc_id": position_id(i), "url": None, "source": f"{name}@{i}", "text": piece}


def read_parquet_file(
    path: Path, first_row: int = 0, rows: int | None = None, batch_size: int = 1024, name: str | None = None
) -> Iterator[dict]:
    """Rows ``first_row ..`` (``rows`` of them, default all) of a Parquet file, ``text`` as bytes;
    ``doc_id``/``source`` are filled in when missing. Only the row groups holding the range are read."""
    name, position_id = name or path.name, _position_ids(path)
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
                yield {"doc_id": row.get("doc_id") or position_id(n), "url": row.get("url"),
                       "source": row.get("source") or f"{name}@{n}", "text": row["text"]}
        row_no += batch.num_rows
        if row_no >= end:
            return


def read_documents(
    path: str | Path, separator: str = BLANK_LINES, first_row: int = 0, rows: int | None = None, batch_size: int = 1024,
    name: str | None = None,
) -> Iterator[dict]:
    """Documents ``first_row ..`` (``rows`` of them, default all) of one source file, as ``{doc_id, url,
    source, text}`` (pass text through valid_text).

    Ids come from the file's content and sources from ``name`` (default: the file name; see
    :func:`source_entries`), so a copy or a symlink of the file gives the same documents.
    """
    path = Path(path).resolve()
    fmt = source_format(path)
    if fmt == PARQUET:
        yield from read_parquet_file(path, first_row, rows, batch_size, name)
        return
    docs = read_jsonl(path, name) if fmt == JSONL else read_text_file(path, separator, name)
    yield from itertools.islice(docs, first_row, None if rows is None else first_row + rows)
