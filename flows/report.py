"""One self-contained HTML report per run (``RUN_ROOT/RUN/report.html``), or two runs side by side.

Sections: warnings; training effects on held-out data (before → after with 95% intervals, one
panel per row); the curation funnel (documents in and kept per stage, top drop reasons, tokens);
pretraining loss and learning-rate curves; RL mean reward and response length per step; the
evaluation table with 95% intervals (Wilson for accuracies) as a chart; and the run's lineage graph
(stages and artifacts with content hashes). Charts are matplotlib PNGs embedded in the page.

    refinery report RUN            # writes RUN_ROOT/RUN/report.html
    refinery report RUN_A RUN_B    # writes RUN_ROOT/compare-RUN_A-RUN_B.html
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

from flows.explorer import render_svg
from infra.effects import EFFECTS_TABLE, format_effect, wilson_interval
from infra.lineage import LineageCatalog, lineage_graph
from infra.runstore import check_name
from training.pretrain_stage import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after selecting the non-interactive backend)

STYLE = ("body{font-family:system-ui,sans-serif;margin:24px;color:#1d2433;max-width:1400px} table{border-collapse:"
         "collapse;margin:8px 0 18px} td,th{border:1px solid #ccd;padding:3px 8px;font-size:13px} th{background:#eef1f7}"
         " .warn{background:#fff3cd;border:1px solid #e0b44c;padding:8px 12px} img{margin:4px;border:1px solid #dde}"
         " .cols{display:flex;gap:24px;align-items:flex-start} .cols>div{flex:1;min-width:0}")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>-</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pretrain_steps(manifest: dict) -> list[dict]:
    """The pretrain stage's step records (loss, lr, ...), without its events (checkpoints, spikes, rollbacks)."""
    if "metrics" not in manifest["outputs"]:
        return []
    path = Path(manifest["outputs"]["metrics"]["path"]) / "metrics.jsonl"
    return read_metrics(path)[0] if path.is_file() else []


def run_data(catalog: LineageCatalog, run_id: str) -> dict[str, Any]:
    """Everything the report shows, read from the catalog and the stage manifests of one run."""
    runs = catalog.stage_runs(run_id)
    if not runs:
        raise KeyError(f"run {run_id!r} is not in the lineage catalog")
    manifests = {r["stage"]: json.loads(Path(r["manifest_path"]).read_text()) for r in runs}
    funnel = [{"stage": s, "in": m["metrics"]["rows_in"], "kept": m["metrics"]["kept"],
               "top drop reasons": ", ".join(f"{k} {v}" for k, v in sorted(
                   (m["metrics"].get("drop_reasons") or {}).items(), key=lambda kv: -kv[1])[:3])}
              for s, m in manifests.items() if {"rows_in", "kept"} <= set(m["metrics"])]
    pretrain = pretrain_steps(manifests["pretrain"]) if "pretrain" in manifests else []
    rl = {s: m["tables"]["steps"] for s, m in manifests.items()
          if s in ("grpo", "ppo") and (m.get("tables") or {}).get("steps")}
    evals = []
    for stage, m in manifests.items():
        for row in (m.get("tables") or {}).get("eval", []):
            lo = hi = None
            if 0.0 <= row["value"] <= 1.0 and row["metric"] in ("acc", "acc_norm", "exact_match", "accuracy"):
                lo, hi = wilson_interval(row["value"], int(row["n"]))
            evals.append({"checkpoint": stage.removeprefix("eval_"), "task": row["task"], "metric": row["metric"],
                          "value": row["value"], "n": row["n"], "low": lo, "high": hi})
    effects = [row for m in manifests.values() for row in (m.get("tables") or {}).get(EFFECTS_TABLE, [])
               if row.get("before") is not None]
    warnings = [f"{s}: {w}" for s, m in manifests.items() for w in m.get("warnings", [])]
    return {"run_id": run_id, "stages": [{"stage": s, "status": ("reused " + m["cached_from"]) if m.get("cached_from")
                                          else "computed", "seconds": m["timings"]["seconds"]}
                                         for s, m in manifests.items()],
            "funnel": funnel, "tokens": manifests.get("tokenize", {}).get("metrics", {}).get("tokens"),
            "pretrain": pretrain, "rl": rl, "evals": evals, "effects": effects, "warnings": warnings,
            "graph": lineage_graph(catalog, [(run_id, s) for s in manifests])}


VERDICT_COLOURS = {"improved": "tab:green", "worse": "tab:red", "no clear change": "tab:gray",
                   "too few items for an interval": "tab:gray"}


def _effects_chart(effects: list[dict]) -> str:
    """One panel per before → after row: both means with their 95% intervals, coloured by verdict."""
    cols = min(4, len(effects))
    rows = math.ceil(len(effects) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    for ax, e in zip(axes.flat, effects):
        ys = [e["before"], e["after"]]
        err = [[e["before"] - e["before_lo"], e["after"] - e["after_lo"]], [e["before_hi"] - e["before"], e["after_hi"] - e["after"]]]
        ax.errorbar(["before", "after"], ys, yerr=err, marker="o", capsize=5, color=VERDICT_COLOURS[e["verdict"]])
        ax.set_title(f"{e['stage']}: {e['metric']}\n{e['verdict']} (n={e['n']}, {e['better']} is better)", fontsize=9)
        ax.margins(x=0.4)
    for ax in list(axes.flat)[len(effects):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _charts(data: dict) -> list[str]:
    out = [_effects_chart(data["effects"])] if data["effects"] else []
    if data["funnel"]:
        fig, ax = plt.subplots(figsize=(5, 2.8))
        ax.bar([f["stage"] for f in data["funnel"]], [f["kept"] for f in data["funnel"]], color="#4c78a8")
        ax.set(ylabel="documents kept", title="curation funnel")
        ax.tick_params(axis="x", rotation=40)
        out.append(_png(fig))
    if data["pretrain"]:
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.8))
        steps = [r["step"] for r in data["pretrain"]]
        a.plot(steps, [r["loss"] for r in data["pretrain"]])
        a.set(xlabel="step", ylabel="loss", title="pretraining loss")
        b.plot(steps, [r["lr"] for r in data["pretrain"]], color="tab:green")
        b.set(xlabel="step", ylabel="lr", title="learning rate")
        out.append(_png(fig))
    for stage, steps in data["rl"].items():
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.8))
        xs = [h["step"] for h in steps]
        a.plot(xs, [h["reward_mean"] for h in steps], marker="o")
        a.set(xlabel="step", ylabel="mean reward", title=f"{stage}: reward")
        b.plot(xs, [h["response_len_mean"] for h in steps], marker="o", color="tab:orange")
        b.set(xlabel="step", ylabel="response tokens", title=f"{stage}: response length")
        out.append(_png(fig))
    by_metric: dict[str, list[dict]] = {}
    for e in data["evals"]:
        by_metric.setdefault(f"{e['task']}/{e['metric']}", []).append(e)
    for name, rows in by_metric.items():
        if len(rows) < 1 or name.endswith(("word_perplexity", "token_perplexity", "byte_perplexity", "tokens")):
            continue
        fig, ax = plt.subplots(figsize=(4.2, 2.8))
        xs = [r["checkpoint"] for r in rows]
        ys = [r["value"] for r in rows]
        err = None
        if all(r["low"] is not None for r in rows):
            err = [[y - r["low"] for y, r in zip(ys, rows)], [r["high"] - y for y, r in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, linestyle="-")
        ax.set(title=name + (" (95% Wilson)" if err else ""), ylabel=name.split("/")[-1])
        out.append(_png(fig))
    return out


def _section(data: dict) -> str:
    evals = [{**e, "value": f"{e['value']:.4g}",
              "95% interval": f"[{e['low']:.3f}, {e['high']:.3f}]" if e["low"] is not None else "",
              "low": None, "high": None} for e in data["evals"]]
    for e in evals:
        e.pop("low"), e.pop("high")
    warn = ("<div class='warn'><b>Warnings</b><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in data["warnings"])
            + "</ul></div>") if data["warnings"] else ""
    return (f"<h2>Run {html.escape(data['run_id'])}</h2>{warn}<h3>Stages</h3>{_table(data['stages'])}"
            + (f"<h3>Training effects on held-out data (before → after, 95% intervals)</h3>"
               f"{_table([{'stage': e['stage'], 'effect': format_effect(e)} for e in data['effects']])}"
               if data["effects"] else "") +
            f"<h3>Curation funnel</h3>{_table(data['funnel'])}<p>tokens after tokenize: {data['tokens'] or '-'}</p>"
            "<h3>Charts</h3>" + "".join(_charts(data)) + f"<h3>Evaluation</h3>{_table(evals)}"
            f"<h3>Lineage</h3>{render_svg(data['graph'], set())}")


def write_report(run_root: str | Path, run_a: str, run_b: str | None = None) -> Path:
    """Write the report of one run (or two side by side) and return its path."""
    run_root = Path(run_root).resolve()
    catalog = LineageCatalog(run_root)
    runs = [run_data(catalog, check_name(r)) for r in (run_a, run_b) if r]
    title = " vs ".join(d["run_id"] for d in runs)
    body = (f"<div class='cols'>{''.join(f'<div>{_section(d)}</div>' for d in runs)}</div>" if len(runs) > 1
            else _section(runs[0]))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Refinery report {html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>Refinery report: {html.escape(title)}</h1>{body}</body></html>")
    path = run_root / run_a / "report.html" if not run_b else run_root / f"compare-{run_a}-{run_b}.html"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path

