"""``tokenize``: curated documents → Megatron indexed-dataset shards + ``blend.json`` (Spark).

Mixing: ``sources`` names each corpus (the upstream curation output, or an external Parquet/
jsonl/text path) with a weight. Every document gets a split by its ``doc_id`` hash
(:func:`split_of`: XXH64 seed 42, as Spark's ``xxhash64``), so the split is per document,
deterministic and stable when the corpus grows; train/valid/test documents go to separate shards.

Plan (driver, no data read): each source's documents in a fixed order (files sorted by path, rows
in file order; Parquet row counts come from the footers) are cut into consecutive *units* of at
most ``docs_per_shard`` documents (:func:`plan_units`). Shell: one Spark job, no shuffle, one task
per core (a PySpark task costs tens of ms of CPU, so not one per unit), units dealt round-robin: for
each unit it reads the row ranges, encodes them with ``encode_batch`` (special-token strings in the
text stay plain text; EOS appended per document) and streams them into one shard per split,
``<source>-<split>-<unit:05d>``, with :class:`curation.megatron_shards.ShardWriter` (atomic per
shard). The same input files and config give byte-identical shards, whatever the cluster. The
driver then writes ``blend.json``: per split, each shard weighted by source weight × its share of
the source's tokens — consumed with :func:`curation.megatron_shards.megatron_blend_kwargs`.
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curation.megatron_shards import (
    SPLITS, ShardWriter, clean_partial, list_shards, read_index, token_dtype, write_blend,
)
from curation.text_sources import (
    BLANK_LINES, PARQUET, doc_hash, read_documents, source_entries, source_format, valid_text,
)
from curation.tokenizer import tokenizer_info
from infra.markdown import markdown_table
from infra.stage import Stage, StageConfig, StageContext, StageResult

HASH_BUCKETS = 10_000
STATS_FIELDS = ("shard", "source_name", "split", "docs", "empty_docs", "repaired_docs", "tokens", "text_bytes")
_NAME = re.compile(r"^[a-z0-9_]+$")


class SourceSpec(BaseModel):
    """One corpus in the mix."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="short name ([a-z0-9_]), used in shard names")
    path: str | None = Field(None, description="external .parquet dir/file, .jsonl(.gz), .txt(.gz); null = upstream data/")
    weight: float = Field(1.0, gt=0, description="share of training tokens drawn from this source (normalised)")
    doc_separator: str = Field(BLANK_LINES, description="regex splitting .txt files into documents")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"source name {v!r} must match [a-z0-9_]+")
        return v


class TokenizeConfig(StageConfig):
    """Sources and weights, the document split, and shard sizes."""

    sources: list[SourceSpec] = Field(
        default_factory=lambda: [SourceSpec(name="web")], description="named corpora and their mixing weights"
    )
    split: str = Field("98,1,1", description="train,valid,test shares of documents (by doc_id hash)")
    docs_per_shard: int = Field(100_000, ge=1, description="documents per shard (at most)")
    encode_batch_size: int = Field(1024, ge=1, description="documents per encode_batch call")
    eod_token: str | None = Field(None, description="token appended to every document; null = the tokenizer's eos_token")

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        split_ratios(v)
        return v

    @model_validator(mode="after")
    def _sources(self):
        names = [s.name for s in self.sources]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"sources need distinct names, got {names}")
        if sum(s.path is None for s in self.sources) > 1:
            raise ValueError("at most one source may read the upstream data (path: null)")
        return self


def split_ratios(split: str) -> tuple[float, float, float]:
    """``"98,1,1"`` → (0.98, 0.01, 0.01); train must be > 0."""
    parts = [p.strip() for p in split.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"split {split!r} must be three comma-separated numbers") from None
    if len(values) != 3 or any(v < 0 or math.isnan(v) for v in values) or values[0] <= 0:
        raise ValueError(f"split {split!r} must be three non-negative numbers with train > 0")
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def split_thresholds(split: str) -> tuple[int, int]:
    """Hash-bucket bounds: bucket < t1 → train, < t2 → valid, else test."""
    train, valid, _ = split_ratios(split)
    return round(train * HASH_BUCKETS), round((train + valid) * HASH_BUCKETS)


def split_of(doc_id: str, split: str) -> str:
    """The split of one document: ``doc_hash(doc_id) mod 10000`` against :func:`split_thresholds`."""
    return _split_by_hash(doc_id, *split_thresholds(split))


def _split_by_hash(doc_id: str, t1: int, t2: int) -> str:
    bucket = doc_hash(doc_id) % HASH_BUCKETS
    return "train" if bucket < t1 else "valid" if bucket < t2 else "test"


def shard_name(source_name: str, split: str, part: int) -> str:
    return f"{source_name}-{split}-{part:05d}"


def encode_documents(tokenizer, texts: list[str], eos_id: int, dtype) -> tuple[Any, list[int]]:
    """``encode_batch`` + EOS per document → (concatenated tokens as ``dtype``, tokens per document)."""
    import numpy as np

    flat: list[int] = []
    lengths: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids
        flat.extend(ids)
        flat.append(eos_id)
        lengths.append(len(ids) + 1)
    return np.array(flat, dtype=dtype), lengths


def load_worker_tokenizer(tokenizer_json: str):
    """The tokenizer as tokenize uses it: special-token strings inside documents are encoded as text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.encode_special_tokens = True
    return tok


@functools.lru_cache(maxsize=2)
def _cached_worker_tokenizer(tokenizer_json: str, mtime_ns: int, size: int):
    return load_worker_tokenizer(tokenizer_json)


def worker_tokenizer(tokenizer_json: str):
    """:func:`load_worker_tokenizer`, loaded once per worker process (Spark reuses Python workers
    across tasks; a large vocabulary takes ~0.2 s to load) and again if the file changes."""
    st = os.stat(tokenizer_json)
    return _cached_worker_tokenizer(tokenizer_json, st.st_mtime_ns, st.st_size)


ROW_FIELDS = ("shard", "source_name", "split", "doc_id", "url", "source", "text")


class _OpenShard:
    """One shard being written by :func:`write_shards`: its stats, pending documents and writer."""

    def __init__(self, shard: str, source_name: str, split: str):
        self.stats: dict = {k: 0 for k in STATS_FIELDS}
        self.stats.update(shard=shard, source_name=source_name, split=split)
        self.pending: list[tuple[str, str, str | None, str | None]] = []
        self.writer = None


def write_shards(rows: Iterable[tuple], out_dir: str, tokenizer, eos_id: int, dtype, batch_size: int) -> list[dict]:
    """Core of one Spark task: rows → one shard per distinct ``shard`` name in ``out_dir``; per-shard stats.

    Each row is a tuple in :data:`ROW_FIELDS` order (text str or bytes); rows of different shards may
    interleave, each shard keeps its rows' order. Documents are encoded ``batch_size`` at a time per
    shard. Empty documents are skipped and counted; invalid UTF-8 / lone surrogates are repaired and
    counted. All shards are committed at the end; an error discards every one of them.
    """
    shards: dict[str, _OpenShard] = {}

    def flush(s: _OpenShard) -> None:
        if not s.pending:
            return
        if s.writer is None:
            s.writer = ShardWriter(Path(out_dir) / s.stats["shard"], dtype)
        tokens, lengths = encode_documents(tokenizer, [p[0] for p in s.pending], eos_id, dtype)
        s.writer.add_batch(tokens, lengths, [p[1] for p in s.pending], [p[2] for p in s.pending],
                           [p[3] for p in s.pending])
        s.stats["docs"] += len(s.pending)
        s.stats["tokens"] += sum(lengths)
        s.pending.clear()

    try:
        for shard, source_name, split, doc_id, url, source, raw in rows:
            s = shards.get(shard)
            if s is None:
                s = shards[shard] = _OpenShard(shard, source_name, split)
            text, repaired = valid_text(raw)
            if not text.strip():
                s.stats["empty_docs"] += 1
                continue
            s.stats["repaired_docs"] += int(repaired)
            s.stats["text_bytes"] += len(raw) if isinstance(raw, bytes) and not repaired else len(text.encode("utf-8"))
            s.pending.append((text, doc_id, url, source))
            if len(s.pending) >= batch_size:
                flush(s)
        for s in shards.values():
            flush(s)
        for s in shards.values():
            if s.writer is not None:
                s.writer.commit()
                s.writer = None
    except BaseException:
        for s in shards.values():
            if s.writer is not None:
                s.writer.abort()
        raise
    return [s.stats for s in shards.values()]


def source_paths(spec: SourceSpec, upstream_data: Path | None) -> list[tuple[Path, str]]:
    """The files of one source as ``(path, name)`` (:func:`source_entries`), sorted; the upstream data
    must have ``doc_id`` and ``text`` columns."""
    import pyarrow.parquet as pq

    if spec.path is not None:
        files = source_entries(spec.path)
        if not files:
            raise ValueError(f"source {spec.name!r}: no .parquet/.jsonl/.json/.txt files under {spec.path}")
        return files
    if upstream_data is None:
        raise ValueError(f"source {spec.name!r} reads the upstream data but there is no upstream")
    files = [(f, name) for f, name in source_entries(upstream_data) if f.name.endswith(".parquet")]
    for f, _ in files:
        missing = {"doc_id", "text"} - set(pq.read_schema(f).names)
        if missing:
            raise ValueError(f"upstream data {upstream_data} lacks column(s) {sorted(missing)} (in {f.name})")
    return files


def count_documents(path: Path, separator: str) -> int:
    """Documents in one source file: Parquet from its footer, other formats by reading them."""
    import pyarrow.parquet as pq

    if source_format(path) == PARQUET:
        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in read_documents(path, separator))


def plan_units(sources: list[SourceSpec], upstream_data: Path | None, docs_per_shard: int) -> list[dict]:
    """Work units: each source's documents (files sorted, rows in order) cut every ``docs_per_shard``.

    A unit is ``{source_name, part, separator, pieces: [[path, first_row, rows, name], ...]}``; it may
    span files. ``part`` numbers the units of a source from 0 and names its shards; ``name`` is what
    the documents' ``source`` calls the file (never its absolute path).
    """
    units: list[dict] = []
    for spec in sources:
        part, pieces, filled = 0, [], 0
        for path, name in source_paths(spec, upstream_data):
            n, start = count_documents(path, spec.doc_separator), 0
            while start < n:
                take = min(n - start, docs_per_shard - filled)
                pieces.append([str(path), start, take, name])
                start, filled = start + take, filled + take
                if filled == docs_per_shard:
                    units.append({"source_name": spec.name, "part": part, "separator": spec.doc_separator, "pieces": pieces})
                    part, pieces, filled = part + 1, [], 0
        if pieces:
            units.append({"source_name": spec.name, "part": part, "separator": spec.doc_separator, "pieces": pieces})
    return units


def unit_rows(unit: dict, split: str, batch_size: int) -> Iterator[tuple]:
    """The rows (:data:`ROW_FIELDS`) of one unit, each routed to its split's shard."""
    t1, t2 = split_thresholds(split)
    for path, first_row, rows, name in unit["pieces"]:
        for d in read_documents(path, unit["separator"], first_row, rows, batch_size, name):
            sp = _split_by_hash(d["doc_id"], t1, t2)
            yield shard_name(unit["source_name"], sp, unit["part"]), unit["source_name"], sp, d["doc_id"], d["url"], d["source"], d["text"]


def tokenize_to_shards(
    spark, sources: list[SourceSpec], upstream_data: Path | None, tokenizer_dir: Path, out_dir: Path,
    cfg: TokenizeConfig, log=None,
) -> tuple[list[dict], dict]:
    """Tokenize every source into shards under ``out_dir``: the units of :func:`plan_units`, spread over
    one Spark task per core (``defaultParallelism``).

    ``out_dir`` must not hold shards already (leftovers of a killed run are removed first).
    Returns (per-shard stats sorted by shard, tokenizer info).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_partial(out_dir)
    if list_shards(out_dir):
        raise FileExistsError(f"{out_dir} already holds shards; tokenize into an empty directory")
    info = tokenizer_info(tokenizer_dir, cfg.eod_token)
    dtype = token_dtype(info["vocab_size"])
    units = plan_units(sources, upstream_data, cfg.docs_per_shard)
    tasks = min(len(units), spark.sparkContext.defaultParallelism)
    if log:
        log.info("tokenize: %d units of at most %d documents in %d Spark tasks", len(units), cfg.docs_per_shard, tasks)
    if not units:
        return [], {**info, "dtype": dtype.name}
    tokenizer_json = str(Path(tokenizer_dir) / "tokenizer.json")
    eos_id, batch_size, split, out = info["eos_id"], cfg.encode_batch_size, cfg.split, str(out_dir)

    def task(partition):
        tokenizer = worker_tokenizer(tokenizer_json)
        for units_of_task in partition:
            for unit in units_of_task:
                yield from write_shards(unit_rows(unit, split, batch_size), out, tokenizer, eos_id, dtype, batch_size)

    # round-robin: neighbouring units (often alike in size) go to different tasks
    stats = spark.sparkContext.parallelize([units[i::tasks] for i in range(tasks)], tasks).mapPartitions(task).collect()
    clean_partial(out_dir)
    return sorted(stats, key=lambda r: r["shard"]), {**info, "dtype": dtype.name}


def blend_document(stats: list[dict], sources: list[SourceSpec], info: dict, split: str) -> dict:
    """``blend.json`` content: per split, each shard weighted by source weight × its token share.

    ``prefixes`` with ``split`` "100,0,0" is the training blend as Megatron's ``blend``/``split``
    take it; ``blend_per_split`` also lists the valid/test shards; ``doc_split`` is the ratio used.
    """
    weights = {s.name: s.weight for s in sources}
    written = [r for r in stats if r["docs"] > 0]
    per_split: dict[str, list] = {}
    for sp in SPLITS:
        rows = [r for r in written if r["split"] == sp]
        source_tokens: dict[str, int] = {}
        for r in rows:
            source_tokens[r["source_name"]] = source_tokens.get(r["source_name"], 0) + r["tokens"]
        total_weight = sum(weights[s] for s in source_tokens)
        per_split[sp] = [
            [round(weights[r["source_name"]] / total_weight * r["tokens"] / source_tokens[r["source_name"]], 10), r["shard"]]
            for r in rows
        ]
    return {
        "format": "Megatron indexed dataset (MMIDIDX v1): one sequence per document, EOS appended",
        "prefixes": per_split["train"],
        "split": "100,0,0",
        "blend_per_split": per_split,
        "doc_split": split,
        "split_method": (
            "per document: bucket = xxhash64(doc_id, seed 42) mod 10000 (as Spark's pmod(xxhash64(doc_id), 10000)); train if bucket < "
            f"{split_thresholds(split)[0]}, valid if < {split_thresholds(split)[1]}, else test. Each split has its "
            "own shards: prefixes + split '100,0,0' is the train blend; blend_per_split (train/valid/test, "
            "megatron_shards.megatron_blend_kwargs) gives all three"
        ),
        "weights": {s.name: s.weight for s in sources},
        "vocab_size": info["vocab_size"],
        "eos_id": info["eos_id"],
        "pad_id": info["pad_id"],
        "eod_token": info["eod_token"],
        "dtype": info["dtype"],
    }


def _percentiles(lengths) -> dict[str, float]:
    import numpy as np

    if len(lengths) == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"mean": round(float(np.mean(lengths)), 2), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(stats: list[dict], shards_dir: Path) -> list[dict]:
    """One row per (source, split) and a total: docs, skipped, tokens, doc-length percentiles, bytes/token.

    Doc length counts tokens including the appended EOS; bytes per token excludes it.
    """
    import numpy as np

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in stats:
        groups.setdefault((r["source_name"], r["split"]), []).append(r)
    groups[("all", "all")] = list(stats)
    table = []
    for (source, sp), rows in sorted(groups.items(), key=lambda kv: (kv[0][0] == "all", kv[0])):
        lengths = [read_index(shards_dir / r["shard"]).lengths for r in rows if r["docs"] > 0]
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
        docs, tokens = sum(r["docs"] for r in rows), sum(r["tokens"] for r in rows)
        table.append({
            "source": source, "split": sp, "shards": sum(r["docs"] > 0 for r in rows), "docs": docs,
            "empty_docs_skipped": sum(r["empty_docs"] for r in rows),
            "repaired_utf8_docs": sum(r["repaired_docs"] for r in rows), "tokens": tokens,
            **{f"doc_tokens_{k}": v for k, v in _percentiles(lengths).items()},
            "bytes_per_token": round(sum(r["text_bytes"] for r in rows) / max(tokens - docs, 1), 4),
        })
    return table


def run(ctx: StageContext) -> StageResult:
    cfg: TokenizeConfig = ctx.config
    upstream = ctx.input("dedup").path("data")
    tokenizer_stage = ctx.input("tokenizer")
    tokenizer_dir = tokenizer_stage.path("tokenizer")
    sources = [s if s.path is None else s.model_copy(update={"path": str(ctx.external_inputs[f"source_{s.name}"])})
               for s in cfg.sources]
    out = ctx.output("shards")
    stats, info = tokenize_to_shards(ctx.spark(), sources, upstream, tokenizer_dir, out, cfg, ctx.log)
    blend = blend_document(stats, cfg.sources, info, cfg.split)
    if not blend["blend_per_split"]["train"]:
        raise ValueError("tokenize: no training documents (every source empty or all documents empty)")
    blend["tokenizer_hash"] = tokenizer_stage.manifest["outputs"]["tokenizer"]["hash"]  # not its path, which names a run
    write_blend(out, blend)
    table = summarize(stats, out)
    total = table[-1]
    metrics = {
        "docs": total["docs"], "tokens": total["tokens"], "empty_docs_skipped": total["empty_docs_skipped"],
        "repaired_utf8_docs": total["repaired_utf8_docs"], "shards": total["shards"], "dtype": info["dtype"],
        "vocab_size": info["vocab_size"], "eos_id": info["eos_id"], "bytes_per_token": total["bytes_per_token"],
        "doc_tokens": {k[len("doc_tokens_"):]: v for k, v in total.items() if k.startswith("doc_tokens_")},
        "per_source": {f"{r['source']}/{r['split']}": {"docs": r["docs"], "tokens": r["tokens"]} for r in table[:-1]},
    }
    report = "\n".join([
        f"### tokenize: {total['tokens']:,} tokens in {total['docs']:,} documents, {total['shards']} shards ({info['dtype']})",
        "", *markdown_table(["weight", "train prefix"], ((f"{w:.4f}", p) for w, p in blend["prefixes"])),
    ])
    return StageResult(metrics=metrics, tables={"tokenize": table}, report_md=report)


STAGES = [
    Stage(
        name="tokenize",
        description="documents → Megatron .bin/.idx shards per source and split + .docs.parquet sidecars + blend.json",
        config_model=TokenizeConfig,
        run=run,
        inputs=("dedup", "tokenizer"),
        external_inputs=lambda cfg: {f"source_{s.name}": s.path for s in cfg.sources if s.path is not None},
        uses_spark=True,
        version="2",  # 2: documents of a file source get ids from its content and sources named without its location
    )
]
