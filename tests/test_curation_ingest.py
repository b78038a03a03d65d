"""ingest: real WARC/ARC/WET files and warcio's edge cases → rows or recorded drops, never a crashed run."""

import gzip
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from curation.ingest import find_archives, make_doc_id, read_archive
from flows.registry import execute_stage
from infra.executor import StageInputError

WARC_DIR = "tests/data/warc"


def _reasons(path):
    return Counter(r["drop_reason"] for r in read_archive(str(path)))


def test_real_warc_rows_have_ids_offsets_and_charsets(shared_data):
    rows = list(read_archive(str(shared_data / "warc_samples/resiliparse_cc-main-2020-34_excerpt.warc.gz")))
    assert len(rows) == 16 and all(r["drop_reason"] is None for r in rows)
    assert len({r["doc_id"] for r in rows}) == 16
    assert all(r["content_type"].startswith("text/html") and r["http_status"] == 200 for r in rows)
    charsets = Counter(r["detected_charset"] for r in rows)
    assert charsets["windows-1251"] >= 1 and charsets["utf-8"] >= 1
    assert any(c in charsets for c in ("gb2312", "gbk", "gb18030"))
    offsets = [r["warc_offset"] for r in rows]
    assert offsets == sorted(offsets) and len(set(offsets)) == 16
    # doc ids are stable across reads
    again = list(read_archive(str(shared_data / "warc_samples/resiliparse_cc-main-2020-34_excerpt.warc.gz")))
    assert [r["doc_id"] for r in again] == [r["doc_id"] for r in rows]


def test_arc_and_wet_are_read(shared_data):
    edge = shared_data / "warc_samples/warcio_edge_cases"
    assert _reasons(edge / "example.arc.gz") == {None: 1}
    wet = list(read_archive(str(shared_data / "warc_samples/commoncrawl_whirlwind/whirlwind.warc.wet.gz")))
    assert len(wet) == 1 and wet[0]["record_type"] == "conversion" and wet[0]["content_type"] == "text/plain"


def test_bad_records_become_drops(shared_data):
    edge = shared_data / "warc_samples/warcio_edge_cases"
    assert _reasons(edge / "post-test.warc.gz") == {"non_html": 3}
    assert _reasons(edge / "bad.arc") == {"bad_http_header": 3}
    assert _reasons(edge / "example-bad-non-chunked.warc.gz") == {"warc_read_error: ArchiveLoadFailed": 1}


def test_empty_and_truncated_archives(tmp_path):
    empty = tmp_path / "empty.warc.gz"
    empty.write_bytes(b"")
    assert list(read_archive(str(empty))) == []
    src = tmp_path / "sample.warc.gz"
    shutil.copy(f"{WARC_DIR}/dolma_sample-0000.warc.gz", src)
    data = src.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) // 2])  # a download that stopped half way
    rows = list(read_archive(str(cut)))
    reasons = Counter(r["drop_reason"] for r in rows)
    assert reasons[None] >= 5  # records before the cut survive
    assert reasons["truncated_record"] == 1  # the cut record is a recorded drop, not partial text
    garbage = tmp_path / "garbage.warc.gz"
    garbage.write_bytes(gzip.compress(b"this is not a warc file\n" * 10))
    reasons = Counter(r["drop_reason"] for r in read_archive(str(garbage)))
    assert None not in reasons and sum(reasons.values()) >= 1  # recorded as drops, nothing kept


def test_missing_path_and_doc_id():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_archives(["/no/such/dir"])
    assert make_doc_id(None, "http://a", "sha1:x") == make_doc_id(None, "http://a", "sha1:x")
    assert make_doc_id(None, "http://a", "sha1:x") != make_doc_id(None, "http://b", "sha1:x")
    assert make_doc_id("<urn:uuid:1>", "http://a", "sha1:x") != make_doc_id("<urn:uuid:2>", "http://a", "sha1:x")


def test_ingest_stage_on_spark_records_every_drop(spark, make_config, tmp_path, shared_data):
    inputs = tmp_path / "in"
    shutil.copytree(WARC_DIR, inputs)
    edge = shared_data / "warc_samples/warcio_edge_cases"
    for name in ("post-test.warc.gz", "bad.arc", "example-bad-non-chunked.warc.gz"):
        shutil.copy(edge / name, inputs / name)
    (inputs / "empty.warc").write_bytes(b"")
    config = make_config({"ingest.input_paths": [str(inputs)]})
    m = execute_stage("ingest", config, "r1")
    metrics = m["metrics"]
    assert metrics["archive_files"] == 9
    assert metrics["kept"] == 83  # the bundled sample; the edge-case files add only drops
    assert metrics["drop_reasons"] == {"bad_http_header": 3, "non_html": 3, "warc_read_error: ArchiveLoadFailed": 1}
    data = pq.read_table(m["outputs"]["data"]["path"]).to_pandas()
    assert data["doc_id"].is_unique and data["content"].map(len).min() > 0
    rejected = pq.read_table(m["outputs"]["rejected"]["path"]).to_pandas()
    assert len(rejected) == 7 and rejected["content"].isna().all()  # the ledger keeps no raw bytes
    with pytest.raises(StageInputError, match="does not exist"):
        execute_stage("ingest", make_config({"ingest.input_paths": ["/no/such/warcs"]}), "r2")
