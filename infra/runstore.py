"""Run store: ``RUN_ROOT/RUN_ID/STAGE/`` with outputs written to a temp dir and renamed on success.

A stage directory is *complete* only when it holds ``manifest.json`` and every output listed there
has the recorded files and sizes; anything else (a temp dir of a killed stage, a truncated file)
is not accepted as an input.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
from importlib.metadata import PackageNotFoundError, version
import json
import os
import re
import secrets
import shutil
import subprocess
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from infra.config import REPO_ROOT

MANIFEST = "manifest.json"
_IGNORED = re.compile(r"(^_SUCCESS$|\.crc$|^\.)")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RunStoreError(RuntimeError):
    """A run or stage that does not exist or is incomplete."""


class StageBusyError(RunStoreError):
    """Another live process is writing the same run and stage."""


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def check_name(value: str, what: str = "run id") -> str:
    """The one validator for names that become paths, URLs or headers (run ids, sweep names, stage, output
    and shard names): a letter or digit, then up to 127 letters, digits, '.', '_' or '-' (no '/', no '..'
    prefix, no control characters)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise RunStoreError(f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' and '-', "
                            "starting with a letter or digit")
    return value


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(_IGNORED.search(part) for part in p.relative_to(path).parts)
    )


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parquet_sha256(path: Path, batch_rows: int = 65_536) -> str:
    """sha256 of a Parquet file's logical content: its Arrow schema and the values of every column.

    The bytes are not hashed: parquet-mr writes each column's encoding list in hash-set order, so
    equal tables give different footers. Each leaf column feeds three digests (validity, value
    lengths, value bytes) batch by batch, so the result depends on the rows in order, not on row
    groups, page sizes, encodings or compression, and memory stays at one batch.
    """
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    digests: dict[str, list] = {}
    rows = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        rows += batch.num_rows
        for name, column in zip(schema.names, batch.columns):
            _feed_array(digests, name, column)
    h = hashlib.sha256()
    h.update(repr([(f.name, str(f.type), f.nullable) for f in schema]).encode())
    h.update(rows.to_bytes(8, "little"))
    for key in sorted(digests):
        h.update(key.encode() + b"\0" + b"".join(d.digest() for d in digests[key]))
    return h.hexdigest()


def _feed_array(digests: dict[str, list], key: str, arr) -> None:
    """Add one column chunk to ``digests[key]`` (validity, lengths, values); nested types recurse."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    valid, lengths, values = digests.setdefault(key, [hashlib.sha256(), hashlib.sha256(), hashlib.sha256()])
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    valid.update(arr.is_valid().to_numpy(zero_copy_only=False).tobytes())
    if pa.types.is_struct(t):
        for i, child in enumerate(arr.flatten()):  # children with the parent's nulls applied
            _feed_array(digests, f"{key}.{t.field(i).name}", child)
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lengths.update(pc.fill_null(pc.list_value_length(arr), 0).cast(pa.int64()).to_numpy().tobytes())
        _feed_array(digests, key + "[]", arr.flatten())
    elif pa.types.is_map(t):
        lengths.update(pc.fill_null(pc.list_value_length(arr), 0).cast(pa.int64()).to_numpy().tobytes())
        _feed_array(digests, key + "{key}", arr.keys)
        _feed_array(digests, key + "{value}", arr.items)
    elif pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t) or pa.types.is_large_string(t):
        dense = pc.fill_null(arr.cast(pa.large_binary()), b"")
        lengths.update(pc.binary_length(dense).to_numpy().tobytes())
        offsets = np.frombuffer(dense.buffers()[1], dtype=np.int64)[dense.offset : dense.offset + len(dense) + 1]
        if len(dense):
            values.update(memoryview(dense.buffers()[2])[offsets[0] : offsets[-1]])
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t):
        values.update(arr.drop_null().to_numpy(zero_copy_only=False).tobytes())
    else:  # decimals and other rare types: their Python values
        values.update(repr(arr.drop_null().to_pylist()).encode())


def file_content_hash(path: Path) -> str:
    """A file's hash: the logical content of a ``.parquet`` file (:func:`parquet_sha256`), else its bytes."""
    if path.name.endswith(".parquet"):
        return "arrow-" + parquet_sha256(path)
    return file_sha256(path)


def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (their content and parent folders, not their names).

    File names are left out because Spark names part files with random UUIDs. ``.parquet`` files
    are hashed by their logical content (Arrow schema + values, streamed per batch; see
    :func:`parquet_sha256`) because Spark's Parquet writer does not write equal tables as equal
    bytes; every other file by its bytes. Equal content therefore gives an equal hash.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_file():
        return "sha256:" + file_content_hash(path)
    entries = sorted(f"{f.parent.relative_to(path).as_posix()}:{file_content_hash(f)}" for f in _files(path))
    return "sha256:" + hashlib.sha256("\n".join(entries).encode()).hexdigest()


def listing(path: Path) -> dict[str, int]:
    """Relative path → size of every file under an output (used to validate completeness)."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.stat().st_size}
    return {f.relative_to(path).as_posix(): f.stat().st_size for f in _files(path)}


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """git sha of the project checkout and whether it has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=20
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", False

    try:
        pkg = version("refinery")
    except PackageNotFoundError:
        pkg = "unknown"
    return {"git_sha": sha or None, "dirty": dirty, "package_version": pkg}


def stage_dir(run_root: Path, run_id: str, stage: str) -> Path:
    return Path(run_root) / check_name(run_id) / check_name(stage, "stage name")


def try_lock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if missing): its fd, or None while another process holds it.
    The kernel releases it when the holder dies, so a crash leaves no stale lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd  # not a lock file that its owner removed meanwhile
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def stage_writer(run_root: Path, run_id: str, stage: str) -> Iterator[None]:
    """Hold ``RUN_ID/.lock-STAGE`` while writing a stage: one writer per run and stage, a second one is refused
    at once. Temp dirs of the stage found while holding it are stale (see :func:`make_temp_dir`)."""
    run_dir = Path(run_root) / check_name(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / f".lock-{check_name(stage, 'stage name')}"
    fd = try_lock(lock)
    if fd is None:
        raise StageBusyError(f"{run_id}/{stage} is being written by another process right now; wait for it to "
                             "finish or use another run id")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # removed while held: try_lock's inode check covers a racing opener
        os.close(fd)


def make_temp_dir(run_root: Path, run_id: str, stage: str) -> Path:
    """A fresh temp dir for a stage's outputs; called under :func:`stage_writer`, so the stage's other temp
    dirs are a killed earlier attempt's and are removed."""
    run_dir = Path(run_root) / check_name(run_id)
    prefix = f".tmp-{check_name(stage, 'stage name')}"
    for stale in run_dir.glob(prefix + "-*"):
        if stale.name.rsplit("-", 1)[0] == prefix:  # not another stage's whose name starts the same
            shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir / f"{prefix}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    return tmp


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link a file or a directory's files from ``src`` to ``dst`` (copies across filesystems):
    a stage publishes work kept elsewhere (e.g. checkpoints in its resume dir) without copying bytes."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if Path(src).is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(str(src), str(dst))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def commit_stage_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp dir into place; an older result for the same stage is replaced."""
    trash = None
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{secrets.token_hex(4)}")
        os.replace(final, trash)
    os.replace(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def read_manifest(run_root: Path, run_id: str, stage: str, verify: bool = True) -> dict:
    """The manifest of a complete stage; raises RunStoreError naming what is missing or broken."""
    run_dir = Path(run_root) / check_name(run_id)
    if not run_dir.is_dir():
        raise RunStoreError(f"run {run_id!r} does not exist under {run_root}")
    path = run_dir / check_name(stage, "stage name") / MANIFEST
    if not path.is_file():
        done = sorted(p.parent.name for p in run_dir.glob(f"*/{MANIFEST}"))
        raise RunStoreError(
            f"run {run_id!r} has no completed stage {stage!r} (completed: {', '.join(done) or 'none'})"
        )
    manifest = json.loads(path.read_text())
    if verify:
        verify_outputs(manifest)
    return manifest


def verify_outputs(manifest: dict) -> None:
    """Check every output's files exist with their recorded sizes (cheap; catches truncation)."""
    for name, out in manifest.get("outputs", {}).items():
        actual = listing(Path(out["path"])) if Path(out["path"]).exists() else {}
        if actual != out["files"]:
            missing = sorted(set(out["files"]) - set(actual))
            changed = sorted(k for k in out["files"] if k in actual and actual[k] != out["files"][k])
            raise RunStoreError(
                f"{manifest['run_id']}/{manifest['stage']} output {name!r} is incomplete or modified "
                f"(missing: {missing[:3]}, size changed: {changed[:3]})"
            )


def list_runs(run_root: Path) -> list[str]:
    root = Path(run_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def completed_stages(run_root: Path, run_id: str) -> list[str]:
    run_dir = Path(run_root) / check_name(run_id)
    return sorted(p.parent.name for p in run_dir.glob(f"*/{MANIFEST}"))
