"""Disk full and read-only run roots (issue 16): the stage fails with one line naming the path and the free
space, the partial output is never accepted, and the same command recomputes once there is room.

The run root is a tmpfs mounted by the test (we run as root in CI); where mounting is not allowed the
tests skip and say so.
"""

import json
import subprocess

import pytest

from flows import registry
from flows.registry import execute_stage
from infra.executor import StageStorageError
from infra.runstore import RunStoreError, read_manifest


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MiB tmpfs at ``tmp_path/fs`` (unmounted afterwards)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {mount.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _config(tmp_path, run_root, source):
    return registry.validate_config({"run_root": str(run_root), "alpha": {"source": str(source)}, "pipeline": {"stages": []}})


@pytest.fixture
def process_globals(monkeypatch):
    """Undo what ``stage_process.main`` sets for its own process when a test calls it in-process: the root
    logger's handler (bound to pytest's captured stdout, closed after the test: later log calls would write
    to a closed file) and the SIGTERM handler."""
    import logging
    import signal

    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def test_disk_full_fails_with_one_line_and_the_rerun_recomputes(fake_registry, tiny_fs, tmp_path, capsys, process_globals):
    from flows import stage_process

    source = tmp_path / "big.txt"
    source.write_text(("y" * 1023 + "\n") * 4096)  # 4 MiB: twice the filesystem
    config = _config(tmp_path, tiny_fs / "runs", source)
    with pytest.raises(StageStorageError) as err:
        execute_stage("alpha", config, "r1")
    message = str(err.value)
    assert "\n" not in message and "ran out of space" in message
    assert str(tiny_fs / "runs" / "r1") in message and "free of 2.0 MiB" in message
    assert not list((tiny_fs / "runs" / "r1").glob(".tmp-*"))  # the partial output is gone...
    with pytest.raises(RunStoreError):
        read_manifest(tiny_fs / "runs", "r1", "alpha")  # ...and never accepted

    # the stage process (what the CLI and Prefect run) reports it as one "error:" line, exit code 2
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(config.model_dump(mode="json")))
    rc = stage_process.main(["--stage", "alpha", "--run-id", "r1", "--config-json", str(config_json)])
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err_lines) == 1 and err_lines[0].startswith("error: ") and "free of" in err_lines[0]

    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_fs)], check=True)  # space freed
    manifest = execute_stage("alpha", config, "r1")
    assert not manifest.get("skipped") and manifest["cached_from"] is None
    assert manifest["metrics"]["rows_in"] == 4096
    assert read_manifest(tiny_fs / "runs", "r1", "alpha")["outputs"]["data"]["files"]["lines.txt"] == 4 * 1024 * 1024 - 1


def test_read_only_run_root_is_one_clear_error(fake_registry, tiny_fs, tmp_path):
    source = tmp_path / "small.txt"
    source.write_text("a\nbb\n")
    (tiny_fs / "runs").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(StageStorageError, match=r"runs: the filesystem is read-only \(.* free of 2.0 MiB\)$"):
        execute_stage("alpha", _config(tmp_path, tiny_fs / "runs", source), "r1")
