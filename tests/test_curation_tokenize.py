"""tokenizer + tokenize stages on Spark: shards read back by megatron-core itself, mixing, split, determinism."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import megatron_shards as ms
from curation.text_sources import read_documents, valid_text
from curation.tokenize import load_worker_tokenizer, split_of, tokenize_to_shards
from infra.runstore import MANIFEST, content_hash, listing, write_json_atomic

pytestmark = pytest.mark.slow  # a Spark session and three Spark runs

REPO = Path(__file__).resolve().parent.parent
WIKI = REPO / "tests" / "data" / "tokenize" / "wikitext2_valid.txt.gz"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"  # its tokenizer section trains one (demo.yaml copies SmolLM2's)
SCHEMA = pa.schema([(c, pa.string()) for c in ("doc_id", "url", "source", "text")])


def web_rows(shared: Path) -> list[dict]:
    """Dedup-like rows from real web text (Dolma CC docs) and Shakespeare, plus empty documents."""
    rows = []
    for name in ("cc_en_head-0091.jsonl.gz", "cc_en_head-0174.jsonl.gz"):
        with gzip.open(shared / "web_text_samples_dolma" / name, "rt") as fh:
            for i, line in enumerate(fh):
                doc = json.loads(line)
                rows.append({"doc_id": f"cc-{name[11:15]}-{i}", "url": doc["id"], "source": f"{name}@{i * 977}",
                             "text": doc["text"]})
    with gzip.open(shared / "tinyshakespeare" / "input.txt.gz", "rt") as fh:
        for i, piece in enumerate(re.split(r"\n\s*\n", fh.read())[:300]):
            rows.append({"doc_id": f"ts-{i}", "url": None, "source": f"input.txt@{i}", "text": piece})
    rows.append({"doc_id": "empty-1", "url": None, "source": "x.warc.gz@1", "text": ""})
    rows.append({"doc_id": "empty-2", "url": None, "source": "x.warc.gz@2", "text": " \n "})
    rows.append({"doc_id": "special", "url": "http://x", "source": "x.warc.gz@3", "text": "say <|im_end|> plainly"})
    return rows


def fake_completed_stage(run_root: Path, run_id: str, stage: str, rows: list[dict]) -> None:
    """A finished upstream stage (as the executor leaves it): data/ Parquet + manifest.json."""
    data = run_root / run_id / stage / "data"
    data.mkdir(parents=True)
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half], schema=SCHEMA), data / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:], schema=SCHEMA), data / "part-00001.parquet")
    out = {"path": str(data), "uri": data.as_uri(), "hash": content_hash(data), "files": listing(data),
           "run_id": run_id, "stage": stage}
    write_json_atomic(data.parent / MANIFEST, {"run_id": run_id, "stage": stage, "status": "completed",
                                               "outputs": {"data": out}})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data, spark):
    """Run store with a fake dedup output, an external jsonl source with a lone surrogate, a trained tokenizer."""
    from flows.registry import load_config
    from flows.registry import execute_stage

    root = tmp_path_factory.mktemp("tokenize")
    rows = web_rows(shared_data)
    fake_completed_stage(root / "runs", "up", "dedup", rows)
    extra = root / "extra.jsonl"
    lines = gzip.open(shared_data / "web_text_samples_dolma" / "provided_documents_000.json.gz", "rt").read().splitlines()
    extra.write_text("\n".join([*lines, '{"id": "broken", "text": "half an emoji \\ud83d here"}']) + "\n")
    sources = [
        {"name": "web", "path": None, "weight": 1.0},
        {"name": "wiki", "path": str(WIKI), "weight": 0.5, "doc_separator": r"\n(?= = [^=])"},
        {"name": "extra", "path": str(extra), "weight": 0.25},
    ]
    config = load_config(TINY_CONFIG, overrides={
        "run_root": str(root / "runs"), "spark.master": "local[2]", "tokenizer.vocab_size": 1000,
        "tokenizer.extra_paths": [str(WIKI)], "tokenize.sources": sources, "tokenize.split": "80,10,10",
        "tokenize.docs_per_shard": 60, "tokenize.encode_batch_size": 16,
    })
    manifest = execute_stage("tokenizer", config, "r1", from_ref="up/dedup")
    tokenizer_dir = Path(manifest["outputs"]["tokenizer"]["path"])
    texts = {r["doc_id"]: r["text"] for r in rows}
    order = {"web": [r["doc_id"] for r in rows]}  # each source's document order: files sorted, rows in order
    for name, path, sep in (("wiki", WIKI, r"\n(?= = [^=])"), ("extra", extra, None)):
        docs = list(read_documents(path, *([sep] if sep else [])))
        texts.update({d["doc_id"]: valid_text(d["text"])[0] for d in docs})
        order[name] = [d["doc_id"] for d in docs]
    return SimpleNamespace(root=root, config=config, tokenizer_dir=tokenizer_dir, texts=texts, rows=rows, order=order,
                           tokenizer=load_worker_tokenizer(str(tokenizer_dir / "tokenizer.json")))


@pytest.fixture(scope="module")
def core_run(setup, spark):
    """The stage's core called directly: (shards dir, per-shard stats, tokenizer info)."""
    cfg = setup.config.tokenize
    out = setup.root / "core-shards"
    stats, info = tokenize_to_shards(spark, cfg.sources, setup.root / "runs" / "up" / "dedup" / "data",
                                     setup.tokenizer_dir, out, cfg)
    return out, stats, info


def expected_tokens(setup, doc_id: str, eos_id: int) -> list[int]:
    return setup.tokenizer.encode(setup.texts[doc_id], add_special_tokens=False).ids + [eos_id]


def test_every_sequence_read_by_megatron_equals_the_tokenizer_output_of_its_document(setup, core_run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out, stats, info = core_run
    assert info["dtype"] == "uint16" and info["eos_id"] == 0
    by_source = {}
    for r in stats:
        by_source.setdefault(r["source_name"], []).append(r)
    assert sum(r["empty_docs"] for r in stats) == 2 and sum(r["repaired_docs"] for r in stats) == 1
    non_empty = len(setup.rows) - 2
    assert sum(r["docs"] for r in by_source["web"]) == non_empty
    assert sum(r["docs"] for r in by_source["wiki"]) == 60 and sum(r["docs"] for r in by_source["extra"]) == 11
    assert len([s for s in ms.list_shards(out) if s.startswith("web-train-")]) >= 4  # 280-odd train docs / 60
    seen = set()
    for name in ms.list_shards(out):
        source_name, split, part = name.split("-")
        dataset = IndexedDataset(str(out / name))
        side = ms.read_sidecar(out, name).to_pylist()
        assert len(dataset) == len(side) == next(r["docs"] for r in stats if r["shard"] == name)
        positions = [setup.order[source_name].index(r["doc_id"]) for r in side]
        assert positions == sorted(positions)  # input order
        assert {p // 60 for p in positions} == {int(part)}  # unit = the part-th run of 60 documents
        for i, row in enumerate(side):
            assert split_of(row["doc_id"], "80,10,10") == split
            assert dataset[i].tolist() == expected_tokens(setup, row["doc_id"], info["eos_id"])
            seen.add(row["doc_id"])
    assert len(seen) == non_empty + 60 + 11
    shard = next(n for n in ms.list_shards(out) if "special" in ms.read_sidecar(out, n).column("doc_id").to_pylist())
    seq = ms.read_sidecar(out, shard).column("doc_id").to_pylist().index("special")
    assert ms.trace_tokens(out, shard, seq)["source"] == "x.warc.gz@3"


def test_gpt_dataset_from_blend_draws_samples_equal_to_the_documents_tokens(setup, core_run):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from curation.tokenize import blend_document

    out, stats, info = core_run
    ms.write_blend(out, blend_document(stats, setup.config.tokenize.sources, info, "80,10,10"))
    blend = ms.load_blend(out)
    train_tokens = {r["source_name"]: 0 for r in stats}
    for r in stats:
        train_tokens[r["source_name"]] += r["tokens"] if r["split"] == "train" else 0
    source_weight = {}
    for w, prefix in blend["prefixes"]:
        source_weight[prefix.split("-")[0]] = source_weight.get(prefix.split("-")[0], 0) + w
    assert source_weight == pytest.approx({"web": 1 / 1.75, "wiki": 0.5 / 1.75, "extra": 0.25 / 1.75})
    tokenizer = SimpleNamespace(vocab_size=blend["vocab_size"], eod=blend["eos_id"], pad=blend["pad_id"],
                                unique_identifiers={"tokenizer": str(setup.tokenizer_dir)})
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=64, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, path_to_cache=None, **ms.megatron_blend_kwargs(out),
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [400, 40, 40], lambda: True, config).build()
    assert len(train) >= 400 and valid is not None and test is not None
    drawn = {}
    for i in range(120):  # consecutive: the blend interleaves sources by weight
        sample = train[i]
        gpt = train.datasets[int(train.dataset_index[i])]
        j = int(gpt.shuffle_index[int(train.dataset_sample_index[i])])
        (doc_beg, off_beg), (doc_end, _) = gpt.sample_index[j], gpt.sample_index[j + 1]
        side = ms.read_sidecar(out, Path(gpt.dataset_path).name).column("doc_id").to_pylist()
        full = [t for k in range(doc_beg, doc_end + 1)
                for t in expected_tokens(setup, side[gpt.document_index[k]], blend["eos_id"])]
        window = full[off_beg: off_beg + 65]
        assert sample["tokens"].tolist() == window[:-1] and sample["labels"].tolist() == window[1:]
        name = Path(gpt.dataset_path).name.split("-")[0]
        drawn[name] = drawn.get(name, 0) + 1
    assert set(drawn) == {"web", "wiki", "extra"}


def test_stage_via_executor_matches_core_byte_for_byte_and_traces_to_records(setup, core_run):
    from flows.registry import execute_stage

    out, stats, _ = core_run
    manifest = execute_stage("tokenize", setup.config, "r1", from_ref="up/dedup")
    shards = Path(manifest["outputs"]["shards"]["path"])
    names = ms.list_shards(shards)
    assert names == ms.list_shards(out)
    for name in names:  # two runs over the same input and config: identical tokens and index
        for suffix in (".bin", ".idx"):
            assert content_hash(shards / f"{name}{suffix}") == content_hash(out / f"{name}{suffix}")
    assert manifest["inputs"]["dedup/data"]["run_id"] == "up" and manifest["inputs"]["tokenizer/tokenizer"]["run_id"] == "r1"
    metrics = manifest["metrics"]
    assert metrics["docs"] == sum(r["docs"] for r in stats) and metrics["empty_docs_skipped"] == 2
    assert metrics["tokens"] == sum(ms.read_index(shards / n).num_tokens for n in names)
    table = manifest["tables"]["tokenize"]
    assert table[-1]["source"] == "all" and 2.0 < table[-1]["bytes_per_token"] < 6.0
    blend = json.loads((shards / "blend.json").read_text())
    assert blend["split"] == "100,0,0" and blend["doc_split"] == "80,10,10" and blend["dtype"] == "uint16"
    web_shard = next(n for n in names if n.startswith("web-train-"))
    traced = ms.trace_tokens(shards, web_shard, 0)
    row = next(r for r in setup.rows if r["doc_id"] == traced["doc_id"])
    assert traced["source"] == row["source"] and traced["url"] == row["url"]
    again = execute_stage("tokenize", setup.config, "r1", from_ref="up/dedup")
    assert again.get("skipped") is True

    # another run, both stages recomputed: the same content hashes (no run directory inside blend.json)
    execute_stage("tokenizer", setup.config, "r2", from_ref="up/dedup", force=True)
    other = execute_stage("tokenize", setup.config, "r2", from_ref="up/dedup", force=True)
    assert other["cached_from"] is None and "/r2/" in other["outputs"]["shards"]["path"]
    assert other["outputs"]["shards"]["hash"] == manifest["outputs"]["shards"]["hash"]
