"""Killing the CLI while a stage runs: the stage process, Spark's JVM and its workers go with it, the
half-written output is removed, and the same command then completes (issue 16, part 2)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


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


@pytest.mark.slow
def test_sigkill_of_the_cli_takes_the_stage_tree_and_the_rerun_completes(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--stages", "ingest", "--run-id", "k1",
           "-o", f"run_root={tmp_path / 'runs'}", "-o", "spark.master=local[1]"]
    cli = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    root = psutil.Process(cli.pid)
    others = []
    try:
        deadline = time.time() + 240
        while not any("java" in p.name() for p in _stage_tree(root)):  # the stage's JVM is up
            assert cli.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the stage never started"
            time.sleep(0.5)
        tree = _stage_tree(root)
        others = [p for p in root.children(recursive=True) if p not in tree]  # e.g. Prefect's temporary server
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, [" ".join(p.cmdline()[:4]) for p in alive]
        assert not list((tmp_path / "runs" / "k1").glob(".tmp-*")), "the killed stage left a temp dir"
        assert not (tmp_path / "runs" / "k1" / "ingest" / "manifest.json").exists()
    finally:
        for p in [*others, *_stage_tree(root)] if cli.poll() is None else others:
            try:
                p.kill()
            except psutil.Error:
                pass
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert (tmp_path / "runs" / "k1" / "ingest" / "manifest.json").is_file()
    assert not list((tmp_path / "runs" / "k1").glob(".tmp-*"))
