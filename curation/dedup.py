"""``dedup``: URL, exact, line-level (ccNet-style) and MinHash-LSH fuzzy deduplication in Spark.

Levels run in that order, each switchable, each only over documents still kept:

* URL: normalised URL (:func:`normalize_url`); the newest ``fetch_date`` is kept (tie → smallest doc_id).
* exact: hash of :func:`curation.minhash.normalize_text`; documents that normalise to nothing are dropped.
* lines: a line (normalised) found in more than ``line_max_docs`` documents is removed from every
  document; the document keeps its id and records ``lines_removed`` (empty after that → dropped).
* fuzzy: MinHash signatures per partition (:mod:`curation.minhash`), exploded to (band, bucket);
  each bucket links its members to its smallest doc_id (a star, never all pairs), links are
  optionally verified by estimated Jaccard, and clusters are connected components computed in Spark
  (:mod:`curation.components`).

The kept document of a group is the one with the highest ``quality_score`` (when present), tie →
smallest doc_id. Removed documents record ``dup_cluster`` and ``dup_representative``; kept cluster
members record ``dup_cluster``. Only doc_id, url, fetch_date, text (+ quality_score) are read;
every other column passes through.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field

from curation.components import connected_components
from curation.ledger import funnel_rows, write_decisions
from infra.markdown import markdown_table
from infra.stage import Stage, StageConfig, StageContext, StageResult

_TRACKING_PARAMS = ("utm_", "fbclid", "gclid", "mc_cid", "mc_eid", "sessionid", "phpsessid", "sid")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class DedupConfig(StageConfig):
    """Which dedup levels run and their parameters."""

    url: bool = Field(True, description="drop documents whose normalised URL was seen (keep the newest fetch)")
    exact: bool = Field(True, description="drop exact duplicates of the normalised text")
    lines: bool = Field(True, description="remove lines that occur in more than line_max_docs documents (ccNet)")
    line_max_docs: int = Field(20, ge=1, description="a line found in more documents than this is removed")
    fuzzy: bool = Field(True, description="MinHash-LSH near-duplicate removal")
    ngram: int = Field(5, ge=1, description="shingle size in words (of the normalised text)")
    bands: int = Field(14, ge=1, description="LSH bands")
    rows: int = Field(8, ge=1, description="rows (permutations) per band; bands × rows permutations in all")
    seed: int = Field(1, description="seed of the MinHash permutations")
    minhash_backend: Literal["native", "datasketch"] = Field(
        "native",
        description="signatures from the compiled core (native) or from datasketch's MinHash with the same "
        "hash function and permutations (the reference: same signatures, its signature step ~40x slower)",
    )
    threshold: float | None = Field(
        0.7, ge=0.0, le=1.0,
        description="keep an LSH candidate link only if its estimated Jaccard reaches this (null: no verification)",
    )
    max_rounds: int = Field(64, ge=1, description="connected-components round limit")


# ---------------------------------------------------------------- pure core

def normalize_url(url: str | None) -> str | None:
    """Canonical form for URL dedup: scheme-less, lower-case host without ``www.`` and default port,
    no fragment, no trailing slash, tracking parameters dropped, query sorted. Empty → None."""
    url = (url or "").strip()
    if not url:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # e.g. a non-numeric port
        return url.lower()
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").removeprefix("www.")
    if port and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    query = sorted(
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if not k.lower().startswith(_TRACKING_PARAMS)
    )
    path = parts.path.rstrip("/") or "/"
    return urlunsplit(("", host, path, urlencode(query), "")).removeprefix("//")


def text_key(text: str | None) -> str | None:
    """Exact-dedup key: 128-bit hash of the normalised text; None when nothing is left."""
    import xxhash

    from curation.minhash import normalize_text

    norm = normalize_text(text or "")
    return xxhash.xxh3_128_hexdigest(norm.encode("utf-8", "surrogatepass")) if norm else None


def doc_keys(url, text):
    """Every per-document key of the URL, exact and line levels, computed in one pass."""
    from curation.minhash import line_hashes

    return {"url": normalize_url(url), "text_key": text_key(text), "line_hashes": line_hashes(text)}


# ---------------------------------------------------------------- Spark shell

_KEYS_TYPE = "struct<url:string, text_key:string, line_hashes:array<long>>"

def _order(has_quality: bool):
    from pyspark.sql import functions as F

    return ([F.col("quality_score").desc_nulls_last()] if has_quality else []) + [F.col("doc_id").asc()]


def _drop_duplicates_by(keys, key: str, order, reason: str):
    """Among live rows of the key frame sharing ``key`` keep the first by ``order``; the rest get ``reason``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    is_live = F.col("drop_reason").isNull() & F.col(key).isNotNull()
    w = Window.partitionBy(key).orderBy(*order)
    live = (
        keys.where(is_live)
        .withColumn("_rep", F.first("doc_id").over(w))
        .withColumn("_dup", F.col("_rep") != F.col("doc_id"))
        .withColumn("drop_reason", F.when(F.col("_dup"), F.lit(reason)).otherwise(F.col("drop_reason")))
        .withColumn("dup_representative", F.when(F.col("_dup"), F.col("_rep")).otherwise(F.col("dup_representative")))
        .drop("_rep", "_dup")
    )
    return live.unionByName(keys.where(~is_live))


def _url_level(keys):
    from pyspark.sql import functions as F

    order = [F.expr("try_cast(fetch_date AS timestamp)").desc_nulls_last(), F.col("doc_id").asc()]
    return _drop_duplicates_by(keys, "_url", order, "dup_url")


def _exact_level(keys, has_quality: bool):
    from pyspark.sql import functions as F

    keys = keys.withColumn(
        "drop_reason", F.when(F.col("drop_reason").isNull() & F.col("_key").isNull(), F.lit("empty_text")).otherwise(F.col("drop_reason"))
    )
    return _drop_duplicates_by(keys, "_key", _order(has_quality), "dup_exact")


def _removed_lines(df, keys, max_docs: int):
    """ccNet-style: positions of the lines present in more than ``max_docs`` live documents, as
    ``(_row, _removed array<int>)`` for the documents that lose a line."""
    from pyspark.sql import functions as F

    live = keys.where(F.col("drop_reason").isNull()).select("_row")
    exploded = (
        df.select("_row", F.posexplode("_keys.line_hashes").alias("pos", "h")).where(F.col("h").isNotNull())
        .join(live, "_row", "left_semi")
    )
    frequent = exploded.select("_row", "h").distinct().groupBy("h").count().where(F.col("count") > max_docs).select("h")
    return exploded.join(frequent, "h", "left_semi").groupBy("_row").agg(F.collect_list("pos").alias("_removed"))


def _remove_lines(df):
    """Drop the lines listed in ``_removed`` from ``text``; ``lines_removed`` counts them."""
    from pyspark.sql import functions as F

    kept_text = F.array_join(
        F.filter(F.split("text", "\n", -1), lambda line, i: ~F.array_contains(F.col("_removed"), i)), "\n"
    )
    df = (
        df.withColumn("lines_removed", F.coalesce(F.size("_removed"), F.lit(0)))
        .withColumn("text", F.when(F.col("_removed").isNotNull(), kept_text).otherwise(F.col("text")))
        .drop("_removed")
    )
    emptied = F.col("drop_reason").isNull() & (F.col("lines_removed") > 0) & (F.length(F.trim("text")) == 0)
    return df.withColumn("drop_reason", F.when(emptied, F.lit("empty_after_line_dedup")).otherwise(F.col("drop_reason")))


def _key_levels(df, cfg: DedupConfig, has_quality: bool):
    """URL, exact and line levels. Their windows and joins shuffle only a key frame (row id, doc_id,
    keys, ordering columns, decisions); the decisions reach the full rows in one join on the row id."""
    from pyspark.sql import functions as F

    keys_udf = F.udf(lambda url, text: doc_keys(url, text), _KEYS_TYPE, useArrow=True)
    df = df.withColumn("_row", F.monotonically_increasing_id()).withColumn("_keys", keys_udf("url", "text"))
    df = df.localCheckpoint()  # the one Python pass; fixes the row ids
    keys = df.select(
        "_row", "doc_id", "fetch_date", "drop_reason", "dup_representative",
        *(["quality_score"] if has_quality else []), F.col("_keys.url").alias("_url"), F.col("_keys.text_key").alias("_key"),
    )
    if cfg.url:
        keys = _url_level(keys)
    if cfg.exact:
        keys = _exact_level(keys, has_quality)
    decisions = keys.select("_row", "drop_reason", "dup_representative")
    if cfg.lines:
        decisions = decisions.join(_removed_lines(df, decisions, cfg.line_max_docs), "_row", "left")
    columns = df.drop("_row", "_keys").columns
    df = df.drop("_keys", "drop_reason", "dup_representative").join(decisions, "_row")
    if cfg.lines:
        df = _remove_lines(df)
    return df.select(*columns)


def signature_frame(df, params, backend: str = "native"):
    """``(doc_id, sig array<long>, bands array<long>)`` for every row of ``df(doc_id, text)`` that has
    shingles; one batch per Arrow batch of each partition, Arrow in and out (no pandas). ``backend``:
    :func:`~curation.minhash.batch_signatures` or :func:`~curation.minhash.datasketch_signatures`."""
    import numpy as np
    import pyarrow as pa

    from curation import minhash
    from curation.minhash import EMPTY, band_keys

    batch_signatures = {"native": minhash.batch_signatures, "datasketch": minhash.datasketch_signatures}[backend]

    def as_lists(matrix: np.ndarray) -> pa.ListArray:
        offsets = np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32)
        return pa.ListArray.from_arrays(offsets, matrix.reshape(-1))

    def compute(batches):
        for batch in batches:
            texts = batch.column("text").fill_null("").to_pylist()
            sigs = batch_signatures(texts, params)
            has_shingles = ~(sigs == EMPTY).all(axis=1)  # docs without shingles never match anything
            sigs = sigs[has_shingles]
            doc_ids = batch.column("doc_id").filter(pa.array(has_shingles))
            yield pa.RecordBatch.from_arrays(
                [doc_ids, as_lists(sigs.view(np.int64)), as_lists(band_keys(sigs, params))], names=["doc_id", "sig", "bands"]
            )

    return df.select("doc_id", "text").mapInArrow(compute, "doc_id string, sig array<long>, bands array<long>")


def fuzzy_clusters(df, params, threshold: float | None, max_rounds: int, log=None, backend: str = "native"):
    """Near-duplicate clusters of ``df(doc_id, text)``: ``(node, component)`` for every clustered doc,
    plus counts. Candidate links go from each bucket member to the bucket's smallest doc_id."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    sigs = signature_frame(df, params, backend).localCheckpoint()  # the one Python pass, computed once
    bucket = Window.partitionBy("band", "key")
    links = (
        sigs.select("doc_id", F.posexplode("bands").alias("band", "key"))
        .select(F.col("doc_id").alias("src"), F.min("doc_id").over(bucket).alias("dst"))
        .where(F.col("src") != F.col("dst")).distinct()
    )
    if threshold is None:
        links = links.withColumn("verified", F.lit(True))
    else:
        s1 = sigs.select(F.col("doc_id").alias("src"), F.col("sig").alias("a"))
        s2 = sigs.select(F.col("doc_id").alias("dst"), F.col("sig").alias("b"))
        equal = F.aggregate(F.zip_with("a", "b", lambda x, y: (x == y).cast("int")), F.lit(0), lambda acc, v: acc + v)
        verified = (equal >= F.lit(threshold * params.num_perm)).alias("verified")
        links = links.join(s1, "src").join(s2, "dst").select("src", "dst", verified)
    links = links.localCheckpoint()
    candidates, verified = links.agg(F.count("*"), F.count_if("verified")).first()
    stats = {"fuzzy_candidate_links": candidates}
    if threshold is not None:
        stats["fuzzy_verified_links"] = verified
    components, rounds = connected_components(links.where("verified").select("src", "dst"), max_rounds=max_rounds, log=log)
    stats["components_rounds"] = rounds
    return components, stats


def _fuzzy_level(df, params, threshold, max_rounds, has_quality: bool, log, backend: str):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    live = df.where(F.col("drop_reason").isNull())
    components, stats = fuzzy_clusters(live, params, threshold, max_rounds, log, backend)
    members = components.join(
        df.select(F.col("doc_id").alias("node"), *(["quality_score"] if has_quality else [])), "node"
    ).withColumnRenamed("node", "doc_id")
    w = Window.partitionBy("component").orderBy(*_order(has_quality))
    members = members.select(
        "doc_id", F.col("component").alias("_cluster"), F.first("doc_id").over(w).alias("_rep")
    ).localCheckpoint()
    stats["fuzzy_clusters"] = members.agg(F.count_distinct("_cluster")).first()[0]
    df = df.join(members, "doc_id", "left")
    dup = F.col("_rep").isNotNull() & (F.col("_rep") != F.col("doc_id"))
    return (
        df.withColumn("dup_cluster", F.coalesce("_cluster", "dup_cluster"))
        .withColumn("drop_reason", F.when(dup, F.lit("dup_fuzzy")).otherwise(F.col("drop_reason")))
        .withColumn("dup_representative", F.when(dup, F.col("_rep")).otherwise(F.col("dup_representative")))
        .drop("_cluster", "_rep")
    ), stats


def deduplicate(df, cfg: DedupConfig, log=None):
    """Apply the enabled levels to ``df``; returns (df with decisions, stats)."""
    from pyspark.sql import functions as F

    from curation.minhash import MinHashParams

    for col, typ in (("fetch_date", "string"), ("drop_reason", "string")):
        if col not in df.columns:
            df = df.withColumn(col, F.lit(None).cast(typ))
    df = (
        df.withColumn("dup_cluster", F.lit(None).cast("string"))
        .withColumn("dup_representative", F.lit(None).cast("string"))
        .withColumn("lines_removed", F.lit(0))
    )
    has_quality = "quality_score" in df.columns
    stats: dict = {}
    if cfg.url or cfg.exact or cfg.lines:
        df = _key_levels(df, cfg, has_quality).localCheckpoint()
    if cfg.lines:
        stats["lines_removed"] = df.agg(F.sum("lines_removed")).first()[0] or 0
    if cfg.fuzzy:
        params = MinHashParams(cfg.ngram, cfg.bands, cfg.rows, cfg.seed)
        df, fuzzy_stats = _fuzzy_level(df, params, cfg.threshold, cfg.max_rounds, has_quality, log, cfg.minhash_backend)
        stats.update(fuzzy_stats)
    return df, stats


def run(ctx: StageContext) -> StageResult:
    from curation.minhash import s_curve

    cfg: DedupConfig = ctx.config
    spark = ctx.spark()
    df = spark.read.parquet(str(ctx.input("quality").path("data")))
    missing = {"doc_id", "url", "text"} - set(df.columns)
    if missing:
        raise ValueError(f"dedup input lacks column(s) {sorted(missing)}")
    df, stats = deduplicate(df, cfg, ctx.log)
    counts = write_decisions(df, ctx.output("data"), ctx.output("rejected"))
    curve = s_curve(cfg.bands, cfg.rows)
    metrics = {
        **counts, **stats, "levels": [lv for lv in ("url", "exact", "lines", "fuzzy") if getattr(cfg, lv)],
        "num_perm": cfg.bands * cfg.rows, "s_curve": curve,
    }
    report = "\n".join(markdown_table(["Jaccard", "P(candidate)"], [(j, f"{p:.3f}") for j, p in curve.items()]))
    return StageResult(
        metrics=metrics,
        tables={"funnel": funnel_rows("dedup", counts), "s_curve": [{"jaccard": j, "p_candidate": p} for j, p in curve.items()]},
        report_md=f"### dedup S-curve ({cfg.bands} bands × {cfg.rows} rows)\n\n{report}\n",
    )


STAGES = [
    Stage(
        name="dedup",
        description="URL, exact, line-level and MinHash-LSH fuzzy dedup (connected components in Spark)",
        config_model=DedupConfig,
        run=run,
        inputs=("quality",),
        version="2",  # 2: signatures in datasketch's affine64 scheme (fmix64 before each permutation)
        uses_spark=True,
    )
]
