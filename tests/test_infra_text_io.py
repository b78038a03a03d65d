"""The one JSON-lines reader (its bad-line policy) and the one markdown-table writer."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.jsonl import BadLine, open_text, read_jsonl
from infra.markdown import dict_table, markdown_table

# blank lines, a BOM, CRLF, a non-object, broken JSON, invalid UTF-8, a lone-surrogate encoding
RAW = (b'\xef\xbb\xbf{"a": 1}\r\n'  # 1: BOM + CRLF
       b"\n"  # 2: blank
       b"   \t\n"  # 3: blank
       b"[1, 2]\n"  # 4: not an object
       b'{"a": \n'  # 5: broken
       b'{"a": "\xff"}\n'  # 6: invalid UTF-8
       b'{"a": "x\xed\xa0\x80y"}\n'  # 7: an encoded lone surrogate (CESU-8 style)
       b'{"a": "\xc3\xa9"}')  # 8: last line without newline


@pytest.fixture(params=["plain", "gz"])
def path(request, tmp_path):
    if request.param == "gz":
        p = tmp_path / "x.jsonl.gz"
        p.write_bytes(gzip.compress(RAW))
    else:
        p = tmp_path / "x.jsonl"
        p.write_bytes(RAW)
    return p


def test_without_on_bad_the_first_bad_line_raises_with_its_number(path):
    rows = read_jsonl(path)
    assert next(rows) == (1, {"a": 1})
    with pytest.raises(BadLine, match=r"x\.jsonl(\.gz)?:4: TypeError: expected a JSON object, got list") as info:
        next(rows)
    assert info.value.line_no == 4 and info.value.path == path


def test_on_bad_sees_every_bad_line_and_the_good_ones_keep_their_numbers(path):
    bad = []
    rows = list(read_jsonl(path, on_bad=bad.append))
    assert rows == [(1, {"a": 1}), (8, {"a": "é"})]
    assert [(b.line_no, b.reason.split(":")[0]) for b in bad] == [
        (4, "TypeError"), (5, "JSONDecodeError"), (6, "UnicodeDecodeError"), (7, "UnicodeDecodeError")]


def test_decoding_leniency_is_the_callers_choice(path):
    replaced = dict(read_jsonl(path, on_bad=lambda b: None, errors="replace"))
    assert replaced[6] == {"a": "\ufffd"} and replaced[7]["a"].startswith("x\ufffd")
    kept = dict(read_jsonl(path, on_bad=lambda b: None, errors="surrogatepass"))
    assert kept[7] == {"a": "x\ud800y"} == json.loads(RAW.split(b"\n")[6])  # what json.loads(bytes) gives
    assert 6 not in kept


@settings(deadline=None, max_examples=50)
@given(st.lists(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(), st.none()), max_size=3),
                max_size=8))
def test_any_objects_written_as_json_lines_read_back_in_order(objects):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "o.jsonl.gz"
        with gzip.open(p, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(o, ensure_ascii=False) + "\n" for o in objects)
        assert [o for _, o in read_jsonl(p)] == objects
        with open_text(p) as fh:
            assert len(fh.readlines()) == len(objects)


def test_markdown_table_escapes_pipes_and_formats_cells():
    assert markdown_table(["k", "v"], [("a|b", 1.23456), ("c", None)], fmt=lambda v: str(v)[:4]) == [
        "| k | v |", "|---|---|", "| a\\|b | 1.23 |", "| c | None |"]
    assert dict_table([{"a": 1}, {"b": 2, "a": 3}]) == ["| a | b |", "|---|---|", "| 1 |  |", "| 3 | 2 |"]
