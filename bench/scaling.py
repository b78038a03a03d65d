"""Cost at scale: wall time and peak memory of every curation stage against data size.

Ingest + extract run on ``--page-sizes`` WARC response records (the real HTML pages of
``../shared/data`` packed into gzipped WARCs, cycled, each copy its own URL: see
``curation_throughput.py``). The post-extraction stages (langid, heuristics, quality, dedup with
every level, tokenize) run on ``--sizes`` documents: the distinct real pages extracted at the largest page
size expanded synthetically with duplicate rates in the range reported for a
Common Crawl snapshot (:data:`DUP_RATES`, :func:`expand`), written as an ``extract`` output so every
stage runs through the real executor (``flows.registry.execute_stage``).

Each (size, stage) runs in its own child process with ``local[--cores]``; its Spark session is
started before the stage and left out of the stage's seconds (the manifest's ``timings.seconds``:
the stage itself, its writes and output hashing). Peak memory is the sum of the RSS of the child's
whole process tree (the driver JVM and Spark's Python workers included), sampled every 0.1 s from
/proc. ``train_quality`` and ``tokenizer`` (fixed-cost training) run once, at the first size, and
later sizes reuse them (``--from``).

Prints one table (stage, input documents, seconds, ms/doc, peak RSS), writes a log-log plot of
seconds per document against size (``--plot``, PNG), with the shuffle bytes each stage wrote (Spark
event log), and last ``worst_scaling_exponent <x>``: the
largest, over stages, slope of log(seconds) against log(input documents) between the top two sizes.

    .venv/bin/python bench/scaling.py [--page-sizes 5000,10000,20000,50000] [--sizes 125000,250000,500000,1000000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

from curation_throughput import pack_warcs, real_pages
from dedup_throughput import measured

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
PAGE_STAGES = ("ingest", "extract")
POST_STAGES = ("langid", "heuristics", "quality", "dedup", "tokenize")
FIXED_STAGES = ("train_quality", "tokenizer")  # trained once, at the first size
# share of synthetic documents that duplicate an earlier one (the rest are distinct pages): a re-fetch
# of the same URL (1% of words changed), an exact copy up to case and whitespace, a near copy with 1–5% of
# words replaced (5-gram Jaccard ≈ 0.8 on average, most above the 0.7 threshold)
DUP_RATES = {"url": 0.04, "exact": 0.10, "near": 0.20}
PART_ROWS = 10_000  # rows per Parquet part of the synthetic extract output
RECENT = 2_000  # duplicates copy one of the last RECENT documents (bounded generator memory)


def _doc_id(seed: int, i: int) -> str:
    return hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=10).hexdigest()


def _url_variant(url: str, key: str, i: int) -> str:
    """``url`` with the query parameter ``key=i`` (before any fragment, which URL dedup drops: the packed
    pages' ``#copyN`` fragments once made every synthetic copy of a page one URL)."""
    base = url.split("#", 1)[0]
    return f"{base}{'&' if '?' in base else '?'}{key}={i}"


def _mutate(text: str, rng: random.Random, fraction: float, every_line: bool = False) -> str:
    """Replace ``fraction`` of the words with other words of the same text (``every_line``: that
    fraction of each line's words, at least one per line, so no line survives verbatim)."""
    vocab = text.split()
    if not vocab:
        return text
    lines = [line.split(" ") for line in text.split("\n")]
    slots = [(i, k) for i, words in enumerate(lines) for k, w in enumerate(words) if w]
    if every_line:
        by_line: dict[int, list] = {}
        for i, k in slots:
            by_line.setdefault(i, []).append((i, k))
        chosen = [s for line in by_line.values() for s in rng.sample(line, max(1, round(len(line) * fraction)))]
    else:
        chosen = rng.sample(slots, max(1, round(len(slots) * fraction)))
    for i, k in chosen:
        lines[i][k] = rng.choice(vocab)
    return "\n".join(" ".join(words) for words in lines)


def expand(base: list[dict], n: int, seed: int = 0, weights: list[float] | None = None):
    """``n`` documents from the real extracted rows ``base`` (every column kept; doc_id, url,
    fetch_date and text made new; distinct documents get distinct normalised URLs), yielded one by one. Distinct documents have 35% of each line's
    words replaced by other words of the page (5-gram Jaccard between two of them ≈ 0.01); the
    duplicates (:data:`DUP_RATES`) copy one of the recent documents. ``weights``: how often each
    base page is drawn (default: uniformly)."""
    import itertools

    rng = random.Random(seed)
    cum = list(itertools.accumulate(weights or [1.0] * len(base)))
    recent: list[dict] = []
    for i in range(n):
        u = rng.random()
        row = None
        if recent and u < sum(DUP_RATES.values()):
            src = rng.choice(recent)
            row = dict(src, doc_id=_doc_id(seed, i))
            if u < DUP_RATES["url"]:
                row.update(text=_mutate(src["text"], rng, 0.01), fetch_date=f"2024-{rng.randint(2, 12):02d}-01T00:00:00Z")
            elif u < DUP_RATES["url"] + DUP_RATES["exact"]:
                row.update(text="  " + src["text"].upper() + "\n", url=_url_variant(src["url"], "copy", i))
            else:
                row.update(text=_mutate(src["text"], rng, rng.uniform(0.01, 0.05)), url=_url_variant(src["url"], "near", i))
        if row is None:
            page = rng.choices(base, cum_weights=cum)[0]
            row = dict(page, doc_id=_doc_id(seed, i), url=_url_variant(page["url"], "syn", i), text=_mutate(page["text"], rng, 0.35, every_line=True))
            row["fetch_date"] = "2024-01-01T00:00:00Z"
            recent.append(row)
            if len(recent) > RECENT:
                recent.pop(rng.randrange(len(recent)))
        yield row


def write_extract_output(base: list[dict], weights, schema, n: int, run_root: Path, run_id: str) -> None:
    """Write ``expand(base, n, weights=weights)`` as a completed ``extract`` stage of run ``run_id`` (Parquet parts + manifest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from infra.runstore import content_hash, listing

    out = run_root / run_id / "extract"
    shutil.rmtree(out, ignore_errors=True)
    data = out / "data"
    data.mkdir(parents=True)
    chunk, part = [], 0
    for row in expand(base, n, weights=weights):
        chunk.append(row)
        if len(chunk) == PART_ROWS:
            pq.write_table(pa.Table.from_pylist(chunk, schema=schema), data / f"part-{part:05d}.parquet")
            chunk, part = [], part + 1
    if chunk:
        pq.write_table(pa.Table.from_pylist(chunk, schema=schema), data / f"part-{part:05d}.parquet")
    manifest = {
        "run_id": run_id, "stage": "extract", "config": {}, "inputs": {},
        "outputs": {"data": {"uri": data.as_uri(), "path": str(data), "hash": content_hash(data), "files": listing(data)}},
        "metrics": {"rows_in": n, "kept": n, "funnel": [{"step": "synthetic extracted documents", "documents": n}]},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


ENGLISH_SHARE = 0.8  # of the synthetic documents (the real pages are mostly not English; langid keeps en)


def english_weights(base: list[dict]) -> list[float]:
    """Per base page, a draw weight that makes :data:`ENGLISH_SHARE` of the documents English pages
    (lid.176 as the langid stage sees them), so every later stage gets most of the documents."""
    from curation.langid import LangidConfig, identify, load_model

    cfg, model = LangidConfig(), load_model()
    english = [identify(model, row["text"], cfg.max_chars)[0] == "en" for row in base]
    n_en = sum(english)
    if n_en in (0, len(base)):
        return [1.0] * len(base)
    print(f"{n_en} of {len(base)} distinct pages are English; they make {ENGLISH_SHARE:.0%} of the synthetic documents")
    return [ENGLISH_SHARE / n_en if e else (1 - ENGLISH_SHARE) / (len(base) - n_en) for e in english]


def config(work: Path, cores: int, warc_dir: Path | None = None, event_log: Path | None = None):
    from flows.registry import load_config

    overrides = {
        "run_root": str(work / "runs"), "spark.master": f"local[{cores}]",
        "tokenize.sources": [{"name": "web", "path": None, "weight": 1.0}],
        # every stage's input grows with the size: the demo profile's quality threshold kept 15% of the
        # mutated synthetic text, and line dedup at 5 documents emptied most copies of a page (dedup's
        # output fed tokenize 40 documents at 25,000); the levels cost the same work at any threshold
        "quality.threshold": 0.0, "dedup.line_max_docs": 1000,
    }
    if event_log is not None:
        overrides["spark.conf"] = {"spark.eventLog.enabled": "true", "spark.eventLog.dir": event_log.as_uri()}
    if warc_dir is not None:
        overrides["ingest.input_paths"] = [str(warc_dir)]
    return load_config(overrides=overrides)


def shuffle_bytes(event_log: Path) -> int:
    """Shuffle bytes written by every task in a Spark event log folder (Spark 4: a folder of rolled,
    zstd-compressed ``events_*`` files per application)."""
    import pyarrow as pa

    total = 0
    for path in event_log.rglob("events_*"):
        stream = pa.OSFile(str(path))
        if path.suffix == ".zstd":
            stream = pa.CompressedInputStream(stream, "zstd")
        for line in stream.read().decode("utf-8", "replace").splitlines():
            if '"SparkListenerTaskEnd"' in line:
                total += json.loads(line).get("Task Metrics", {}).get("Shuffle Write Metrics", {}).get("Shuffle Bytes Written", 0)
    return total


def run_child(stage: str, run_id: str, from_ref: str | None, work: Path, cores: int, warc_dir: str | None) -> dict:
    """Child-process body: start Spark, then execute one stage; its manifest's seconds, counts and
    the shuffle bytes written (from the session's event log)."""
    from flows.registry import execute_stage
    from infra.spark import get_spark

    os.chdir(REPO)  # the config's relative paths (fixtures, ../shared/data) are relative to the repository
    event_log = work / "eventlog" / f"{run_id}-{stage}"
    event_log.mkdir(parents=True)
    cfg = config(work, cores, Path(warc_dir) if warc_dir else None, event_log)
    spark = get_spark(cfg.spark, app_name=f"bench-scaling-{stage}")
    spark.range(1).count()
    manifest = execute_stage(stage, cfg, run_id, from_ref=from_ref, force=True)
    spark.stop()  # flushes the event log
    m = manifest["metrics"]
    return {"stage": stage, "run": run_id, "seconds": manifest["timings"]["seconds"], "rows_in": m.get("rows_in"), "kept": m.get("kept"),
            "shuffle_mib": round(shuffle_bytes(event_log) / 2**20, 1)}


def child(stage: str, run_id: str, from_ref: str | None, work: Path, cpus: list[int], warc_dir: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--run", run_id, "--workdir", str(work), "--cores", str(len(cpus))]
    cmd += ["--from", from_ref] if from_ref else []
    cmd += ["--warc-dir", str(warc_dir)] if warc_dir else []
    with open(work / "children.log", "a") as err:
        return measured(cmd, cpus, f"{stage} ({run_id})", stderr=err)


def extracted_pages(data: Path):
    """The distinct pages of an extract output (the packed WARCs cycle the real pages) and their schema."""
    import pyarrow.parquet as pq

    table = pq.read_table(data)
    seen, rows = set(), []
    for row in table.to_pylist():
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
    return rows, table.schema


def slope(points: list[tuple[int, float]]) -> float:
    """d log(seconds) / d log(size) between the two largest sizes."""
    (n1, s1), (n2, s2) = sorted(points)[-2:]
    return math.log(s2 / s1) / math.log(n2 / n1)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage in (*PAGE_STAGES, *POST_STAGES):
        pts = sorted((r["docs"], r["seconds"] / r["docs"]) for r in results if r["stage"] == stage)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=stage)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("input documents of the stage")
    ax.set_ylabel("seconds per document")
    ax.set_title("Refinery curation stages: cost per document vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def report(results: list[dict], plot_path: Path) -> None:
    """The table, the plot and the exponents of ``results`` (also from a saved results.json: ``--report``)."""
    print("\n| stage | input docs | seconds | ms/doc | peak RSS MiB (process tree) | shuffle written MiB |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['stage']} | {r['docs']} | {r['seconds']:.1f} | {1000 * r['seconds'] / r['docs']:.3f} "
              f"| {r['peak_rss_mib']:.0f} | {r['shuffle_mib']:.1f} |")
    plot(results, plot_path)
    exponents = {}
    for stage in (*PAGE_STAGES, *POST_STAGES):
        pts = [(r["docs"], r["seconds"]) for r in results if r["stage"] == stage]
        if len(pts) >= 2:
            exponents[stage] = slope(pts)
    print("scaling exponents (top two sizes): " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))
    print(f"plot: {plot_path}")
    if exponents:
        print(f"worst_scaling_exponent {max(exponents.values()):.3f}")
    else:
        print("one size per stage: no scaling exponent")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page-sizes", default="5000,10000,20000,50000", help="WARC records for ingest + extract")
    ap.add_argument("--sizes", default="125000,250000,500000,1000000", help="documents for the post-extraction stages")
    ap.add_argument("--base", type=Path, help="with --page-sizes '': an extract output data/ folder to expand")
    ap.add_argument("--cores", type=int, default=2, help="CPUs every child is pinned to; Spark local[cores]")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "scaling")
    ap.add_argument("--plot", type=Path, default=REPO / "bench" / "out" / "scaling.png")
    ap.add_argument("--report", type=Path, nargs="*", help="only the table, plot and exponents of saved results.json files")
    ap.add_argument("--child")
    ap.add_argument("--run")
    ap.add_argument("--from", dest="from_ref")
    ap.add_argument("--warc-dir")
    args = ap.parse_args()
    if args.report:
        report([r for path in args.report for r in json.loads(path.read_text())], args.plot)
        return 0
    if args.child:
        print(json.dumps(run_child(args.child, args.run, args.from_ref, args.workdir, args.cores, args.warc_dir)))
        return 0
    cpus = sorted(os.sched_getaffinity(0))[: args.cores]
    page_sizes = sorted(int(s) for s in args.page_sizes.split(",") if s)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    print(f"pinned to CPUs {cpus}, local[{len(cpus)}]; load avg {os.getloadavg()}", flush=True)
    results: list[dict] = []

    def record(r: dict, docs: int) -> None:
        r["docs"] = docs
        results.append(r)
        (args.workdir / "results.json").write_text(json.dumps(results, indent=1))  # partial results survive a stop
        print(f"  {r['stage']:<13} {docs:>9} docs {r['seconds']:8.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB"
              f"  shuffle {r['shuffle_mib']:8.1f} MiB", flush=True)

    pages = real_pages(SHARED)
    for n in page_sizes:
        warc = args.workdir / f"warc-{n}"
        pack_warcs(pages, n, max(4, n // 2500), warc)
        run_id = f"pages{n}"
        record(child("ingest", run_id, None, args.workdir, cpus, warc), n)
        ingest_kept = results[-1]["kept"]
        record(child("extract", run_id, None, args.workdir, cpus, warc), ingest_kept)
        shutil.rmtree(warc)
    if page_sizes:
        shutil.copytree(args.workdir / "runs" / f"pages{page_sizes[-1]}" / "extract" / "data", args.workdir / "base")
    elif args.base is None:
        ap.error("--page-sizes '' needs --base (an extract stage's data/ folder)")
    else:
        shutil.copytree(args.base, args.workdir / "base")
    base, schema = extracted_pages(args.workdir / "base")
    weights = english_weights(base)
    print(f"{len(pages)} real pages; {len(base)} extracted documents are the base of the synthetic sets", flush=True)
    first = None
    for n in sizes:
        run_id = f"docs{n}"
        write_extract_output(base, weights, schema, n, args.workdir / "runs", run_id)
        docs = n
        for stage in POST_STAGES:
            if first is None and stage == "quality":
                print(f"  (fixed cost) {child('train_quality', run_id, None, args.workdir, cpus)['seconds']:.1f} s train_quality")
            if first is None and stage == "tokenize":
                print(f"  (fixed cost) {child('tokenizer', run_id, None, args.workdir, cpus)['seconds']:.1f} s tokenizer")
            record(child(stage, run_id, first, args.workdir, cpus), docs)
            docs = results[-1]["kept"] if results[-1]["kept"] is not None else docs
        first = first or run_id
        shutil.rmtree(args.workdir / "runs" / run_id / "extract" / "data")  # the synthetic input: large, not needed later
    print(f"load avg after {os.getloadavg()}")
    report(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
