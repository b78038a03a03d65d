"""Run store: content hashes, atomic stage dirs, manifests that reject incomplete outputs."""

import json

import pytest

from infra.runstore import (
    RunStoreError,
    check_run_id,
    commit_stage_dir,
    content_hash,
    listing,
    make_temp_dir,
    read_manifest,
    verify_outputs,
)


def test_directory_hash_ignores_file_names_but_not_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, name in ((a, "part-0000-uuid1.parquet"), (b, "part-0000-uuid2.parquet")):
        d.mkdir()
        (d / name).write_bytes(b"same bytes")
        (d / "_SUCCESS").write_bytes(b"")
        (d / f".{name}.crc").write_bytes(b"checksum differs " + name.encode())
    assert content_hash(a) == content_hash(b)
    (b / "part-0000-uuid2.parquet").write_bytes(b"other bytes")
    assert content_hash(a) != content_hash(b)
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing")


def test_commit_replaces_previous_result_atomically(tmp_path):
    final = tmp_path / "run1" / "stage"
    for content in ("first", "second"):
        tmp = make_temp_dir(tmp_path, "run1", "stage")
        (tmp / "out.txt").write_text(content)
        commit_stage_dir(tmp, final)
    assert (final / "out.txt").read_text() == "second"
    assert sorted(p.name for p in (tmp_path / "run1").iterdir()) == ["stage"]


def _manifest(tmp_path, out):
    return {"run_id": "r", "stage": "s", "outputs": {"data": {"path": str(out), "files": listing(out)}}}


def test_truncated_output_is_rejected(tmp_path):
    out = tmp_path / "r" / "s" / "data"
    out.mkdir(parents=True)
    (out / "f.bin").write_bytes(b"x" * 100)
    manifest = _manifest(tmp_path, out)
    (tmp_path / "r" / "s" / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(tmp_path, "r", "s")["stage"] == "s"
    (out / "f.bin").write_bytes(b"x" * 50)
    with pytest.raises(RunStoreError, match="incomplete or modified"):
        verify_outputs(manifest)


def test_stage_without_manifest_is_not_accepted(tmp_path):
    (tmp_path / "r" / ".tmp-s-1234").mkdir(parents=True)  # what a killed (SIGKILL) stage leaves
    (tmp_path / "r" / ".tmp-s-1234" / "half.parquet").write_bytes(b"PAR1")
    with pytest.raises(RunStoreError, match="no completed stage 's'"):
        read_manifest(tmp_path, "r", "s")
    fresh = make_temp_dir(tmp_path, "r", "s")  # the next attempt clears the leftovers
    assert [p.name for p in (tmp_path / "r").iterdir()] == [fresh.name]
    with pytest.raises(RunStoreError, match="does not exist"):
        read_manifest(tmp_path, "nope", "s")


def test_run_ids_are_checked():
    assert check_run_id("20261121-120000-ab12") == "20261121-120000-ab12"
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(RunStoreError):
            check_run_id(bad)
