"""The parent ``pipeline`` flow: runs the selected stages in order, each as its own stage flow run,
then publishes one run summary (stages, funnel, evaluation, links) as the parent run's artifact."""

from typing import Any, Literal

import prefect.settings
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.registry import expand_stages, stage_groups
from flows.report import write_report
from flows.stages import PIPELINE_STEPS, STAGE_FLOWS, explorer_link, label_flow_run, start_checks
from infra.config import DEFAULT_CONFIG, BaseRefineryConfig
from infra.effects import EFFECTS_TABLE, format_effect
from infra.executor import parse_from
from infra.markdown import dict_table
from infra.runstore import check_name, new_run_id

# the UI offers a picker of the groups and the known stages
StageName = Literal[(*stage_groups(), *STAGE_FLOWS)]


@flow(name="pipeline", log_prints=True, validate_parameters=True)
def pipeline(
    stages: list[StageName] = [],  # noqa: B006 (read only; Prefect needs a plain default for the form)
    run_id: str = "",
    from_run: str = "",
    config_file: str = str(DEFAULT_CONFIG),
    overrides: dict[str, Any] = {},  # noqa: B006
    force: bool = False,
) -> dict:
    """Run Refinery stages in pipeline order.

    Args:
        stages: Stages to run, in any order (they run in pipeline order). Empty = the config's pipeline.stages;
            `curation` = web archives to token shards, `training` = pretraining to RL with their evaluations
            (give from_run = a curation run), `all` = every stage.
        run_id: Refinery run to write into; empty = a new run id.
        from_run: RUN or RUN/STAGE whose outputs feed the first selected stage (later stages read this run
            first, then RUN); empty = none.
        config_file: Refinery config YAML on the machine that runs the flow.
        overrides: Dotted config keys, e.g. {"heuristics.c4.min_sentences": 3, "spark.master": "local[2]"}.
        force: Recompute every selected stage even if its inputs and config are unchanged.
    """
    # the run's one validation: every stage gets this object
    config, run_id = start_checks(config_file, overrides, None, run_id, from_run)
    if not isinstance(config, BaseRefineryConfig):
        return config  # refused: a Failed state with the reason
    return run_pipeline(config, stages, run_id, from_run, force)


@flow(name="pipeline", log_prints=True, validate_parameters=False)
def validated_pipeline(config: Any, stages: list[str] = [], run_id: str = "", from_run: str = "",  # noqa: B006
                       force: bool = False) -> dict:
    """The ``pipeline`` flow on a config its caller already validated (the CLI): same flow name and
    stage runs, but its parameters are taken as they are, so nothing is read or validated again."""
    return run_pipeline(config, stages, run_id, from_run, force)


def run_pipeline(config, stages: list[str], run_id: str, from_run: str, force: bool) -> dict:
    """The body of both pipeline flows: the selected stages in input order, each as its stage's flow run,
    then the HTML report and the run summary artifact."""
    order = config.pipeline_stages()
    selected = expand_stages(list(stages)) or order
    unknown = [s for s in selected if s not in STAGE_FLOWS]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGE_FLOWS)}")
    selected = sorted(selected, key=lambda s: order.index(s) if s in order else len(order))
    run_id = check_name(run_id or new_run_id())
    from_run_id, _ = parse_from(from_run or None)
    label_flow_run(run_id, ["refinery", f"run:{run_id}", "pipeline"])
    logger = get_run_logger()
    logger.info("run %s: stages %s (run root %s)", run_id, ", ".join(selected), config.run_root)
    results, manifests = {}, {}
    for i, stage in enumerate(selected):
        manifest = PIPELINE_STEPS[stage](
            config=config, run_id=run_id, from_run=(from_run if i == 0 else from_run_id) or "", force=force,
        )
        manifests[stage] = manifest
        results[stage] = {
            "status": "skipped" if manifest.get("skipped") else "reused" if manifest.get("cached_from") else "completed",
            "dir": str(manifest["manifest_path"]).rsplit("/", 1)[0],
        }
    report = write_report(config.run_root, run_id)
    logger.info("run %s: report %s", run_id, report)
    create_markdown_artifact(markdown=run_summary_markdown(run_id, results, manifests, report), key="refinery-run-summary",
                             description=f"Refinery run {run_id}: stages, funnel, evaluation, lineage")
    return {"run_id": run_id, "run_root": config.run_root, "stages": results}


def run_summary_markdown(run_id: str, results: dict, manifests: dict, report=None) -> str:
    """The parent run's summary: stage table with links, the curation funnel, the evaluation table."""
    ui = (prefect.settings.get_current_settings().ui_url or "").rstrip("/")
    lines = [f"# Refinery run {run_id}", "", explorer_link(f"/run/{run_id}") + f" · CLI: `refinery lineage show {run_id}`"
             + (" · " + explorer_link(f"/report/{run_id}", "report (charts)", f"report (charts): `{report}`")
                if report else ""), "", "## Stages", ""]
    rows = []
    for stage, info in results.items():
        m = manifests[stage]
        art = m.get("summary_artifact_id")
        summary = f"[summary]({ui}/artifacts/artifact/{art})" if art and ui else ("-" if not art else art)
        rows.append({"stage": stage, "status": info["status"] + (f" ({m['cached_from']})" if m.get("cached_from") else ""),
                     "seconds": m.get("timings", {}).get("seconds", 0),
                     "outputs": ", ".join(f"{k} `{v['hash'].split(':')[-1][:10]}`" for k, v in m["outputs"].items()),
                     "summary": summary})
    lines += dict_table(rows)
    warnings = [f"{stage}: {w}" for stage, m in manifests.items() for w in m.get("warnings", [])]
    if warnings:
        lines += ["", "## ⚠ Warnings", "", *(f"- **{w}**" for w in warnings)]
    funnel = [{"stage": s, "in": m["metrics"]["rows_in"], "kept": m["metrics"]["kept"],
               "top drop reasons": ", ".join(f"{r} {n}" for r, n in sorted(
                   (m["metrics"].get("drop_reasons") or {}).items(), key=lambda kv: -kv[1])[:3])}
              for s, m in manifests.items() if "kept" in m["metrics"] and "rows_in" in m["metrics"]]
    if funnel:
        lines += ["", "## Curation funnel (documents)", "", *dict_table(funnel)]
    effects = [{"stage": row["stage"], "held-out effect (before → after, 95% intervals)": format_effect(row)}
               for m in manifests.values() for row in (m.get("tables") or {}).get(EFFECTS_TABLE, [])]
    if effects:
        lines += ["", "## Training effects on held-out data", "", *dict_table(effects)]
    evals = eval_rows([{"stage": s, "metrics": m["metrics"]} for s, m in manifests.items() if s.startswith("eval_")])
    if evals:
        lines += ["", "## Evaluation (one row per trained checkpoint)", "", *dict_table(evals)]
    return "\n".join(lines)


def eval_rows(eval_runs: list[dict]) -> list[dict]:
    """One row of ``task/metric`` values per eval stage (n and malformed counts left out)."""
    skip = ("/n", "/malformed", "tasks_skipped")
    columns = sorted({k for r in eval_runs for k, v in r["metrics"].items()
                      if isinstance(v, (int, float)) and not k.endswith(skip) and not k.startswith("effect/")})
    return [{"checkpoint": r["stage"].removeprefix("eval_"),
             **{c: f"{r['metrics'][c]:.4g}" if isinstance(r["metrics"].get(c), (int, float)) else "-" for c in columns}}
            for r in eval_runs]
