"""The real documents the dedup benchmarks share: the trafilatura_eval pages and the WARC samples of
../shared/data, main text extracted with trafilatura once and cached in bench/out/dedup_corpus.jsonl."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
CACHE = REPO / "bench" / "out" / "dedup_corpus.jsonl"


def load_corpus(min_words: int = 50) -> list[dict]:
    """``[{doc_id, url, text}]`` of every page with at least ``min_words`` words (cached)."""
    if not CACHE.exists():
        import trafilatura
        from tqdm import tqdm

        from curation.quality import read_texts

        docs = []
        manifest = [json.loads(line) for line in open(SHARED / "trafilatura_eval" / "manifest.jsonl")]
        for m in tqdm(manifest, desc="extract trafilatura_eval", file=sys.stderr):
            html = gzip.open(SHARED / "trafilatura_eval" / m["html_gz"]).read().decode("utf-8", "replace")
            text = trafilatura.extract(html)
            if text:
                docs.append({"url": m["url"], "text": text})
        for warc in sorted((SHARED / "warc_samples").rglob("*.warc.gz")):
            docs += [{"url": f"{warc.name}#{i}", "text": t} for i, t in enumerate(read_texts(warc))]
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        tmp.replace(CACHE)
    docs = [json.loads(line) for line in open(CACHE)]
    docs = [d for d in docs if len(d["text"].split()) >= min_words]
    return [{"doc_id": f"o{i:05d}", **d} for i, d in enumerate(docs)]
