"""Deployments the UI can launch and schedule: the pipeline (cron from config) and one per stage."""

from __future__ import annotations

from pathlib import Path


def build_deployments(config_file: str, config) -> list:
    """``pipeline`` (scheduled if ``prefect.schedule_cron`` is set) plus every stage flow."""
    from flows.pipeline import pipeline
    from flows.stages import STAGE_FLOWS

    config_file = str(Path(config_file).resolve())
    deployments = [
        pipeline.to_deployment(
            name="refinery-pipeline", cron=config.prefect.schedule_cron,
            parameters={"config_file": config_file},
            description="Full Refinery pipeline. Set `stages` and `from_run` to rerun part of it on an earlier run.",
            tags=["refinery"],
        )
    ]
    for name, stage_flow in STAGE_FLOWS.items():
        deployments.append(
            stage_flow.to_deployment(
                name=f"refinery-{name}", parameters={"config_file": config_file},
                description=f"Run or rerun the `{name}` stage (from_run = RUN or RUN/STAGE to reuse earlier outputs).",
                tags=["refinery", "stage"],
            )
        )
    return deployments
