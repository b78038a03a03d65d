"""Run store: content hashes, atomic stage dirs, manifests that reject incomplete outputs."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.runstore import (
    RunStoreError,
    check_name,
    commit_stage_dir,
    content_hash,
    file_sha256,
    listing,
    make_temp_dir,
    parquet_sha256,
    read_manifest,
    verify_outputs,
)


def test_directory_hash_ignores_file_names_but_not_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, name in ((a, "part-0000-uuid1.bin"), (b, "part-0000-uuid2.bin")):
        d.mkdir()
        (d / name).write_bytes(b"same bytes")
        (d / "_SUCCESS").write_bytes(b"")
        (d / f".{name}.crc").write_bytes(b"checksum differs " + name.encode())
    assert content_hash(a) == content_hash(b)
    (b / "part-0000-uuid2.bin").write_bytes(b"other bytes")
    assert content_hash(a) != content_hash(b)
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing")


SCHEMA = pa.schema([
    ("id", pa.int64()), ("text", pa.string()), ("blob", pa.binary()),
    ("signals", pa.struct([("n", pa.int32()), ("score", pa.float64())])), ("tags", pa.list_(pa.string())),
])
CELLS = {
    "id": st.none() | st.integers(-3, 3),
    "text": st.none() | st.sampled_from(["", "a", "ab", "b\u00e9", "\x00"]),
    "blob": st.none() | st.binary(max_size=3),
    "signals": st.none() | st.fixed_dictionaries({"n": st.none() | st.integers(0, 2), "score": st.sampled_from([0.0, 0.5])}),
    "tags": st.none() | st.lists(st.none() | st.sampled_from(["x", "yz"]), max_size=3),
}
ROWS = st.lists(st.fixed_dictionaries(CELLS), min_size=1, max_size=12)


@st.composite
def table_pairs(draw):
    """Rows and a variant: equal, one cell redrawn, or two rows swapped (near misses find hash gaps)."""
    rows = draw(ROWS)
    other = [dict(r) for r in rows]
    kind = draw(st.sampled_from(["same", "cell", "swap"]))
    if kind == "cell":
        i, col = draw(st.integers(0, len(rows) - 1)), draw(st.sampled_from(sorted(CELLS)))
        other[i][col] = draw(CELLS[col])
    elif kind == "swap":
        i, j = draw(st.integers(0, len(rows) - 1)), draw(st.integers(0, len(rows) - 1))
        other[i], other[j] = other[j], other[i]
    return rows, other


def _write(path, rows, **kw):
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, **kw)
    return path


@settings(max_examples=300, deadline=None)
@given(table_pairs(), st.integers(1, 5))
def test_parquet_hash_is_equal_exactly_when_the_tables_are_equal(tmp_path_factory, pair, group):
    rows_a, rows_b = pair
    d = tmp_path_factory.mktemp("pq")
    a = _write(d / "a.parquet", rows_a)
    a_layout = _write(d / "a2.parquet", rows_a, row_group_size=group, compression="gzip", use_dictionary=False,
                      data_page_size=64)
    b = _write(d / "b.parquet", rows_b, row_group_size=group)
    assert content_hash(a) == content_hash(a_layout)  # other row groups, pages, encodings, codec: same content
    assert parquet_sha256(a, batch_rows=2) == parquet_sha256(a)  # independent of the read batches
    equal = pa.Table.from_pylist(rows_a, schema=SCHEMA).equals(pa.Table.from_pylist(rows_b, schema=SCHEMA))
    assert (content_hash(a) == content_hash(b)) == equal


def test_parquet_hash_covers_schema_and_other_files_keep_byte_hashes(tmp_path):
    rows = [{"id": 1, "text": "a", "blob": None, "signals": None, "tags": []}]
    a = _write(tmp_path / "a.parquet", rows)
    renamed = pa.Table.from_pylist(rows, schema=SCHEMA).rename_columns(["id2", "text", "blob", "signals", "tags"])
    pq.write_table(renamed, tmp_path / "b.parquet")
    assert content_hash(a) != content_hash(tmp_path / "b.parquet")
    (tmp_path / "a.bin").write_bytes(a.read_bytes())
    assert content_hash(tmp_path / "a.bin") == "sha256:" + file_sha256(tmp_path / "a.bin")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(pa.ArrowInvalid):
        content_hash(tmp_path / "broken.parquet")


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


def test_names_are_checked_whole(tmp_path):
    """Run ids, stage and sweep names: the whole string must match ("nl\\n" passed a ``$`` pattern)."""
    assert check_name("20261121-120000-ab12") == "20261121-120000-ab12"
    for bad in ("../x", "a/b", "", ".hidden", "..", "nl\n", "a\r\nLocation: x", "/abs", "x" * 129, None):
        with pytest.raises(RunStoreError, match="invalid run id"):
            check_name(bad)
    with pytest.raises(RunStoreError, match="invalid stage name"):
        make_temp_dir(tmp_path, "r", "../../escape")
    with pytest.raises(RunStoreError, match="invalid run id"):
        read_manifest(tmp_path, "nl\n", "s")
    assert not list(tmp_path.iterdir())
