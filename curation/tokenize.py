"""``tokenize``: curated documents → Megatron indexed-dataset shards + ``blend.json`` (Spark).

Mixing: ``sources`` names each corpus (the upstream curation output, or an external Parquet/
jsonl/text path) with a weight. Every document gets a split by its ``doc_id`` hash (Spark's
``xxhash64``, mirrored by :func:`split_of`), so the split is per document, deterministic and stable
when the corpus grows. Train/valid/test documents go to separate shards
``<source>-<split>-<part:05d>``; the part is another slice of the same hash.

Shell: rows are hash-partitioned by shard name and sorted by ``doc_id`` inside each partition;
each Spark task encodes its rows with ``encode_batch`` (special-token strings in the text stay
plain text; EOS appended per document) and streams them into its shards with
:class:`curation.megatron_shards.ShardWriter` (atomic per shard). The driver then writes
``blend.json``: per split, each shard weighted by source weight × its share of the source's
tokens — consumed with :func:`curation.megatron_shards.megatron_blend_kwargs`.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curation.megatron_shards import SPLITS
from curation.text_sources import BLANK_LINES
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
    """The split of one document (same answer as the Spark shell)."""
    from curation.text_sources import doc_hash

    t1, t2 = split_thresholds(split)
    bucket = doc_hash(doc_id) % HASH_BUCKETS
    return "train" if bucket < t1 else "valid" if bucket < t2 else "test"


def part_of(doc_id: str, parts: int) -> int:
    """The shard part of one document among ``parts`` (Spark: ``pmod(h div 10000, parts)``)."""
    from curation.text_sources import doc_hash

    h = doc_hash(doc_id)
    quotient = abs(h) // HASH_BUCKETS * (1 if h >= 0 else -1)
    return quotient % parts


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


ROW_FIELDS = ("shard", "source_name", "split", "doc_id", "url", "source", "text")


def write_shards(rows: Iterator[tuple], out_dir: str, tokenizer, eos_id: int, dtype, batch_size: int) -> list[dict]:
    """Core of one Spark task: rows sorted by shard → shards in ``out_dir``; returns per-shard stats.

    Each row is a tuple in :data:`ROW_FIELDS` order (text str or bytes).
    Empty documents are skipped and counted; invalid UTF-8 / lone surrogates are repaired and counted.
    """
    from curation.megatron_shards import ShardWriter
    from curation.text_sources import valid_text

    stats: list[dict] = []
    writer: ShardWriter | None = None
    pending: list[tuple[str, str, str | None, str | None]] = []
    current: dict | None = None

    def flush() -> None:
        nonlocal writer
        if not pending:
            return
        if writer is None:
            writer = ShardWriter(Path(out_dir) / current["shard"], dtype)
        tokens, lengths = encode_documents(tokenizer, [p[0] for p in pending], eos_id, dtype)
        writer.add_batch(tokens, lengths, [p[1] for p in pending], [p[2] for p in pending], [p[3] for p in pending])
        current["docs"] += len(pending)
        current["tokens"] += sum(lengths)
        pending.clear()

    def close() -> None:
        nonlocal writer
        flush()
        if writer is not None:
            writer.commit()
            writer = None
        if current is not None:
            stats.append(current)

    try:
        for shard, source_name, split, doc_id, url, source, raw in rows:
            if current is None or shard != current["shard"]:
                close()
                current = {k: 0 for k in STATS_FIELDS}
                current.update(shard=shard, source_name=source_name, split=split)
            text, repaired = valid_text(raw)
            if not text.strip():
                current["empty_docs"] += 1
                continue
            current["repaired_docs"] += int(repaired)
            current["text_bytes"] += len(raw) if isinstance(raw, bytes) and not repaired else len(text.encode("utf-8"))
            pending.append((text, doc_id, url, source))
            if len(pending) >= batch_size:
                flush()
        close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return stats


def _stats_schema():
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField(f, T.StringType() if f in ("shard", "source_name", "split") else T.LongType())
        for f in STATS_FIELDS
    ])


def _doc_schema():
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField("doc_id", T.StringType()), T.StructField("url", T.StringType()),
        T.StructField("source", T.StringType()), T.StructField("text", T.BinaryType()),
    ])


def documents_dataframe(spark, sources: list[SourceSpec], upstream_data: Path | None):
    """One DataFrame ``(source_name, doc_id, url, source, text: binary)`` over every source."""
    import pandas as pd
    from pyspark.sql import functions as F

    from curation.text_sources import read_documents, source_files

    frames = []
    for spec in sources:
        if spec.path is None:
            if upstream_data is None:
                raise ValueError(f"source {spec.name!r} reads the upstream data but there is no upstream")
            df = spark.read.parquet(str(upstream_data))
            missing = {"doc_id", "text"} - set(df.columns)
            if missing:
                raise ValueError(f"upstream data {upstream_data} lacks column(s) {sorted(missing)}")
            df = df.select(
                "doc_id",
                *(F.col(c) if c in df.columns else F.lit(None).cast("string").alias(c) for c in ("url", "source")),
                F.col("text").cast("binary").alias("text"),
            )
        else:
            separator = spec.doc_separator

            def read(batches, separator=separator):
                for batch in batches:
                    for path in batch["path"]:
                        rows = [
                            {**d, "text": d["text"].encode("utf-8", "surrogatepass") if isinstance(d["text"], str) else d["text"]}
                            for d in read_documents(path, separator)
                        ]
                        if rows:
                            yield pd.DataFrame(rows, columns=["doc_id", "url", "source", "text"])

            files = [str(f) for f in source_files(spec.path)]
            if not files:
                raise ValueError(f"source {spec.name!r}: no .parquet/.jsonl/.json/.txt files under {spec.path}")
            paths = spark.createDataFrame([(f,) for f in files], "path string").repartition(len(files), "path")
            df = paths.mapInPandas(read, schema=_doc_schema())
        doc_id = F.coalesce(F.col("doc_id"), F.substring(F.sha2(F.col("text"), 256), 1, 32))
        frames.append(df.select(F.lit(spec.name).alias("source_name"), doc_id.alias("doc_id"), "url", "source", "text"))
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df)
    return out


def tokenize_to_shards(
    spark, docs, tokenizer_dir: Path, out_dir: Path, cfg: TokenizeConfig, log=None
) -> tuple[list[dict], dict]:
    """Tokenize ``docs`` (from :func:`documents_dataframe`) into shards under ``out_dir``.

    ``out_dir`` must not hold shards already (leftovers of a killed run are removed first).
    Returns (per-shard stats, tokenizer info).
    """
    from pyspark.sql import functions as F

    from curation.megatron_shards import clean_partial, list_shards, token_dtype
    from curation.tokenizer import tokenizer_info

    out_dir.mkdir(parents=True, exist_ok=True)
    clean_partial(out_dir)
    if list_shards(out_dir):
        raise FileExistsError(f"{out_dir} already holds shards; tokenize into an empty directory")
    info = tokenizer_info(tokenizer_dir, cfg.eod_token)
    dtype = token_dtype(info["vocab_size"])
    t1, t2 = split_thresholds(cfg.split)
    h = F.xxhash64("doc_id")
    bucket = F.pmod(h, F.lit(HASH_BUCKETS))
    docs = docs.withColumn("_h", h).withColumn(
        "split", F.when(bucket < t1, "train").when(bucket < t2, "valid").otherwise("test")
    )
    started = time.time()
    counts = {(r["source_name"], r["split"]): r["count"] for r in docs.groupBy("source_name", "split").count().collect()}
    parts = {k: max(1, math.ceil(n / cfg.docs_per_shard)) for k, n in counts.items()}
    if log:
        log.info("tokenize: %d documents in %d (source, split) groups → %d shards (counted in %.1f s)",
                 sum(counts.values()), len(counts), sum(parts.values()), time.time() - started)
    if not parts:
        return [], {**info, "dtype": dtype.name}
    parts_map = F.create_map(*[F.lit(x) for (s, sp), n in sorted(parts.items()) for x in (f"{s}/{sp}", n)])
    n_parts = parts_map[F.concat_ws("/", "source_name", "split")]
    part = F.pmod(F.expr(f"_h div {HASH_BUCKETS}"), n_parts)
    shard = F.concat_ws("-", "source_name", "split", F.lpad(part.cast("string"), 5, "0"))
    docs = (
        docs.withColumn("shard", shard)
        .select(*ROW_FIELDS)
        .repartition(sum(parts.values()), "shard")
        .sortWithinPartitions("shard", "doc_id", "source", "url")
    )
    tokenizer_json = str(Path(tokenizer_dir) / "tokenizer.json")
    eos_id, batch_size, out = info["eos_id"], cfg.encode_batch_size, str(out_dir)

    def task(batches):
        import pyarrow as pa

        tokenizer = load_worker_tokenizer(tokenizer_json)

        def rows():
            for batch in batches:
                yield from zip(*(batch.column(f).to_pylist() for f in ROW_FIELDS))

        stats = write_shards(rows(), out, tokenizer, eos_id, dtype, batch_size)
        if stats:
            yield pa.RecordBatch.from_pylist(stats, schema=pa.schema(
                [(f, pa.string() if f in ("shard", "source_name", "split") else pa.int64()) for f in STATS_FIELDS]
            ))

    stats = [r.asDict() for r in docs.mapInArrow(task, _stats_schema()).collect()]
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
            "per document: bucket = pmod(xxhash64(doc_id), 10000) (Spark, seed 42); train if bucket < "
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

    from curation.megatron_shards import read_index

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
    from curation.megatron_shards import write_blend

    cfg: TokenizeConfig = ctx.config
    upstream = ctx.input("dedup").path("data")
    tokenizer_dir = ctx.input("tokenizer").path("tokenizer")
    sources = [s if s.path is None else s.model_copy(update={"path": str(ctx.external_inputs[f"source_{s.name}"])})
               for s in cfg.sources]
    out = ctx.output("shards")
    spark = ctx.spark()
    docs = documents_dataframe(spark, sources, upstream)
    stats, info = tokenize_to_shards(spark, docs, tokenizer_dir, out, cfg, ctx.log)
    blend = blend_document(stats, cfg.sources, info, cfg.split)
    if not blend["blend_per_split"]["train"]:
        raise ValueError("tokenize: no training documents (every source empty or all documents empty)")
    blend["tokenizer"] = str(tokenizer_dir)
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
        "", "| weight | train prefix |", "|---|---|",
        *(f"| {w:.4f} | {p} |" for w, p in blend["prefixes"]),
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
    )
]
