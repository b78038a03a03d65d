"""Results tables and comparisons: one row per (task, metric); eval stages store their rows in the
manifest's ``tables["eval"]``, which is what comparisons across stages and runs read."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from evaluation.tasks import TaskResult
from infra.markdown import markdown_table as table_lines
from infra.runstore import RunStoreError, completed_stages, read_manifest

EVAL_TABLE = "eval"
# evaluation stage -> the training stage whose checkpoint it scores, in pipeline order
EVALUATED = {"eval_pretrain": "pretrain", "eval_sft": "sft", "eval_dpo": "dpo", "eval_grpo": "grpo", "eval_ppo": "ppo"}


def result_rows(results: Iterable[TaskResult]) -> list[dict]:
    """Flat rows ``{task, metric, value, n, malformed}`` for the manifest and the Prefect table."""
    return [
        {"task": r.task, "metric": m, "value": round(float(v), 6), "n": r.n, "malformed": r.malformed}
        for r in results for m, v in r.metrics.items()
    ]


def flat_metrics(rows: Iterable[dict]) -> dict[str, float]:
    """``{"task/metric": value}`` plus ``task/n`` and ``task/malformed`` for the manifest and lineage catalog."""
    out: dict[str, float] = {}
    for row in rows:
        out[f"{row['task']}/{row['metric']}"] = row["value"]
        out[f"{row['task']}/n"] = row["n"]
        out[f"{row['task']}/malformed"] = row["malformed"]
    return out


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A table with the report's number format (floats to 4 places, None as –)."""
    return "\n".join(table_lines(header, rows, _fmt))


def eval_tables(run_root: str | Path, run_id: str) -> dict[str, list[dict]]:
    """``{eval stage: rows}`` of every completed eval stage of a run, in pipeline order."""
    tables = {}
    for stage in completed_stages(Path(run_root), run_id):
        try:
            manifest = read_manifest(Path(run_root), run_id, stage, verify=False)
        except RunStoreError:
            continue
        rows = (manifest.get("tables") or {}).get(EVAL_TABLE)
        if rows:
            tables[stage] = rows
    return _pipeline_order(tables)


def _pipeline_order(tables: dict[str, list[dict]]) -> dict[str, list[dict]]:
    order = {name: i for i, name in enumerate(EVALUATED)}
    return dict(sorted(tables.items(), key=lambda kv: order.get(kv[0], len(order))))


def _index(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["task"], r["metric"]): r["value"] for r in rows}


def stages_side_by_side(tables: dict[str, list[dict]]) -> str:
    """Markdown: one column per eval stage of one run (how scores move along the pipeline)."""
    indexed = {stage: _index(rows) for stage, rows in tables.items()}
    keys = sorted({k for idx in indexed.values() for k in idx})
    rows = [[task, metric, *(idx.get((task, metric)) for idx in indexed.values())] for task, metric in keys]
    return markdown_table(["task", "metric", *indexed], rows)


def compare_runs(run_root: str | Path, run_a: str, run_b: str) -> tuple[list[dict], str]:
    """Rows and markdown comparing the eval stages both runs completed: same tasks side by side, deltas."""
    a, b = eval_tables(run_root, run_a), eval_tables(run_root, run_b)
    rows = []
    for stage in [s for s in a if s in b]:
        ia, ib = _index(a[stage]), _index(b[stage])
        for task, metric in sorted(set(ia) & set(ib)):
            va, vb = ia[(task, metric)], ib[(task, metric)]
            rows.append({"stage": stage, "task": task, "metric": metric, run_a: va, run_b: vb, "delta": vb - va})
    only = sorted(set(a) ^ set(b))
    md = [f"## Evaluation: {run_a} vs {run_b}", ""]
    if rows:
        md.append(markdown_table(
            ["stage", "task", "metric", run_a, run_b, "delta"],
            [[r["stage"], r["task"], r["metric"], r[run_a], r[run_b], f"{r['delta']:+.4f}"] for r in rows],
        ))
    else:
        md.append("No evaluation stage with common tasks in both runs.")
    if only:
        md += ["", "Eval stages in only one run: " + ", ".join(only)]
    return rows, "\n".join(md)
