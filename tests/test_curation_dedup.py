"""dedup: URL/exact/line/fuzzy levels on real web text, bad input, a 10k-identical cluster, and a
rerun of the stage alone with another threshold from an earlier run."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from curation.components import connected_components
from curation.dedup import DedupConfig, deduplicate, normalize_url, text_key
from curation.minhash import line_hashes
from infra.runstore import content_hash, listing, write_json_atomic

# a config file with no sections: every stage at its defaults (independent of configs/demo.yaml)
MINIMAL_CONFIG = Path(__file__).parent / "data" / "quality" / "minimal_config.yaml"


def real_docs(shared_data) -> list[str]:
    """The 30 Dolma Common Crawl documents plus WikiText paragraphs of ≥ 80 words."""
    docs = []
    base = shared_data / "web_text_samples_dolma"
    for name in ("cc_en_head-0091.jsonl.gz", "cc_en_head-0174.jsonl.gz", "provided_documents_000.json.gz"):
        docs += [json.loads(line)["text"] for line in gzip.open(base / name, "rt")]
    paras = gzip.open(shared_data / "wikitext2_valid_test" / "valid.txt.gz", "rt").read().split("\n \n")
    docs += [p.strip() for p in paras if len(p.split()) >= 80 and not p.strip().startswith("=")][:30]
    return docs


def edit_words(text: str, n: int, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split(" ")
    for _ in range(n):
        words[rng.randrange(len(words))] = f"xq{rng.randrange(10**6)}"
    return " ".join(words)


def row(doc_id, text, url=None, fetch_date="2024-01-01T00:00:00Z", quality=0.5):
    return {
        "doc_id": doc_id, "url": url or f"https://example.org/{doc_id}", "fetch_date": fetch_date, "text": text,
        "quality_score": quality, "lang": "en", "signals": {"words": len(text.split())}, "drop_reason": None,
    }


SCHEMA = (
    "doc_id string, url string, fetch_date string, text string, quality_score double, lang string, "
    "signals struct<words:int>, drop_reason string"
)


@pytest.fixture(scope="module")
def corpus(shared_data):
    docs = [d for d in real_docs(shared_data) if len(d.split()) >= 120]
    rows = [row(f"d{i:03d}", d) for i, d in enumerate(docs)]
    long_a, long_b, long_c = docs[0], docs[1], docs[2]
    rows += [
        # URL duplicates of d000: same page refetched; the newest fetch is kept
        row("u1", edit_words(long_a, 30, 1), url="HTTP://www.example.org/d000/?utm_source=x#top", fetch_date="2025-06-01T00:00:00Z"),
        row("u2", edit_words(long_a, 60, 2), url="https://example.org:443/d000", fetch_date="2023-01-01T00:00:00Z"),
        # exact duplicate of d001 up to case/whitespace/unicode form; higher quality wins
        row("e1", "  " + long_b.upper().replace(" ", "\u00a0 ") + "\n", quality=0.9),
        # near duplicates of d002 (~3 edits per 100 words); lower quality than d002
        row("n1", edit_words(long_c, 4, 3), quality=0.4),
        row("n2", edit_words(long_c, 6, 4), quality=0.5),  # ties d002 on quality: smaller doc_id (d002) wins
        # bad input
        row("x_empty", ""), row("x_blank", " \n\t "), row("x_punct", "!!! ..."),
        row("x_short1", "tiny doc"), row("x_short2", "another tiny doc"),
    ]
    # a boilerplate footer repeated in 8 documents (> line_max_docs=5) is removed from each
    footer = "Copyright 2024 Example Media Group. All rights reserved. Privacy policy | Terms of use"
    for i in range(10, 18):
        rows[i]["text"] = rows[i]["text"] + "\n" + footer
    return rows


def test_pure_helpers():
    assert normalize_url("HTTPS://WWW.Example.org:443/a/b/?utm_medium=m&b=2&a=1#frag") == "example.org/a/b?a=1&b=2"
    assert normalize_url("http://example.org") == normalize_url("https://example.org/") == "example.org/"
    assert normalize_url("http://example.org:8080/x") == "example.org:8080/x"
    assert normalize_url("http://example.org:bad/x") == "http://example.org:bad/x"
    assert normalize_url("") is None and normalize_url(None) is None
    assert text_key("Hello,  World") == text_key("hello world!") and text_key("ﬁ") == text_key("fi")
    assert text_key("") is None and text_key(" ... ") is None
    hashes = line_hashes("A line\n\nB LINE.\na line!")
    assert len(hashes) == 4 and hashes[1] is None and hashes[0] == hashes[3] != hashes[2]


def test_stage_all_levels_then_rerun_alone_with_other_threshold(spark, corpus, make_config, tmp_path):
    """The dedup stage on real text with every level on; then dedup alone in a new run, its input
    taken from the first run (``--from``), with a threshold no edited near-duplicate reaches."""
    from flows.registry import execute_stage

    data = tmp_path / "quality_data"
    spark.createDataFrame(corpus, SCHEMA).coalesce(1).write.parquet(str(data))
    seed_stage(tmp_path / "runs", "r1", "quality", {"data": data})
    first = execute_stage("dedup", make_config(path=MINIMAL_CONFIG, overrides={"dedup.line_max_docs": 5}), "r1")
    stats = first["metrics"]
    assert stats["s_curve"]["0.80"] == pytest.approx(0.924, abs=0.001)
    out = spark.read.parquet(first["outputs"]["data"]["path"]).unionByName(spark.read.parquet(first["outputs"]["rejected"]["path"]))
    rows = {r["doc_id"]: r.asDict(recursive=True) for r in out.collect()}
    assert len(rows) == len(corpus) == stats["rows_in"]
    reason = {k: v["drop_reason"] for k, v in rows.items()}
    # URL level: u1 is the newest fetch of the normalised URL
    assert reason["u1"] is None and reason["d000"] == reason["u2"] == "dup_url"
    assert rows["d000"]["dup_representative"] == "u1"
    # exact level: e1 normalises to d001 and has the higher quality score
    assert reason["e1"] is None and reason["d001"] == "dup_exact" and rows["d001"]["dup_representative"] == "e1"
    # fuzzy level: one cluster {d002, n1, n2}; d002 and n2 tie on quality → smallest doc_id d002 kept
    assert reason["d002"] is None and reason["n1"] == reason["n2"] == "dup_fuzzy"
    assert rows["n1"]["dup_representative"] == rows["n2"]["dup_representative"] == "d002"
    assert rows["n1"]["dup_cluster"] == rows["d002"]["dup_cluster"] == "d002"
    # bad input: empty / whitespace / punctuation-only recorded as drops; short docs kept, not clustered
    assert reason["x_empty"] == reason["x_blank"] == reason["x_punct"] == "empty_text"
    assert reason["x_short1"] is None and reason["x_short2"] is None and rows["x_short1"]["dup_cluster"] is None
    # line level: the footer is gone from all 8 documents, which keep their ids
    for i in range(10, 18):
        r = rows[f"d{i:03d}"]
        assert "All rights reserved" not in r["text"] and r["lines_removed"] == 1
    assert rows["d020"]["lines_removed"] == 0 and stats["lines_removed"] == 8
    # every other original is untouched and kept; pass-through columns survive
    untouched = [f"d{i:03d}" for i in range(3, len(corpus) - 10) if i not in range(10, 18)]
    assert all(reason[d] is None and rows[d]["dup_cluster"] is None for d in untouched)
    assert rows["d005"]["signals"]["words"] > 0 and rows["d005"]["lang"] == "en"
    assert stats["fuzzy_clusters"] == 1 and stats["fuzzy_verified_links"] >= 2
    strict = make_config(path=MINIMAL_CONFIG, overrides={"dedup.line_max_docs": 5, "dedup.threshold": 1.0})
    second = execute_stage("dedup", strict, "r2", from_ref="r1")
    assert second["inputs"]["quality/data"]["run_id"] == "r1" and not second.get("skipped")
    assert "dup_fuzzy" not in second["metrics"]["drop_reasons"]
    assert second["metrics"]["kept"] == stats["kept"] + 2
    assert execute_stage("dedup", strict, "r2", from_ref="r1").get("skipped")  # unchanged: not recomputed


def union_find_components(edges) -> dict[str, str]:
    """Reference: node → smallest node of its component."""
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def test_connected_components_equal_union_find(spark):
    """Shuffled long paths (many rounds), a cycle, random sparse edges, repeats, both orientations
    and self-loops: Spark's components equal a union-find's."""
    rng = random.Random(7)
    edges = []
    for path in range(3):
        nodes = [f"p{path}_{i:03d}" for i in range(150)]
        rng.shuffle(nodes)  # ids not in path order, so min-label moves slowly
        edges += list(zip(nodes, nodes[1:]))
    cycle = [f"c{i:02d}" for i in range(30)]
    edges += list(zip(cycle, cycle[1:] + cycle[:1]))
    edges += [(f"r{rng.randrange(400):03d}", f"r{rng.randrange(400):03d}") for _ in range(300)]
    edges += [(b, a) for a, b in edges[:50]] + edges[:20] + [("self", "self")]
    rng.shuffle(edges)
    expected = union_find_components([e for e in edges if e[0] != e[1]])
    df = spark.createDataFrame(edges, "src string, dst string").repartition(3)
    components, rounds = connected_components(df)
    got = {r["node"]: r["component"] for r in components.collect()}
    assert got == expected
    assert components.count() == len(expected)  # one row per node
    assert rounds > 2  # the shuffled paths needed several rounds


@pytest.mark.slow
def test_giant_identical_cluster_stays_distributed(spark, shared_data):
    """10k identical documents through the fuzzy path (exact level off): one cluster, one kept doc."""
    text = real_docs(shared_data)[0]
    rows = [(f"g{i:05d}", f"https://example.org/g{i}", text) for i in range(10_000)]
    rows.append(("z_other", "https://example.org/other", real_docs(shared_data)[1]))
    df = spark.createDataFrame(rows, "doc_id string, url string, text string").repartition(4)
    out, stats = deduplicate(df, DedupConfig(url=False, exact=False, lines=False))
    summary = {
        (r["drop_reason"], r["dup_cluster"], r["dup_representative"]): r["count"]
        for r in out.groupBy("drop_reason", "dup_cluster", "dup_representative").count().collect()
    }
    assert summary == {(None, "g00000", None): 1, ("dup_fuzzy", "g00000", "g00000"): 9999, (None, None, None): 1}
    assert stats["fuzzy_clusters"] == 1
    # star links to each bucket's smallest member, not all pairs: ≤ one link per document
    assert stats["fuzzy_candidate_links"] == 9999


def seed_stage(run_root, run_id, stage, outputs: dict):
    """Record a finished upstream stage (as the executor would) whose outputs are existing folders."""
    d = run_root / run_id / stage
    d.mkdir(parents=True, exist_ok=True)
    manifest = {
        "run_id": run_id, "stage": stage, "status": "completed", "cache_key": f"seeded-{stage}",
        "outputs": {
            name: {"path": str(p), "uri": p.as_uri(), "hash": content_hash(p), "files": listing(p), "run_id": run_id, "stage": stage}
            for name, p in outputs.items()
        },
        "metrics": {},
    }
    write_json_atomic(d / "manifest.json", manifest)


def test_datasketch_backend_same_clusters_as_native_and_minhash_lsh(spark, corpus):
    """The fuzzy level on real pages with near copies at 2–6% word edits (estimated Jaccard on both
    sides of the 0.7 threshold): clusters with ``minhash_backend: datasketch`` equal the native ones,
    and both equal a reference built on datasketch alone — LeanMinHash signatures in a MinHashLSH
    (14 × 8), each bucket linked to its smallest doc_id, links kept when LeanMinHash.jaccard ≥ 0.7,
    union-find."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    from curation.minhash import EMPTY, MinHashParams, datasketch_signatures

    rows = [dict(r) for r in corpus]
    for i in range(3, 13):
        rows += [row(f"f{i:03d}_{k}", edit_words(rows[i]["text"], max(1, len(rows[i]["text"].split()) * pct // 100), 10 * i + k))
                 for k, pct in enumerate((2, 4, 6))]
    df = spark.createDataFrame(rows, SCHEMA)

    def clusters(backend: str) -> set[frozenset[str]]:
        cfg = DedupConfig(url=False, exact=False, lines=False, minhash_backend=backend)
        out, stats = deduplicate(df, cfg)
        groups: dict[str, set[str]] = {}
        for r in out.where("dup_cluster IS NOT NULL").select("doc_id", "dup_cluster").collect():
            groups.setdefault(r["dup_cluster"], set()).add(r["doc_id"])
        return {frozenset(g) for g in groups.values()}, stats

    params = MinHashParams()
    sigs = datasketch_signatures([r["text"] for r in rows], params)
    lsh, sketches = MinHashLSH(num_perm=params.num_perm, params=(params.bands, params.rows)), {}
    for r, sig in zip(rows, sigs):
        if not (sig == EMPTY).all():  # no shingles: never a candidate
            sketches[r["doc_id"]] = LeanMinHash(MinHash(hashvalues=sig, seed=params.seed, scheme="affine64"))
            lsh.insert(r["doc_id"], sketches[r["doc_id"]])
    parent = {d: d for d in sketches}

    def find(d):
        while parent[d] != d:
            d = parent[d]
        return d

    rejected = 0
    for table in lsh.hashtables:
        for key in table.keys():
            members = sorted(table.get(key))
            for m in members[1:]:
                if sketches[m].jaccard(sketches[members[0]]) >= 0.7:
                    parent[find(m)] = find(members[0])
                else:
                    rejected += 1
    groups: dict[str, set[str]] = {}
    for d in sketches:
        groups.setdefault(find(d), set()).add(d)
    reference = {frozenset(g) for g in groups.values() if len(g) > 1}
    native, native_stats = clusters("native")
    assert len(reference) >= 8 and rejected > 0  # several clusters, and verification dropped some links
    assert native == reference
    backend, backend_stats = clusters("datasketch")
    assert backend == reference and backend_stats == native_stats
