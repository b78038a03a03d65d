"""The decision ledger shared by every curation stage's Spark shell.

Every stage maps its core over the documents and sets ``drop_reason`` (null = kept). This module
writes kept rows to ``data/`` and dropped rows to ``rejected/`` (with their reason and signals) in
one pass over the data, and counts rows per reason for the manifest's funnel. Dropped documents are
never lost.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

DROP_REASON = "drop_reason"
_LEDGER = "_ledger"


def write_decisions(df, data_path: Path, rejected_path: Path, rejected_drop_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write kept/rejected rows of ``df`` (which has ``drop_reason``) and return the counts.

    One Spark job computes the stage once and writes both sides (``partitionBy`` on a kept/rejected
    marker); ``rejected_drop_columns`` are nulled in ``rejected/`` (e.g. raw page bytes) to keep it
    small. Returns ``{"rows_in", "kept", "dropped", "drop_reasons": {reason: n}}``.
    """
    from pyspark.sql import functions as F

    spark = df.sparkSession
    kept = F.col(DROP_REASON).isNull()
    columns = [F.when(kept, F.col(c)).alias(c) if c in rejected_drop_columns else F.col(c) for c in df.columns]
    staged = Path(data_path).parent / f".ledger-{secrets.token_hex(4)}"
    try:
        (
            df.select(*columns, F.when(kept, "data").otherwise("rejected").alias(_LEDGER))
            .write.partitionBy(_LEDGER)
            .parquet(str(staged))
        )
        for side, target in (("data", Path(data_path)), ("rejected", Path(rejected_path))):
            part = staged / f"{_LEDGER}={side}"
            if part.is_dir():
                os.replace(part, target)
            else:  # no rows on this side: an empty Parquet dataset with the same schema
                spark.createDataFrame([], df.schema).coalesce(1).write.parquet(str(target))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    kept_n = spark.read.parquet(str(data_path)).count()
    reasons = {
        r[DROP_REASON]: int(r["count"])
        for r in spark.read.parquet(str(rejected_path)).groupBy(DROP_REASON).count().collect()
    }
    dropped = sum(reasons.values())
    return {"rows_in": kept_n + dropped, "kept": kept_n, "dropped": dropped, "drop_reasons": dict(sorted(reasons.items()))}


def funnel_rows(stage: str, counts: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows (stage, reason, documents) for a Prefect table artifact."""
    rows = [{"stage": stage, "step": "in", "documents": counts["rows_in"]}]
    rows += [{"stage": stage, "step": f"dropped: {r}", "documents": n} for r, n in counts["drop_reasons"].items()]
    rows.append({"stage": stage, "step": "kept", "documents": counts["kept"]})
    return rows
