"""Deployments the UI can launch and schedule: the pipeline (cron from config) and one per stage.

Every deployment's parameters are prefilled from the served config (file + ``serve -o`` overrides):
a stage's typed ``params`` form shows the resolved section of the config file, not the code's
defaults, so submitting it untouched runs exactly the served config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.pipeline import pipeline
from flows.stages import STAGE_FLOWS
from flows.sweep import sweep


def build_deployments(config_file: str, config, overrides: dict[str, Any] | None = None) -> list:
    """``pipeline`` (scheduled if ``prefect.schedule_cron`` is set), ``sweep``, and every stage flow."""
    config_file = str(Path(config_file).resolve())
    shared = {"config_file": config_file, "overrides": dict(overrides or {})}
    deployments = [
        pipeline.to_deployment(
            name="refinery-pipeline", cron=config.prefect.schedule_cron,
            parameters={**shared, "stages": []},
            description="Full Refinery pipeline: `stages` empty runs the config's pipeline; pick `curation`, "
                        "`training` or single stages (with `from_run`) to run or rerun part of it.",
            tags=["refinery"],
        )
    ]
    deployments.append(
        sweep.to_deployment(
            name="refinery-sweep",
            parameters={**shared, "axes": config.sweep.axes, "mode": config.sweep.mode, "seeds": config.sweep.seeds,
                        "stages": config.sweep.stages, "parallel": config.sweep.parallel},
            description="Data-ablation sweep: one run per arm (axis values × seeds), upstream stages reused from "
                        "the cache, one report (HTML file + artifact).",
            tags=["refinery", "sweep"],
        )
    )
    for name, stage_flow in STAGE_FLOWS.items():
        deployments.append(
            stage_flow.to_deployment(
                name=f"stage-{name}",
                parameters={**shared, "params": config.stage_config(name).model_dump(mode="json")},
                description=f"Run or rerun the `{name}` stage (from_run = RUN or RUN/STAGE to reuse earlier outputs). "
                            "`params` shows the served config's section; edited keys are merged into it.",
                tags=["refinery", "stage"],
            )
        )
    return deployments
