"""Throughput of ingest → extract → langid → heuristics on Spark vs a bare single-process Python loop.

Packs the real HTML pages under ``../shared/data`` (trafilatura_eval's 990 pages plus the HTML
responses in warc_samples) into gzipped WARC files, replicated to ``--records`` response records
(each copy gets its own URL, hence its own doc_id). Both sides run pinned to the same ``--cores``
CPUs (``sched_setaffinity``, inherited by the JVM and the Python workers):

- bare loop: one process, for each record ``read_archive`` → ``extract_record`` → ``identify`` →
  ``language_decision`` → ``all_signals`` → ``first_failure``, kept rows written to Parquet;
- Spark: the four stages through ``flows.registry.execute_stage`` with ``local[<cores>]`` (session
  start-up timed separately and left out of docs/s).

Last line: ``ratio_vs_bare_loop <Spark docs/s / bare docs/s>``.

    .venv/bin/python bench/curation_throughput.py [--records 10000] [--cores 1]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
STAGES = ("ingest", "extract", "langid", "heuristics")


def real_pages(shared: Path) -> list[tuple[str, bytes]]:
    """(url, html bytes) of every real HTML page in the shared data folder."""
    from curation.ingest import read_archive

    pages = []
    manifest = shared / "trafilatura_eval" / "manifest.jsonl"
    for line in manifest.read_text().splitlines():
        entry = json.loads(line)
        pages.append((entry["url"], gzip.decompress((shared / "trafilatura_eval" / entry["html_gz"]).read_bytes())))
    for warc in sorted((shared / "warc_samples").rglob("*.warc.gz")):
        for row in read_archive(str(warc)):
            if row["drop_reason"] is None and row["record_type"] == "response":
                pages.append((row["url"], row["content"]))
    return pages


def pack_warcs(pages: list[tuple[str, bytes]], records: int, files: int, out_dir: Path) -> list[Path]:
    """Write ``records`` response records (pages cycled, URLs made unique) into ``files`` .warc.gz files."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"bench-{i:03d}.warc.gz" for i in range(files)]
    handles = [open(p, "wb") for p in paths]
    writers = [WARCWriter(h, gzip=True) for h in handles]
    try:
        for i in range(records):
            url, html = pages[i % len(pages)]
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
            record = writers[i % files].create_warc_record(
                f"{url}#copy{i // len(pages)}", "response", payload=io.BytesIO(html), http_headers=http
            )
            writers[i % files].write_record(record)
    finally:
        for h in handles:
            h.close()
    return paths


def bare_loop(files: list[Path], out: Path) -> Counter:
    """The same work in one plain Python process; returns decision counts (None = kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.extract import ExtractConfig, extract_record
    from curation.filters import all_signals, first_failure
    from curation.heuristics import HeuristicsConfig, rules_for
    from curation.ingest import read_archive
    from curation.langid import LangidConfig, identify, language_decision, load_model

    ecfg, lcfg = ExtractConfig(), LangidConfig()
    rules = rules_for(HeuristicsConfig())
    model = load_model()
    counts: Counter = Counter()
    kept = []
    for path in files:
        for row in read_archive(str(path)):
            reason = row["drop_reason"]
            if reason is None:
                ex = extract_record(row, ecfg)
                reason = ex["drop_reason"]
            if reason is None:
                lang, score = identify(model, ex["text"], lcfg.max_chars)
                reason = language_decision(lang, score, lcfg.languages, lcfg.min_score)
            if reason is None:
                signals = {**ex["signals"], **all_signals(ex["text"])}
                reason = first_failure(signals, rules)
            counts[reason] += 1
            if reason is None:
                kept.append({"doc_id": row["doc_id"], "url": row["url"], "text": ex["text"], "lang": lang,
                             "lang_score": score, "signals": json.dumps(signals)})
    pq.write_table(pa.Table.from_pylist(kept), out)
    return counts


def spark_pipeline(files_dir: Path, run_root: Path, cores: int) -> tuple[dict, float, float]:
    """Run the four stages; returns (heuristics manifest, session start seconds, stage seconds)."""
    from flows.registry import execute_stage, load_config
    from infra.spark import get_spark

    config = load_config(overrides={
        "run_root": str(run_root), "spark.master": f"local[{cores}]", "ingest.input_paths": [str(files_dir)],
    })
    t0 = time.perf_counter()
    get_spark(config.spark, app_name="bench-curation").range(1).count()
    t1 = time.perf_counter()
    manifests = {name: execute_stage(name, config, "bench") for name in STAGES}
    t2 = time.perf_counter()
    for name in STAGES:
        print(f"  spark {name:<10} {manifests[name]['timings']['seconds']:8.1f} s  kept {manifests[name]['metrics']['kept']}")
    return manifests["heuristics"], t1 - t0, t2 - t1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000, help="response records to pack (>= 10000 for the figure)")
    parser.add_argument("--files", type=int, default=16, help="WARC files to spread them over")
    parser.add_argument("--cores", type=int, default=1, help="CPUs both sides are pinned to")
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cpus)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="refinery-bench-"))
    try:
        pages = real_pages(args.shared)
        files = pack_warcs(pages, args.records, args.files, work / "warc")
        size = sum(f.stat().st_size for f in files)
        print(f"{len(pages)} real pages → {args.records} records in {len(files)} WARC files ({size / 1e6:.0f} MB gz); "
              f"pinned to CPUs {cpus} of {os.cpu_count()}")

        t0 = time.perf_counter()
        counts = bare_loop(files, work / "bare.parquet")
        bare_s = time.perf_counter() - t0
        bare_rate = args.records / bare_s
        print(f"bare loop: {bare_s:.1f} s, {bare_rate:.2f} docs/s, kept {counts[None]}")

        heur, start_s, spark_s = spark_pipeline(work / "warc", work / "runs", args.cores)
        spark_rate = args.records / spark_s
        print(f"spark local[{args.cores}]: {spark_s:.1f} s (+ {start_s:.1f} s session start), {spark_rate:.2f} docs/s, "
              f"kept {heur['metrics']['kept']}")
        print("funnel: " + ", ".join(f"{r['step']} {r['documents']}" for r in heur["metrics"]["funnel"]))
        print(f"bare_docs_per_s {bare_rate:.2f}")
        print(f"spark_docs_per_s {spark_rate:.2f}")
        print(f"ratio_vs_bare_loop {spark_rate / bare_rate:.3f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
