"""The decision ledger shared by every curation stage's Spark shell.

Every stage maps its core over the documents and sets ``drop_reason`` (null = kept). This module
writes kept rows to ``data/`` and dropped rows to ``rejected/`` (with their reason and signals), and
counts rows per reason for the manifest's funnel. Dropped documents are never lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DROP_REASON = "drop_reason"


def write_decisions(df, data_path: Path, rejected_path: Path, rejected_drop_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write kept/rejected rows of ``df`` (which has ``drop_reason``) and return the counts.

    ``rejected_drop_columns`` are left out of ``rejected/`` (e.g. raw page bytes) to keep it small.
    Returns ``{"rows_in", "kept", "dropped", "drop_reasons": {reason: n}}``.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    df = df.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        reasons = {
            (r[DROP_REASON] or "kept"): int(r["count"])
            for r in df.groupBy(DROP_REASON).count().collect()
        }
        df.filter(F.col(DROP_REASON).isNull()).write.mode("error").parquet(str(data_path))
        rejected = df.filter(F.col(DROP_REASON).isNotNull())
        keep_cols = [c for c in df.columns if c not in rejected_drop_columns]
        rejected.select(*keep_cols).write.mode("error").parquet(str(rejected_path))
    finally:
        df.unpersist()
    kept = reasons.pop("kept", 0)
    dropped = sum(reasons.values())
    return {"rows_in": kept + dropped, "kept": kept, "dropped": dropped, "drop_reasons": dict(sorted(reasons.items()))}


def funnel_rows(stage: str, counts: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows (stage, reason, documents) for a Prefect table artifact."""
    rows = [{"stage": stage, "step": "in", "documents": counts["rows_in"]}]
    rows += [{"stage": stage, "step": f"dropped: {r}", "documents": n} for r, n in counts["drop_reasons"].items()]
    rows.append({"stage": stage, "step": "kept", "documents": counts["kept"]})
    return rows
