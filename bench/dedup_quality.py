"""Near-duplicate benchmark on real pages: recall of pairs with true Jaccard ≥ 0.8, precision of the
removed documents, and the cluster count vs ground truth, for the Spark ``dedup`` fuzzy level.

Originals: the real pages of ../shared/data (bench/dedup_corpus.py). For a sample of them, variants
with controlled edits (replace / delete / insert / swap words, boilerplate header+footer,
truncation) at a range of strengths; the true Jaccard of every pair sharing a shingle is computed
exactly (sparse shingle matrix), so cross-page near-duplicates already in the real set count too.

    .venv/bin/python bench/dedup_quality.py [--variants-of 400]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from dedup_corpus import load_corpus

BOILERPLATE = [
    "Home | News | Sport | Weather | Contact us",
    "Subscribe to our newsletter and never miss a story.",
    "Cookies help us deliver our services. By using our services, you agree to our use of cookies.",
    "© 2024 All rights reserved. Privacy Policy · Terms of Service",
]


def make_variant(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    op = rng.choice(["replace", "delete", "insert", "swap", "boilerplate", "truncate", "mixed"])
    p = rng.uniform(0.002, 0.06)
    n = max(1, int(p * len(words)))
    if op in ("replace", "mixed"):
        for _ in range(n):
            words[rng.randrange(len(words))] = f"w{rng.randrange(10**6)}"
    if op in ("delete", "mixed"):
        for _ in range(min(n, len(words) - 10)):
            del words[rng.randrange(len(words))]
    if op == "insert":
        for _ in range(n):
            words.insert(rng.randrange(len(words)), rng.choice(["very", "really", "new", "the", "update"]))
    if op == "swap":
        for _ in range(n):
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
    if op == "truncate":
        words = words[: max(10, int(len(words) * rng.uniform(0.75, 0.99)))]
    out = " ".join(words)
    if op in ("boilerplate", "mixed"):
        out = "\n".join(rng.sample(BOILERPLATE, 2)) + "\n" + out + "\n" + rng.choice(BOILERPLATE)
    return out


def true_pairs(shingles: list[np.ndarray], min_j: float) -> dict[tuple[int, int], float]:
    """Every pair (i < j) with exact shingle Jaccard ≥ ``min_j`` (sparse X·Xᵀ intersections)."""
    from scipy import sparse

    vocab, inverse = np.unique(np.concatenate(shingles), return_inverse=True)
    rows = np.repeat(np.arange(len(shingles)), [len(s) for s in shingles])
    x = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, inverse)), shape=(len(shingles), len(vocab)))
    inter = sparse.triu(x @ x.T, k=1).tocoo()
    sizes = np.array([len(s) for s in shingles])
    jac = inter.data / (sizes[inter.row] + sizes[inter.col] - inter.data)
    keep = jac >= min_j
    return {(int(i), int(j)): float(v) for i, j, v in zip(inter.row[keep], inter.col[keep], jac[keep])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants-of", type=int, default=400, help="originals that get variants")
    ap.add_argument("--per-original", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.7)
    args = ap.parse_args()

    from curation.dedup import DedupConfig, deduplicate
    from curation.minhash import s_curve, shingle_hashes
    from infra.config import SparkConfig
    from infra.spark import get_spark

    rng = random.Random(0)
    docs = load_corpus()
    for d in rng.sample(docs, min(args.variants_of, len(docs))):
        for k in range(args.per_original):
            docs.append({"doc_id": f"v{d['doc_id'][1:]}_{k}", "url": f"{d['url']}#v{k}", "text": make_variant(d["text"], rng)})
    ids = [d["doc_id"] for d in docs]
    shingles = [shingle_hashes(d["text"]) for d in docs]
    gt = true_pairs(shingles, 0.5)
    gt08 = {p for p, j in gt.items() if j >= 0.8}
    print(f"documents {len(docs)} ({len(docs) - args.variants_of * args.per_original} originals), "
          f"pairs J>=0.8 {len(gt08)}, pairs J>=0.5 {len(gt)}")

    spark = get_spark(SparkConfig(master="local[2]", shuffle_partitions=4), app_name="bench-dedup-quality")
    df = spark.createDataFrame([(d["doc_id"], d["url"], d["text"]) for d in docs], "doc_id string, url string, text string")
    t0 = time.time()
    out, stats = deduplicate(df, DedupConfig(url=False, exact=False, lines=False, threshold=args.threshold))
    result = {r["doc_id"]: (r["dup_cluster"], r["dup_representative"]) for r in out.select("doc_id", "dup_cluster", "dup_representative").collect()}
    seconds = time.time() - t0
    cluster = {doc: (c or doc) for doc, (c, _) in result.items()}
    index = {doc: i for i, doc in enumerate(ids)}

    caught = sum(cluster[ids[i]] == cluster[ids[j]] for i, j in gt08)
    removed = [(doc, rep) for doc, (_, rep) in result.items() if rep]
    correct = sum(tuple(sorted((index[doc], index[rep]))) in gt for doc, rep in removed)
    # ground-truth clusters: components of the J >= 0.8 pairs
    parent = list(range(len(ids)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in gt08:
        parent[find(i)] = find(j)
    gt_multi = len({find(i) for p in gt08 for i in p})
    pred_multi = len({c for c, _ in result.values() if c})
    recall = caught / max(1, len(gt08))
    print(f"S-curve 14x8: {s_curve(14, 8)}")
    print(f"stage time {seconds:.1f} s; links {stats}")
    print(f"removed {len(removed)}; precision (removed doc has true J >= 0.5 with its representative) {correct / max(1, len(removed)):.4f}")
    print(f"clusters with >= 2 docs: predicted {pred_multi}, ground truth (J >= 0.8 components) {gt_multi}")
    print(f"recall_j08 {recall:.4f}")
    spark.stop()


if __name__ == "__main__":
    main()
