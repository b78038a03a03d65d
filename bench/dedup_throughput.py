"""MinHash dedup throughput, one core each, same documents, word 5-grams, 14 bands × 8 rows:

* shingling limit — normalise + build the set of 5-gram strings (the floor of any signature step);
* our signature core (curation.minhash, vectorised NumPy 64-bit) — ratio vs the shingling limit;
* datasketch — per-document MinHash.update_batch + MinHashLSH insert/query, single process;
* our Spark ``dedup`` fuzzy level (local[1]: signatures, buckets, verification, connected components);
* DataTrove's MinHash pipeline (signature → buckets → cluster → filter, LocalPipelineExecutor, 1 task)
  in its own venv ``.venv-bench-datatrove`` (created here with ``python -m venv`` + pip when missing).

Each engine runs in a child process; docs/s and the child's peak RSS are reported.
``--scaling 10000,50000,200000`` also times the Spark stage on synthetic expansions of the real set.

    .venv/bin/python bench/dedup_throughput.py [--scaling 10000,50000,200000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

from dedup_corpus import REPO, load_corpus

OUT = REPO / "bench" / "out"
DT_VENV = REPO / ".venv-bench-datatrove"
ENGINES = ("shingle_limit", "ours_core", "datasketch", "ours_spark")


def expand(docs: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` documents: the real ones, then copies with 2–10% of words replaced (near-duplicate families)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = docs[i % len(docs)]
        if i < len(docs):
            out.append(d)
            continue
        words = d["text"].split(" ")
        for _ in range(max(1, int(len(words) * rng.uniform(0.02, 0.1)))):
            words[rng.randrange(len(words))] = f"w{rng.randrange(10**6)}"
        out.append({"doc_id": f"s{i:07d}", "url": f"{d['url']}#s{i}", "text": " ".join(words)})
    return out


def run_engine(engine: str, n: int) -> dict:
    """Child-process body: time one engine on the first ``n`` (expanded) documents."""
    docs = expand(load_corpus(), n)
    texts = [d["text"] for d in docs]
    t0 = time.perf_counter()
    if engine == "shingle_limit":
        from curation.minhash import normalize_text

        for t in texts:
            w = normalize_text(t).split()
            set(" ".join(w[i : i + 5]) for i in range(max(1, len(w) - 4)))
    elif engine == "ours_core":
        from curation.minhash import band_keys, batch_signatures

        for start in range(0, len(texts), 1000):
            band_keys(batch_signatures(texts[start : start + 1000]))
    elif engine == "datasketch":
        from datasketch import MinHash, MinHashLSH

        from curation.minhash import normalize_text

        lsh = MinHashLSH(num_perm=112, params=(14, 8))
        for i, t in enumerate(texts):
            w = normalize_text(t).split()
            m = MinHash(num_perm=112)
            m.update_batch([" ".join(w[k : k + 5]).encode() for k in range(max(1, len(w) - 4))])
            lsh.query(m)
            lsh.insert(str(i), m)
    elif engine == "ours_spark":
        from curation.dedup import DedupConfig, deduplicate
        from infra.config import SparkConfig
        from infra.spark import get_spark

        spark = get_spark(SparkConfig(master="local[1]", shuffle_partitions=4), app_name="bench-dedup")
        df = spark.createDataFrame([(d["doc_id"], d["url"], d["text"]) for d in docs], "doc_id string, url string, text string")
        df = df.repartition(max(1, n // 2000)).localCheckpoint()
        t0 = time.perf_counter()
        out, _ = deduplicate(df, DedupConfig(url=False, exact=False, lines=False))
        out.where("drop_reason IS NULL").count()
    seconds = time.perf_counter() - t0
    return {"engine": engine, "docs": n, "seconds": seconds, "docs_per_s": n / seconds}


def child(engine: str, n: int) -> dict:
    """Run one engine in a child process; add its peak RSS (MiB, largest process of its tree)."""
    cmd = [sys.executable, __file__, "--child", engine, "--docs", str(n)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO / "bench")
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{engine} failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    return result


DT_SCRIPT = r'''
import json, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
    MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.utils.hashing import HashConfig
work, n = sys.argv[1], int(sys.argv[2])
cfg = MinhashConfig(hash_config=HashConfig(precision=64), n_grams=5, num_buckets=14, hashes_per_bucket=8)
t0 = time.perf_counter()
for pipeline in (
    [JsonlReader(f"{work}/input"), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)],
    [MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg)],
    [MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids", config=cfg)],
    [JsonlReader(f"{work}/input"), MinhashDedupFilter(input_folder=f"{work}/remove_ids")],
):
    tasks = 14 if isinstance(pipeline[0], MinhashDedupBuckets) else 1
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs/{time.time_ns()}").run()
s = time.perf_counter() - t0
print(json.dumps({"engine": "datatrove", "docs": n, "seconds": s, "docs_per_s": n / s}))
'''


def datatrove(n: int) -> dict:
    """DataTrove's 4-step MinHash pipeline on the same documents, in its own venv."""
    import shutil

    py = DT_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(DT_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), "datatrove[io,processing]", "spacy", "orjson"], check=True)
    work = OUT / "datatrove_work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "input").mkdir(parents=True)
    with open(work / "input" / "docs.jsonl", "w") as fh:
        for d in expand(load_corpus(), n):
            fh.write(json.dumps({"id": d["doc_id"], "text": d["text"]}) + "\n")
    (work / "run.py").write_text(DT_SCRIPT)
    with open(work / "stderr.log", "w") as err:
        proc = subprocess.Popen([str(py), str(work / "run.py"), str(work), str(n)], stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        tail = (work / "stderr.log").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"datatrove failed: {' | '.join(tail)}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description="MinHash dedup throughput vs datasketch and DataTrove")
    ap.add_argument("--child")
    ap.add_argument("--docs", type=int, default=0, help="documents (default: the real set)")
    ap.add_argument("--scaling", default="", help="comma-separated sizes for the Spark scaling run")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_engine(args.child, args.docs)))
        return
    n = args.docs or len(load_corpus())
    words = sum(len(d["text"].split()) for d in load_corpus()) / len(load_corpus())
    print(f"{n} real documents, {words:.0f} words on average; one core per engine")
    results = {e: child(e, n) for e in ENGINES}
    try:
        results["datatrove"] = datatrove(n)
    except Exception as exc:  # reported, the other ratios still print
        print(f"datatrove: not measured ({exc})")
    for r in results.values():
        print(f"{r['engine']:14s} {r['docs_per_s']:9.0f} docs/s  {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mib']:7.1f} MiB")
    for size in [int(s) for s in args.scaling.split(",") if s]:
        r = child("ours_spark", size)
        print(f"scaling {size:7d} docs: {r['seconds']:7.1f} s  {r['docs_per_s']:6.0f} docs/s  peak RSS {r['peak_rss_mib']:.0f} MiB")
    limit = results["shingle_limit"]["docs_per_s"]
    print(f"ratio_core_vs_shingling_limit {results['ours_core']['docs_per_s'] / limit:.3f}")
    print(f"ratio_core_vs_datasketch {results['ours_core']['docs_per_s'] / results['datasketch']['docs_per_s']:.3f}")
    print(f"ratio_spark_stage_vs_datasketch {results['ours_spark']['docs_per_s'] / results['datasketch']['docs_per_s']:.3f}")
    if "datatrove" in results:
        print(f"ratio_vs_datatrove {results['ours_spark']['docs_per_s'] / results['datatrove']['docs_per_s']:.3f}")
    else:
        print("ratio_vs_datatrove nan")


if __name__ == "__main__":
    main()
