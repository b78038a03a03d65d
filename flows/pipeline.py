"""The parent ``pipeline`` flow: runs the selected stages in order, each as its own stage flow run."""

from typing import Any, Optional

from prefect import flow, get_run_logger

from flows.stages import STAGE_FLOWS, resolve_config
from infra.config import DEFAULT_CONFIG
from infra.executor import parse_from
from infra.runstore import check_run_id, new_run_id


@flow(name="pipeline", log_prints=True, validate_parameters=True)
def pipeline(
    stages: Optional[list[str]] = None,
    run_id: Optional[str] = None,
    from_run: Optional[str] = None,
    config_file: str = str(DEFAULT_CONFIG),
    overrides: Optional[dict[str, Any]] = None,
    force: bool = False,
) -> dict:
    """Run Refinery stages in pipeline order.

    stages: subset to run (default: the config's pipeline.stages, or every stage);
    run_id: write into this run (default: a new one); from_run: RUN or RUN/STAGE whose outputs feed
    the first selected stage (later stages read this run first, then RUN);
    overrides: dotted config keys, e.g. {"heuristics.c4_min_sentences": 3}; force: ignore the cache.
    """
    config = resolve_config(config_file, overrides)
    order = config.pipeline_stages()
    selected = stages or order
    unknown = [s for s in selected if s not in STAGE_FLOWS]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGE_FLOWS)}")
    selected = sorted(selected, key=lambda s: order.index(s) if s in order else len(order))
    run_id = check_run_id(run_id or new_run_id())
    from_run_id, _ = parse_from(from_run)
    logger = get_run_logger()
    logger.info("run %s: stages %s (run root %s)", run_id, ", ".join(selected), config.run_root)
    results = {}
    for i, stage in enumerate(selected):
        manifest = STAGE_FLOWS[stage](
            run_id=run_id, from_run=from_run if i == 0 else from_run_id,
            config_file=config_file, overrides=overrides, force=force,
        )
        results[stage] = {
            "status": "skipped" if manifest.get("skipped") else "reused" if manifest.get("cached_from") else "completed",
            "dir": str(manifest["manifest_path"]).rsplit("/", 1)[0],
        }
    return {"run_id": run_id, "run_root": config.run_root, "stages": results}
