"""``ingest``: WARC / ARC / WET files (gz or plain) → one Parquet row per HTML response record.

Core: :func:`read_archive` walks one file with warcio and yields row dicts; records it cannot
read become rows with a ``drop_reason`` (the run goes on). Shell: one Spark task per input file
(``mapInPandas``), then the shared decision ledger writes ``data/`` and ``rejected/``.

Identity and provenance do not depend on where the archives sit (a copy, a symlink or another
checkout gives the same rows, so the same content hashes):

* ``doc_id`` (:func:`make_doc_id`) is the first 128 bits of sha256 over what identifies the record
  itself: its ``WARC-Record-ID`` (WARC/WET; unique by the WARC spec, a ``urn:uuid``), else (ARC,
  which has none) its URL, capture date and payload digest. Two ids collide only for the same
  record (the same archive ingested twice, under any name) or for two ARC captures of the same URL
  in the same second with the same payload (the same page); exact dedup merges both cases anyway.
  A random collision of 128-bit ids is negligible (~1e-20 for 1e9 records).
* ``warc_file`` is the archive's name relative to the configured input it was found under (the
  file name for a file given directly, ``sub/dir/x.warc.gz`` under a folder), never an absolute
  path; ``source`` is ``warc_file@offset``. Where the inputs were is recorded only in the
  manifest's inputs (URI + content hash). Two inputs holding archives of the same relative name
  are read, and the stage warns that their ``source`` values are ambiguous.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
import zlib
from pathlib import Path
from typing import Iterator

from pydantic import Field

from curation.ledger import funnel_rows, write_decisions
from infra.stage import Stage, StageConfig, StageContext, StageResult

ARCHIVE_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz", ".wet", ".wet.gz", ".warc.wet.gz")
HTML_TYPES = ("text/html", "application/xhtml+xml")
# records per pandas frame a Python worker hands to Spark: its memory is bounded by a frame, not by a
# WARC file (a whole file per frame grew the stage's peak RSS from 1.5 to 4.0 GB between 1,000 and 8,000 records)
FRAME_RECORDS = 256
# the first line of an ARC record: URL, IP address, 14-digit date, ... (ARC v1 files start with filedesc://)
_ARC_HEADER = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*:\S*[ \t]+\S+[ \t]+\d{14}\b")

COLUMNS = (
    "doc_id", "url", "source", "warc_file", "warc_offset", "warc_record_id", "record_type", "fetch_date",
    "http_status", "content_type", "declared_charset", "detected_charset", "content", "content_length",
    "drop_reason",
)


class IngestConfig(StageConfig):
    """Where the archives are and what counts as a document."""

    input_paths: list[str] = Field(
        default_factory=list,
        description="WARC/ARC/WET files or folders (searched recursively); required (configs/tiny.yaml: the bundled sample)",
    )
    max_record_bytes: int = Field(50_000_000, ge=1, description="records with larger payloads are dropped")
    keep_non_html: bool = Field(False, description="keep non-HTML responses instead of dropping them")


def archive_entries(paths: list[str]) -> list[tuple[Path, str]]:
    """``(file to read, its name in the data)`` for every archive under the given files/folders,
    sorted by name; a missing path is an error.

    The name is relative to the configured input (a file's own name, or its path below a folder),
    so it is the same wherever the corpus sits; a file reached twice (two inputs, a symlink) is
    read once, under its first name.
    """
    if not paths:
        raise ValueError("ingest.input_paths is empty: list WARC/ARC/WET files or folders, e.g. -o 'ingest.input_paths=[tests/data/warc]'")
    found: dict[Path, str] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"ingest input {raw!r} does not exist")
        if p.is_file():
            found.setdefault(p.resolve(), p.name)
        else:
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.name.lower().endswith(ARCHIVE_SUFFIXES):
                    found.setdefault(f.resolve(), f.relative_to(p).as_posix())
    return sorted(((f, name) for f, name in found.items()), key=lambda e: (e[1], str(e[0])))


def find_archives(paths: list[str]) -> list[Path]:
    """Archive files under the given files/folders (resolved), in :func:`archive_entries` order."""
    return [f for f, _ in archive_entries(paths)]


def make_doc_id(record_id: str | None, url: str, payload_digest: str, fetch_date: str | None = None) -> str:
    """Stable id of a source record from the record alone (never from where its archive is): its
    WARC-Record-ID, else (ARC) its URL + capture date + payload digest.

    Two fetches of the same page are two records with two ids; exact dedup merges them later.
    """
    key = record_id or f"{url}\n{fetch_date or ''}\n{payload_digest}"
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def sniff_charset(content: bytes, declared: str | None) -> str:
    """The page's encoding as a Python codec name: the WHATWG order (BOM > HTTP charset > ``<meta>``
    prescan > windows-1252) with w3lib's implementation of each step, and two safeguards.

    1. A byte-order mark (UTF-8, UTF-16LE/BE, UTF-32) wins.
    2. Bytes that are valid UTF-8 and not plain ASCII are UTF-8: a declaration that disagrees
       (UTF-8 served as Latin-1) is wrong far more often than such bytes are a coincidence.
    3. The HTTP charset, then the ``<meta>``/XML declaration, each only if it names a known encoding
       (labels resolved the WHATWG way: latin-1 → cp1252, gb2312 → gb18030, ...) and the bytes decode
       under it; a bogus name or a label the bytes contradict falls through. UTF-16/32 labels without
       a BOM are ignored, as the WHATWG prescan does.
    4. Plain ASCII is UTF-8.
    5. Undeclared non-UTF-8 bytes: charset-normalizer's guess only where it reads as a non-Latin
       script (Cyrillic, Greek, CJK, ...); otherwise windows-1252, the WHATWG default for Latin-script
       locales, so Latin-1 "crème brûlée" is not guessed into cp1257 "crčme brūlée".
    """
    from w3lib.encoding import html_body_declared_encoding, read_bom, resolve_encoding

    bom, _ = read_bom(content)
    if bom:
        return bom
    try:
        content.decode("utf-8")
        is_utf8 = True
    except UnicodeDecodeError:
        is_utf8 = False
    if is_utf8 and not content.isascii():
        return "utf-8"
    for label in (declared, html_body_declared_encoding(content)):
        codec = resolve_encoding(label) if label else None
        if codec and not codec.startswith(("utf-16", "utf-32")) and _decodes(content, codec):
            return codec
    if is_utf8:
        return "utf-8"
    return _non_latin_guess(content[:65536]) or "cp1252"


def _decodes(content: bytes, codec: str) -> bool:
    try:
        content.decode(codec)
        return True
    except UnicodeDecodeError:
        return False


def _non_latin_guess(sample: bytes) -> str | None:
    """charset-normalizer's encoding for ``sample`` if its letters beyond ASCII are mostly non-Latin, else None."""
    from charset_normalizer import from_bytes
    from w3lib.encoding import resolve_encoding

    best = from_bytes(sample).best()
    codec = resolve_encoding(best.encoding) if best else None
    if not codec:
        return None
    letters = [c for c in sample.decode(codec, errors="replace") if ord(c) > 127 and c.isalpha()]
    latin = sum(unicodedata.name(c, "").startswith("LATIN") for c in letters)
    return codec if letters and latin < len(letters) / 2 else None


def archive_format(path: str) -> tuple[str | None, str | None]:
    """``("warc" | "arc", None)`` from a file's first bytes, or ``(None, problem)`` for a file that is
    no archive: ``empty_file``, ``bad_gzip`` (gzip magic, broken stream) or ``not_an_archive``
    (after gzip, neither a WARC nor an ARC header)."""
    with open(path, "rb") as fh:
        head = fh.read(65536)
    if not head:
        return None, "empty_file"
    if head[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(31).decompress(head, 4096)
        except zlib.error:
            return None, "bad_gzip"
    head = head.lstrip(b"\r\n")
    if head.startswith(b"WARC/"):
        return "warc", None
    if _ARC_HEADER.match(head):
        return "arc", None
    return None, "not_an_archive"


def _charset_from_type(content_type: str | None) -> str | None:
    if content_type and "charset=" in content_type.lower():
        return content_type.lower().split("charset=", 1)[1].split(";")[0].strip(" \"'") or None
    return None


def _read_limited(stream, limit: int, chunk: int = 1 << 16) -> bytes:
    """Read up to ``limit`` bytes in chunks (warcio's readers misbehave on one huge read)."""
    parts, total = [], 0
    while total < limit:
        block = stream.read(min(chunk, limit - total))
        if not block:
            break
        parts.append(block)
        total += len(block)
    return b"".join(parts)


def read_archive(
    path: str, max_record_bytes: int = 50_000_000, keep_non_html: bool = False, name: str | None = None
) -> Iterator[dict]:
    """Yield one row per response/conversion record of an archive file, and at least one row per file.

    ``name`` is what the rows call the file (``warc_file``, and ``source`` = ``name@offset``); default
    its file name. Rows never hold the path the file was read from.

    Rows for records that are not HTML, too large, or unreadable carry a ``drop_reason``; a file
    that cannot be read past some point yields a ``warc_read_error`` row at that offset and stops.
    A file that is no archive (:func:`archive_format`) yields one file-level row
    ``warc_read_error: <problem>`` and an archive without response records one
    ``no_response_records`` row, so every input file appears in the ledger. A WARC file is read as
    WARC only (warcio would otherwise parse junk after a lying Content-Length as ARC records), and a
    WARC record not followed by its blank lines (its Content-Length is wrong, so its payload is cut
    or padded) is dropped as ``bad_content_length``.
    """
    from warcio.archiveiterator import ArchiveIterator, WARCIterator

    file_name = name or Path(path).name

    def row(**kw) -> dict:
        base = {c: None for c in COLUMNS}
        base.update(warc_file=file_name, **kw)
        base["source"] = f"{file_name}@{base.get('warc_offset')}"
        return base

    fmt, problem = archive_format(path)
    if problem:
        yield row(warc_offset=0, drop_reason=f"warc_read_error: {problem}")
        return
    offset, records, it = 0, 0, None
    try:
        with open(path, "rb") as fh:
            it = WARCIterator(fh) if fmt == "warc" else ArchiveIterator(fh, arc2warc=True)
            for record in it:
                offset = it.offset  # get_record_offset() would consume the record
                if record.rec_type not in ("response", "conversion"):
                    continue
                records += 1
                headers = record.rec_headers
                url = headers.get_header("WARC-Target-URI") or ""
                # warcio invents a random WARC-Record-ID for ARC records: not an id of the source record
                record_id = headers.get_header("WARC-Record-ID") if fmt == "warc" else None
                fetch_date = headers.get_header("WARC-Date")
                common = dict(
                    url=url, warc_offset=offset, warc_record_id=record_id, record_type=record.rec_type,
                    fetch_date=fetch_date,
                )
                try:
                    content = _read_limited(record.content_stream(), max_record_bytes + 1)
                except Exception as exc:  # truncated gzip member, bad chunking, ...
                    yield row(**common, drop_reason=f"record_read_error: {type(exc).__name__}")
                    return
                if len(content) <= max_record_bytes and getattr(record.raw_stream, "limit", 0) > 0:
                    # the file ended before the record's declared Content-Length: a cut download
                    yield row(**common, drop_reason="truncated_record")
                    continue
                errors = it.err_count
                it.read_to_end(record)  # consumes the blank lines after the record; counts a missing one
                if fmt == "warc" and it.err_count > errors:
                    yield row(**common, drop_reason="bad_content_length")
                    continue
                digest = headers.get_header("WARC-Payload-Digest") or "sha1:" + hashlib.sha1(content).hexdigest()
                doc_id = make_doc_id(record_id, url, digest, fetch_date)
                if record.rec_type == "conversion":  # WET: text already extracted
                    yield row(**common, doc_id=doc_id, content_type="text/plain", content=content,
                              content_length=len(content), declared_charset="utf-8", detected_charset="utf-8")
                    continue
                http = record.http_headers
                if http is None or not http.get_statuscode():
                    yield row(**common, doc_id=doc_id, drop_reason="bad_http_header")
                    continue
                try:
                    status = int(http.get_statuscode())
                except ValueError:
                    yield row(**common, doc_id=doc_id, drop_reason="bad_http_header")
                    continue
                content_type = (http.get_header("Content-Type") or "").strip()
                declared = _charset_from_type(content_type)
                base = dict(
                    **common, doc_id=doc_id, http_status=status, content_type=content_type,
                    declared_charset=declared, content_length=len(content),
                )
                mime = content_type.split(";")[0].strip().lower()
                if len(content) > max_record_bytes:
                    yield row(**base, drop_reason="too_large")
                elif not (200 <= status < 300):
                    yield row(**base, drop_reason=f"http_status_{status // 100}xx")
                elif mime and mime not in HTML_TYPES and not keep_non_html:
                    yield row(**base, drop_reason="non_html")
                elif not content.strip():
                    yield row(**base, content=content, drop_reason="empty_payload")
                else:
                    yield row(**base, content=content, detected_charset=sniff_charset(content, declared))
    except Exception as exc:  # truncated file, broken gzip stream, garbage between records
        at = max(offset, getattr(it, "offset", 0))  # where the reader stopped
        yield row(warc_offset=at, drop_reason=f"warc_read_error: {type(exc).__name__}")
        return
    if not records:
        yield row(warc_offset=0, drop_reason="no_response_records")


def spark_schema():
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField("doc_id", T.StringType()), T.StructField("url", T.StringType()),
        T.StructField("source", T.StringType()), T.StructField("warc_file", T.StringType()),
        T.StructField("warc_offset", T.LongType()), T.StructField("warc_record_id", T.StringType()),
        T.StructField("record_type", T.StringType()), T.StructField("fetch_date", T.StringType()),
        T.StructField("http_status", T.IntegerType()), T.StructField("content_type", T.StringType()),
        T.StructField("declared_charset", T.StringType()), T.StructField("detected_charset", T.StringType()),
        T.StructField("content", T.BinaryType()), T.StructField("content_length", T.LongType()),
        T.StructField("drop_reason", T.StringType()),
    ])


def ingest_dataframe(spark, files: list[tuple[Path, str]], max_record_bytes: int, keep_non_html: bool):
    """A DataFrame of records from ``files`` (``(path, name)``, :func:`archive_entries`): one Spark
    task per file, the i-th file in the i-th partition (no shuffle keyed on paths, so the output's
    part files hold the same rows wherever the archives are)."""
    import pandas as pd

    def parse(batches):
        for batch in batches:
            for path, name in zip(batch["path"], batch["name"]):
                records = read_archive(path, max_record_bytes, keep_non_html, name)
                while rows := list(itertools.islice(records, FRAME_RECORDS)):
                    frame = pd.DataFrame(rows, columns=list(COLUMNS))
                    for col in ("warc_offset", "content_length", "http_status"):
                        frame[col] = frame[col].astype("Int64")
                    yield frame

    rows = spark.sparkContext.parallelize([(str(f), name) for f, name in files], max(1, len(files)))
    return spark.createDataFrame(rows, "path string, name string").mapInPandas(parse, schema=spark_schema())


def run(ctx: StageContext) -> StageResult:
    cfg: IngestConfig = ctx.config
    files = archive_entries(cfg.input_paths)
    ctx.log.info("ingest: %d archive files", len(files))
    names = [name for _, name in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    warnings = [f"archives of the same name under different inputs, so their rows' source/warc_file are ambiguous: "
                f"{', '.join(twice[:5])}{' ...' if len(twice) > 5 else ''} (the manifest's inputs list every input)"] if twice else []
    spark = ctx.spark()
    if files:
        df = ingest_dataframe(spark, files, cfg.max_record_bytes, cfg.keep_non_html)
    else:
        df = spark.createDataFrame([], spark_schema())
    counts = write_decisions(df, ctx.output("data"), ctx.output("rejected"), rejected_drop_columns=("content",))
    metrics = {"archive_files": len(files), **counts}
    return StageResult(metrics=metrics, tables={"funnel": funnel_rows("ingest", counts)}, warnings=warnings)


STAGES = [
    Stage(
        name="ingest",
        description="WARC/ARC/WET → Parquet, one row per HTML response record (broken records recorded as drops)",
        config_model=IngestConfig,
        run=run,
        external_inputs=lambda cfg: {f"archives_{i}": p for i, p in enumerate(cfg.input_paths)},
        uses_spark=True,
        version="2",  # 2: warc_file/source name the archive relative to its input, not by absolute path
    )
]
