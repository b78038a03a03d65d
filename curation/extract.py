"""``extract``: raw HTML → main text with trafilatura (precision mode), under a per-document time limit.

Core: :func:`extract_html` turns one page's bytes into an :class:`Extracted` (text, title, date,
the page's declared language as ``lang_hint``, timing) or a drop reason; :func:`extract_record`
handles one ingest row (WET conversion records are already text and pass through). Shell: a
``mapInArrow`` over the ingest output that keeps every column except the raw ``content`` bytes
(``source``/``warc_file``/``warc_offset`` point back at them) and adds ``text``, ``title``, ``date``,
``lang_hint`` and ``signals`` (struct: ``text_chars``, ``text_html_ratio``).

Timing is not data: two extractions of the same page must give the same row (content hashes and
cache keys depend on it), so per-page wall time goes into the stage's metrics instead
(``extract_seconds_total``/``extract_seconds_max``, summed by Spark accumulators; a retried task
counts twice there).

Time limit: trafilatura has no timeout, so :func:`time_limit` arms ``SIGALRM`` with
``signal.setitimer``. PySpark runs ``mapInArrow`` functions in the Python worker's main thread
(checked: ``threading.current_thread() is threading.main_thread()``), where that works. The alarm
interrupts Python code; a single long call inside lxml's C parser is interrupted when it returns,
which is why pages above ``max_html_bytes`` are dropped before parsing.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from pydantic import Field

from curation.ledger import funnel_rows, write_decisions
from infra.stage import Stage, StageConfig, StageContext, StageResult

EXTRACT_COLUMNS = ("text", "title", "date", "lang_hint")
SIGNAL_FIELDS = (("text_chars", int), ("text_html_ratio", float))
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f]")


class ExtractConfig(StageConfig):
    """trafilatura options and the limits that keep one bad page from stalling a partition."""

    favor_precision: bool = Field(True, description="trafilatura favor_precision (less boilerplate)")
    include_comments: bool = Field(False, description="append the page's comment section to the text")
    include_tables: bool = Field(True, description="keep text inside <table> elements")
    date_extensive_search: bool = Field(
        False, description="htmldate's extensive search for the page date (about 1.5x slower extraction)"
    )
    timeout_s: float = Field(10.0, gt=0, description="per-document extraction time limit (seconds)")
    max_html_bytes: int = Field(5_000_000, ge=1, description="pages larger than this are dropped unparsed")
    min_text_chars: int = Field(1, ge=0, description="documents with less extracted text are dropped")
    arrow_batch_rows: int = Field(64, ge=1, description="rows per batch read from Parquet and sent to a Python worker")


@dataclass
class Extracted:
    """One page's extraction: text and metadata, or a drop reason."""

    text: str | None = None
    title: str | None = None
    date: str | None = None
    lang_hint: str | None = None
    drop_reason: str | None = None


class ExtractionTimeout(BaseException):
    """Raised inside an extraction that ran past its time limit.

    A BaseException so that trafilatura's and lxml's ``except Exception`` blocks cannot swallow it.
    """


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`ExtractionTimeout` in the block after ``seconds`` (main thread only; elsewhere no limit).

    The alarm repeats every 50 ms until the block ends, in case a bare ``except:`` swallows one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise ExtractionTimeout(f"extraction took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def clean_text(text: str | None) -> str | None:
    """Replace each surrogate code point (the only str content UTF-8 cannot encode) with U+FFFD."""
    return None if text is None else _SURROGATE.sub("\ufffd", text)


def looks_binary(text: str, sample: int = 8192) -> bool:
    """True for decoded payloads that are not text: NUL or > 10% control characters in the first ``sample``.

    Checked after decoding, so UTF-16 pages (NUL bytes, no NUL characters) are text.
    """
    head = text[:sample]
    if not head:
        return False
    if "\x00" in head:
        return True
    return len(_CONTROL.findall(head)) > 0.1 * len(head)


def decode_html(content: bytes, charset: str | None) -> str:
    """Bytes → str with the detected charset (unknown or missing charset: UTF-8), bad bytes replaced, BOM dropped."""
    for cand in (charset, "utf-8"):
        if not cand:
            continue
        try:
            return content.decode(cand, errors="replace").removeprefix("\ufeff")
        except LookupError:
            continue
    return content.decode("utf-8", errors="replace").removeprefix("\ufeff")


def extract_html(content: bytes, url: str | None = None, charset: str | None = None, cfg: ExtractConfig | None = None) -> Extracted:
    """Main text and metadata of one HTML page, or an :class:`Extracted` with a drop reason."""
    cfg = cfg or ExtractConfig()
    if len(content) > cfg.max_html_bytes:
        return Extracted(drop_reason="extract_too_large")
    html = decode_html(content, charset)
    if looks_binary(html):
        return Extracted(drop_reason="extract_binary_content")
    from trafilatura import bare_extraction
    from trafilatura.utils import load_html

    try:
        with time_limit(cfg.timeout_s):
            tree = load_html(html)
            if tree is None:
                return Extracted(drop_reason="extract_unparsable")
            lang_hint = tree.get("lang") or tree.get("xml:lang")
            doc = bare_extraction(
                tree, url=url, favor_precision=cfg.favor_precision, include_comments=cfg.include_comments,
                include_tables=cfg.include_tables, with_metadata=True,
                date_extraction_params={"extensive_search": cfg.date_extensive_search, "original_date": True},
            )
    except ExtractionTimeout:
        return Extracted(drop_reason="extract_timeout")
    except Exception as exc:  # a trafilatura/lxml bug on one page must not end the run
        return Extracted(drop_reason=f"extract_error:{type(exc).__name__}")
    text = doc.text if doc is not None else None
    if text and cfg.include_comments and doc.comments:
        text = f"{text}\n{doc.comments}"
    text = clean_text(text)
    if not text or len(text.strip()) < max(cfg.min_text_chars, 1):
        return Extracted(drop_reason="extract_no_text")
    return Extracted(
        text=text, title=clean_text(doc.title), date=doc.date,
        lang_hint=clean_text(lang_hint.strip()[:32]) if lang_hint and lang_hint.strip() else None,
    )


def extract_record(row: dict[str, Any], cfg: ExtractConfig) -> dict[str, Any]:
    """New columns (text, title, date, lang_hint, signals, drop_reason) for one ingest row."""
    content: bytes = row.get("content") or b""
    if row.get("record_type") == "conversion":  # WET: already extracted UTF-8 text
        text = clean_text(content.decode("utf-8", errors="replace"))
        result = Extracted(text=text) if text and text.strip() else Extracted(drop_reason="extract_no_text")
    else:
        result = extract_html(content, row.get("url"), row.get("detected_charset"), cfg)
    text_chars = len(result.text) if result.text else 0
    return {
        "text": result.text, "title": result.title, "date": result.date, "lang_hint": result.lang_hint,
        "signals": {"text_chars": text_chars, "text_html_ratio": text_chars / len(content) if content else 0.0},
        "drop_reason": result.drop_reason,
    }


def output_schema(input_schema):
    """Ingest columns minus ``content``, plus the extraction columns; ``drop_reason`` last."""
    from pyspark.sql import types as T

    keep = [f for f in input_schema.fields if f.name not in ("content", "drop_reason")]
    signals = T.StructType([
        T.StructField(name, T.DoubleType() if kind is float else T.LongType()) for name, kind in SIGNAL_FIELDS
    ])
    return T.StructType(
        keep + [T.StructField(c, T.StringType()) for c in EXTRACT_COLUMNS]
        + [T.StructField("signals", signals), T.StructField("drop_reason", T.StringType())]
    )


class _MaxParam:
    """Spark AccumulatorParam of a float maximum."""

    def zero(self, value: float) -> float:
        return 0.0

    def addInPlace(self, a: float, b: float) -> float:
        return max(a, b)


def extract_dataframe(df, cfg: ExtractConfig, seconds: tuple | None = None):
    """Map :func:`extract_record` over an ingest DataFrame (only rows ingest kept).

    ``seconds``: optional (total, max) Spark accumulators that receive each page's wall time.
    """
    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = output_schema(df.schema)
    arrow_schema = to_arrow_schema(schema)
    added = (*EXTRACT_COLUMNS, "signals", "drop_reason")
    passthrough = [f.name for f in schema.fields if f.name not in added]

    def extract_batches(batches):
        for batch in batches:
            rows = batch.select(["content", "url", "detected_charset", "record_type"]).to_pylist()
            results = []
            for r in rows:
                started = time.perf_counter()
                results.append(extract_record(r, cfg))
                if seconds is not None:
                    took = time.perf_counter() - started
                    seconds[0].add(took)
                    seconds[1].add(took)
            arrays = [batch.column(name) for name in passthrough]
            for name in added:
                arrays.append(pa.array([r[name] for r in results], type=arrow_schema.field(name).type))
            yield pa.RecordBatch.from_arrays(arrays, schema=arrow_schema)

    return df.mapInArrow(extract_batches, schema)


def run(ctx: StageContext) -> StageResult:
    cfg: ExtractConfig = ctx.config
    spark = ctx.spark()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_rows))
    # the Parquet reader's batches hold raw HTML too: its default 4,096 rows (~320 MB of pages at
    # 78 KB each) exhausted a 2 GB driver heap at 4,000 pages (bench/scaling.py)
    spark.conf.set("spark.sql.parquet.columnarReaderBatchSize", str(cfg.arrow_batch_rows))
    pages = spark.read.parquet(str(ctx.input("ingest").path("data")))
    seconds = (spark.sparkContext.accumulator(0.0), spark.sparkContext.accumulator(0.0, _MaxParam()))
    counts = write_decisions(extract_dataframe(pages, cfg, seconds), ctx.output("data"), ctx.output("rejected"))
    ingest_metrics = ctx.input("ingest").manifest["metrics"]
    funnel = [
        {"step": "records", "documents": ingest_metrics["rows_in"]},
        {"step": "ingested (HTML responses)", "documents": ingest_metrics["kept"]},
        {"step": "extracted", "documents": counts["kept"]},
    ]
    return StageResult(
        metrics={
            **counts, "funnel": funnel,
            "extract_seconds_total": round(seconds[0].value, 3), "extract_seconds_max": round(seconds[1].value, 3),
        },
        tables={"funnel": funnel_rows("extract", counts), "pipeline_funnel": funnel},
    )


STAGES = [
    Stage(
        name="extract",
        description="HTML → main text with trafilatura (precision mode, per-page time limit, charset-aware)",
        config_model=ExtractConfig,
        run=run,
        inputs=("ingest",),
        uses_spark=True,
        execution_metrics=("extract_seconds_total", "extract_seconds_max"),
    )
]
