"""Killing the CLI while a stage runs (issue 16, part 2): the stage process, Spark's JVM and its workers go
with it, the half-written output is removed, the catalog holds nothing half-written, and the same command
then gives the outputs of an uninterrupted run."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


MARK = "REFINERY_KILL_TEST"  # set in the CLI's environment: every process it starts inherits it


def _marked(mark: str) -> list[psutil.Process]:
    """Every process on the machine whose environment carries this test's mark (the process table check)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARK) == mark:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _stage_tree(root: psutil.Process) -> list[psutil.Process]:
    """The stage process and what it started (JVM, Python workers), among ``root``'s descendants."""
    procs = []
    for p in root.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "flows.stage_process" in cmd or "java" in p.name() or "pyspark" in cmd:
            procs.append(p)
    return procs


@pytest.fixture(scope="module")
def tokenize_upstream(tmp_path_factory, shared_data):
    """A run root whose run ``up`` has a completed dedup output (real web text) and a trained tokenizer."""
    from test_curation_tokenize import fake_completed_stage, web_rows

    runs = tmp_path_factory.mktemp("kill") / "runs"
    fake_completed_stage(runs, "up", "dedup", web_rows(shared_data))
    env = {**os.environ, "PREFECT_HOME": str(runs.parent / "prefect")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-c", str(TINY_CONFIG), "--stages", "tokenizer",
                           "--run-id", "up", "-o", f"run_root={runs}", "-o", "spark.master=local[1]"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return runs


TINY_CONFIG = REPO / "configs" / "tiny.yaml"
STAGE_ARGS = {"ingest": ["--stages", "ingest"], "tokenize": ["--stages", "tokenize", "--from", "up"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ingest", "tokenize"])
def test_sigkill_at_a_random_point_then_the_same_command_gives_the_uninterrupted_outputs(
        stage, tmp_path, request):
    """SIGKILL of the CLI's whole process group at a random moment of the stage's life (seed printed), then
    the same command (``--force``, so the rerun recomputes instead of reusing the uninterrupted run):
    no process of the killed command is left on the machine, no temp dir, the catalog records nothing for
    the killed stage unless its output was committed, and the rerun's output hashes equal the
    uninterrupted run's."""
    from catalog_checks import assert_catalog_consistent

    from infra.lineage import LineageCatalog
    from infra.runstore import read_manifest

    runs = request.getfixturevalue("tokenize_upstream") if stage == "tokenize" else tmp_path / "runs"
    seed = int(os.environ.get("REFINERY_KILL_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)

    def command(run_id: str) -> list[str]:
        return [sys.executable, "-m", "flows.cli", "run", "-c", str(TINY_CONFIG), *STAGE_ARGS[stage],
                "--run-id", run_id, "--force", "-o", f"run_root={runs}", "-o", "spark.master=local[1]"]

    def start(run_id: str, mark: str) -> subprocess.Popen:
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), MARK: mark}
        env.pop("PREFECT_API_URL", None)
        log = open(tmp_path / f"{mark}.log", "w")  # a file, not a pipe nobody reads while the test sleeps
        proc = subprocess.Popen(command(run_id), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log = tmp_path / f"{mark}.log"
        return proc

    def finish(proc: subprocess.Popen) -> str:
        proc.wait(timeout=900)
        return proc.log.read_text()

    def stage_started(cli: subprocess.Popen) -> float:
        deadline = time.time() + 300
        while not any("flows.stage_process" in " ".join(p.cmdline()) for p in _stage_tree(psutil.Process(cli.pid))):
            assert cli.poll() is None, "the command ended before its stage process was seen"
            assert time.time() < deadline, "the stage never started"
            time.sleep(0.1)
        return time.time()

    clean = start("clean", uuid.uuid4().hex)
    began = stage_started(clean)
    out = finish(clean)
    assert clean.returncode == 0, out[-3000:]
    lifetime = time.time() - began  # the stage process's life, and the CLI's wind-down after it
    expected = {k: v["hash"] for k, v in read_manifest(runs, "clean", stage)["outputs"].items()}

    mark = uuid.uuid4().hex
    killed = start("k", mark)
    delay = rng.uniform(0.0, lifetime)
    stage_started(killed)
    time.sleep(delay)
    committed = (runs / "k" / stage / "manifest.json").is_file()
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    where = f"seed {seed}: killed {delay:.1f} s into a {lifetime:.1f} s stage (output committed: {committed})"
    print(where)
    deadline = time.time() + 30
    while (left := _marked(mark)) and time.time() < deadline:
        time.sleep(0.5)
    left = [(p.pid, " ".join(p.cmdline()[:4])) for p in _marked(mark)]
    for pid, _ in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"{where}: processes of the killed command still running: {left}"
    assert not list((runs / "k").glob(".tmp-*")), f"{where}: a temp dir was left"
    if not (runs / "k" / stage / "manifest.json").is_file():
        assert LineageCatalog(runs).stage_run("k", stage) is None, f"{where}: the catalog recorded an uncommitted stage"

    rerun = start("k", uuid.uuid4().hex)
    out = finish(rerun)
    assert rerun.returncode == 0, f"{where}\n{out[-3000:]}"
    manifest = read_manifest(runs, "k", stage)  # verifies every file and size
    assert manifest["cached_from"] is None
    assert {k: v["hash"] for k, v in manifest["outputs"].items()} == expected, where
    assert not list(runs.glob("*/.tmp-*")), where
    assert_catalog_consistent(runs, {"k": manifest, "clean": read_manifest(runs, "clean", stage)})


def test_a_process_tree_past_its_time_limit_is_stopped():
    """run_streaming's wall-clock limit: a child and its grandchild that would run for a minute (a hung JVM)
    are both gone within seconds of the limit, and the caller gets TimeoutExpired."""
    from infra.process import run_streaming

    lines: list[str] = []
    script = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(60)']); print(c.pid, flush=True); time.sleep(60)")
    t0 = time.time()
    with pytest.raises(subprocess.TimeoutExpired):
        run_streaming([sys.executable, "-c", script], lines.append, timeout_s=10)  # room to start on a loaded box
    assert time.time() - t0 < 45 and lines, lines
    grandchild = int(lines[0])
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert run_streaming([sys.executable, "-c", "print('ok')"], lines.append, timeout_s=30) == 0 and lines[-1] == "ok"


@pytest.mark.slow
def test_a_stage_past_pipeline_stage_timeout_s_fails_with_that_reason_and_leaves_nothing(tmp_path):
    """``pipeline.stage_timeout_s``: an ingest stage (Spark's JVM starting) limited to 3 s ends with one line
    naming the limit, no process of it is left, no temp dir and no output."""
    mark = uuid.uuid4().hex
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), MARK: mark}
    env.pop("PREFECT_API_URL", None)
    runs = tmp_path / "runs"
    cli = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-c", str(TINY_CONFIG), "--stages", "ingest",
                          "--run-id", "slow", "-o", f"run_root={runs}", "-o", "pipeline.stage_timeout_s=3",
                          "-o", "pipeline.retries=2", "-o", "pipeline.retry_delay_s=0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 1, cli.stdout[-3000:] + cli.stderr[-3000:]
    errors = [line for line in cli.stderr.splitlines() if line.startswith("error:")]
    assert errors[-1] == ("error: stage 'ingest' failed (time limit): error: ran longer than "
                          "pipeline.stage_timeout_s = 3 s; its process tree was stopped"), cli.stderr[-3000:]
    assert "Retry" not in cli.stdout + cli.stderr  # not retried
    left = [(p.pid, " ".join(p.cmdline()[:4])) for p in _marked(mark)]
    assert not left, left
    assert not list((runs / "slow").glob(".tmp-*")) and not (runs / "slow" / "ingest").exists()
