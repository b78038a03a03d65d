"""bench/scaling.py's synthetic expansion of real pages: the duplicate rates it claims, distinct
documents that are not near duplicates of each other, and near copies that are; and the sweep's FLOP
accounting in bench/pretrain_throughput.py against the parameter count written out by hand."""

from __future__ import annotations

import gzip
import json
import sys
from argparse import Namespace
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def test_expand_duplicate_rates_and_distinctness(shared_data):
    from scaling import DUP_RATES, expand

    from curation.dedup import normalize_url
    from curation.minhash import batch_signatures, estimated_jaccard

    base_dir = shared_data / "web_text_samples_dolma"
    # the packed WARC pages' URLs end in a #copyN fragment, which URL dedup drops
    base = [{"doc_id": "x", "url": f"https://e.org/{i}#copy{i % 3}", "fetch_date": None, "text": json.loads(line)["text"], "lang": "en"}
            for f in sorted(base_dir.glob("*.gz")) for i, line in enumerate(gzip.open(f, "rt"))]
    docs = list(expand(base, 3000, seed=1))
    assert len(docs) == 3000 and len({d["doc_id"] for d in docs}) == 3000
    assert all(d["lang"] == "en" for d in docs)  # other columns pass through
    kind = Counter("url" if "?syn=" in d["url"] and d["fetch_date"] != "2024-01-01T00:00:00Z" else
                   "exact" if "copy=" in d["url"] else "near" if "near=" in d["url"] else "distinct" for d in docs)
    for k, rate in DUP_RATES.items():
        assert abs(kind[k] / 3000 - rate) < 0.03, (k, kind)
    distinct_docs = [d for d in docs if "near=" not in d["url"] and "copy=" not in d["url"] and d["fetch_date"] == "2024-01-01T00:00:00Z"]
    assert len({normalize_url(d["url"]) for d in distinct_docs}) == len(distinct_docs)  # URL dedup keeps them all
    distinct = [d["text"] for d in distinct_docs][:200]
    sigs = batch_signatures(distinct)
    same_page = [(i, j) for i in range(60) for j in range(i + 1, 60)]
    assert max(estimated_jaccard(sigs[i], sigs[j]) for i, j in same_page) < 0.3  # 30 pages, 60 docs: many from one page
    by_id = {d["doc_id"]: d for d in docs}
    near = [d for d in docs if "&near=" in d["url"]][:50]
    sources = [by_id[next(x["doc_id"] for x in docs if x["url"] == d["url"].split("&near=")[0])] for d in near]
    pair = batch_signatures([d["text"] for d in near] + [s["text"] for s in sources])
    est = [estimated_jaccard(pair[i], pair[50 + i]) for i in range(50)]
    assert np.median(est) > 0.7


def test_sweep_flops_per_token_by_hand():
    from pretrain_throughput import flops_per_token, gemms, shape_args

    args = Namespace(mbs=4, seq=256, layers=2)
    shape_args(args, 512)
    assert (args.ffn, args.heads) == (1368, 8)
    h, f, kv, vocab = 512, 1368, 256, 384  # GQA: 4 query groups of 64 → K and V 256 wide; 257 tokens padded to 384
    weights = 2 * (h * (h + 2 * kv) + h * h + h * 2 * f + f * h) + h * vocab
    assert flops_per_token(args) == 6 * weights + 12 * 2 * h * 256
    assert all(2 * m * k * n == 2 * 1024 * weights_k_n for (m, k, n, _), weights_k_n in
               zip(gemms(args)[::3], [h * (h + 2 * kv), h * h, h * 2 * f, f * h, h * vocab]))
