"""Standard OpenLineage run events for every stage run, so Marquez / DataHub / OpenMetadata can show
Refinery's lineage.

Each computed or cache-reused stage run emits START then COMPLETE (or FAIL, with the error message
and stack trace). Job: namespace ``openlineage.namespace`` (default ``refinery``), name = the stage.
Datasets follow OpenLineage's naming for local files (namespace ``file``, name = absolute path);
facets: ``version`` (the content hash), ``schema`` (Parquet outputs and inputs), and for outputs
``outputStatistics`` (rows for Parquet, bytes, files). Run facets: ``processing_engine``, ``tags``
(Refinery run id, stage, cache key, cache source) and ``errorMessage`` on failure.

Events go to a JSON-lines file (default ``RUN_ROOT/openlineage/events.jsonl``) or an HTTP endpoint
(``openlineage.transport: http`` + ``url``), through the ``openlineage-python`` client. A transport
that fails (an endpoint down) logs a warning; it never fails the stage.
"""

from __future__ import annotations

import datetime as dt
import logging
import traceback
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    dataset_version_dataset,
    error_message_run,
    job_type_job,
    output_statistics_output_dataset,
    processing_engine_run,
    schema_dataset,
    tags_run,
)
from openlineage.client.transport.file import FileConfig, FileTransport
from openlineage.client.transport.http import HttpConfig, HttpTransport
from openlineage.client.uuid import generate_new_uuid

from infra.config import OpenLineageConfig
from infra.runstore import code_version

PRODUCER = "https://github.com/refinery/refinery"
FILE_NAMESPACE = "file"


class StageRunEvents:
    """Emits START / COMPLETE / FAIL for one stage run."""

    def __init__(self, config: OpenLineageConfig, run_root: Path, stage: str, run_id: str,
                 log: logging.Logger | None = None):
        self.config, self.stage, self.run_id = config, stage, run_id
        self.log = log or logging.getLogger(f"refinery.{stage}")
        self.ol_run_id = str(generate_new_uuid())
        self.client = _client(config, run_root)

    def start(self, inputs: dict[str, dict], cache_key: str) -> None:
        self._emit(RunState.START, self._run({"cache_key": cache_key}), inputs, {})

    def complete(self, manifest: dict) -> None:
        tags = {"cache_key": manifest["cache_key"], "cached_from": manifest.get("cached_from") or ""}
        self._emit(RunState.COMPLETE, self._run(tags), manifest["inputs"], manifest["outputs"])

    def fail(self, inputs: dict[str, dict], exc: BaseException) -> None:
        error = error_message_run.ErrorMessageRunFacet(
            message=f"{type(exc).__name__}: {exc}", programmingLanguage="python",
            stackTrace="".join(traceback.format_exception(exc))[-20000:],
        )
        self._emit(RunState.FAIL, self._run({}, errorMessage=error), inputs, {})

    def _run(self, tags: dict[str, str], **facets: Any) -> Run:
        fields = [tags_run.TagsRunFacetFields(key=k, value=str(v), source="REFINERY")
                  for k, v in {"refinery_run_id": self.run_id, "stage": self.stage, **tags}.items() if v]
        return Run(runId=self.ol_run_id, facets={
            "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
                version=str(code_version().get("package_version")), name="refinery"),
            "tags": tags_run.TagsRunFacet(tags=fields),
            **facets,
        })

    def _emit(self, state: RunState, run: Run, inputs: dict[str, dict], outputs: dict[str, dict]) -> None:
        if self.client is None:
            return
        job = Job(namespace=self.config.namespace, name=self.stage, facets={
            "jobType": job_type_job.JobTypeJobFacet(processingType="BATCH", integration="REFINERY", jobType="STAGE"),
        })
        event = RunEvent(
            eventType=state, eventTime=dt.datetime.now(dt.timezone.utc).isoformat(), run=run, job=job, producer=PRODUCER,
            inputs=[InputDataset(namespace=FILE_NAMESPACE, name=_path(rec), facets=dataset_facets(rec))
                    for rec in inputs.values()],
            outputs=[OutputDataset(namespace=FILE_NAMESPACE, name=_path(rec), facets=dataset_facets(rec),
                                   outputFacets=output_facets(rec)) for rec in outputs.values()],
        )
        try:
            self.client.emit(event)
        except Exception as exc:  # a lineage sink that is down must not fail the stage
            self.log.warning("OpenLineage %s event not sent (%s): %s", state.value, self.config.transport, exc)


def _client(config: OpenLineageConfig, run_root: Path) -> OpenLineageClient | None:
    if config.transport == "none":
        return None
    if config.transport == "http":
        return OpenLineageClient(transport=HttpTransport(HttpConfig(url=config.url, endpoint=config.endpoint)))
    path = Path(config.file) if config.file else Path(run_root) / "openlineage" / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return OpenLineageClient(transport=FileTransport(FileConfig(log_file_path=str(path), append=True)))


def _path(record: dict) -> str:
    """A dataset's name: the absolute path where its files are."""
    return record.get("path") or record["uri"].removeprefix("file://")


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))


def dataset_facets(record: dict) -> dict[str, Any]:
    """``version`` (content hash) and, for Parquet data, ``schema`` (read from one file's footer)."""
    facets: dict[str, Any] = {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=record["hash"])}
    files = _parquet_files(Path(_path(record)))
    if files:
        schema = pq.read_schema(files[0])
        facets["schema"] = schema_dataset.SchemaDatasetFacet(
            fields=[schema_dataset.SchemaDatasetFacetFields(name=f.name, type=str(f.type)) for f in schema])
    return facets


def output_facets(record: dict) -> dict[str, Any]:
    """``outputStatistics``: rows (Parquet footers), bytes and files of a stage output."""
    path = Path(_path(record))
    files = record.get("files") or {}
    parquet = _parquet_files(path)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parquet) if parquet else None
    return {"outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
        rowCount=rows, size=sum(files.values()), fileCount=len(files))}
