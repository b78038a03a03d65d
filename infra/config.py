"""One YAML file holds every stage's parameters; pydantic validates it; ``-o key=value`` overrides.

Errors are one line naming the offending key, e.g.
``config error: extract.timeout_s: Input should be a valid number (got 'abc')``.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
MAX_CONFIG_BYTES = 1 << 20  # a config file or an override value
MAX_YAML_DEPTH = 64  # nesting levels, aliases expanded
MAX_YAML_NODES = 100_000  # values, aliases expanded (a "billion laughs" document counts in full)


class ConfigError(ValueError):
    """A config file, override or parameter that does not validate."""


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that stops composing past :data:`MAX_YAML_DEPTH` levels (before Python's recursion limit)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _expanded(node, seen: dict, open_: set) -> tuple[int, int]:
    """(values, depth) of a composed YAML node with its aliases expanded, counted without expanding them."""
    if id(node) not in seen:
        if id(node) in open_:
            raise yaml.YAMLError("an alias refers to a value that contains it")
        open_.add(id(node))
        children = ([] if isinstance(node, yaml.ScalarNode) else node.value if isinstance(node, yaml.SequenceNode)
                    else [n for pair in node.value for n in pair])
        counts = [_expanded(child, seen, open_) for child in children]
        seen[id(node)] = (1 + sum(n for n, _ in counts), 1 + max((d for _, d in counts), default=0))
        if seen[id(node)][0] > MAX_YAML_NODES or seen[id(node)][1] > MAX_YAML_DEPTH:
            raise yaml.YAMLError(f"with its aliases expanded it has more than {MAX_YAML_NODES} values or "
                                 f"{MAX_YAML_DEPTH} levels")
    return seen[id(node)]


def safe_yaml(text: str, where: str) -> Any:
    """YAML with plain types only, bounded in size, depth and alias expansion. Errors name ``where`` and the
    line and column, never the text: a config file named by a UI parameter may be any file."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config error: {where} is larger than {MAX_CONFIG_BYTES} bytes")
    loader = None
    try:
        loader = _BoundedLoader(text)  # checks for control characters
        node = loader.get_single_node()
        if node is not None:
            _expanded(node, {}, set())
        return None if node is None else loader.construct_document(node)
    except yaml.reader.ReaderError as exc:
        problem = f"control character at position {exc.position}"
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        problem = re.sub(r"'[^']*'|\"[^\"]*\"", "…", exc.problem or "syntax error")  # no quoted content
        problem += f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an integer of more than 4300 digits
        problem = str(exc) if isinstance(exc, yaml.YAMLError) else "a value cannot be converted"
    finally:
        if loader is not None:
            loader.dispose()
    raise ConfigError(f"config error: {where} is not valid YAML: {problem}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# spark.conf keys that size, place or time a job without changing what it computes. Every other key
# (SQL semantics, codecs, JVM options, ...) may change a Spark stage's output and enters its cache key.
RESOURCE_SPARK_CONF = re.compile(
    r"spark\.((driver|executor)\.(memory|memoryOverhead|cores|maxResultSize)|executor\.instances"
    r"|memory\.(fraction|storageFraction|offHeap\.(enabled|size))|default\.parallelism|task\.(cpus|maxFailures)"
    r"|network\.timeout|executor\.heartbeatInterval|python\.worker\.(memory|reuse)|local\.dir|ui\.[A-Za-z.]+"
    r"|eventLog\.[A-Za-z.]+|sql\.execution\.arrow\.maxRecordsPerBatch)")


class SparkConfig(Strict):
    """Spark session settings; ``master`` may be ``local[*]`` or any cluster URL (spark://, yarn, k8s://)."""

    master: str = "local[*]"
    driver_memory: str = "2g"
    shuffle_partitions: int = Field(8, ge=1)
    driver_host: str | None = "127.0.0.1"
    # In local mode the one JVM runs every task, and HotSpot's C2 compiler threads compete with
    # them for the same cores; C1 alone compiles far less. Measured on one core (bench/RESULTS.md):
    # dedup 1.5x faster at 20k docs and 1.2x at 50k, equal at 200k; tokenize unchanged.
    local_c1_jit: bool = Field(
        True, description="local masters: limit the JVM's JIT to C1 (-XX:TieredStopAtLevel=1); false = HotSpot's default"
    )
    conf: dict[str, str] = Field(default_factory=dict)

    def result_conf(self) -> dict[str, str]:
        """The ``conf`` entries that may change what a stage computes (all but :data:`RESOURCE_SPARK_CONF`)."""
        return {k: v for k, v in sorted(self.conf.items()) if not RESOURCE_SPARK_CONF.fullmatch(k)}


class PrefectConfig(Strict):
    """Prefect server and deployment settings."""

    host: str = "127.0.0.1"
    port: int = Field(4200, ge=1, le=65535)
    schedule_cron: str | None = None  # cron for the pipeline deployment, e.g. "0 3 * * *"
    work_pool: str = "refinery-process"
    explorer_port: int = Field(4201, ge=0, le=65535, description="port of the lineage explorer `refinery serve` "
                                                                 "starts next to the Prefect UI (0 = off)")


class OpenLineageConfig(Strict):
    """Where OpenLineage run events go."""

    transport: Literal["file", "http", "none"] = Field("file", description="file (JSON lines), http, or none")
    file: str | None = Field(None, description="events file; default RUN_ROOT/openlineage/events.jsonl")
    url: str | None = Field(None, description="http transport: base URL, e.g. http://localhost:5000 (Marquez)")
    endpoint: str = Field("api/v1/lineage", description="http transport: path of the lineage endpoint")
    namespace: str = Field("refinery", description="OpenLineage job namespace")

    @model_validator(mode="after")
    def _http_needs_url(self) -> "OpenLineageConfig":
        if self.transport == "http" and not self.url:
            raise ValueError("transport http needs url (e.g. http://localhost:5000 for Marquez)")
        return self


# The smallest known data effect the default proxy protocol (configs/sweep.yaml) measured, per metric:
# bench/sweep_sensitivity.py (see bench/RESULTS.md). Bits per byte; a gap below it may still be real.
REFERENCE_EFFECTS: dict[str, float] = {"eval_pretrain:web_perplexity/bits_per_byte": 0.024}


class SweepConfig(Strict):
    """A data-ablation sweep for `refinery sweep` (its -a/--mode/--seeds/--stages/--parallel win)."""

    axes: dict[str, list[Any]] = Field(default_factory=dict, description="config key -> values, one arm per value")
    mode: Literal["grid", "zip"] = Field("grid", description="grid = every combination; zip = i-th values together")
    seeds: int = Field(1, ge=1, description="pretraining seeds per arm")
    stages: list[str] = Field(default_factory=list, description="stages every arm runs (empty = curation, the proxy model "
                                     "and its eval: eval_pretrain and every stage it reads; never SFT/RL)")
    parallel: int = Field(1, ge=1, description="arms running at the same time")
    reference_effects: dict[str, float] = Field(
        default_factory=lambda: dict(REFERENCE_EFFECTS),
        description="eval metric -> the smallest known data effect measured with the default proxy protocol "
                    "(bench/sweep_sensitivity.py); a sweep that does not detect a gap but resolves gaps smaller "
                    "than this reports the knob as likely not mattering at this scale")


class PipelineConfig(Strict):
    stages: list[str] = Field(default_factory=list)  # empty = every stage, in the order of their inputs
    fail_on_noop: bool = Field(
        False, description="fail a stage whose output is identical to one of its inputs (e.g. a training stage "
                           "that changed no weight) instead of warning")
    retries: int = Field(
        0, ge=0, description="Prefect retries of a failed stage process (not of config, input or disk errors); a "
                             "retry resumes a training stage from its last checkpoint")
    retry_delay_s: float = Field(10.0, ge=0, description="seconds between a stage's failure and its retry")
    strict_inputs: bool = Field(
        False, description="fail a stage when a configured input is missing and it would fall back or skip "
                           "(e.g. train_quality's fallback classes, an eval task without its data) instead of warning")
    stage_timeout_s: float = Field(
        86400.0, ge=0, description="wall-clock limit of one stage process in seconds (0 = none): past it the stage's "
                                   "process tree (Spark's JVM, torchrun) is stopped and the stage fails, not retried")


class BaseRefineryConfig(Strict):
    run_root: str = "runs"
    spark: SparkConfig = Field(default_factory=SparkConfig)
    prefect: PrefectConfig = Field(default_factory=PrefectConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    openlineage: OpenLineageConfig = Field(default_factory=OpenLineageConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    stage_order: ClassVar[tuple[str, ...]] = ()  # set on the model config_model() builds

    def stage_config(self, name: str):
        return getattr(self, name)

    def pipeline_stages(self) -> list[str]:
        return self.pipeline.stages or list(self.stage_order)

    @model_validator(mode="after")
    def _known_pipeline_stages(self) -> "BaseRefineryConfig":
        unknown = [s for s in self.pipeline.stages if s not in self.stage_order]
        if unknown:
            raise ValueError(f"pipeline.stages: unknown stage(s) {unknown}; known: {list(self.stage_order)}")
        return self


class StageSpec(Protocol):
    """What the config needs of a stage (``infra.stage.Stage`` has it): its name and its section's model."""

    name: str
    config_model: type[BaseModel]


@lru_cache(maxsize=8)
def _config_model(stages: tuple[StageSpec, ...]) -> type[BaseRefineryConfig]:
    fields = {stage.name: (stage.config_model, Field(default_factory=stage.config_model)) for stage in stages}
    model = create_model("RefineryConfig", __base__=BaseRefineryConfig, **fields)
    model.stage_order = tuple(stage.name for stage in stages)
    return model


def config_model(stages: Mapping[str, StageSpec]) -> type[BaseRefineryConfig]:
    """The root model: the fixed sections plus one section per stage (in pipeline order)."""
    return _config_model(tuple(stages.values()))


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        else:
            got = repr(e.get("input"))
            parts.append(f"{key}: {e['msg']} (got {got if len(got) <= 80 else got[:77] + '...'})")
    return "config error: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stage.key=value`` → (["stage", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"config error: override {text!r} has an empty key")
    return path, safe_yaml(raw, f"override {key.strip()!r}") if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any] | None) -> dict:
    """Return a copy of ``data`` with dotted-key overrides applied (a list of strings or a dict)."""
    data = json.loads(json.dumps(data))
    if not overrides:
        return data
    items = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [([p for p in k.split(".") if p], v) for k, v in overrides.items()]
    )
    for path, value in items:
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"config error: {'.'.join(path)}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(
    path: str | Path | None, overrides: list[str] | dict[str, Any] | None, stages: Mapping[str, StageSpec]
) -> BaseRefineryConfig:
    """Load and validate a config file (default ``configs/demo.yaml``) with overrides applied."""
    return validate_config(apply_overrides(read_config_file(Path(path) if path else DEFAULT_CONFIG), overrides), stages)


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a dict; ``extends: base.yaml`` (relative to the file) is deep-merged underneath."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"config error: config file {str(path)!r} {what}")
    if path.resolve() in seen:
        raise ConfigError(f"config error: {path} extends itself (via {' -> '.join(map(str, seen))})")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config error: {path} is larger than {MAX_CONFIG_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config error: {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"config error: config file {str(path)!r} cannot be read: {exc.strerror}") from None
    data = safe_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path} must hold a mapping at the top level")
    base = data.pop("extends", None)
    if base is None:
        return data
    return deep_merge(read_config_file(path.parent / base, (*seen, path.resolve())), data)


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``: mappings merge key by key, anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_config(data: dict, stages: Mapping[str, StageSpec]) -> BaseRefineryConfig:
    try:
        return config_model(stages).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
