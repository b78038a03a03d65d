"""Extraction quality on trafilatura's evaluation pages: our ``extract`` core vs trafilatura's defaults.

For each page of ``../shared/data/trafilatura_eval`` (HTML + must-contain / must-not-contain
snippets) the text from :func:`curation.extract.extract_html` (charset from ingest's sniffer, the
stage's default config) and from a direct ``trafilatura.extract(html_bytes, url=url)`` call are
scored the same way: a snippet from ``with`` found = true positive, missing = false negative; a
snippet from ``without`` found = false positive. A page passes when it has no false negative and
no false positive. Last line: ``pass_ratio_vs_trafilatura <ours / direct>``.

    .venv/bin/python bench/extraction_quality.py [--limit N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from curation.extract import ExtractConfig, extract_html  # noqa: E402
from curation.ingest import sniff_charset  # noqa: E402


def score(text: str | None, must: list[str], must_not: list[str]) -> dict[str, int]:
    text = text or ""
    tp = sum(s in text for s in must)
    fp = sum(s in text for s in must_not)
    return {"tp": tp, "fn": len(must) - tp, "fp": fp, "tn": len(must_not) - fp, "pass": int(tp == len(must) and fp == 0)}


def summarize(name: str, scores: list[dict[str, int]], seconds: float) -> dict[str, float]:
    tot = {k: sum(s[k] for s in scores) for k in ("tp", "fn", "fp", "tn", "pass")}
    precision = tot["tp"] / max(tot["tp"] + tot["fp"], 1)
    recall = tot["tp"] / max(tot["tp"] + tot["fn"], 1)
    out = {
        "pages": len(scores), "pass_share": tot["pass"] / max(len(scores), 1), "precision": precision,
        "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-9),
        "pages_per_s": len(scores) / max(seconds, 1e-9),
    }
    print(f"{name:<28} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "trafilatura_eval")
    parser.add_argument("--limit", type=int, default=0, help="only the first N pages (0 = all 990)")
    args = parser.parse_args()
    import trafilatura

    entries = [json.loads(line) for line in (args.data / "manifest.jsonl").read_text().splitlines() if line.strip()]
    if args.limit:
        entries = entries[: args.limit]
    pages = [(e, gzip.decompress((args.data / e["html_gz"]).read_bytes())) for e in entries]
    cfg = ExtractConfig()
    ours, direct = [], []
    t_ours = t_direct = 0.0
    for entry, html in pages:
        t0 = time.perf_counter()
        result = extract_html(html, entry["url"], sniff_charset(html, None), cfg)
        t1 = time.perf_counter()
        direct_text = trafilatura.extract(html, url=entry["url"])
        t2 = time.perf_counter()
        t_ours += t1 - t0
        t_direct += t2 - t1
        ours.append(score(result.text, entry["with"], entry["without"]))
        direct.append(score(direct_text, entry["with"], entry["without"]))
    print(f"{len(pages)} pages from {args.data}; ours = extract_html with {cfg.model_dump()}")
    a = summarize("ours (refinery extract)", ours, t_ours)
    b = summarize("trafilatura.extract default", direct, t_direct)
    print(f"pass_ratio_vs_trafilatura {a['pass_share'] / max(b['pass_share'], 1e-9):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
