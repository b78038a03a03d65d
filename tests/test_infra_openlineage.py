"""OpenLineage run events: START/COMPLETE/FAIL per stage run, valid against the RunEvent structure of
the OpenLineage spec (a JSON Schema written here from https://openlineage.io/spec/2-0-2/OpenLineage.json,
not produced by the client), with content-hash, schema and row-count facets."""

import json

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows import registry
from infra.config import ConfigError
from flows.registry import execute_stage
from infra.openlineage_events import dataset_facets, output_facets

FACET = {"type": "object", "required": ["_producer", "_schemaURL"],
         "properties": {"_producer": {"type": "string", "format": "uri"},
                        "_schemaURL": {"type": "string", "format": "uri", "pattern": "^https://openlineage.io/spec/"}}}
FACETS = {"type": "object", "additionalProperties": FACET}
DATASET = {"type": "object", "required": ["namespace", "name"],
           "properties": {"namespace": {"type": "string", "minLength": 1}, "name": {"type": "string", "minLength": 1},
                          "facets": FACETS, "inputFacets": FACETS, "outputFacets": FACETS}}
RUN_EVENT = {
    "type": "object",
    "required": ["eventTime", "producer", "schemaURL", "run", "job", "eventType"],
    "properties": {
        "eventTime": {"type": "string", "format": "date-time"},
        "producer": {"type": "string", "format": "uri"},
        "schemaURL": {"type": "string", "format": "uri", "pattern": "^https://openlineage.io/spec/2-0-2/OpenLineage.json"},
        "eventType": {"enum": ["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"]},
        "run": {"type": "object", "required": ["runId"],
                "properties": {"runId": {"type": "string", "format": "uuid"}, "facets": FACETS}},
        "job": {"type": "object", "required": ["namespace", "name"],
                "properties": {"namespace": {"type": "string"}, "name": {"type": "string"}, "facets": FACETS}},
        "inputs": {"type": "array", "items": DATASET},
        "outputs": {"type": "array", "items": DATASET},
    },
}


def _events(root):
    lines = (root / "openlineage" / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def runs(fake_registry, tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("a\nbb\nccc\n")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"run_root: {tmp_path / 'runs'}\nalpha:\n  source: {src}\n")
    return cfg_file, tmp_path / "runs"


def test_every_stage_run_emits_valid_start_and_complete_or_fail(runs):
    cfg_file, root = runs
    config = registry.load_config(cfg_file)
    first = execute_stage("alpha", config, "r1")
    execute_stage("beta", config, "r1")
    reused = execute_stage("alpha", config, "r2")
    with pytest.raises(RuntimeError, match="injected failure"):
        execute_stage("alpha", registry.load_config(cfg_file, ["alpha.fail=true"]), "r3")
    events = _events(root)
    checker = jsonschema.Draft202012Validator(RUN_EVENT, format_checker=jsonschema.FormatChecker())
    for event in events:
        errors = [e.message for e in checker.iter_errors(event)]
        assert not errors, (event["eventType"], errors)
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        ("alpha", "START"), ("alpha", "COMPLETE"), ("beta", "START"), ("beta", "COMPLETE"),
        ("alpha", "START"), ("alpha", "COMPLETE"), ("alpha", "START"), ("alpha", "FAIL")]
    by_run = {}
    for e in events:
        by_run.setdefault(e["run"]["runId"], []).append(e["eventType"])
    assert len(by_run) == 4 and all(states[0] == "START" for states in by_run.values())
    complete = events[1]
    assert complete["run"]["runId"] == first["openlineage_run_id"]
    outputs = {o["name"]: o for o in complete["outputs"]}
    data = outputs[first["outputs"]["data"]["path"]]
    assert data["namespace"] == "file"
    assert data["facets"]["version"]["datasetVersion"] == first["outputs"]["data"]["hash"]
    assert data["outputFacets"]["outputStatistics"]["fileCount"] == 1
    tags = {t["key"]: t["value"] for t in events[5]["run"]["facets"]["tags"]["tags"]}
    assert tags["cached_from"] == "r1/alpha" and tags["refinery_run_id"] == "r2"
    assert events[5]["run"]["runId"] == reused["openlineage_run_id"]
    assert "injected failure" in events[7]["run"]["facets"]["errorMessage"]["message"]
    assert events[3]["inputs"][0]["facets"]["version"]["datasetVersion"] == first["outputs"]["data"]["hash"]


def test_parquet_datasets_carry_schema_and_row_count(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    for i, n in enumerate((3, 4)):
        pq.write_table(pa.table({"doc_id": [f"d{i}{j}" for j in range(n)], "score": [0.5] * n}), out / f"part-{i}.parquet")
    record = {"path": str(out), "hash": "sha256:abc", "files": {"part-0.parquet": 10, "part-1.parquet": 12}}
    facets = dataset_facets(record)
    assert [(f.name, f.type) for f in facets["schema"].fields] == [("doc_id", "string"), ("score", "double")]
    assert facets["version"].datasetVersion == "sha256:abc"
    stats = output_facets(record)["outputStatistics"]
    assert (stats.rowCount, stats.size, stats.fileCount) == (7, 22, 2)


def test_http_transport_without_url_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="openlineage.*transport http needs url"):
        registry.load_config(None, {"openlineage.transport": "http"})
