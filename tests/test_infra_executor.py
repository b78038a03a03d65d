"""Executor: atomic outputs, manifests, content-hash cache (skip / reuse / rerun), --from, lineage."""

import json

import pytest

from flows import registry
from flows.registry import execute_stage
from infra.executor import StageInputError
from infra.lineage import LineageCatalog, diff_runs
from infra.runstore import RunStoreError, read_manifest


@pytest.fixture
def fake(fake_registry, tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("a\nbb\nccc\n")

    def build(**overrides):
        data = {"run_root": str(tmp_path / "runs"), "alpha": {"source": str(src)}, "pipeline": {"stages": []}}
        for key, value in overrides.items():
            section, field = key.split("__")
            data.setdefault(section, {})[field] = value
        return registry.validate_config(data)

    yield build, src, tmp_path / "runs"


def test_manifest_records_inputs_outputs_config_and_code(fake):
    build, src, root = fake
    m = execute_stage("alpha", build(alpha__min_len=2), "r1")
    assert m["metrics"] == {"rows_in": 3, "kept": 2}
    assert m["inputs"]["source"]["hash"].startswith("sha256:") and m["inputs"]["source"]["uri"] == src.as_uri()
    assert (root / "r1" / "alpha" / "data" / "lines.txt").read_text() == "bb\nccc"
    assert m["outputs"]["data"]["hash"].startswith("sha256:")
    assert m["config"] == {"source": str(src), "min_len": 2, "fail": False}
    assert set(m["code_version"]) == {"git_sha", "dirty", "package_version"}
    assert json.loads((root / "r1" / "alpha" / "manifest.json").read_text())["cache_key"] == m["cache_key"]


def test_unchanged_stage_is_skipped_changed_input_reruns(fake):
    build, src, root = fake
    first = execute_stage("alpha", build(), "r1")
    again = execute_stage("alpha", build(), "r1")
    assert again.get("skipped") and again["cache_key"] == first["cache_key"]
    src.write_text("a\nbb\nccc\ndddd\n")  # same path, new content: must rerun
    rerun = execute_stage("alpha", build(), "r1")
    assert not rerun.get("skipped") and rerun["metrics"]["rows_in"] == 4
    assert rerun["cache_key"] != first["cache_key"]


def test_a_kill_between_commit_and_catalog_record_is_repaired_by_the_rerun(fake):
    """The output is committed before the catalog records it: the rerun that skips the stage records it."""
    import sqlite3

    from infra.lineage import DB_NAME

    build, _, root = fake
    first = execute_stage("alpha", build(), "r1")
    with sqlite3.connect(root / DB_NAME) as c:  # as if SIGKILLed right after commit_stage_dir
        c.execute("DELETE FROM stage_runs WHERE run_id='r1' AND stage='alpha'")
    assert LineageCatalog(root).stage_run("r1", "alpha") is None
    again = execute_stage("alpha", build(), "r1")
    assert again.get("skipped")
    assert LineageCatalog(root).stage_run("r1", "alpha")["cache_key"] == first["cache_key"]


def test_other_run_with_same_inputs_reuses_outputs(fake):
    build, _, root = fake
    first = execute_stage("alpha", build(), "r1")
    second = execute_stage("alpha", build(), "r2")
    assert second["cached_from"] == "r1/alpha"
    assert second["outputs"]["data"]["path"] == first["outputs"]["data"]["path"]
    forced = execute_stage("alpha", build(), "r3", force=True)
    assert forced["cached_from"] is None and "r3" in forced["outputs"]["data"]["path"]


def test_a_reused_stage_does_not_copy_metrics_that_describe_the_computation(fake_registry, tmp_path):
    """A cache miss or a wall time is about the run that computed; the run that reused it did not."""
    import dataclasses

    from infra.executor import execute

    src = tmp_path / "input.txt"
    src.write_text("a\nbb\n")
    config = registry.validate_config({"run_root": str(tmp_path / "runs"), "alpha": {"source": str(src)}})
    alpha = dataclasses.replace(registry.get_stage("alpha"), execution_metrics=("rows_in",))
    first = execute(alpha, config, "r1")
    again = execute(alpha, config, "r2")
    assert first["metrics"] == {"rows_in": 2, "kept": 2}
    assert again["cached_from"] == "r1/alpha" and again["metrics"] == {"kept": 2}
    catalog = LineageCatalog(tmp_path / "runs")
    assert catalog.stage_run("r2", "alpha")["metrics"] == {"kept": 2}


def test_spark_conf_that_may_change_results_is_part_of_a_spark_stages_cache_key(fake_registry, tmp_path):
    """The security review reused a cached output for a run whose spark.conf differed. Keys that only size
    or time the job (memory, cores, timeouts) still reuse; any other key recomputes; a stage without
    Spark ignores spark.conf."""
    import dataclasses

    from infra.executor import execute

    src = tmp_path / "input.txt"
    src.write_text("a\nbb\n")

    def config(conf: dict) -> object:
        return registry.validate_config({"run_root": str(tmp_path / "runs"), "alpha": {"source": str(src)},
                                         "spark": {"conf": conf}})

    alpha = registry.get_stage("alpha")
    spark_alpha = dataclasses.replace(alpha, uses_spark=True)
    first = execute(spark_alpha, config({}), "r1")
    assert execute(spark_alpha, config({"spark.executor.memory": "8g", "spark.network.timeout": "600s"}),
                   "r2")["cached_from"] == "r1/alpha"
    changed = execute(spark_alpha, config({"spark.sql.ansi.enabled": "true"}), "r3")
    assert changed["cached_from"] is None and changed["cache_key"] != first["cache_key"]
    assert execute(spark_alpha, config({"spark.sql.ansi.enabled": "true", "spark.driver.cores": "2"}),
                   "r4")["cached_from"] == "r3/alpha"
    # an empty spark.conf leaves the key as it was; a stage without Spark ignores spark.conf
    assert execute(alpha, config({"spark.sql.ansi.enabled": "true"}), "p1")["cached_from"] == "r1/alpha"


def test_killed_stage_leaves_nothing_a_later_stage_accepts(fake):
    build, _, root = fake
    execute_stage("alpha", build(), "r1")
    with pytest.raises(RuntimeError, match="injected failure"):
        execute_stage("alpha", build(alpha__fail=True, alpha__min_len=3), "r1")
    # the earlier good result is intact, and no temp dir is left behind
    assert read_manifest(root, "r1", "alpha")["metrics"]["kept"] == 3
    assert sorted(p.name for p in (root / "r1").iterdir()) == ["alpha"]
    with pytest.raises(RuntimeError):
        execute_stage("alpha", build(alpha__fail=True), "r9")
    with pytest.raises(StageInputError, match="needs 'alpha'.*no completed stage"):
        execute_stage("beta", build(), "r9")


def test_rerun_downstream_stage_on_earlier_run(fake):
    build, _, root = fake
    execute_stage("alpha", build(), "r1")
    m = execute_stage("beta", build(beta__suffix="!"), "r2", from_ref="r1")
    assert m["inputs"]["alpha/data"]["run_id"] == "r1"
    assert "alpha/stats" not in m["inputs"]  # lineage records only the outputs the stage read
    assert (root / "r2" / "beta" / "data" / "upper.txt").read_text().splitlines() == ["A!", "BB!", "CCC!"]
    m2 = execute_stage("beta", build(), "r3", from_ref="r1/alpha")
    assert m2["inputs"]["alpha/data"]["stage"] == "alpha"
    with pytest.raises(StageInputError, match="run 'nope' does not exist"):
        execute_stage("beta", build(), "r4", from_ref="nope")
    with pytest.raises(StageInputError, match="expected RUN_ID or RUN_ID/STAGE"):
        execute_stage("beta", build(), "r4", from_ref="a/b/c")


def test_missing_external_input_is_a_clear_error(fake, tmp_path):
    build, _, _ = fake
    with pytest.raises(StageInputError, match=r"alpha.source: input path '.*missing.txt' does not exist"):
        execute_stage("alpha", build(alpha__source=str(tmp_path / "missing.txt")), "r1")


def test_lineage_upstream_downstream_and_diff(fake):
    build, src, root = fake
    execute_stage("alpha", build(), "r1")
    execute_stage("beta", build(), "r1")
    execute_stage("beta", build(beta__suffix="?"), "r2", from_ref="r1")
    catalog = LineageCatalog(root)
    beta_r2 = catalog.resolve("r2/beta/data")
    assert len(beta_r2) == 1
    up = [a for _, a in catalog.tree(beta_r2[0]["uri"], "up")]
    assert [a["stage"] for a in up if a["kind"] == "stage_output"] == ["alpha"]
    assert any(a["kind"] == "external" and a["uri"] == src.as_uri() for a in up)
    down = [a for _, a in catalog.tree(src.as_uri(), "down")]
    assert {(a["run_id"], a["stage"]) for a in down} == {("r1", "alpha"), ("r1", "beta"), ("r2", "beta")}
    lines = diff_runs(catalog, "r1", "r2")
    assert lines[0] == "r1 vs r2: 1 stage(s) differ (beta); not run in r2: alpha"
    assert "not run in r2: alpha" in lines and not any(line.startswith("alpha:") for line in lines)
    assert "  config beta.suffix: '' -> '?'" in lines
    with pytest.raises(KeyError):
        diff_runs(catalog, "r1", "nope")


def test_truncated_upstream_output_is_refused(fake):
    build, _, root = fake
    execute_stage("alpha", build(), "r1")
    (root / "r1" / "alpha" / "data" / "lines.txt").write_text("x")
    with pytest.raises(StageInputError, match="incomplete or modified"):
        execute_stage("beta", build(), "r1")
    with pytest.raises(RunStoreError):
        read_manifest(root, "r1", "alpha")


def test_a_stage_that_changes_nothing_is_flagged_and_can_fail_the_run(fake, caplog):
    """beta upper-cases alpha's lines: on upper-case input its output equals its input (a no-op)."""
    from infra.executor import StageNoOp

    build, src, root = fake
    src.write_text("A\nBB\nCCC\n")
    execute_stage("alpha", build(), "r1")
    m = execute_stage("beta", build(), "r1")
    assert len(m["warnings"]) == 1 and m["warnings"][0].startswith("no-op: output 'data' is identical to input 'alpha/data'")
    assert "WARNING" in caplog.text
    changed = execute_stage("beta", build(beta__suffix="!"), "r2", from_ref="r1")
    assert changed["warnings"] == []
    with pytest.raises(StageNoOp, match="fail_on_noop"):
        execute_stage("beta", build(pipeline__fail_on_noop=True), "r3", from_ref="r1", force=True)
    assert not (root / "r3" / "beta").exists()


def _resumable_stage():
    """A stage that counts its attempts in ctx.resume_dir and fails until the third."""
    from pathlib import Path

    from fake_stages import CountConfig

    from infra.stage import Stage, StageResult

    def run(ctx):
        tries = Path(ctx.resume_dir) / "tries"
        n = int(tries.read_text()) + 1 if tries.exists() else 1
        tries.write_text(str(n))
        ctx.output("data").mkdir()
        (ctx.output("data") / "n.txt").write_text("done")
        if n < 3:
            raise RuntimeError(f"attempt {n} fails")
        return StageResult(metrics={"attempt": n})

    return Stage("alpha", "resumable", CountConfig, run, external_inputs=lambda c: {"source": c.source}, resumable=True)


def test_resume_dir_survives_failures_is_private_when_busy_and_goes_on_success(fake):
    import fcntl
    import os

    from infra.executor import RESUME_DIR, execute

    build, _, root = fake
    stage, config = _resumable_stage(), build()
    for attempt in (1, 2):
        with pytest.raises(RuntimeError, match=f"attempt {attempt} fails"):
            execute(stage, config, "r1")
    [kept] = [p for p in (root / RESUME_DIR).iterdir() if p.is_dir()]
    assert (kept / "tries").read_text() == "2" and not list((root / "r1").glob(".tmp-*"))
    with pytest.raises(RunStoreError):
        read_manifest(root, "r1", "alpha")  # a failed attempt's output is never accepted

    fd = os.open(kept.with_name(kept.name + ".lock"), os.O_RDWR)  # another live run holds it
    fcntl.flock(fd, fcntl.LOCK_EX)
    with pytest.raises(RuntimeError, match="attempt 1 fails"):  # so this attempt starts afresh, privately
        execute(stage, config, "r2")
    os.close(fd)
    assert (kept / "tries").read_text() == "2"

    manifest = execute(stage, config, "r1")  # the kernel released the lock: the third attempt succeeds
    assert manifest["metrics"] == {"attempt": 3} and list(manifest["outputs"]) == ["data"]
    assert list((root / RESUME_DIR).iterdir()) == []  # work and lock file removed once committed


def test_a_missing_input_is_a_warning_or_with_strict_inputs_an_error(fake, monkeypatch):
    """A stage's ``input_warnings`` (a fallback taken, a part skipped) land in the manifest's warnings;
    ``pipeline.strict_inputs`` fails the stage before it runs."""
    from dataclasses import replace

    import fake_stages

    alpha = replace(fake_stages.STAGES[0], input_warnings=lambda c: ["missing input: alpha.extra 'x' does not exist"])
    monkeypatch.setattr(fake_stages, "STAGES", [alpha, *fake_stages.STAGES[1:]])
    registry.all_stages.cache_clear()
    build, src, root = fake
    m = execute_stage("alpha", build(), "r1")
    assert m["warnings"] == ["missing input: alpha.extra 'x' does not exist"]
    with pytest.raises(StageInputError, match="strict_inputs"):
        execute_stage("alpha", build(pipeline__strict_inputs=True), "r2")
    assert not (root / "r2" / "alpha").exists()


HELD_WRITER = """
import sys, time
from pathlib import Path
from fake_stages import CountConfig, count_lines
from infra.config import config_model
from infra.executor import execute
from infra.runstore import RunStoreError
from infra.stage import Stage

root, src, min_len, gate = sys.argv[1:]

def held(ctx):  # writes its output, then waits until the test opens the gate
    result = count_lines(ctx)
    Path(root, "started").write_text(ctx.out_dir.name)
    while not Path(gate).exists():
        time.sleep(0.05)
    return result

stage = Stage("alpha", "held", CountConfig, held, external_inputs=lambda c: {"source": c.source})
config = config_model({"alpha": stage}).model_validate(
    {"run_root": root, "alpha": {"source": src, "min_len": int(min_len)}})
try:
    print(execute(stage, config, "r")["metrics"]["kept"])
except RunStoreError as exc:
    print(f"error: {exc}")
    sys.exit(2)
"""


def test_one_writer_per_run_and_stage_a_second_is_refused_at_once(tmp_path):
    """Two processes write run r, stage alpha, with different configs: the second is refused with one line while
    the first runs, the first's temp dir survives and its result is the one committed; stale temp dirs of the
    stage (a killed attempt's) are removed, another stage's whose name starts the same are not."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}:{repo / 'tests'}"}
    root, src, gate = tmp_path / "runs", tmp_path / "input.txt", tmp_path / "gate"
    src.write_text("a\nbb\nccc\n")
    (root / "r" / ".tmp-alpha-0badc0de").mkdir(parents=True)  # left by a killed attempt
    (root / "r" / ".tmp-alpha-x-12345678").mkdir()  # stage "alpha-x" at work

    def writer(min_len: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", HELD_WRITER, str(root), str(src), str(min_len), str(gate)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = writer(2)
    try:
        deadline = time.time() + 120
        while not (root / "started").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[0]
            time.sleep(0.05)
        tmp_name = (root / "started").read_text()
        assert sorted(p.name for p in (root / "r").glob(".tmp-*")) == sorted([".tmp-alpha-x-12345678", tmp_name])

        second = writer(0)
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 2 and out == "error: r/alpha is being written by another process right now; " \
                                                 "wait for it to finish or use another run id\n"
        assert (root / "r" / tmp_name).is_dir() and first.poll() is None  # the second touched nothing

        gate.touch()
        out, _ = first.communicate(timeout=120)
        assert first.returncode == 0 and out.strip() == "2", out
        assert read_manifest(root, "r", "alpha")["config"]["min_len"] == 2
    finally:
        first.kill()  # a no-op once it has finished
    assert sorted(p.name for p in (root / "r").iterdir()) == [".tmp-alpha-x-12345678", "alpha"]
