"""``heuristics``: Gopher quality, Gopher repetition, C4 and FineWeb filters, with signals kept apart from decisions.

Two passes, so a changed threshold never recomputes a signal:

1. **signals** (expensive, threshold-free): :func:`curation.filters.all_signals` over every input
   document, merged into the ``signals`` struct next to the extraction signals. The scored table is
   cached at ``<run_root>/cache/heuristics_signals/<key>/`` where ``key`` = sha256 of (the langid
   ``data`` output's content hash, :data:`curation.filters.SIGNALS_VERSION`). It is written to a
   temp dir and renamed into place (atomic), and shared by every run whose input has that hash.
2. **decisions** (cheap): :func:`curation.filters.first_failure` with the rules built from this
   config; the first failed rule is the ``drop_reason`` (``"<filter>:<rule>"``).

``refinery run --stages heuristics -o heuristics.gopher_quality.max_avg_word_length=12`` changes the
stage's cache key, so the stage reruns, finds the signals cache and only redoes pass 2 (the
manifest's ``signals_cache`` metric says ``hit``). Deleting ``<run_root>/cache`` is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from pydantic import Field, create_model

from curation.filters import FILTERS, RULE_SPECS, SIGNALS_VERSION, all_signals, build_rules, first_failure, signal_names
from curation.ledger import funnel_rows, write_decisions
from infra.markdown import markdown_table
from infra.stage import Stage, StageConfig, StageContext, StageResult

CACHE_DIR = "cache/heuristics_signals"


def thresholds_model(name: str, filter_name: str, doc: str) -> type[StageConfig]:
    """The config section of one filter, generated from its rules in :data:`curation.filters.RULE_SPECS`
    (key, type, default threshold and description each come from the rule's one declaration)."""
    fields = {
        spec.name: (spec.kind if spec.kind is bool else spec.kind | None, Field(spec.default, description=spec.description))
        for spec in RULE_SPECS if spec.filter == filter_name
    }
    return create_model(name, __base__=StageConfig, __doc__=doc, __module__=__name__, **fields)


GopherQualityThresholds = thresholds_model(
    "GopherQualityThresholds", "gopher_quality", "Gopher quality rules (Rae et al. 2021, DataTrove defaults); null disables a rule."
)
GopherRepetitionThresholds = thresholds_model(
    "GopherRepetitionThresholds", "gopher_repetition",
    "Gopher repetition rules (Gopher Table A1, DataTrove defaults); null disables a rule.",
)
C4Thresholds = thresholds_model(
    "C4Thresholds", "c4",
    "C4 rules (Raffel et al. 2020, DataTrove's C4QualityFilter); sentences are counted on the lines C4 keeps.",
)
FineWebThresholds = thresholds_model(
    "FineWebThresholds", "fineweb", "FineWeb quality rules (Penedo et al. 2024, DataTrove defaults); null disables a rule."
)


class HeuristicsConfig(StageConfig):
    """Thresholds per filter (applied in this order; the first failed rule is the drop reason)."""

    gopher_quality: GopherQualityThresholds = Field(default_factory=GopherQualityThresholds, description="Gopher quality")
    gopher_repetition: GopherRepetitionThresholds = Field(
        default_factory=GopherRepetitionThresholds, description="Gopher repetition"
    )
    c4: C4Thresholds = Field(default_factory=C4Thresholds, description="C4 quality")
    fineweb: FineWebThresholds = Field(default_factory=FineWebThresholds, description="FineWeb quality")
    arrow_batch_rows: int = Field(256, ge=1, description="rows per Arrow batch sent to a Python worker")


def rules_for(cfg: HeuristicsConfig):
    """The ordered rule list of a config."""
    return build_rules(cfg.model_dump(include={"gopher_quality", "gopher_repetition", "c4", "fineweb"}))


def signals_cache_key(input_hash: str) -> str:
    payload = json.dumps({"input": input_hash, "signals_version": SIGNALS_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _merge_signals(batch, new: dict[str, list[float]]):
    """The batch's ``signals`` struct (if any) with ``new`` fields appended, as one StructArray."""
    import pyarrow as pa

    fields, arrays = [], []
    if "signals" in batch.schema.names:
        old = batch.column("signals")
        fields += [old.type.field(i).name for i in range(old.type.num_fields)]
        arrays += old.flatten()
    for name, values in new.items():
        fields.append(name)
        arrays.append(pa.array(values, pa.float64()))
    return pa.StructArray.from_arrays(arrays, names=fields)


def signals_dataframe(df):
    """Add every heuristic signal to the ``signals`` struct (no decision yet)."""
    from pyspark.sql import types as T

    names = signal_names()
    old = [f for f in df.schema["signals"].dataType.fields] if "signals" in df.columns else []
    signals_type = T.StructType(old + [T.StructField(n, T.DoubleType()) for n in names])
    schema = T.StructType([f for f in df.schema.fields if f.name != "signals"] + [T.StructField("signals", signals_type)])

    def score_batches(batches):
        import pyarrow as pa

        for batch in batches:
            found = [all_signals(text or "") for text in batch.column("text").to_pylist()]
            cols = [n for n in batch.schema.names if n != "signals"]
            merged = _merge_signals(batch, {n: [f[n] for f in found] for n in names})
            yield pa.RecordBatch.from_arrays([batch.column(c) for c in cols] + [merged], names=cols + ["signals"])

    return df.mapInArrow(score_batches, schema)


def decide_dataframe(scored, rules):
    """Set ``drop_reason`` to the first failed rule (signals untouched)."""
    from pyspark.sql import types as T

    schema = T.StructType(
        [f for f in scored.schema.fields if f.name != "drop_reason"] + [T.StructField("drop_reason", T.StringType())]
    )

    def decide_batches(batches):
        import pyarrow as pa

        for batch in batches:
            reasons = [first_failure(s or {}, rules) for s in batch.column("signals").to_pylist()]
            cols = [n for n in batch.schema.names if n != "drop_reason"]
            yield pa.RecordBatch.from_arrays(
                [batch.column(c) for c in cols] + [pa.array(reasons, pa.string())], names=cols + ["drop_reason"]
            )

    return scored.mapInArrow(decide_batches, schema)


def cached_signals(spark, input_path: Path, cache_dir: Path, log) -> str:
    """Make sure ``cache_dir`` holds the scored input; return ``"hit"`` or ``"miss"``."""
    if (cache_dir / "_SUCCESS").is_file():
        log.info("heuristics: reusing signals from %s", cache_dir)
        return "hit"
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir.parent / f".tmp-{cache_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        signals_dataframe(spark.read.parquet(str(input_path))).write.mode("error").parquet(str(tmp))
        try:
            os.rename(tmp, cache_dir)
        except OSError:  # a concurrent run finished the same cache first
            if not (cache_dir / "_SUCCESS").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("heuristics: signals computed and cached in %s", cache_dir)
    return "miss"


def filter_funnel(counts: dict, filters: tuple[str, ...]) -> list[dict]:
    """Documents left after each filter, in order."""
    left, rows = counts["rows_in"], []
    for filt in filters:
        left -= sum(n for reason, n in counts["drop_reasons"].items() if reason.split(":", 1)[0] == filt)
        rows.append({"step": f"after {filt}", "documents": left})
    return rows


def run(ctx: StageContext) -> StageResult:
    cfg: HeuristicsConfig = ctx.config
    spark = ctx.spark()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_rows))
    upstream = ctx.input("langid")
    cache_dir = ctx.run_root / CACHE_DIR / signals_cache_key(upstream.manifest["outputs"]["data"]["hash"])
    cache = cached_signals(spark, upstream.path("data"), cache_dir, ctx.log)
    decided = decide_dataframe(spark.read.parquet(str(cache_dir)), rules_for(cfg))
    counts = write_decisions(decided, ctx.output("data"), ctx.output("rejected"))
    steps = filter_funnel(counts, FILTERS)
    funnel = [*upstream.manifest["metrics"].get("funnel", []), *steps]
    by_filter = {row["step"].removeprefix("after "): row["documents"] for row in steps}
    return StageResult(
        metrics={**counts, "signals_cache": cache, "signals_cache_dir": str(cache_dir), "kept_after": by_filter,
                 "funnel": funnel},
        tables={"funnel": funnel_rows("heuristics", counts), "pipeline_funnel": funnel},
        report_md="\n".join(markdown_table(["step", "documents"], ((r["step"], r["documents"]) for r in funnel))),
    )


STAGES = [
    Stage(
        name="heuristics",
        description="Gopher quality/repetition, C4 and FineWeb filters; signals cached, thresholds re-applied cheaply",
        config_model=HeuristicsConfig,
        run=run,
        inputs=("langid",),
        uses_spark=True,
        execution_metrics=("signals_cache", "signals_cache_dir"),
    )
]
