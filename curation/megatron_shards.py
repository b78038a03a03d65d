"""Megatron indexed-dataset shards: a pure writer/reader of the ``.bin``/``.idx`` format, the
``.docs.parquet`` sidecar, ``blend.json``, and token → document tracing.

Layout of ``PREFIX.idx`` (``megatron/core/datasets/indexed_dataset.py``, ``_IndexWriter``), all
little-endian: ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` = 1, dtype code ``<B`` (8 = uint16,
4 = int32), sequence count ``<Q``, document count ``<Q`` (= documents + 1), then the
sequence lengths (int32), the byte offset of each sequence in ``.bin`` (int64) and the
document indices (int64, ``[0, 1, ..., n]``: here one sequence per document). ``PREFIX.bin`` holds
the raw tokens. ``PREFIX.docs.parquet`` maps sequence index → ``doc_id``, ``url``, ``source``.

A shard exists only once its ``.idx`` exists: the writer renames ``.bin`` and ``.docs.parquet`` into
place first and ``.idx`` last, each from a hidden temp file, so a killed writer leaves at most
temp files (ignored by :func:`list_shards`, removed by :func:`clean_partial`) or a ``.bin``
without ``.idx``, which neither Megatron nor :func:`read_index` accept.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
UINT16_VOCAB_LIMIT = 65500  # Megatron's DType.optimal_dtype: uint16 below this cardinality
BLEND_FILE = "blend.json"
SIDECAR_SUFFIX = ".docs.parquet"
SPLITS = ("train", "valid", "test")
_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8


class ShardError(ValueError):
    """A shard that is missing, incomplete or not in the MMIDIDX format."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits with Megatron's margin (vocab < 65,500), else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")


class ShardWriter:
    """Streams documents into one shard; ``commit()`` makes it visible atomically.

    Use as a context manager: leaving the block normally commits, an exception discards the
    temp files. Each document becomes one sequence (its tokens, EOS included by the caller).
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype} (use uint16 or int32)")
        self._bin_tmp = _tmp_path(self.prefix.with_name(self.prefix.name + ".bin"))
        self._bin = open(self._bin_tmp, "wb")
        self.lengths: list[int] = []
        self.doc_ids: list[str] = []
        self.urls: list[str | None] = []
        self.sources: list[str | None] = []

    def add_document(self, tokens: np.ndarray, doc_id: str, url: str | None = None, source: str | None = None) -> None:
        """Append one document's tokens (already cast to the shard dtype)."""
        if tokens.dtype != self.dtype:
            raise TypeError(f"tokens are {tokens.dtype}, shard is {self.dtype}")
        self._bin.write(tokens.tobytes(order="C"))
        self.lengths.append(len(tokens))
        self.doc_ids.append(doc_id)
        self.urls.append(url)
        self.sources.append(source)

    def add_batch(self, tokens: np.ndarray, lengths: Sequence[int], doc_ids, urls, sources) -> None:
        """Append several documents at once: ``tokens`` is their concatenation, ``lengths`` splits it."""
        if tokens.dtype != self.dtype:
            raise TypeError(f"tokens are {tokens.dtype}, shard is {self.dtype}")
        self._bin.write(tokens.tobytes(order="C"))
        self.lengths.extend(int(n) for n in lengths)
        self.doc_ids.extend(doc_ids)
        self.urls.extend(urls)
        self.sources.extend(sources)

    def commit(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        idx_tmp = _tmp_path(self.prefix.with_name(self.prefix.name + ".idx"))
        side_tmp = _tmp_path(self.prefix.with_name(self.prefix.name + SIDECAR_SUFFIX))
        try:
            with open(idx_tmp, "wb") as fh:
                fh.write(index_bytes(lengths, self.dtype))
            table = pa.table({
                "seq_index": pa.array(np.arange(len(lengths), dtype=np.int64)),
                "doc_id": pa.array(self.doc_ids, pa.string()),
                "url": pa.array(self.urls, pa.string()),
                "source": pa.array(self.sources, pa.string()),
                "tokens": pa.array(lengths),
            })
            pq.write_table(table, side_tmp, compression="zstd")
            for tmp, suffix in ((self._bin_tmp, ".bin"), (side_tmp, SIDECAR_SUFFIX), (idx_tmp, ".idx")):
                os.replace(tmp, self.prefix.with_name(self.prefix.name + suffix))
        finally:
            for tmp in (self._bin_tmp, idx_tmp, side_tmp):
                tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def index_bytes(lengths: np.ndarray, dtype: np.dtype) -> bytes:
    """The ``.idx`` content for one sequence per document with these token counts."""
    lengths = np.asarray(lengths, dtype=np.int32)
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    document_indices = np.arange(n + 1, dtype=np.int64)
    header = INDEX_HEADER + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", DTYPE_CODES[np.dtype(dtype)])
    header += struct.pack("<Q", n) + struct.pack("<Q", n + 1)
    return header + lengths.tobytes() + pointers.tobytes() + document_indices.tobytes()


def write_shard(prefix: str | Path, documents: Iterable[tuple[np.ndarray, str, str | None, str | None]], dtype) -> int:
    """Write ``(tokens, doc_id, url, source)`` documents as one shard; returns the document count."""
    with ShardWriter(prefix, dtype) as writer:
        for tokens, doc_id, url, source in documents:
            writer.add_document(np.asarray(tokens, dtype=writer.dtype), doc_id, url, source)
    return len(writer.lengths)


@dataclass(frozen=True)
class ShardIndex:
    """The parsed, validated ``.idx`` of one shard."""

    prefix: Path
    dtype: np.dtype
    lengths: np.ndarray  # tokens per sequence (int32)
    pointers: np.ndarray  # byte offset of each sequence in .bin (int64)
    document_indices: np.ndarray  # int64, n_docs + 1 entries

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self.lengths)


def read_index(prefix: str | Path) -> ShardIndex:
    """Parse and validate a shard's ``.idx`` against its ``.bin``; :class:`ShardError` otherwise."""
    prefix = Path(prefix)
    idx, binf = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
    if not idx.is_file() or not binf.is_file():
        raise ShardError(f"shard {prefix} is incomplete: needs both {idx.name} and {binf.name}")
    raw = idx.read_bytes()
    if len(raw) < _HEADER_BYTES or raw[:9] != INDEX_HEADER:
        raise ShardError(f"{idx} is not a Megatron MMIDIDX index")
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    if version != INDEX_VERSION:
        raise ShardError(f"{idx}: index version {version}, expected {INDEX_VERSION}")
    dtypes = {c: d for d, c in DTYPE_CODES.items()}
    if code not in dtypes:
        raise ShardError(f"{idx}: unsupported dtype code {code}")
    expected = _HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if len(raw) != expected:
        raise ShardError(f"{idx}: {len(raw)} bytes, expected {expected} for {n_seq} sequences (truncated?)")
    off = _HEADER_BYTES
    lengths = np.frombuffer(raw, np.int32, n_seq, off)
    pointers = np.frombuffer(raw, np.int64, n_seq, off + 4 * n_seq)
    documents = np.frombuffer(raw, np.int64, n_doc, off + 12 * n_seq)
    dtype = dtypes[code]
    want_bin = int(lengths.sum(dtype=np.int64)) * dtype.itemsize
    if binf.stat().st_size != want_bin:
        raise ShardError(f"{binf}: {binf.stat().st_size} bytes, index expects {want_bin} (truncated or stale)")
    if n_doc == 0 or documents[-1] != n_seq:
        raise ShardError(f"{idx}: document indices do not end at the sequence count")
    return ShardIndex(prefix, dtype, lengths, pointers, documents)


def read_tokens(index: ShardIndex, seq_index: int) -> np.ndarray:
    """Tokens of one sequence of a validated shard."""
    if not 0 <= seq_index < len(index):
        raise IndexError(f"sequence {seq_index} out of range for {index.prefix} ({len(index)} sequences)")
    binf = index.prefix.with_name(index.prefix.name + ".bin")
    data = np.memmap(binf, dtype=index.dtype, mode="r")
    start = int(index.pointers[seq_index]) // index.dtype.itemsize
    return np.array(data[start : start + int(index.lengths[seq_index])])


def list_shards(shards_dir: str | Path) -> list[str]:
    """Names (prefixes relative to ``shards_dir``) of the complete shards, sorted."""
    shards_dir = Path(shards_dir)
    return sorted(
        p.name[: -len(".idx")]
        for p in shards_dir.glob("*.idx")
        if not p.name.startswith(".") and p.with_suffix(".bin").is_file()
    )


def clean_partial(shards_dir: str | Path) -> list[str]:
    """Remove what a killed writer left behind (temp files, ``.bin``/sidecar without ``.idx``)."""
    shards_dir = Path(shards_dir)
    removed = []
    complete = set(list_shards(shards_dir))
    for p in sorted(shards_dir.iterdir()):
        if not p.is_file():
            continue
        stem = p.name[: -len(SIDECAR_SUFFIX)] if p.name.endswith(SIDECAR_SUFFIX) else p.name.rsplit(".", 1)[0]
        is_shard_part = p.name.endswith((".bin", ".idx", SIDECAR_SUFFIX))
        if (p.name.startswith(".") and ".tmp-" in p.name) or (is_shard_part and stem not in complete):
            p.unlink()
            removed.append(p.name)
    return removed


def read_sidecar(shards_dir: str | Path, shard_name: str):
    """The ``.docs.parquet`` of a shard as a pyarrow Table."""
    import pyarrow.parquet as pq

    path = Path(shards_dir) / f"{shard_name}{SIDECAR_SUFFIX}"
    if not path.is_file():
        raise ShardError(f"shard {shard_name!r} has no sidecar {path}")
    return pq.read_table(path)


def trace_tokens(shards_dir: str | Path, shard_name: str, seq_index: int) -> dict:
    """Which document a sequence of a shard came from: ``{doc_id, url, source, shard, seq_index, tokens}``.

    ``source`` is the curation ``source`` field (``warc_file@offset`` for web pages), which leads
    back to the WARC record.
    """
    index = read_index(Path(shards_dir) / shard_name)
    if not 0 <= seq_index < len(index):
        raise IndexError(f"sequence {seq_index} out of range for shard {shard_name!r} ({len(index)} sequences)")
    table = read_sidecar(shards_dir, shard_name)
    if table.num_rows != len(index):
        raise ShardError(f"sidecar of {shard_name!r} has {table.num_rows} rows, index has {len(index)}")
    row = table.slice(seq_index, 1).to_pylist()[0]
    return {
        "shard": shard_name, "seq_index": seq_index, "doc_id": row["doc_id"], "url": row["url"],
        "source": row["source"], "tokens": int(index.lengths[seq_index]),
    }


def write_blend(shards_dir: str | Path, blend: dict) -> None:
    """Write ``blend.json`` atomically."""
    path = Path(shards_dir) / BLEND_FILE
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(blend, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_blend(shards_dir: str | Path) -> dict:
    """``blend.json`` with every shard checked to be complete (a half-written dir is refused)."""
    shards_dir = Path(shards_dir)
    path = shards_dir / BLEND_FILE
    if not path.is_file():
        raise ShardError(f"{shards_dir} has no {BLEND_FILE} (not a finished tokenize output)")
    blend = json.loads(path.read_text())
    for split in SPLITS:
        for _, prefix in blend["blend_per_split"].get(split) or []:
            read_index(shards_dir / prefix)
    return blend


def megatron_blend_kwargs(shards_dir: str | Path) -> dict:
    """Keyword arguments for megatron-core's ``GPTDatasetConfig``: ``{"blend_per_split": [...]}``.

    Train/valid/test documents live in separate shards (split by ``doc_id`` hash), so the blend is
    given per split with absolute prefixes; a split without documents is ``None``.
    """
    shards_dir = Path(shards_dir).resolve()
    blend = load_blend(shards_dir)
    per_split = []
    for split in SPLITS:
        entries = blend["blend_per_split"].get(split) or []
        per_split.append(
            ([str(shards_dir / p) for _, p in entries], [float(w) for w, _ in entries]) if entries else None
        )
    return {"blend_per_split": per_split}
