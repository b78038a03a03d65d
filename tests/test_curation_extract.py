"""extract core: real pages, charsets, and the bad inputs that must become recorded drops, never crashes."""

import gzip
import json
import signal

import pyarrow as pa
import pytest

from curation.extract import ExtractConfig, clean_text, extract_html, extract_record, looks_binary
from curation.ingest import read_archive, sniff_charset

PARA = "<p>Der Gemeinderat hat am Montag über den neuen Radweg entlang des Flusses beraten und {i} Einwände gehört.</p>\n"


def _page(n_paragraphs: int, head: str = "") -> bytes:
    body = "".join(PARA.format(i=i) for i in range(n_paragraphs))
    return f"<html lang='de'><head>{head}<title>Radweg</title></head><body><article>{body}</article></body></html>".encode()


def _row(content: bytes, charset: str | None = "utf-8", record_type: str = "response") -> dict:
    return {"content": content, "url": "http://example.org/a", "detected_charset": charset, "record_type": record_type}


def test_real_pages_keep_text_title_date_and_lang_hint(shared_data):
    data = shared_data / "trafilatura_eval"
    entries = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()[:40]]
    passed = 0
    for entry in entries:
        html = gzip.decompress((data / entry["html_gz"]).read_bytes())
        result = extract_html(html, entry["url"], sniff_charset(html, None))
        assert result.drop_reason is None and result.text
        passed += all(s in result.text for s in entry["with"]) and not any(s in result.text for s in entry["without"])
    assert passed >= 24  # trafilatura's defaults pass 27 of these 40 pages; precision mode about the same
    first = extract_html(gzip.decompress((data / entries[0]["html_gz"]).read_bytes()), entries[0]["url"], "utf-8")
    assert first.title.startswith("Das Ministerium") and first.date == "2012-05-31" and first.lang_hint == "de-DE"


def test_non_utf8_pages_decode_with_detected_charset(shared_data):
    rows = list(read_archive(str(shared_data / "warc_samples/resiliparse_cc-main-2020-34_excerpt.warc.gz")))
    cfg = ExtractConfig()
    by_charset = {r["detected_charset"]: extract_record(r, cfg) for r in rows}
    cyrillic = by_charset["cp1251"]["text"]
    assert sum("\u0400" <= c <= "\u04ff" for c in cyrillic) > 100 and "\ufffd" not in cyrillic
    gb = [extract_record(r, cfg)["text"] or "" for r in rows if r["detected_charset"] == "gb18030"]
    assert max(sum("\u4e00" <= c <= "\u9fff" for c in text) for text in gb) > 20


def test_invalid_charset_declaration_falls_back_to_utf8():
    page = _page(8, head="<meta charset='klingon-8'>")
    assert sniff_charset(page, "klingon-8") == "utf-8"
    result = extract_html(page, None, "klingon-8")  # even when a bogus name reaches extract
    assert result.drop_reason is None and "Einwände" in result.text
    latin = _page(8, head="<meta charset='utf-8'>").decode().encode("latin-1")  # declared UTF-8, really Latin-1
    assert "Einw" in extract_html(latin, None, sniff_charset(latin, "utf-8")).text


def test_20mb_page_is_dropped_unparsed_or_extracted_within_the_limit():
    page = _page(200_000)
    assert len(page) > 20_000_000
    assert extract_html(page).drop_reason == "extract_too_large"
    assert extract_record(_row(page), ExtractConfig())["drop_reason"] == "extract_too_large"


def test_slow_page_times_out_as_a_recorded_drop_and_the_alarm_is_disarmed():
    slow = _page(30_000)  # ~3.5 MB of paragraphs: seconds of trafilatura work
    out = extract_record(_row(slow), ExtractConfig(timeout_s=0.2))
    assert out["drop_reason"] == "extract_timeout" and out["text"] is None
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.default_int_handler, None)
    assert extract_html(_page(8)).drop_reason is None  # the next page extracts normally


@pytest.mark.parametrize(
    "content", [b"", b"   \n ", b"<html></html>", b"<html><body><script>var a = 1;</script></body></html>",
                b"<html><body><p></p><div> </div></body></html>"],
)
def test_zero_text_pages_are_dropped(content):
    out = extract_record(_row(content), ExtractConfig())
    assert out["drop_reason"] in ("extract_no_text", "extract_unparsable") and out["text"] is None


def test_binary_content_labelled_html_is_dropped(shared_data):
    blob = (shared_data / "trafilatura_eval/html/0000.html.gz").read_bytes()  # gzip bytes served as text/html
    assert looks_binary(blob.decode("utf-8", "replace")) and not looks_binary(_page(3).decode())
    assert extract_record(_row(blob, charset=None), ExtractConfig())["drop_reason"] == "extract_binary_content"


def test_utf16_pages_with_a_bom_are_text_and_png_bytes_are_not():
    page = _page(8, head="<meta charset='utf-16'>").decode()
    for codec, bom in (("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff")):
        body = bom + page.encode(codec)
        result = extract_html(body, None, sniff_charset(body, None))
        assert result.drop_reason is None and "Einwände" in result.text and "\ufeff" not in result.text
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))  # served as text/html
    assert extract_html(png, None, sniff_charset(png, "utf-8")).drop_reason == "extract_binary_content"


def test_lone_surrogates_become_replacement_characters():
    assert clean_text("a\ud800b\udfffc") == "a\ufffdb\ufffdc"
    html = _page(6).replace(b"</article>", b"<p>Ein kaputtes Zeichen &#xD800; steht mitten in diesem Satz hier.</p></article>")
    text = extract_html(html).text
    pa.array([text])  # Arrow/Parquet can write it (a lone surrogate would raise here)
    assert "kaputtes Zeichen" in text
    wet = "Text mit \ud800 Surrogat.".encode("utf-8", "surrogatepass")  # CESU-style bytes in a WET record
    out = extract_record(_row(wet, record_type="conversion"), ExtractConfig())
    assert out["text"] == "Text mit \ufffd\ufffd\ufffd Surrogat." and out["drop_reason"] is None


def test_wet_records_pass_through_without_trafilatura(shared_data):
    rows = list(read_archive(str(shared_data / "warc_samples/commoncrawl_whirlwind/whirlwind.warc.wet.gz")))
    out = extract_record(rows[0], ExtractConfig())
    assert out["text"] == rows[0]["content"].decode("utf-8") and out["title"] is None and out["drop_reason"] is None
