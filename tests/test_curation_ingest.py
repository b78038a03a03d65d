"""ingest: real WARC/ARC/WET files and warcio's edge cases → rows or recorded drops, never a crashed run."""

import gzip
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.ingest import archive_entries, find_archives, make_doc_id, read_archive, sniff_charset
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
    assert charsets["cp1251"] >= 1 and charsets["utf-8"] >= 1
    assert charsets["gb18030"] >= 1  # gb2312 / gbk labels decode with GB18030, as browsers do
    offsets = [r["warc_offset"] for r in rows]
    assert offsets == sorted(offsets) and len(set(offsets)) == 16
    # doc ids are stable across reads
    again = list(read_archive(str(shared_data / "warc_samples/resiliparse_cc-main-2020-34_excerpt.warc.gz")))
    assert [r["doc_id"] for r in again] == [r["doc_id"] for r in rows]


def test_arc_and_wet_are_read(shared_data):
    edge = shared_data / "warc_samples/warcio_edge_cases"
    assert _reasons(edge / "example.arc.gz") == {None: 1}
    ids = [[(r["doc_id"], r["warc_record_id"]) for r in read_archive(str(edge / "example.arc"))] for _ in range(2)]
    assert ids[0] == ids[1] and ids[0][0][1] is None  # stable ids, no invented WARC-Record-ID
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
    assert _reasons(empty) == {"warc_read_error: empty_file": 1}  # one file-level row: the file is in the ledger
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
    assert _reasons(garbage) == {"warc_read_error: not_an_archive": 1}


def test_files_that_are_not_archives_give_one_file_level_row(tmp_path):
    text = "".join(f"line {i}: just a text file, GET / HTTP/1.1 200 OK\n" for i in range(100)).encode()
    cases = {
        "notes.warc": (text, "not_an_archive"),  # warcio alone reads this as 50 ARC records
        "notes.warc.gz": (text, "not_an_archive"),  # not gzip despite its name
        "broken.warc.gz": (b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, "bad_gzip"),
        "empty.arc": (b"", "empty_file"),
    }
    for name, (data, problem) in cases.items():
        (tmp_path / name).write_bytes(data)
        rows = list(read_archive(str(tmp_path / name)))
        assert [(r["drop_reason"], r["warc_offset"], r["doc_id"]) for r in rows] == [(f"warc_read_error: {problem}", 0, None)]
    plain = tmp_path / "plain-named.warc.gz"  # an uncompressed WARC named .gz is still read
    plain.write_bytes(gzip.decompress((Path(WARC_DIR) / "whirlwind.warc.gz").read_bytes()))
    assert _reasons(plain) == _reasons(Path(WARC_DIR) / "whirlwind.warc.gz")
    requests_only = tmp_path / "requests.warc"
    requests_only.write_bytes(b"WARC/1.0\r\nWARC-Type: request\r\nWARC-Record-ID: <urn:uuid:1>\r\nContent-Length: 0\r\n\r\n\r\n\r\n")
    assert _reasons(requests_only) == {"no_response_records": 1}


FRENCH = "<p>La crème brûlée est un dessert français à base de crème, de jaunes d'oeufs et de sucre caramélisé.</p>"
RUSSIAN = "<p>Московский метрополитен, основная транспортная система столицы России, перевозит миллионы пассажиров.</p>"
JAPANESE = "<p>東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。</p>"


@pytest.mark.parametrize(
    "body, declared, expected",
    [
        ((b"\xff\xfe" + f"<html>{FRENCH}</html>".encode("utf-16-le")), None, "utf-16-le"),  # BOM wins
        ((b"\xfe\xff" + f"<html>{FRENCH}</html>".encode("utf-16-be")), "iso-8859-1", "utf-16-be"),
        (f"<html>{FRENCH}</html>".encode("latin-1"), None, "cp1252"),  # undeclared Latin: WHATWG default
        (f"<html>{FRENCH}</html>".encode("latin-1"), "utf-8", "cp1252"),  # Latin-1 labelled UTF-8
        (f"<html><meta charset=utf-8>{FRENCH}</html>".encode("latin-1"), None, "cp1252"),
        (f"<html>{FRENCH}</html>".encode("utf-8"), "iso-8859-1", "utf-8"),  # UTF-8 labelled Latin-1
        (f"<html>{FRENCH}</html>".encode("utf-8"), "klingon-8", "utf-8"),  # bogus name
        (f"<html>{RUSSIAN}</html>".encode("cp1251"), None, "cp1251"),  # undeclared Cyrillic: detected
        (f"<html>{RUSSIAN}</html>".encode("koi8-r"), "klingon-8", "koi8-r"),
        (f"<html><meta charset='Shift_JIS'>{JAPANESE}</html>".encode("shift_jis"), None, "cp932"),  # meta prescan
        (f"<html><!-- <meta charset=koi8-r> -->{FRENCH}</html>".encode("cp1252"), "windows-1252", "cp1252"),
        (f"<html>{FRENCH}</html>".encode("cp1252"), "latin-1", "cp1252"),  # latin-1 label → windows-1252
        (b"<html><p>plain ascii</p></html>", "utf-16", "utf-8"),  # a UTF-16 label without a BOM is ignored
    ],
)
def test_charset_sniffing_follows_whatwg_with_strict_fallbacks(body, declared, expected):
    assert sniff_charset(body, declared) == expected
    text = body.decode(expected).removeprefix("\ufeff")
    assert any(s in text for s in ("crème brûlée", "основная", "東京", "plain ascii")) and "\ufffd" not in text


def test_missing_path_and_doc_id():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_archives(["/no/such/dir"])
    assert make_doc_id(None, "http://a", "sha1:x") == make_doc_id(None, "http://a", "sha1:x")
    assert make_doc_id(None, "http://a", "sha1:x") != make_doc_id(None, "http://b", "sha1:x")
    assert make_doc_id("<urn:uuid:1>", "http://a", "sha1:x") != make_doc_id("<urn:uuid:2>", "http://a", "sha1:x")
    # ARC records (no record id): two captures of the same page at two dates are two documents
    assert make_doc_id(None, "http://a", "sha1:x", "20240101000000") != make_doc_id(None, "http://a", "sha1:x", "20240102000000")


def test_archive_names_do_not_depend_on_where_the_corpus_is(tmp_path):
    copy, link = tmp_path / "a" / "corpus", tmp_path / "b" / "corpus"
    shutil.copytree(WARC_DIR, copy / "sub")
    link.parent.mkdir()
    link.symlink_to(copy)
    names = [n for _, n in archive_entries([str(copy)])]
    assert names == [n for _, n in archive_entries([str(link)])] and "sub/whirlwind.warc.gz" in names
    assert [n for _, n in archive_entries([str(link / "sub" / "whirlwind.warc.gz")])] == ["whirlwind.warc.gz"]
    [(path, name)] = archive_entries([str(link / "sub" / "whirlwind.warc.gz"), str(copy / "sub" / "whirlwind.warc.gz")])
    assert path == (copy / "sub" / "whirlwind.warc.gz").resolve()  # one file reached twice is read once
    rows = [list(read_archive(str(p), name=n)) for p, n in archive_entries([str(copy / "sub" / "whirlwind.warc.gz")])]
    again = list(read_archive(str(link / "sub" / "whirlwind.warc.gz")))
    assert rows[0] == again and all(r["source"] == f"whirlwind.warc.gz@{r['warc_offset']}" for r in again)


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
    assert metrics["drop_reasons"] == {
        "bad_http_header": 3, "non_html": 3, "warc_read_error: ArchiveLoadFailed": 1, "warc_read_error: empty_file": 1,
    }
    data = pq.read_table(m["outputs"]["data"]["path"]).to_pandas()
    assert data["doc_id"].is_unique and data["content"].map(len).min() > 0
    rejected = pq.read_table(m["outputs"]["rejected"]["path"]).to_pandas()
    assert len(rejected) == 8 and rejected["content"].isna().all()  # the ledger keeps no raw bytes
    assert set(data["warc_file"]) | set(rejected["warc_file"]) == {name for _, name in archive_entries([str(inputs)])}
    with pytest.raises(StageInputError, match="does not exist"):
        execute_stage("ingest", make_config({"ingest.input_paths": ["/no/such/warcs"]}), "r2")
