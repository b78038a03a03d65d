"""Tokens/s of the Spark ``tokenize`` stage vs a bare ``encode_batch`` loop writing the same ``.bin``.

Same text (real: WikiText-2 valid+test, Tiny Shakespeare, Dolma CC samples, repeated with distinct
doc ids up to ``--mb``), same tokenizer (byte-level BPE trained here), same run. The bare loop is
the limit: text already in memory as str, one process, ``encode_batch`` (all cores) + EOS + one
``.bin`` write, documents in input order. The Spark side is ``tokenize_to_shards`` from Parquet
(unit plan from the footers, one task per core, each unit: read, split by doc_id, encode, write ``.bin``/
``.idx``/sidecar per split) on a warm session (a discarded warm-up run first). Bare and Spark run in
adjacent pairs; the headline is the median of the pairs' ratios (the machine is shared and its load
drifts). Checks that the bare ``.bin`` equals the Spark shards' documents concatenated in input
order (same work), and prints the content hashes of every Spark run's ``.bin``/``.idx`` (all equal =
deterministic) and the load average. Last line: ``ratio_vs_bare_encode <x>``.

    .venv/bin/python bench/tokenize_throughput.py --mb 12 --pairs 3
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def real_documents(shared: Path) -> list[str]:
    docs = []
    for name in ("valid.txt.gz", "test.txt.gz"):
        text = gzip.open(shared / "wikitext2_valid_test" / name, "rt").read()
        docs += [p for p in re.split(r"\n(?= = [^=])", text) if p.strip()]
    text = gzip.open(shared / "tinyshakespeare" / "input.txt.gz", "rt").read()
    docs += [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    for f in sorted((shared / "web_text_samples_dolma").glob("*.json*.gz")):
        docs += [json.loads(line)["text"] for line in gzip.open(f, "rt")]
    return docs


def build_corpus(shared: Path, mb: float, out: Path) -> list[dict]:
    """Write a dedup-like Parquet dir of ~``mb`` MB of text; returns its rows in input (= doc_id) order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = real_documents(shared)
    rows, size, rep = [], 0, 0
    while size < mb * 1e6:
        for i, text in enumerate(base):
            rows.append({"doc_id": f"{rep:04d}-{i:06d}", "url": None, "source": f"bench@{rep}:{i}", "text": text})
            size += len(text.encode())
        rep += 1
    out.mkdir(parents=True)
    per_file = len(rows) // 8 + 1
    for k in range(0, len(rows), per_file):
        pq.write_table(pa.Table.from_pylist(rows[k:k + per_file]), out / f"part-{k // per_file:05d}.parquet")
    return rows


def bare_encode(texts: list[str], tokenizer_json: str, eos_id: int, batch: int, out: Path) -> int:
    """The limit: encode_batch + EOS per document, appended to one .bin."""
    import numpy as np

    from curation.tokenize import encode_documents, load_worker_tokenizer

    tok = load_worker_tokenizer(tokenizer_json)
    total = 0
    with open(out, "wb") as fh:
        for k in range(0, len(texts), batch):
            tokens, lengths = encode_documents(tok, texts[k:k + batch], eos_id, np.uint16)
            fh.write(tokens.tobytes())
            total += len(tokens)
    return total


def documents_in_order(shards: Path, doc_ids: list[str]) -> bytes:
    """The tokens of every document of every shard, concatenated in ``doc_ids`` order."""
    from curation.megatron_shards import list_shards, read_index, read_sidecar

    by_id = {}
    for name in list_shards(shards):
        index, data = read_index(shards / name), (shards / f"{name}.bin").read_bytes()
        for doc_id, start, n in zip(read_sidecar(shards, name).column("doc_id").to_pylist(), index.pointers, index.lengths):
            by_id[doc_id] = data[int(start): int(start) + int(n) * index.dtype.itemsize]
    return b"".join(by_id[d] for d in doc_ids)


def shard_hash(shards: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(shards.glob("*.bin")) + sorted(shards.glob("*.idx")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=24.0, help="MB of text to tokenize")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved bare/spark pairs (median ratio)")
    parser.add_argument("--docs-per-shard", type=int, default=2000, help="documents per unit (one shard per unit and split)")
    args = parser.parse_args()

    from curation.tokenize import TokenizeConfig, tokenize_to_shards
    from curation.tokenizer import TokenizerConfig, save_hf_tokenizer, tokenizer_info, train_bpe
    from infra.config import SparkConfig
    from infra.spark import get_spark

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="tokenize-bench-"))
    rows = build_corpus(args.shared, args.mb, work / "data")
    texts = [r["text"] for r in rows]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tcfg = TokenizerConfig(vocab_size=8192)
    save_hf_tokenizer(train_bpe(real_documents(args.shared), tcfg.vocab_size, tcfg.special_tokens()), work / "tok", tcfg)
    info = tokenizer_info(work / "tok")
    cfg = TokenizeConfig(docs_per_shard=args.docs_per_shard)
    t0 = time.time()
    spark = get_spark(SparkConfig(master=args.master, shuffle_partitions=4))
    print(f"corpus: {len(texts)} docs, {mb:.1f} MB; spark session start {time.time() - t0:.1f} s (not counted)")

    warm = work / "warm"  # first Spark job pays JVM/JIT warm-up: run one on two files, discarded
    warm.mkdir()
    for f in sorted((work / "data").glob("*.parquet"))[:2]:
        (warm / f.name).symlink_to(f)
    tokenize_to_shards(spark, cfg.sources, warm, work / "tok", work / "shards-warm", cfg)

    ratios, hashes, bare_tokens, spark_tokens = [], [], 0, 0
    for run in range(args.pairs):  # adjacent pairs: the shared machine's load drifts between pairs
        t0 = time.time()
        bare_tokens = bare_encode(texts, str(work / "tok" / "tokenizer.json"), info["eos_id"], cfg.encode_batch_size,
                                  work / f"bare-{run}.bin")
        bare_s = time.time() - t0
        t0 = time.time()
        stats, _ = tokenize_to_shards(spark, cfg.sources, work / "data", work / "tok", work / f"shards-{run}", cfg)
        spark_s = time.time() - t0
        spark_tokens = sum(r["tokens"] for r in stats)
        hashes.append(shard_hash(work / f"shards-{run}"))
        ratios.append(bare_s / spark_s)
        print(f"pair {run}: bare {bare_tokens / bare_s:,.0f} tok/s ({bare_s:.1f} s), "
              f"spark {spark_tokens / spark_s:,.0f} tok/s ({spark_s:.1f} s, {len(stats)} shards), ratio {ratios[-1]:.3f}")
    spark.stop()
    if bare_tokens != spark_tokens:
        raise SystemExit(f"token counts differ: bare {bare_tokens} vs spark {spark_tokens}")
    if documents_in_order(work / "shards-0", [r["doc_id"] for r in rows]) != (work / "bare-0.bin").read_bytes():
        raise SystemExit("the bare .bin differs from the Spark shards' documents in input order")
    print(f"tokens: {spark_tokens:,} ({mb * 1e6 / spark_tokens:.2f} bytes/token); bare .bin == Spark documents in input order")
    print("load average 1/5/15 min: before %.2f %.2f %.2f, after %.2f %.2f %.2f" % (*load_before, *os.getloadavg()))
    print(f"content hash of .bin/.idx per run: {hashes}, all equal: {len(set(hashes)) == 1}")
    shutil.rmtree(work)
    print(f"ratio_vs_bare_encode {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
