"""Run one stage: resolve inputs, compute the content-hash cache key, skip or reuse a cached result,
otherwise run into a temp dir, write the manifest, rename into place and record lineage.

The process entry the Prefect task launches is ``python -m flows.stage_process`` (the application
layer knows the stage list); this module only knows the :class:`~infra.stage.Stage` it is given.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from infra.config import BaseRefineryConfig
from infra.lineage import LineageCatalog
from infra.openlineage_events import StageRunEvents
from infra.runstore import (
    MANIFEST,
    RunStoreError,
    check_name,
    code_version,
    commit_stage_dir,
    content_hash,
    listing,
    make_temp_dir,
    read_manifest,
    stage_dir,
    stage_writer,
    try_lock,
    write_json_atomic,
)
from infra.stage import MISSING_INPUT, Stage, StageContext, StageInput, StageResult

RESULT_MARKER = "REFINERY_RESULT "  # + JSON {"manifest": path, "skipped": bool}, the child's last line


class StageInputError(RuntimeError):
    """A stage's upstream output or external input cannot be found."""


class StageNoOp(RuntimeError):
    """A stage produced an output identical to one of its inputs and ``pipeline.fail_on_noop`` is set."""


class StageStorageError(RuntimeError):
    """The run root is full or read-only: one line naming the path and the free space."""


NO_OP = "no-op:"
RESUME_DIR = ".resume"  # RUN_ROOT/.resume/STAGE-KEY: resumable work kept across failed attempts
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _free_space(path: Path) -> str:
    """'12.0 KiB free of 2.0 MiB' for the filesystem holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)

    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if n < 1024 or unit == "TiB":
                return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
            n /= 1024

    return f"{size(usage.free)} free of {size(usage.total)}"


def storage_error(exc: BaseException, where: Path) -> StageStorageError | None:
    """A :class:`StageStorageError` if ``exc`` (or a child process's error text) says the disk is full or
    read-only, else None. ``where`` is reported when the exception names no file."""
    code = exc.errno if isinstance(exc, OSError) else None
    text = str(exc)
    if code not in _STORAGE_ERRNOS:
        if "No space left on device" in text or "Disk quota exceeded" in text:
            code = errno.ENOSPC
        elif "Read-only file system" in text:
            code = errno.EROFS
        else:
            return None
    path = Path(getattr(exc, "filename", None) or where)
    what = "is read-only" if code == errno.EROFS else "ran out of space"
    return StageStorageError(f"{path}: the filesystem {what} ({_free_space(path)})")


def check_writable(run_root: Path) -> None:
    """Fail early, with one line, when the run root cannot be written (read-only or full)."""
    try:
        run_root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_root, prefix=".probe-"):
            pass
    except OSError as exc:
        err = storage_error(OSError(exc.errno, exc.strerror), run_root)  # name the run root, not the probe
        raise (err or StageStorageError(f"run_root {run_root} is not writable: {exc}")) from None


class ResumeDir:
    """``RUN_ROOT/.resume/STAGE-KEY``: a resumable stage's work dir for one cache key, held under an
    exclusive ``flock`` (released by the kernel when the process dies, so a crash leaves no stale lock).
    When another live process holds it, this attempt works in a private dir inside its temp dir."""

    def __init__(self, run_root: Path, stage: str, key: str, tmp: Path, log: logging.Logger):
        base = run_root / RESUME_DIR
        base.mkdir(exist_ok=True)
        self.path = base / f"{stage}-{key.removeprefix('sha256:')[:16]}"
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.fd = try_lock(self.lock_path)
        if self.fd is None:
            log.warning("stage %s: %s is in use by another run; this attempt cannot resume", stage, self.path)
            self.path = tmp / RESUME_DIR
        elif self.path.is_dir() and any(self.path.iterdir()):
            log.info("stage %s: resuming the work of an earlier attempt in %s", stage, self.path)
        self.path.mkdir(exist_ok=True)

    def done(self) -> None:
        """The output is committed: the work is no longer needed."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.release(remove=True)

    def release(self, remove: bool = False) -> None:
        if self.fd is not None:
            if remove:
                self.lock_path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _no_op_warnings(outputs: dict[str, dict], records: dict[str, dict]) -> list[str]:
    """An output with the same content as an upstream stage's output: the stage changed nothing (e.g. a
    training stage without learning signal). External inputs do not count: copying a model is allowed."""
    return [
        f"{NO_OP} output {name!r} is identical to input {key!r} ({out['hash'][:19]}): this stage changed nothing"
        for name, out in outputs.items() for key, rec in records.items()
        if rec.get("stage") and out["hash"] == rec["hash"]
    ]


def parse_from(ref: str | None) -> tuple[str | None, str | None]:
    """``RUN`` or ``RUN/STAGE`` → (run, stage)."""
    if not ref:
        return None, None
    parts = ref.strip("/").split("/")
    if len(parts) > 2 or not parts[0]:
        raise StageInputError(f"--from {ref!r}: expected RUN_ID or RUN_ID/STAGE")
    return check_name(parts[0]), (check_name(parts[1], "stage name") if len(parts) == 2 else None)


def resolve_inputs(stage: Stage, run_root: Path, run_id: str, from_ref: str | None) -> dict[str, StageInput]:
    """Upstream outputs: this run's first, then the ``--from`` run's.

    With ``--from RUN/STAGE`` that stage's output stands in for the first declared input, so a
    stage can also run on an earlier stage's output that is not its usual upstream.
    """
    from_run, from_stage = parse_from(from_ref)
    if from_run and not (run_root / from_run).is_dir():
        raise StageInputError(f"--from {from_ref!r}: run {from_run!r} does not exist under {run_root}")
    resolved: dict[str, StageInput] = {}
    for i, upstream in enumerate((*stage.inputs, *stage.optional_inputs)):
        required = upstream in stage.inputs
        candidates: list[tuple[str, str]] = []
        if from_stage and i == 0:
            candidates.append((from_run, from_stage))
        else:
            candidates.append((run_id, upstream))
            if from_run:
                candidates.append((from_run, upstream))
        errors = []
        for cand_run, cand_stage in candidates:
            try:
                manifest = read_manifest(run_root, cand_run, cand_stage)
            except RunStoreError as exc:
                errors.append(str(exc))
                continue
            resolved[upstream] = StageInput(
                stage=cand_stage, run_id=cand_run, dir=stage_dir(run_root, cand_run, cand_stage), manifest=manifest
            )
            break
        else:
            if required:
                hint = "" if from_run else f"; run {upstream!r} first or pass --from RUN_ID"
                raise StageInputError(f"stage {stage.name!r} needs {upstream!r}: " + "; ".join(errors) + hint)
    return resolved


def resolve_external(stage: Stage, cfg) -> dict[str, Path]:
    out = {}
    for name, path in stage.external_inputs(cfg).items():
        p = Path(path).expanduser()
        if not p.exists():
            raise StageInputError(f"{stage.name}.{name}: input path {str(path)!r} does not exist")
        out[name] = p.resolve()
    return out


def _input_records(inputs: dict[str, StageInput], external: dict[str, Path]) -> dict[str, dict]:
    records = {}
    for upstream, inp in inputs.items():
        for out_name, out in inp.manifest["outputs"].items():
            records[f"{upstream}/{out_name}"] = {
                "uri": out["uri"], "hash": out["hash"], "run_id": out.get("run_id", inp.run_id),
                "stage": out.get("stage", inp.stage), "output": out_name,
            }
    for name, path in external.items():
        records[name] = {"uri": path.as_uri(), "hash": content_hash(path)}
    return records


def _used_inputs(records: dict[str, dict], inputs: dict[str, StageInput]) -> dict[str, dict]:
    """The input records a stage actually read (all of an upstream's outputs if it read none by name)."""
    keep = {}
    for key, record in records.items():
        upstream, _, output = key.partition("/")
        inp = inputs.get(upstream) if output else None
        if inp is None or not inp.used or output in inp.used:
            keep[key] = record
    return keep


def cache_key(stage: Stage, cfg, input_records: dict[str, dict], spark_conf: dict[str, str] | None = None) -> str:
    """The identity of a stage's result: its name, version, config, input hashes and, for a Spark stage,
    the ``spark.conf`` entries that may change what it computes (``SparkConfig.result_conf``)."""
    payload = {
        "stage": stage.name,
        "version": stage.version,
        "config": cfg.model_dump(mode="json"),
        "inputs": {k: v["hash"] for k, v in sorted(input_records.items())},
    }
    if spark_conf:  # absent when empty, so keys made before this entry existed stay valid
        payload["spark_conf"] = spark_conf
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def execute(
    stage: Stage,
    config: BaseRefineryConfig,
    run_id: str,
    from_ref: str | None = None,
    force: bool = False,
    log: logging.Logger | None = None,
) -> dict:
    """Run (or skip, or reuse) one stage and return its manifest; a second process writing the same run and
    stage meanwhile is refused (:class:`StageBusyError`)."""
    run_root = Path(config.run_root).resolve()
    check_writable(run_root)
    with stage_writer(run_root, run_id, stage.name):
        return _execute(stage, config, run_root, run_id, from_ref, force, log or logging.getLogger(f"refinery.{stage.name}"))


def _execute(stage: Stage, config: BaseRefineryConfig, run_root: Path, run_id: str, from_ref: str | None, force: bool,
             log: logging.Logger) -> dict:
    name = stage.name
    cfg = config.stage_config(name)
    catalog = LineageCatalog(run_root)

    inputs = resolve_inputs(stage, run_root, run_id, from_ref)
    external = resolve_external(stage, cfg)
    missing = list(stage.input_warnings(cfg))
    if missing and config.pipeline.strict_inputs:
        raise StageInputError(f"stage {name!r}: {missing[0]} (pipeline.strict_inputs is true)")
    records = _input_records(inputs, external)
    key = cache_key(stage, cfg, records, config.spark.result_conf() if stage.uses_spark else None)
    final = stage_dir(run_root, run_id, name)

    if not force:
        if (final / MANIFEST).is_file():
            try:
                existing = read_manifest(run_root, run_id, name)
                if existing["cache_key"] == key:
                    log.info("stage %s: unchanged inputs and config, skipped (%s)", name, final)
                    recorded = catalog.stage_run(run_id, name)
                    if recorded is None or recorded["cache_key"] != key:  # killed between commit and record
                        catalog.record_stage_run(existing)
                    return {**existing, "skipped": True}
            except RunStoreError:
                pass
        for hit in catalog.find_cached(key):
            try:
                cached = read_manifest(run_root, hit["run_id"], hit["stage"])
            except RunStoreError:
                continue
            events = StageRunEvents(config.openlineage, run_root, name, run_id, log)
            events.start(records, key)
            manifest = _reuse_cached(cached, records, run_root, run_id, name, catalog, log, events.ol_run_id,
                                     stage.execution_metrics)
            events.complete(manifest)
            return manifest

    events = StageRunEvents(config.openlineage, run_root, name, run_id, log)
    events.start(records, key)
    tmp = resume = None
    try:
        tmp = make_temp_dir(run_root, run_id, name)
        resume = ResumeDir(run_root, name, key, tmp, log) if stage.resumable else None
    except OSError as exc:
        full = storage_error(exc, tmp or run_root)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        events.fail(records, exc)
        raise (full or exc) from exc
    started, t0 = _now(), time.time()
    ctx = StageContext(
        run_id=run_id, stage=name, config=cfg, spark_config=config.spark, inputs=inputs,
        external_inputs=external, out_dir=tmp, run_root=run_root, log=log,
        resume_dir=resume.path if resume else None,
    )
    log.info("stage %s: running into %s", name, tmp)
    try:
        result = stage.run(ctx)
        if not isinstance(result, StageResult):
            raise TypeError(f"stage {name!r} returned {type(result).__name__}, expected StageResult")
        outputs = {}
        for entry in sorted(tmp.iterdir()):
            if entry.name.startswith("."):
                continue
            final_path = final / entry.name
            outputs[entry.name] = {
                "path": str(final_path), "uri": final_path.as_uri(), "hash": content_hash(entry),
                "files": listing(entry), "run_id": run_id, "stage": name,
            }
        warnings = [*missing, *result.warnings, *_no_op_warnings(outputs, records)]
        for warning in warnings:
            log.warning("stage %s: WARNING: %s", name, warning)
        gap = next((w for w in result.warnings if w.startswith(MISSING_INPUT)), None)
        if gap and config.pipeline.strict_inputs:
            raise StageInputError(f"stage {name!r}: {gap} (pipeline.strict_inputs is true)")
        if config.pipeline.fail_on_noop and any(w.startswith(NO_OP) for w in warnings):
            raise StageNoOp(f"stage {name!r}: {next(w for w in warnings if w.startswith(NO_OP))} "
                            "(pipeline.fail_on_noop is true)")
        manifest = {
            "run_id": run_id, "stage": name, "stage_version": stage.version, "status": "completed",
            "warnings": warnings,
            "inputs": _used_inputs(records, inputs),
            "cache_key": key, "cached_from": None,
            "config": cfg.model_dump(mode="json"),
            "spark_master": config.spark.master if stage.uses_spark else None,
            "outputs": outputs,
            "metrics": result.metrics, "tables": result.tables, "report_md": result.report_md,
            "images": {k: str(final / v) for k, v in result.images.items()},
            "code_version": code_version(), "host": socket.gethostname(),
            "timings": {"started_at": started, "finished_at": _now(), "seconds": round(time.time() - t0, 3)},
            "manifest_path": str(final / MANIFEST), "openlineage_run_id": events.ol_run_id,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        commit_stage_dir(tmp, final)
    except BaseException as exc:
        full = storage_error(exc, tmp)  # the free space before the temp dir is removed
        shutil.rmtree(tmp, ignore_errors=True)
        if resume is not None:
            resume.release()
            if resume.path.is_relative_to(run_root / RESUME_DIR):
                log.info("stage %s: kept %s; the same command resumes from it", name, resume.path)
        events.fail(records, exc)
        if full is not None:
            raise full from exc
        raise
    if resume is not None:
        resume.done()
    catalog.record_stage_run(manifest)
    events.complete(manifest)
    log.info("stage %s: done in %.1f s -> %s", name, manifest["timings"]["seconds"], final)
    return manifest


def _reuse_cached(
    cached: dict, records: dict[str, dict], run_root: Path, run_id: str, name: str, catalog: LineageCatalog, log,
    openlineage_run_id: str, execution_metrics: tuple[str, ...] = (),
) -> dict:
    """Point this run's stage at an identical earlier result instead of recomputing it.

    The stage gets artifacts of its own (this run's URIs, the computed run's files) and records
    this run's inputs, so lineage never borrows the earlier run's upstream. Metrics that describe
    the earlier execution (the stage's ``execution_metrics``: a cache miss, a wall time) are not
    copied: this run did not compute; the earlier run's manifest keeps them.
    """
    source = f"{cached['run_id']}/{cached['stage']}"
    final = stage_dir(run_root, run_id, name)
    outputs = {
        out_name: {**out, "uri": (final / out_name).as_uri(), "run_id": run_id, "stage": name}
        for out_name, out in cached["outputs"].items()
    }
    manifest = {
        **cached, "run_id": run_id, "cached_from": source, "manifest_path": str(final / MANIFEST),
        "inputs": {k: records[k] for k in cached["inputs"] if k in records}, "outputs": outputs,
        "metrics": {k: v for k, v in cached["metrics"].items() if k not in execution_metrics},
        "timings": {"started_at": _now(), "finished_at": _now(), "seconds": 0.0},
        "openlineage_run_id": openlineage_run_id,
    }
    tmp = make_temp_dir(run_root, run_id, name)
    write_json_atomic(tmp / MANIFEST, manifest)
    commit_stage_dir(tmp, final)
    catalog.record_stage_run(manifest)
    log.info("stage %s: same inputs and config as %s, reused its outputs", name, source)
    return manifest
