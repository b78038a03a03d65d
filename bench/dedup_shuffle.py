"""Shuffle bytes of the whole ``dedup`` stage (URL, exact, line and fuzzy levels) per document.

Runs ``curation.dedup.deduplicate`` of a code checkout (``--code``, default this one: pass an older
checkout to compare before/after on the same data; it builds the plan in the driver, while Spark's Python
workers import the installed checkout's per-document functions) on ``--docs`` synthetic documents (the Dolma
Common Crawl samples of ``../shared/data`` expanded with ``bench/scaling.py``'s duplicate rates, quality
scores from a hash of the doc_id), Spark ``local[1]`` with an event log. Prints the levels' stats, the
seconds, the shuffle bytes every task wrote (from the event log) and a SHA-256 of the sorted output
rows (equal across checkouts ⇔ equal decisions and texts), then ``shuffle_kib_per_doc <x>``.

    .venv/bin/python bench/dedup_shuffle.py [--docs 12000] [--code DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SHARED = BENCH.parent.parent / "shared" / "data"
SCHEMA = "doc_id string, url string, fetch_date string, text string, quality_score double, lang string, drop_reason string"


def corpus(n: int) -> list[dict]:
    from scaling import expand

    base = []
    for name in ("cc_en_head-0091.jsonl.gz", "cc_en_head-0174.jsonl.gz"):
        with gzip.open(SHARED / "web_text_samples_dolma" / name, "rt") as fh:
            for i, line in enumerate(fh):
                base.append({"doc_id": "", "url": f"https://example.org/{name}/{i}", "fetch_date": "",
                             "text": json.loads(line)["text"], "quality_score": 0.5, "lang": "en", "drop_reason": None})
    rows = list(expand(base, n, seed=3))
    for r in rows:
        r["quality_score"] = int(hashlib.md5(r["doc_id"].encode()).hexdigest(), 16) % 1000 / 1000
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=12000)
    ap.add_argument("--code", type=Path, default=BENCH.parent, help="checkout whose curation.dedup runs")
    args = ap.parse_args()
    code = args.code.resolve()
    import scaling  # its helpers put this checkout first on sys.path: ``code`` goes before it

    sys.path[:0] = [str(code)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])  # Spark's Python workers
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    with tempfile.TemporaryDirectory(prefix="dedup-shuffle-") as tmp:
        events = Path(tmp) / "events"
        events.mkdir()
        spark = (SparkSession.builder.master("local[1]").config("spark.sql.shuffle.partitions", "4")
                 .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
                 .config("spark.eventLog.enabled", "true").config("spark.eventLog.dir", events.as_uri()).getOrCreate())
        spark.createDataFrame(corpus(args.docs), SCHEMA).write.parquet(f"{tmp}/in")
        from curation.dedup import DedupConfig, deduplicate

        t0 = time.perf_counter()
        out, stats = deduplicate(spark.read.parquet(f"{tmp}/in"), DedupConfig(line_max_docs=5))
        out.write.parquet(f"{tmp}/out")
        seconds = time.perf_counter() - t0
        got = spark.read.parquet(f"{tmp}/out")
        rows = sorted(json.dumps(r.asDict(recursive=True), sort_keys=True) for r in got.collect())
        columns = got.columns
        spark.stop()  # flushes the event log
        shuffled = scaling.shuffle_bytes(events)  # writing the input shuffles nothing
    import curation.dedup

    print(f"code {code} (curation.dedup from {curation.dedup.__file__}); {args.docs} documents; columns {columns}")
    print(f"stats {stats}")
    print(f"seconds {seconds:.1f}; shuffle written {shuffled / 2**20:.1f} MiB; "
          f"rows sha256 {hashlib.sha256(chr(10).join(rows).encode()).hexdigest()}")
    print(f"shuffle_kib_per_doc {shuffled / 1024 / args.docs:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
