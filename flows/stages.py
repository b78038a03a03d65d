"""One Prefect flow per stage, generated from the stage registry.

Each stage flow has typed parameters (the UI form is generated from them): ``params`` is the
stage's own pydantic config section, ``overrides`` takes dotted keys for any section,
``from_run`` points at an earlier run (``RUN`` or ``RUN/STAGE``) to rerun on its outputs.
The stage itself runs in a child process (``python -m flows.stage_process``) whose output streams
into the flow run's logs; the flow then publishes the manifest's metrics, tables and lineage as
Prefect artifacts and asset materializations.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Optional

import prefect.runtime as prefect_runtime
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.assets import materialize
from prefect.client.orchestration import get_client

from flows.registry import all_stages, load_config
from infra.config import DEFAULT_CONFIG, BaseRefineryConfig, ConfigError
from infra.executor import RESULT_MARKER, parse_from
from infra.lineage import flatten
from infra.markdown import dict_table, markdown_table
from infra.process import run_streaming
from infra.runstore import RunStoreError, check_name, new_run_id

FAILURE_TAIL_LINES = 40  # log lines kept for a failed stage's artifact
EXPLORER_URL_ENV = "REFINERY_EXPLORER_URL"  # set by `refinery serve`; summaries link to the lineage explorer


class StageFailed(RuntimeError):
    """The stage process exited with an error (its log is in the flow run's logs).

    ``retryable``: the process crashed or raised; exit code 2 (bad config, missing input, disk full or
    read-only) would fail the same way again. ``reason`` is the one-line cause; the message adds the
    process's last log lines, so the flow run's state in the UI shows them.
    """

    def __init__(self, reason: str, retryable: bool = True, log_tail: list[str] | tuple = ()):
        super().__init__("\n".join([reason, "last log lines:", *log_tail]) if log_tail else reason)
        self.reason = reason
        self.retryable = retryable


def _retryable(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a crashed stage process, not a clear user-side error."""
    return getattr(state.result(raise_on_failure=False), "retryable", False)


SERVED_POLICY_ENV = "REFINERY_SERVED_POLICY"
# spark.conf keys a flow parameter may set: sizes, parallelism and timeouts. JVM options, class paths,
# Python executables, plugins and local directories come only from the config file (they run code or
# write where they name), as does pretrain.torchrun_args.
PARAMETER_SPARK_CONF = re.compile(
    r"spark\.(sql\.(shuffle\.partitions|adaptive\.[A-Za-z.]+|files\.maxPartitionBytes|autoBroadcastJoinThreshold"
    r"|execution\.arrow\.maxRecordsPerBatch)|default\.parallelism|(driver|executor)\.(memory|cores)"
    r"|executor\.instances|memory\.(fraction|storageFraction)|task\.cpus|network\.timeout"
    r"|python\.worker\.(memory|reuse))")
PARAMETER_DENIED = ("pretrain.torchrun_args",)


def served_policy(config_file: str, run_root: str, overrides: dict[str, Any]) -> str:
    """What ``refinery serve`` puts in :data:`SERVED_POLICY_ENV` for :func:`check_parameters`."""
    return json.dumps({"config_file": str(Path(config_file).resolve()), "run_root": str(Path(run_root).resolve()),
                       "overrides": flatten(overrides)})


def check_parameters(config_file: str, overrides: dict[str, Any]) -> None:
    """Refuse flow parameters that could run code or reach files, when the flow runs under ``refinery serve``.

    There the parameters come from the UI/API, which anyone who reaches its port can call, so: the
    config file must be the served one or a file beside it; ``run_root`` must be the served run root;
    ``spark.conf`` keys must match :data:`PARAMETER_SPARK_CONF`; :data:`PARAMETER_DENIED` keys are
    config-file only. Values the operator served with (``serve -o``) pass. From the CLI (no policy in
    the environment) everything passes: its user is the config's owner.
    """
    raw = os.environ.get(SERVED_POLICY_ENV)
    if not raw:
        return
    policy = json.loads(raw)
    served = Path(policy["config_file"])
    path = Path(config_file).resolve()
    if path != served and path.parent != served.parent:
        raise ConfigError(f"config error: a served flow reads its config_file from {served.parent} only "
                          f"(got {Path(config_file).name!r})")
    for key, value in flatten(dict(overrides or {})).items():
        if policy["overrides"].get(key) == value:
            continue
        if key.startswith("spark.conf.") and not PARAMETER_SPARK_CONF.fullmatch(key.removeprefix("spark.conf.")):
            raise ConfigError(f"config error: {key.removeprefix('spark.conf.')!r} cannot be set from a flow "
                              "parameter (JVM options, class paths and executables come from the config file only)")
        if key == "run_root" and Path(str(value)).resolve() != Path(policy["run_root"]):
            raise ConfigError(f"config error: a served flow writes to its run root {policy['run_root']} only")
        if key in PARAMETER_DENIED or key.startswith(tuple(d + "." for d in PARAMETER_DENIED)):
            raise ConfigError(f"config error: {key} cannot be set from a flow parameter (config file only)")


def resolve_config(config_file: str, overrides: Optional[dict[str, Any]], section: Optional[tuple[str, Any]] = None):
    """Config file + dotted overrides (+ a stage section from the typed UI parameter ``params``).

    ``params`` is merged key by key (nested keys too) over the file's section: only the keys the
    caller set count, so a partial edit changes those keys and nothing else, and an untouched UI
    form (prefilled with the served config) resolves to exactly the config file.
    """
    merged = dict(overrides or {})
    if section is not None and section[1] is not None:
        value = section[1]
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json", exclude_unset=True)
        merged.update({f"{section[0]}.{k}": v for k, v in flatten(value).items()})
    check_parameters(config_file, merged)
    return load_config(config_file, overrides=merged)


def label_flow_run(name: str, tags: list[str]) -> None:
    """Name the current Prefect flow run (e.g. ``RUN_ID/STAGE``) and add tags, so the UI lists runs by them."""
    flow_run_id = prefect_runtime.flow_run.id
    if not flow_run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run_id)
            client.update_flow_run(flow_run_id, name=name, tags=sorted(set(current.tags) | set(tags)))
    except Exception as exc:  # a name is a convenience: never fail a stage over it
        get_run_logger().warning("could not name the flow run %s: %s", name, exc)


def explorer_link(path: str, text: str = "lineage explorer", fallback: str | None = None) -> str:
    """Markdown link to a page of the lineage explorer that ``refinery serve`` runs; without one, ``fallback``
    (e.g. the file's path) or how to get one."""
    base = os.environ.get(EXPLORER_URL_ENV)
    if base:
        return f"[{text}]({base.rstrip('/')}{path})"
    return fallback if fallback is not None else f"{text}: run `refinery serve`"


def start_checks(config_file: str, overrides: dict, section: Optional[tuple[str, Any]], run_id: str, from_run: str,
                 stage: str = "pipeline"):
    """The checks a flow run does before it starts anything: its run id, the config (file, overrides,
    served policy) and that ``from_run`` exists. Names and tags the flow run first (``RUN/STAGE`` or
    ``RUN``), so even a refused run is found by its run id. Returns ``(config, run_id)``, or a Failed state
    to return from the flow: one ERROR line, a ``STAGE-failure`` artifact, the reason as the state's
    message, no traceback (an expected error is not a bug)."""
    from prefect.states import Failed

    run_id = run_id or new_run_id()
    try:
        check_name(run_id)
        label_flow_run(run_id if stage == "pipeline" else f"{run_id}/{stage}",
                       ["refinery", f"run:{run_id}", stage if stage == "pipeline" else f"stage:{stage}"])
        config = resolve_config(config_file, overrides, section)
        if from_run:
            from_id, _ = parse_from(from_run)
            if not (Path(config.run_root) / from_id).is_dir():
                raise RunStoreError(f"from_run {from_run!r}: run {from_id!r} does not exist under {config.run_root}")
    except (ConfigError, RunStoreError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        get_run_logger().error(reason)
        create_markdown_artifact(markdown=f"# {run_id}/{stage} did not start\n\n**Reason:** {reason}",
                                 key=_artifact_key(stage, "failure"), description=f"{run_id}/{stage}: why it did not start")
        return Failed(message=reason), run_id
    return config, run_id


def _artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:200]


@task(name="run-stage-process")
def run_stage_process(stage: str, run_id: str, config: BaseRefineryConfig, from_ref: Optional[str], force: bool) -> dict:
    """Run one stage in a child process, streaming its output into this task's logs."""
    logger = get_run_logger()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(config.model_dump(mode="json"), fh)
        config_json = fh.name
    cmd = [sys.executable, "-m", "flows.stage_process", "--stage", stage, "--run-id", run_id, "--config-json", config_json]
    if from_ref:
        cmd += ["--from", from_ref]
    if force:
        cmd.append("--force")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = None
    tail: deque[str] = deque(maxlen=FAILURE_TAIL_LINES)

    def on_line(line: str) -> None:
        nonlocal result
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            return
        logger.info(line)
        tail.append(line)

    limit = config.pipeline.stage_timeout_s
    try:
        rc = run_streaming(cmd, on_line, env=env, timeout_s=limit)
    except subprocess.TimeoutExpired:
        tail.append(f"error: ran longer than pipeline.stage_timeout_s = {limit:g} s; its process tree was stopped")
        raise stage_failure(stage, run_id, 2, list(tail), how="time limit") from None
    finally:
        os.unlink(config_json)
    if rc != 0 or not result:
        raise stage_failure(stage, run_id, rc, list(tail))
    return {**json.loads(Path(result["manifest"]).read_text()), "skipped": result["skipped"]}


def stage_failure(stage: str, run_id: str, rc: int, tail: list[str], how: str = "") -> StageFailed:
    """The error a failed stage process raises: the reason (its last ``error:`` line, else its last line)
    and its last log lines, in the exception (the flow run's state message in the UI) and in a
    ``STAGE-failure`` markdown artifact. Exit code 2 is not retried."""
    errors = [t for t in tail if t.startswith("error:")]
    reason = (errors or tail or ["no output"])[-1]
    how = how or (f"killed by signal {-rc}" if rc < 0 else f"exit {rc}")
    create_markdown_artifact(
        markdown="\n".join([f"# {run_id}/{stage} failed ({how})", "", f"**Reason:** {reason}", "",
                             f"## Last {len(tail)} log lines", "", "```", *tail, "```"]),
        key=_artifact_key(stage, "failure"), description=f"{run_id}/{stage}: why the stage failed",
    )
    return StageFailed(f"stage {stage!r} failed ({how}): {reason}", rc != 2, tail[-10:])


def asset_key(uri: str) -> str:
    """The Prefect asset key of an artifact URI: the URI itself where Prefect accepts it; otherwise (a path
    with a space, ``#``, a quote, non-ASCII letters, ... — all legal inputs and run roots) the decoded URI
    with each character Prefect forbids replaced by ``_``, plus 12 hex digits of the URI's hash so keys
    of different paths stay different. The exact URI is in the asset's metadata."""
    from urllib.parse import unquote

    from prefect.types.names import MAX_ASSET_KEY_LENGTH, RESTRICTED_ASSET_CHARACTERS

    if len(uri) <= MAX_ASSET_KEY_LENGTH and not any(c in uri for c in RESTRICTED_ASSET_CHARACTERS):
        return uri
    readable = "".join("_" if c in RESTRICTED_ASSET_CHARACTERS or not c.isprintable() else c for c in unquote(uri))
    suffix = "~" + hashlib.sha256(uri.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return readable[: MAX_ASSET_KEY_LENGTH - len(suffix)] + suffix


def publish(manifest: dict) -> Optional[str]:
    """Prefect side of a finished stage: asset materializations with explicit deps, and artifacts.

    Returns the id of the stage's summary artifact.
    """
    stage, run_id = manifest["stage"], manifest["run_id"]
    outputs = [asset_key(o["uri"]) for o in manifest["outputs"].values()]
    deps = [asset_key(i["uri"]) for i in manifest["inputs"].values()]
    if outputs:

        def record() -> None:
            from prefect.assets import add_asset_metadata

            for name, out in manifest["outputs"].items():
                add_asset_metadata(asset_key(out["uri"]), {"hash": out["hash"], "run_id": run_id, "stage": stage,
                                                           "output": name, "uri": out["uri"]})

        materialize(*outputs, asset_deps=deps, by="refinery", name=f"materialize-{stage}")(record)()
    for name, rows in (manifest.get("tables") or {}).items():
        if rows:
            create_table_artifact(table=rows, key=_artifact_key(stage, name), description=f"{run_id}/{stage}: {name}")
    artifact_id = create_markdown_artifact(markdown=stage_markdown(manifest), key=_artifact_key(stage, "summary"),
                                           description=f"{run_id}/{stage} summary and lineage")
    return str(artifact_id) if artifact_id else None


def stage_markdown(manifest: dict) -> str:
    """Markdown summary of a stage run: metrics (list-valued ones as tables), lineage with hashes, cache status."""
    run_id, stage = manifest["run_id"], manifest["stage"]
    lines = [f"# {run_id}/{stage}", "", explorer_link(f"/stage/{run_id}/{stage}"), ""]
    if manifest.get("cached_from"):
        lines += [f"Reused the outputs of `{manifest['cached_from']}` (same inputs and config).", ""]
    if manifest.get("warnings"):
        lines += ["## ⚠ Warnings", "", *(f"- **{w}**" for w in manifest["warnings"]), ""]
    scalars = {k: v for k, v in flatten(manifest["metrics"]).items() if not _is_rows(v)}
    lines += ["## Metrics", "", *markdown_table(["metric", "value"], scalars.items())]
    for key, value in flatten(manifest["metrics"]).items():
        if _is_rows(value):
            lines += ["", f"## {key}", "", *dict_table(value)]
    lineage = [("input", name, a["uri"], f"`{a['hash'][:19]}`") for name, a in manifest["inputs"].items()]
    lineage += [("output", name, a["uri"], f"`{a['hash'][:19]}`") for name, a in manifest["outputs"].items()]
    lines += ["", "## Lineage", "", *markdown_table(["direction", "name", "uri", "hash"], lineage)]
    for name, path in (manifest.get("images") or {}).items():
        lines += ["", f"**{name}**: `{path}`"]
    if manifest.get("report_md"):
        lines += ["", manifest["report_md"]]
    return "\n".join(lines)


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def run_stage(stage: str, config: BaseRefineryConfig, run_id: str, from_ref: Optional[str], force: bool) -> dict:
    label_flow_run(f"{run_id}/{stage}", ["refinery", f"run:{run_id}", f"stage:{stage}"])
    manifest = run_stage_process.with_options(
        retries=config.pipeline.retries, retry_delay_seconds=config.pipeline.retry_delay_s, retry_condition_fn=_retryable,
    )(stage, run_id, config, from_ref, force)
    if not manifest.get("skipped"):
        try:  # the stage has committed: publishing its metadata must not fail the run
            manifest["summary_artifact_id"] = publish(manifest)
        except Exception as exc:
            get_run_logger().warning("%s/%s: its Prefect assets and artifacts were not published: %s: %s",
                                     run_id, stage, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    get_run_logger().info(
        "%s/%s: %s", run_id, stage,
        "skipped (unchanged)" if manifest.get("skipped") else
        f"reused {manifest['cached_from']}" if manifest.get("cached_from") else "completed",
    )
    return manifest


def _make_stage_flow(name: str, config_model: type, description: str):
    def stage_flow(
        run_id: str = "",
        from_run: str = "",
        config_file: str = str(DEFAULT_CONFIG),
        params: Optional[config_model] = None,
        overrides: dict[str, Any] = {},  # noqa: B006 (read only; Prefect needs a plain default for the form)
        force: bool = False,
    ) -> dict:
        """Run one stage of Refinery (or rerun it on an earlier run's outputs).

        Args:
            run_id: Refinery run to write into; empty = a new run id.
            from_run: RUN or RUN/STAGE whose outputs this stage reads (rerun on an earlier run); empty = this run's.
            config_file: Refinery config YAML on the machine that runs the flow.
            params: This stage's settings, prefilled with the served config; edited keys are merged into the
                config file's section, untouched keys keep the file's values.
            overrides: Dotted config keys for any section, e.g. {"spark.master": "local[2]"}.
            force: Recompute even if the inputs and config are unchanged (ignore the cache).
        """
        config, run_id = start_checks(config_file, overrides, (name, params), run_id, from_run, name)
        if not isinstance(config, BaseRefineryConfig):
            return config  # refused: a Failed state with the reason
        return run_stage(name, config, run_id, from_run or None, force)

    stage_flow.__name__ = f"{name}_flow"
    stage_flow.__qualname__ = stage_flow.__name__
    return flow(name=name, description=description, log_prints=True, validate_parameters=True)(stage_flow)


def _make_pipeline_step(name: str, description: str):
    """The flow the ``pipeline`` runs for stage ``name``: the stage flow's name (the UI lists its runs
    with the stage's own), but it takes the config object the pipeline validated, as is (parameters
    not validated again), so a stage neither re-reads the config file nor re-merges overrides."""

    def pipeline_step(config: Any, run_id: str, from_run: str = "", force: bool = False) -> dict:
        return run_stage(name, config, run_id, from_run or None, force)

    pipeline_step.__name__ = f"{name}_pipeline_step"
    pipeline_step.__qualname__ = pipeline_step.__name__
    return flow(name=name, description=description, log_prints=True, validate_parameters=False)(pipeline_step)


STAGE_FLOWS = {name: _make_stage_flow(name, s.config_model, s.description) for name, s in all_stages().items()}
PIPELINE_STEPS = {name: _make_pipeline_step(name, s.description) for name, s in all_stages().items()}
# each stage flow as a module attribute (flows.stages:ingest_flow, ...): the entrypoints prefect.yaml and
# Prefect's runners import by name — load-bearing, not a convenience
globals().update({f"{name}_flow": f for name, f in STAGE_FLOWS.items()})
