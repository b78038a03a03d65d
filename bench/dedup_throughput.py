"""MinHash dedup throughput, same documents, word 5-grams, 14 bands × 8 rows, equal cores per engine:

* shingling limit — normalise + build the set of 5-gram strings (the floor of any signature step);
* our signature core (curation.minhash: 64-bit MinHash compiled with numba, fused per batch) — ratio vs the shingling limit;
* datasketch — per-document MinHash.update_batch + MinHashLSH insert/query, single process;
* the ``minhash_backend: datasketch`` reference (``datasketch_backend``: datasketch's MinHash with our
  hash function and permutations, same signatures as our core; ``ours_spark_datasketch``: the Spark
  fuzzy level with that backend) — ``ratio_native_vs_datasketch_backend`` for the core and the stage;
* our Spark ``dedup`` fuzzy level (local[cores]: read Parquet, signatures, buckets, verification,
  connected components, kept count) with the project's Spark settings (in local mode the JVM's JIT
  is limited to C1, ``spark.local_c1_jit``) — and, at ``--docs``, once more with HotSpot's default
  tiered JIT (``ours_spark_tiered``, printed separately);
* DataTrove's MinHash pipeline (read JSONL, signature → buckets → cluster → filter,
  LocalPipelineExecutor with ``workers = cores``) in its own venv ``.venv-bench-datatrove``
  (created here with ``python -m venv`` + pip when missing).

Every engine runs in a child process pinned (``sched_setaffinity``, inherited by the JVM, Spark's
Python workers and DataTrove's processes) to the same ``--cores`` CPUs; docs/s and the peak RSS of
the child's whole process tree (sampled every 0.1 s) are reported. Per-process constants are not
timed: the Spark session start, our lookup tables and the loading of the compiled (numba, cached on
disk) MinHash kernels, DataTrove's imports.

Sizes: the real set (~1k documents) for every engine, then ``--docs`` (default 20,000: the real
set plus near-duplicate copies, see :func:`expand`) for our Spark stage and DataTrove — the
headline, since at 1k documents both mostly measure fixed start-up costs.
``--scaling 10000,50000,200000`` also times the Spark stage alone at those sizes (first;
``--scaling-only`` stops there).

    .venv/bin/python bench/dedup_throughput.py [--docs 20000] [--cores 1] [--scaling 10000,50000,200000 [--scaling-only]]
    .venv/bin/python bench/dedup_throughput.py --backends   # only native vs datasketch backend, real set
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time

from dedup_corpus import REPO, load_corpus

OUT = REPO / "bench" / "out"
DT_VENV = REPO / ".venv-bench-datatrove"
ENGINES = ("shingle_limit", "ours_core", "datasketch", "ours_spark")
BACKEND_ENGINES = ("ours_core", "datasketch_backend", "ours_spark", "ours_spark_datasketch")
SHARD_DOCS = 5000  # documents per input file (Parquet part / JSONL shard), as an upstream stage writes them


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


def input_dir(n: int):
    """The first ``n`` (expanded) documents as Parquet parts and JSONL shards, written once per size."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = OUT / "dedup_bench_input" / str(n)
    if not (folder / "complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "parquet").mkdir(parents=True)
        (folder / "jsonl").mkdir()
        docs = expand(load_corpus(), n)
        for k, start in enumerate(range(0, n, SHARD_DOCS)):
            shard = docs[start : start + SHARD_DOCS]
            pq.write_table(pa.Table.from_pylist(shard), folder / "parquet" / f"part-{k:05d}.parquet")
            with open(folder / "jsonl" / f"part-{k:05d}.jsonl", "w") as fh:
                fh.writelines(json.dumps({"id": d["doc_id"], "text": d["text"]}) + "\n" for d in shard)
        (folder / "complete").touch()
    return folder


def run_engine(engine: str, n: int, cores: int) -> dict:
    """Child-process body: time one engine on the first ``n`` (expanded) documents."""
    import pyarrow.parquet as pq

    from curation.minhash import normalize_text

    folder = input_dir(n)
    if not engine.startswith("ours_spark"):  # Spark reads the Parquet parts itself
        texts = pq.read_table(folder / "parquet", columns=["text"]).column("text").to_pylist()
    from curation.minhash import batch_signatures

    batch_signatures([""])  # builds the lookup tables, loads the compiled kernels (per-process constants)
    t0 = time.perf_counter()
    if engine == "shingle_limit":
        for t in texts:
            w = normalize_text(t).split()
            set(" ".join(w[i : i + 5]) for i in range(max(1, len(w) - 4)))
    elif engine == "ours_core":
        from curation.minhash import band_keys

        for start in range(0, len(texts), 1000):
            band_keys(batch_signatures(texts[start : start + 1000]))
    elif engine == "datasketch":
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(num_perm=112, params=(14, 8))
        for i, t in enumerate(texts):
            w = normalize_text(t).split()
            m = MinHash(num_perm=112)
            m.update_batch([" ".join(w[k : k + 5]).encode() for k in range(max(1, len(w) - 4))])
            lsh.query(m)
            lsh.insert(str(i), m)
    elif engine == "datasketch_backend":
        from curation.minhash import band_keys, datasketch_signatures

        for start in range(0, len(texts), 1000):
            band_keys(datasketch_signatures(texts[start : start + 1000]))
    elif engine.startswith("ours_spark"):
        from curation.dedup import DedupConfig, deduplicate
        from infra.config import SparkConfig
        from infra.spark import get_spark

        cfg = SparkConfig(master=f"local[{cores}]", local_c1_jit=engine == "ours_spark")
        spark = get_spark(cfg, app_name="bench-dedup")
        t0 = time.perf_counter()
        df = spark.read.parquet(str(folder / "parquet"))
        backend = "datasketch" if engine == "ours_spark_datasketch" else "native"
        out, _ = deduplicate(df, DedupConfig(url=False, exact=False, lines=False, minhash_backend=backend))
        out.where("drop_reason IS NULL").count()
    seconds = time.perf_counter() - t0
    return {"engine": engine, "docs": n, "seconds": seconds, "docs_per_s": n / seconds}


def measured(cmd: list[str], cpus: list[int], name: str, stderr=None) -> dict:
    """Run ``cmd`` pinned to ``cpus``; its last stdout line is a JSON result, to which the peak RSS
    (MiB, sum over the process tree, sampled every 0.1 s) is added."""
    import psutil

    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO / "bench",
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.wait(0.1):
            total = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for p in tree:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{name} failed (status {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = round(peak / 2**20, 1)
    return result


def child(engine: str, n: int, cpus: list[int]) -> dict:
    """One engine of ours (or a baseline in our venv) in a child process."""
    input_dir(n)  # written here, so the child's memory is the engine's alone
    cmd = [sys.executable, __file__, "--child", engine, "--docs", str(n), "--cores", str(len(cpus))]
    return measured(cmd, cpus, engine)


DT_SCRIPT = r"""
import json, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
    MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.utils.hashing import HashConfig
inp, work, n, workers, shards = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = MinhashConfig(hash_config=HashConfig(precision=64), n_grams=5, num_buckets=14, hashes_per_bucket=8)
t0 = time.perf_counter()
for tasks, pipeline in (
    (shards, [JsonlReader(inp), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)]),
    (14, [MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg)]),
    (1, [MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids", config=cfg)]),
    (shards, [JsonlReader(inp), MinhashDedupFilter(input_folder=f"{work}/remove_ids")]),
):
    logs = f"{work}/logs/{time.time_ns()}"
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=logs).run()
s = time.perf_counter() - t0
print(json.dumps({"engine": "datatrove", "docs": n, "seconds": s, "docs_per_s": n / s}))
"""


def datatrove(n: int, cpus: list[int]) -> dict:
    """DataTrove's 4-step MinHash pipeline on the same documents (JSONL shards), in its own venv."""
    import shutil

    py = DT_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(DT_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), "datatrove[io,processing]", "spacy", "orjson"], check=True)
    jsonl = input_dir(n) / "jsonl"
    work = OUT / "datatrove_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "run.py").write_text(DT_SCRIPT)
    shards = len(list(jsonl.glob("*.jsonl")))
    with open(work / "stderr.log", "w") as err:
        cmd = [str(py), str(work / "run.py"), str(jsonl), str(work), str(n), str(len(cpus)), str(shards)]
        try:
            return measured(cmd, cpus, "datatrove", stderr=err)
        except RuntimeError as exc:
            tail = (work / "stderr.log").read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"{exc}: {' | '.join(tail)}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description="MinHash dedup throughput vs datasketch and DataTrove")
    ap.add_argument("--child")
    ap.add_argument("--docs", type=int, default=20_000, help="documents for the headline Spark vs DataTrove comparison")
    ap.add_argument("--cores", type=int, default=1, help="CPUs every engine is pinned to (Spark local[cores], DataTrove workers)")
    ap.add_argument("--scaling", default="", help="comma-separated sizes for the Spark scaling run")
    ap.add_argument("--scaling-only", action="store_true", help="only the scaling run (no comparison, no ratios)")
    ap.add_argument("--backends", action="store_true", help="only native vs datasketch backend on the real set")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_engine(args.child, args.docs, args.cores)))
        return
    cpus = sorted(os.sched_getaffinity(0))[: args.cores]
    real = load_corpus()
    words = sum(len(d["text"].split()) for d in real) / len(real)
    print(f"{len(real)} real documents, {words:.0f} words on average; every engine pinned to CPUs {cpus}")
    print(f"load avg before {os.getloadavg()}")

    def report(r: dict) -> None:
        print(
            f"{r['engine']:14s} {r['docs']:7d} docs {r['docs_per_s']:8.0f} docs/s  {r['seconds']:7.2f} s"
            f"  peak RSS {r['peak_rss_mib']:7.1f} MiB", flush=True,
        )

    def with_datatrove(n: int) -> dict | None:
        try:
            return datatrove(n, cpus)
        except Exception as exc:  # reported, the other ratios still print
            print(f"datatrove at {n} docs: not measured ({exc})")
            return None

    for size in [int(s) for s in args.scaling.split(",") if s]:
        r = child("ours_spark", size, cpus)
        print(
            f"scaling {size:7d} docs: {r['seconds']:7.1f} s  {r['docs_per_s']:6.0f} docs/s"
            f"  peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True,
        )
    if args.scaling_only:
        print(f"load avg after {os.getloadavg()}")
        return
    if args.backends:
        small = {e: child(e, len(real), cpus) for e in BACKEND_ENGINES}
        for r in small.values():
            report(r)
        print(f"load avg after {os.getloadavg()}")
        core = small["ours_core"]["docs_per_s"] / small["datasketch_backend"]["docs_per_s"]
        stage = small["ours_spark"]["docs_per_s"] / small["ours_spark_datasketch"]["docs_per_s"]
        print(f"ratio_spark_stage_native_vs_datasketch_backend {stage:.3f}")
        print(f"ratio_native_vs_datasketch_backend {core:.3f}")
        return
    small = {e: child(e, len(real), cpus) for e in ENGINES}
    small["datatrove"] = with_datatrove(len(real))
    for r in small.values():
        if r:
            report(r)
    large = {e: child(e, args.docs, cpus) for e in ("ours_spark", "ours_spark_tiered")}
    large["datatrove"] = with_datatrove(args.docs)
    for r in large.values():
        if r:
            report(r)
    print(f"load avg after {os.getloadavg()}")

    def ratio(ours: dict, theirs: dict | None) -> str:
        return f"{ours['docs_per_s'] / theirs['docs_per_s']:.3f}" if theirs else "nan"

    print(f"ratio_core_vs_shingling_limit {ratio(small['ours_core'], small['shingle_limit'])}")
    print(f"ratio_core_vs_datasketch {ratio(small['ours_core'], small['datasketch'])}")
    print(f"ratio_spark_stage_vs_datasketch {ratio(small['ours_spark'], small['datasketch'])}")
    print(f"ratio_vs_datatrove_at_{len(real)}_docs {ratio(small['ours_spark'], small['datatrove'])}")
    print(f"ratio_vs_datatrove_tiered_jit_at_{args.docs}_docs {ratio(large['ours_spark_tiered'], large['datatrove'])}")
    print(f"ratio_vs_datatrove {ratio(large['ours_spark'], large['datatrove'])}")


if __name__ == "__main__":
    main()
