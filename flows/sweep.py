"""Data-ablation sweeps: one ordinary Refinery run per arm, compared in one report.

A sweep is a base config plus axes (``key=[v1, v2, ...]``) expanded as a grid or zipped, times
``seeds`` pretraining seeds. Each arm is a normal run (its own run id ``SWEEP-ARMHASH``, tagged
with the sweep id), so lineage, rerun, diff and the UI work for arms. The proxy-training protocol:

- one tokenizer for every arm: a base run (``SWEEP-base``, the base config) trains it once and every
  arm copies it (``tokenizer.pretrained``), so token counts and losses compare;
- a fixed pretraining budget in tokens (the base config's ``pretrain`` steps × batch × sequence;
  an arm with less data repeats epochs — the report shows how many), the same model shape;
- ``seeds`` different ``pretrain.seed`` values per arm, so seed spread sits next to arm differences;
- tokenizer-independent held-out metrics from the eval stages (bits per byte on WikiText-2 and on
  held-out web text, ``web_perplexity``) plus any benchmark the config lists.

Stages upstream of the first changed key are reused from the cache, not recomputed. Reruns are
incremental: the sweep id does not depend on the axis values and an arm's run id depends only on
its own values, so rerunning the same command finishes only what is missing, and adding an axis
value computes one new arm.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import math
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed

from flows.pipeline import StageName, pipeline
from flows.stages import check_parameters, explorer_link, label_flow_run
from flows.registry import all_stages, execution_metrics, load_config
from infra.config import DEFAULT_CONFIG, ConfigError, parse_override
from infra.lineage import LineageCatalog, compare_runs, flatten
from infra.markdown import markdown_table
from infra.runstore import check_name, write_json_atomic

SEED_KEY = "pretrain.seed"
CURATION_METRICS = ("rows_in", "kept")


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple


@dataclass
class Arm:
    """One variant of the data (and one seed): the overrides that make it, and its run id."""

    values: dict[str, Any]
    seed: int | None
    run_id: str = ""
    status: str = "pending"
    stages: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def overrides(self) -> dict[str, Any]:
        return {**self.values, **({SEED_KEY: self.seed} if self.seed is not None else {})}

    @property
    def label(self) -> str:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.values.items())


def parse_axis(text: str) -> Axis:
    """``key=[v1,v2]`` (YAML list; a scalar is a one-value axis) → :class:`Axis`."""
    path, value = parse_override(text)
    values = tuple(value) if isinstance(value, list) else (value,)
    if not values:
        raise ConfigError(f"config error: axis {text!r} has no values")
    return Axis(".".join(path), values)


def expand_arms(axes: list[Axis], mode: Literal["grid", "zip"] = "grid", seeds: int = 1) -> list[Arm]:
    """Arms of a sweep: the grid (every combination) or the zip (i-th values together), × seeds."""
    if not axes:
        raise ConfigError("config error: a sweep needs at least one axis (-a key=[v1,v2])")
    if len({a.key for a in axes}) != len(axes):
        raise ConfigError("config error: an axis key is given twice")
    if mode == "zip":
        lengths = {a.key: len(a.values) for a in axes}
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"config error: zip mode needs axes of equal length (got {lengths})")
        combos = list(zip(*(a.values for a in axes)))
    elif mode == "grid":
        combos = list(itertools.product(*(a.values for a in axes)))
    else:
        raise ConfigError(f"config error: sweep mode must be grid or zip (got {mode!r})")
    if seeds < 1:
        raise ConfigError("config error: --seeds must be at least 1")
    seed_values = [None] if seeds == 1 else list(range(1, seeds + 1))
    return [Arm(dict(zip((a.key for a in axes), combo)), seed) for combo in combos for seed in seed_values]


def _digest(data: Any, n: int) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:n]


def sweep_id_for(config_file: str, overrides: dict, axis_keys: list[str], stages: list[str]) -> str:
    """Stable across reruns and across added axis values (they change arms, not the sweep)."""
    return "sweep-" + _digest([str(Path(config_file).resolve()), overrides, sorted(axis_keys), stages], 8)


@dataclass
class SweepPlan:
    sweep_id: str
    config_file: str
    base_overrides: dict[str, Any]
    stages: list[str]
    arms: list[Arm]
    first_varying_stage: str | None
    fixed_tokenizer: bool
    reference_effects: dict[str, float] = field(default_factory=dict)


PROXY_EVAL = "eval_pretrain"


def default_sweep_stages(order: list[str]) -> list[str]:
    """What an arm runs unless told: curation, the proxy model and its evaluation — the proxy model's eval
    stage and every stage it reads, transitively, among ``order`` — never SFT, reward models or RL.
    (A stage list without that eval stage, such as tests' fake stages, runs whole.)"""
    stages = all_stages()
    if PROXY_EVAL not in stages:
        return list(order)
    needed, todo = set(), [PROXY_EVAL]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += [*stages[name].inputs, *stages[name].optional_inputs]
    return [s for s in order if s in needed]


def plan_sweep(config_file: str, overrides: dict | None, axes: list[Axis], mode: str = "grid", seeds: int = 1,
               stages: list[str] | None = None, name: str | None = None) -> SweepPlan:
    """Validate every arm's config (one clear error before anything runs) and name the runs."""
    overrides = dict(overrides or {})
    base = load_config(config_file, overrides)
    order = base.pipeline_stages()
    stages = [s for s in order if s in (stages or default_sweep_stages(order))]
    if seeds > 1 and "pretrain" not in stages:
        raise ConfigError("config error: --seeds > 1 varies pretrain.seed, but pretrain is not among the stages")
    known = flatten(base.model_dump(mode="json"))
    for axis in axes:
        section = axis.key.split(".", 1)[0]
        if axis.key not in known and not any(k.startswith(axis.key + ".") for k in known):
            raise ConfigError(f"config error: axis {axis.key!r} is not a config key")
        if section in order and section not in stages:
            raise ConfigError(f"config error: axis {axis.key!r} changes stage {section!r}, which is not among the stages")
    arms = expand_arms(axes, mode, seeds)  # type: ignore[arg-type]
    for arm in arms:
        load_config(config_file, {**overrides, **arm.overrides})  # bad value → ConfigError naming the key
    sweep_id = sweep_id_for(config_file, overrides, [a.key for a in axes], stages) if not name \
        else check_name(name, "sweep name")
    for arm in arms:
        arm.run_id = check_name(f"{sweep_id}-{_digest(arm.overrides, 6)}", "arm run id (sweep name too long?)")
    varying = {k.split(".", 1)[0] for arm in arms for k in arm.overrides}
    first = next((s for s in stages if s in varying), None)
    fixed_tokenizer = ("tokenizer" in stages and not base.tokenizer.pretrained
                       and (first is None or stages.index(first) <= stages.index("tokenizer")))
    return SweepPlan(sweep_id, str(config_file), overrides, stages, arms, first, fixed_tokenizer,
                     dict(base.sweep.reference_effects))


RunPipeline = Callable[..., dict]  # (stages, run_id, config_file, overrides) -> pipeline result
MapArms = Callable[[Callable[[Arm], Arm], list[Arm], int], None]  # (run_arm, arms, parallel)


def thread_map(run_arm: Callable[[Arm], Arm], arms: list[Arm], parallel: int) -> None:
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(run_arm, arms))


def run_sweep(plan: SweepPlan, run_pipeline: RunPipeline, run_root: Path, parallel: int = 1,
              log: Callable[[str], None] = print, map_arms: MapArms = thread_map) -> dict:
    """Run the base stages once, then every arm (``parallel`` at a time); failed arms are recorded."""
    shared: dict[str, Any] = {}
    base_runs = []
    upstream = plan.stages[: plan.stages.index(plan.first_varying_stage)] if plan.first_varying_stage else plan.stages
    base_stages = list(upstream)
    if plan.fixed_tokenizer and "tokenizer" not in base_stages:
        base_stages = plan.stages[: plan.stages.index("tokenizer") + 1]
    if base_stages:
        base_id = f"{plan.sweep_id}-base"
        log(f"sweep {plan.sweep_id}: base run {base_id} ({', '.join(base_stages)})")
        result = run_pipeline(stages=base_stages, run_id=base_id, config_file=plan.config_file,
                              overrides=plan.base_overrides)
        base_runs.append(result)
        if plan.fixed_tokenizer:
            manifest = json.loads((Path(result["stages"]["tokenizer"]["dir"]) / "manifest.json").read_text())
            shared["tokenizer.pretrained"] = manifest["outputs"]["tokenizer"]["path"]

    def run_arm(arm: Arm) -> Arm:
        try:
            result = run_pipeline(stages=plan.stages, run_id=arm.run_id, config_file=plan.config_file,
                                  overrides={**plan.base_overrides, **shared, **arm.overrides})
            arm.stages = {s: info["status"] for s, info in result["stages"].items()}
            arm.status = "completed"
        except Exception as exc:  # one failed arm must not stop the others
            arm.status, arm.error = "failed", f"{type(exc).__name__}: {exc}"
        log(f"sweep {plan.sweep_id}: arm {arm.run_id} ({arm.label}, seed {arm.seed}) {arm.status}")
        return arm

    map_arms(run_arm, plan.arms, parallel)
    statuses = [st for r in base_runs for st in (i["status"] for i in r["stages"].values())]
    statuses += [st for arm in plan.arms for st in arm.stages.values()]
    summary = {
        "sweep_id": plan.sweep_id, "config_file": plan.config_file, "base_overrides": plan.base_overrides,
        "shared_overrides": shared, "stages": plan.stages, "first_varying_stage": plan.first_varying_stage,
        "arms": [{"run_id": a.run_id, "values": a.values, "seed": a.seed, "status": a.status, "stages": a.stages,
                  "error": a.error} for a in plan.arms],
        "stage_executions": {"computed": statuses.count("completed"), "reused": statuses.count("reused"),
                             "skipped": statuses.count("skipped")},
        "reference_effects": plan.reference_effects,
    }
    out = Path(run_root) / "sweeps" / plan.sweep_id
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", summary)
    report = sweep_report(summary, LineageCatalog(run_root))
    (out / "report.html").write_text(report["html"])
    summary["report"] = str(out / "report.html")
    summary["lines"] = report["lines"]
    summary["resolution"] = report["resolution"]
    summary["per_arm"] = report["rows"]
    summary["differences"] = report["differences"]
    write_json_atomic(out / "sweep.json", summary)
    return summary


# ---- report -------------------------------------------------------------------------------------
def arm_metrics(catalog: LineageCatalog, run_id: str) -> dict[str, float]:
    """The numbers compared across arms: documents kept per curation stage, tokens, epochs, eval metrics."""
    out: dict[str, float] = {}
    runs = {r["stage"]: r for r in catalog.stage_runs(run_id)}
    for stage, r in runs.items():
        m = r["metrics"]
        if all(k in m for k in CURATION_METRICS):
            out[f"{stage}/kept"] = m["kept"]
        if stage.startswith("eval_"):
            out.update({f"{stage}:{k}": v for k, v in m.items() if isinstance(v, (int, float)) and "/" in k
                        and not k.endswith(("/n", "/malformed"))})
    if "tokenize" in runs:
        per_source = runs["tokenize"]["metrics"].get("per_source", {})
        out["tokens/train"] = sum(v["tokens"] for k, v in per_source.items() if k.endswith("/train"))
    if "pretrain" in runs and out.get("tokens/train"):
        cfg = runs["pretrain"]["config"]
        budget = cfg["steps"] * cfg["global_batch_size"] * cfg["seq_length"]
        out["pretrain/tokens_budget"] = budget
        out["pretrain/epochs"] = round(budget / out["tokens/train"], 3)
    return out


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def sweep_report(summary: dict, catalog: LineageCatalog) -> dict:
    """Self-contained HTML (tables + one chart per metric and axis, seed spread as error bars), per eval
    metric the seed spread and the minimum detectable effect of the sweep's seeds, and plain-language
    verdict lines (:func:`compare_arms`)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in summary["arms"] if a["status"] == "completed"]
    per_run = {a["run_id"]: arm_metrics(catalog, a["run_id"]) for a in arms}
    axis_keys = list(summary["arms"][0]["values"]) if summary["arms"] else []
    groups: dict[str, list[dict]] = {}
    for a in arms:
        groups.setdefault(json.dumps(a["values"], sort_keys=True), []).append(a)
    found = {k for m in per_run.values() for k in m}
    stage_pos = {s: i for i, s in enumerate(summary["stages"])}
    metrics = sorted(found, key=lambda k: (":" in k, stage_pos.get(k.split("/")[0].split(":")[0], len(stage_pos)), k))
    rows, lines, charts = [], [], []
    stats: dict[str, dict[str, tuple[float, float, int]]] = {}
    values: dict[str, dict[str, list[float]]] = {}
    for key, members in groups.items():
        row = {"arm": ", ".join(f"{k}={v}" for k, v in json.loads(key).items()), "seeds": len(members)}
        for metric in metrics:
            vals = [per_run[a["run_id"]][metric] for a in members if metric in per_run[a["run_id"]]]
            if vals:
                mean, sd = statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
                stats.setdefault(metric, {})[key] = (mean, sd, len(vals))
                values.setdefault(metric, {})[_arm_label(key)] = vals
                row[metric] = f"{mean:.4g}" + (f" ± {sd:.2g}" if len(vals) > 1 else "")
        rows.append(row)
    references = summary.get("reference_effects", {})
    resolution_rows = []
    for metric in (m for m in metrics if ":" in m):  # eval metrics get a verdict and a chart
        by_arm = stats.get(metric, {})
        if len(by_arm) < 2:
            continue
        found_gap = compare_arms(values[metric], references.get(metric))
        lines.append(f"{metric}: {found_gap['line']}")
        resolution_rows.append({"metric": metric, "seeds per arm": found_gap["seeds"],
                                "seed sd (pooled)": _fmt(found_gap["pooled_sd"]),
                                "minimum detectable effect (2 sd)": _fmt(found_gap["resolution"]),
                                "largest gap": f"{found_gap['gap']:.3g}", "verdict": found_gap["verdict"]})
        charted: set[tuple] = set()
        for axis in axis_keys:
            # an axis's value per arm as JSON text (values may be lists or null); zipped axes that split
            # the arms the same way as one already charted add no chart
            split = tuple(json.dumps(json.loads(key)[axis], sort_keys=True) for key in by_arm)
            partition = tuple(split.index(v) for v in split)
            if partition in charted:
                continue
            charted.add(partition)
            fig, ax = plt.subplots(figsize=(4.2, 2.8))
            points: dict[str, list[tuple[float, float]]] = {}
            for value, (mean, sd, _) in zip(split, by_arm.values()):
                points.setdefault(value, []).append((mean, sd))
            xs = sorted(points, key=_axis_order)
            ax.errorbar(xs, [statistics.fmean(m for m, _ in points[x]) for x in xs],
                        yerr=[max(s for _, s in points[x]) for x in xs], marker="o", capsize=4)
            ax.set_xlabel(axis)
            ax.set_ylabel(metric.split(":", 1)[1])
            ax.set_title(metric, fontsize=9)
            charts.append((metric, axis, _figure_png(fig)))
            plt.close(fig)
    diffs = []
    if len(arms) > 1:
        base = arms[0]["run_id"]
        for a in arms[1:]:
            c = compare_runs(catalog, base, a["run_id"], execution_metrics())
            rows_ = [(e["stage"], r) for e in c["stages"] for r in e["rows"]]
            diffs.append({"arm": a["run_id"], "vs": base, "lineage": c["summary"],
                          "config keys": ", ".join(sorted({f"{s}.{r['key']}" for s, r in rows_
                                                           if r["kind"] == "config"})) or "-",
                          "outputs that differ": ", ".join(sorted({f"{s}/{r['key']}" for s, r in rows_
                                                                   if r["kind"] == "output"})) or "-"})

    def table(items: list[dict]) -> str:
        cols = list(dict.fromkeys(k for r in items for k in r))
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                       for r in items)
        return f"<table><tr>{head}</tr>{body}</table>"

    ex = summary["stage_executions"]
    arm_rows = [{"run": a["run_id"], **{k: v for k, v in a["values"].items()}, "seed": a["seed"], "status": a["status"],
                 "error": a["error"] or ""} for a in summary["arms"]]
    html_doc = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Refinery sweep "
        f"{html.escape(summary['sweep_id'])}</title><style>body{{font-family:system-ui,sans-serif;margin:24px;"
        "color:#1d2433}} table{border-collapse:collapse;margin:8px 0 18px} td,th{border:1px solid #ccd;"
        "padding:3px 8px;font-size:13px} th{background:#eef1f7} .charts img{margin:4px;border:1px solid #dde}"
        "</style></head><body>"
        f"<h1>Sweep {html.escape(summary['sweep_id'])}</h1>"
        f"<p>{len(summary['arms'])} arm runs ({len(groups)} variants); stage executions: {ex['computed']} computed, "
        f"{ex['reused']} reused from the cache, {ex['skipped']} already done. First changed stage: "
        f"{html.escape(str(summary['first_varying_stage']))}. Shared: {html.escape(json.dumps(summary['shared_overrides']))}</p>"
        "<h2>Verdicts</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"
        + "<h2>What this sweep can resolve</h2><p>A gap between arms counts as detected when it exceeds twice the "
        "pooled seed standard deviation (the minimum detectable effect of this sweep's seeds); a gap below it is "
        "noise. " + html.escape(RESOLUTION_NOTE) + "</p>" + (table(resolution_rows) if resolution_rows else "<p>-</p>")
        + "<h2>Per arm (mean ± seed sd)</h2>" + table(rows)
        + "<h2>Metrics against each axis</h2><div class='charts'>"
        + "".join(f"<img alt='{html.escape(m)} vs {html.escape(a)}' src='data:image/png;base64,{png}'>"
                  for m, a, png in charts) + "</div>"
        + "<h2>Lineage: what differs from the first arm</h2>" + (table(diffs) if diffs else "<p>-</p>")
        + "<h2>Runs</h2>" + table(arm_rows) + "</body></html>"
    )
    return {"html": html_doc, "lines": lines, "rows": rows, "resolution": resolution_rows, "differences": diffs}


RESOLUTION_NOTE = ("The default proxy protocol (configs/sweep.yaml, 3 seeds per arm) resolves about 0.030 bits per "
                   "byte on held-out web text (bench/sweep_sensitivity.py, 2 x the seed sd pooled over 18 arms). "
                   "A gap that is not detected is 'above resolution' when the sweep resolves gaps smaller than the "
                   "smallest known data effect measured with the default protocol (sweep.reference_effects, from "
                   "bench/sweep_sensitivity.py): the knob likely does not matter at this scale; otherwise it is "
                   "'below resolution': an effect smaller than the minimum detectable effect would not show, and "
                   "more seeds resolve smaller ones.")


def pooled_sd(groups: list[list[float]]) -> float:
    """Pooled standard deviation of groups (each with 2+ values): sqrt(sum((n_i - 1) s_i^2) / sum(n_i - 1))."""
    dof = sum(len(g) - 1 for g in groups)
    return math.sqrt(sum((len(g) - 1) * statistics.variance(g) for g in groups) / dof)


def compare_arms(values: dict[str, list[float]], reference: float | None = None) -> dict[str, Any]:
    """One metric across arms (arm label -> per-seed values): the gap between the highest and lowest arm
    mean against the sweep's resolution, twice the pooled seed sd. Verdict, one of:

    - ``detected``: the gap exceeds the resolution;
    - ``not detected, above resolution``: it does not, and the resolution is at most ``reference`` (the
      smallest known effect of the protocol): an effect that size would have shown;
    - ``not detected, below resolution``: it does not, and effects smaller than the resolution (larger
      than ``reference``, or no reference) would not show;
    - ``no seed spread``: an arm has a single seed.
    """
    means = {arm: statistics.fmean(v) for arm, v in values.items()}
    ordered = sorted(means, key=means.get)  # stable: tied arms keep their order, so low != high
    low, high = ordered[0], ordered[-1]
    gap = means[high] - means[low]
    seeds = min(len(v) for v in values.values())
    out = {"gap": gap, "high": high, "low": low, "seeds": seeds, "pooled_sd": None, "resolution": None}
    head = f"highest {high} {means[high]:.4g}, lowest {low} {means[low]:.4g}; gap {gap:.3g}"
    if seeds < 2:
        return {**out, "verdict": "no seed spread", "line": f"{head}: no seed spread measured (use --seeds 2 or more)"}
    sd = pooled_sd(list(values.values()))
    resolution = 2 * sd
    out.update(pooled_sd=sd, resolution=resolution)
    if gap > resolution:
        verdict, why = "detected", f"larger than the minimum detectable effect {resolution:.3g} (2 x pooled seed sd)"
    elif reference is not None and resolution <= reference:
        verdict = "not detected, above resolution"
        why = (f"within the minimum detectable effect {resolution:.3g}, which is finer than the smallest known data "
               f"effect {reference:.3g}: the knob likely does not matter at this scale")
    else:
        verdict = "not detected, below resolution"
        why = (f"within the minimum detectable effect {resolution:.3g}: a smaller effect would not show"
               + (f" (the smallest known data effect is {reference:.3g}; more seeds resolve smaller gaps)"
                  if reference is not None else "; more seeds resolve smaller gaps"))
    return {**out, "verdict": verdict, "line": f"{head}: {verdict} — the gap is {why} ({seeds} seeds per arm)"}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _axis_order(text: str) -> tuple:
    """Numbers in numeric order, then everything else (null, lists, strings) by its JSON text."""
    value = json.loads(text)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, text)


def _arm_label(key: str, most: int = 3) -> str:
    """``name=value, ...`` of an arm's axis values; past ``most`` keys (a zipped sweep that switches a whole
    filter off) the first two and how many more, so a verdict line stays one readable line."""
    items = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in json.loads(key).items()]
    return ", ".join(items) if len(items) <= most else ", ".join(items[:2]) + f" (+{len(items) - 2} more keys)"


# ---- Prefect ------------------------------------------------------------------------------------
def prefect_map(run_arm: Callable[[Arm], Arm], arms: list[Arm], parallel: int) -> None:
    """Each arm as a Prefect task (its pipeline a subflow), at most ``parallel`` in flight."""
    arm_task = task(name="sweep-arm", task_run_name="arm {arm.run_id}")(run_arm)
    in_flight, pending = [], list(arms)
    while pending or in_flight:
        while pending and len(in_flight) < max(1, parallel):
            in_flight.append(arm_task.submit(pending.pop(0)))
        done = next(as_completed(in_flight))
        in_flight.remove(done)
        done.result()


@flow(name="sweep", log_prints=True, validate_parameters=True)
def sweep(
    axes: dict[str, list[Any]],
    mode: Literal["grid", "zip"] = "grid",
    seeds: int = 1,
    stages: list[StageName] = [],  # noqa: B006 (read only)
    parallel: int = 1,
    config_file: str = str(DEFAULT_CONFIG),
    overrides: dict[str, Any] = {},  # noqa: B006
    name: str = "",
) -> dict:
    """Data-ablation sweep: one run per arm (axis values × seeds), upstream stages reused from the cache.

    Args:
        axes: Config key → values, e.g. {"heuristics.gopher_quality.min_doc_words": [50, 100, 200]}.
        mode: grid = every combination of the axes' values; zip = the i-th values of every axis together.
        seeds: Pretraining seeds per arm (pretrain.seed = 1..seeds); the report shows their spread.
        stages: Stages every arm runs (empty = curation + pretrain + eval_pretrain: the proxy model's eval and
            every stage it reads, among the config's pipeline; never SFT/RL).
        parallel: Arms running at the same time.
        config_file: Base config YAML on the machine that runs the flow.
        overrides: Dotted keys applied to every arm (the base config).
        name: Sweep id; empty = derived from the config, overrides, axis keys and stages (stable across reruns).
    """
    check_parameters(config_file, overrides)
    for key, values in axes.items():
        for value in values:
            check_parameters(config_file, {key: value})
    plan = plan_sweep(config_file, overrides, [Axis(k, tuple(v)) for k, v in axes.items()], mode, seeds,
                      list(stages) or None, name or None)
    label_flow_run(plan.sweep_id, ["refinery", f"sweep:{plan.sweep_id}"])
    logger = get_run_logger()

    def run_pipeline(**kwargs) -> dict:
        with tags(f"sweep:{plan.sweep_id}"):
            return pipeline(**kwargs)

    run_root = Path(load_config(config_file, overrides).run_root).resolve()
    summary = run_sweep(plan, run_pipeline, run_root, parallel, logger.info, prefect_map)
    create_markdown_artifact(markdown=sweep_markdown(summary), key="refinery-sweep-report",
                             description=f"sweep {plan.sweep_id}")
    return summary


def sweep_markdown(summary: dict) -> str:
    ex = summary["stage_executions"]
    lines = [f"# Sweep {summary['sweep_id']}", "",
             explorer_link(f"/sweep/{summary['sweep_id']}", "Report (charts)", f"Report: `{summary['report']}`")
             + f" · stage executions: {ex['computed']} computed, {ex['reused']} reused "
             f"from the cache, {ex['skipped']} already done", "", "## Verdicts", ""]
    lines += [f"- {line}" for line in summary["lines"]] or ["- (no evaluation metric to compare)"]
    if summary.get("resolution"):
        cols = list(summary["resolution"][0])
        lines += ["", "## What this sweep can resolve", "", RESOLUTION_NOTE, "",
                  *markdown_table(cols, [[r[c] for c in cols] for r in summary["resolution"]])]
    if summary.get("per_arm"):
        cols = list(dict.fromkeys(k for r in summary["per_arm"] for k in r))
        lines += ["", "## Per arm (documents kept per stage, tokens, metrics: mean ± seed sd)", "",
                  *markdown_table(cols, [[r.get(c, "") for c in cols] for r in summary["per_arm"]])]
    diffs = summary.get("differences") or []
    if diffs:
        lines += ["", "## What differs from the first arm", ""]
        if all(d["outputs that differ"] == "-" for d in diffs):
            lines += ["**Every arm's outputs are identical in content to the first arm's**: the axis changed "
                      "nothing this sweep produced (only seeds or unused settings differ).", ""]
        cols = list(diffs[0])
        lines += markdown_table(cols, [[d[c] for c in cols] for d in diffs])
    arms = [(a["run_id"], json.dumps(a["values"]), a["seed"], a["status"]) for a in summary["arms"]]
    lines += ["", "## Arms", "", *markdown_table(["run", "values", "seed", "status"], arms)]
    return "\n".join(lines)

