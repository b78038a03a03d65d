"""The stage contract every pipeline step implements.

A stage is a pure core (plain functions elsewhere in its module) plus this thin description:
its name, a pydantic config model, the upstream stages whose outputs it reads, the external
paths it reads (hashed for the cache key and the lineage catalog), and a ``run`` function that
writes its outputs into ``ctx.out_dir`` and returns a :class:`StageResult`.

Stage modules keep heavy imports (pyspark, torch, transformers, megatron, vllm) inside
functions so that building the config and ``refinery --help`` stay fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from infra.config import SparkConfig


class StageConfig(BaseModel):
    """Base for every stage's config section: unknown keys are errors; a key in ``renamed`` (old name →
    new name) is an error that names its new key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _reject_renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = sorted(set(data) & set(cls.renamed))
            if old:
                raise ValueError("; ".join(f"{k!r} was renamed to {cls.renamed[k]!r}" for k in old))
        return data


@dataclass(frozen=True)
class StageInput:
    """A completed upstream output this stage reads (possibly from an earlier run)."""

    stage: str
    run_id: str
    dir: Path  # the upstream stage's final directory
    manifest: dict
    used: set[str] = field(default_factory=set)  # outputs the stage asked for (recorded as lineage)

    def path(self, output: str = "data") -> Path:
        """Absolute path of one named output of the upstream stage."""
        outputs = self.manifest["outputs"]
        self.used.add(output)
        if output not in outputs:
            raise KeyError(
                f"{self.run_id}/{self.stage} has no output {output!r} (has: {', '.join(sorted(outputs))})"
            )
        return Path(outputs[output]["path"])


MISSING_INPUT = "missing input:"  # prefix of a warning about a configured input the stage went without


@dataclass
class StageResult:
    """What a stage reports besides the files it wrote.

    metrics: flat numbers/strings for the manifest and the lineage catalog.
    tables: named lists of row dicts, published as Prefect table artifacts (e.g. the funnel).
    report_md: optional markdown published as a Prefect markdown artifact.
    images: named PNG paths inside out_dir (e.g. a loss curve) linked from the report.
    warnings: things a user must not miss (e.g. no learning signal); logged, kept in the manifest and
    shown in the run summary.
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    report_md: str | None = None
    images: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class StageContext:
    """Everything a stage's ``run`` needs; outputs go under ``out_dir`` (a temp dir renamed on success).

    ``resume_dir`` (stages declared ``resumable``) survives a failed or killed attempt: the next attempt
    with the same cache key gets the same directory back, so a training loop resumes from the newest
    checkpoint it finds there. It is removed once the stage's output is committed.
    """

    run_id: str
    stage: str
    config: StageConfig
    spark_config: SparkConfig  # the run's ``spark`` section, for :meth:`spark`
    inputs: dict[str, StageInput]
    external_inputs: dict[str, Path]
    out_dir: Path
    run_root: Path
    log: logging.Logger
    resume_dir: Path | None = None  # resumable stages: work (checkpoints) kept across failed attempts
    _spark: Any = None

    def input(self, stage: str) -> StageInput:
        if stage not in self.inputs:
            raise KeyError(f"stage {self.stage!r} did not declare or resolve input {stage!r}")
        return self.inputs[stage]

    def output(self, name: str = "data") -> Path:
        """Path of a named output inside the temp out_dir (not created)."""
        return self.out_dir / name

    def spark(self):
        """The shared SparkSession for this stage process, built from the run's ``spark`` section."""
        if self._spark is None:
            from infra.spark import get_spark  # pyspark: imported by the stages that use Spark only

            self._spark = get_spark(self.spark_config, app_name=f"refinery-{self.stage}-{self.run_id}")
        return self._spark


@dataclass(frozen=True)
class Stage:
    """Declaration of one pipeline stage.

    inputs: upstream stages that must have completed (in this run or the ``--from`` run).
    optional_inputs: upstream stages used when present (e.g. a model exported by pretraining).
    external_inputs: maps the stage config to named external paths (files/dirs) it reads.
    version: bump when the stage's output for the same inputs and config changes (cache key).
    resumable: the stage keeps checkpoints in ``ctx.resume_dir`` and resumes from them.
    input_warnings: maps the stage config to one line per configured input that is missing and what the
    stage does instead (a fallback, a skipped part), each starting with :data:`MISSING_INPUT`; they go
    into the manifest's warnings, or fail the stage before it runs under ``pipeline.strict_inputs``.
    A stage that finds such a gap only while running returns a ``MISSING_INPUT`` warning instead.
    execution_metrics: metric names that describe this execution (a cache hit, a wall time, a throughput),
    not the outputs' content: a run that reuses the outputs does not copy them, and diffs do not compare them.
    """

    name: str
    description: str
    config_model: type[StageConfig]
    run: Callable[[StageContext], StageResult]
    inputs: tuple[str, ...] = ()
    optional_inputs: tuple[str, ...] = ()
    external_inputs: Callable[[Any], dict[str, str]] = lambda cfg: {}
    version: str = "1"
    uses_spark: bool = False
    resumable: bool = False
    input_warnings: Callable[[Any], list[str]] = lambda cfg: []
    execution_metrics: tuple[str, ...] = ()
