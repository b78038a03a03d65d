"""Megatron shard format, tokenizer training and the bad-input paths of tokenize (no Spark)."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curation import megatron_shards as ms
from curation.text_sources import read_documents, valid_text
from curation.tokenize import ROW_FIELDS, encode_documents, load_worker_tokenizer, split_of, write_shards
from curation.tokenizer import TokenizerConfig, save_hf_tokenizer, tokenizer_info, train_bpe

REPO = Path(__file__).resolve().parent.parent
WIKI = REPO / "tests" / "data" / "tokenize" / "wikitext2_valid.txt.gz"
WIKI_SEPARATOR = r"\n(?= = [^=])"


def as_rows(dicts: list[dict]):
    return (tuple(d[f] for f in ROW_FIELDS) for d in dicts)


@pytest.fixture(scope="module")
def wiki_docs() -> list[dict]:
    docs = list(read_documents(WIKI, WIKI_SEPARATOR))
    assert len(docs) == 60  # 60 articles in WikiText-2 valid
    return docs


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, wiki_docs) -> Path:
    cfg = TokenizerConfig(vocab_size=1000)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_hf_tokenizer(train_bpe([d["text"] for d in wiki_docs], cfg.vocab_size, cfg.special_tokens()), out, cfg)
    return out


def test_tokenizer_files_special_ids_chat_template_and_round_trip(tokenizer_dir, wiki_docs):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = TokenizerConfig()
    assert [hf.convert_tokens_to_ids(t) for t in cfg.special_tokens()] == [0, 1, 2, 3, 4]
    assert (hf.eos_token, hf.pad_token, hf.bos_token) == (cfg.eos_token, cfg.pad_token, cfg.bos_token)
    assert len(hf) == 1000
    chat = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    text = wiki_docs[3]["text"]
    ids = hf(text, add_special_tokens=True)["input_ids"]
    assert ids[0] not in range(5) and hf.decode(ids) == text  # byte-level: lossless, no BOS added
    info = tokenizer_info(tokenizer_dir)
    assert info == {"vocab_size": 1000, "eos_id": 0, "pad_id": 2, "eod_token": "<|endoftext|>"}


def test_index_and_bin_are_byte_identical_to_megatrons_builder(tmp_path, tokenizer_dir, wiki_docs):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    tok = load_worker_tokenizer(str(tokenizer_dir / "tokenizer.json"))
    for dtype in (np.uint16, np.int32):
        flat, lengths = encode_documents(tok, [d["text"] for d in wiki_docs[:20]], 0, dtype)
        docs = np.split(flat, np.cumsum(lengths)[:-1])
        ours = tmp_path / f"ours-{np.dtype(dtype).name}"
        ms.write_shard(ours, ((t, d["doc_id"], d["url"], d["source"]) for t, d in zip(docs, wiki_docs)), dtype)
        theirs = tmp_path / f"theirs-{np.dtype(dtype).name}"
        builder = IndexedDatasetBuilder(f"{theirs}.bin", dtype=dtype)
        for t in docs:
            builder.add_document(torch.from_numpy(t.astype(np.int64)), [len(t)])
        builder.finalize(f"{theirs}.idx")
        for suffix in (".bin", ".idx"):
            assert Path(f"{ours}{suffix}").read_bytes() == Path(f"{theirs}{suffix}").read_bytes()
        read = IndexedDataset(str(ours))
        assert len(read) == 20 and all(np.array_equal(read[i], docs[i]) for i in range(20))


def test_vocab_over_uint16_limit_switches_to_int32_and_megatron_reads_it(tmp_path, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    big = tmp_path / "big"
    big.mkdir()
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_tokens([f"<w{i}>" for i in range(66_000)])
    tok.save(str(big / "tokenizer.json"))
    (big / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    info = tokenizer_info(big)
    assert info["vocab_size"] == 67_000
    dtype = ms.token_dtype(info["vocab_size"])
    assert dtype == np.int32 and ms.token_dtype(65_499) == np.uint16
    rows = [{"shard": "big-train-00000", "source_name": "big", "split": "train", "doc_id": "d0", "url": None,
             "source": "x@0", "text": "The ship <w65990> sank <w10>."}]
    [stats] = write_shards(as_rows(rows), str(tmp_path), load_worker_tokenizer(str(big / "tokenizer.json")),
                           info["eos_id"], dtype, 8)
    dataset = IndexedDataset(str(tmp_path / "big-train-00000"))  # keep alive: items are views of its mmap
    tokens = dataset[0]
    assert tokens.dtype == np.int32 and 1000 + 65_990 in tokens.tolist() and tokens[-1] == info["eos_id"]
    assert stats["docs"] == 1 and stats["tokens"] == len(tokens)


def test_empty_docs_skipped_bad_unicode_repaired_and_special_strings_stay_text(tmp_path, tokenizer_dir, wiki_docs):
    assert valid_text("ab\ud800c") == ("ab\ufffdc", True)
    assert valid_text(b"caf\xc3\xa9 \xff") == ("café \ufffd", True)
    assert valid_text("café") == ("café", False)
    tok = load_worker_tokenizer(str(tokenizer_dir / "tokenizer.json"))
    texts = {"a": wiki_docs[0]["text"], "b": "", "c": " \n\t ", "d": "lone \ud83d surrogate", "e": b"bad \xff\xfe bytes",
             "f": "a page that says <|endoftext|> and <|im_start|> in its text", None: None}
    rows = [{"shard": "web-train-00000", "source_name": "web", "split": "train", "doc_id": f"id-{k}", "url": None,
             "source": f"w.warc.gz@{i}", "text": v} for i, (k, v) in enumerate(texts.items())]
    [stats] = write_shards(as_rows(rows), str(tmp_path), tok, 0, np.uint16, 2)
    assert (stats["docs"], stats["empty_docs"], stats["repaired_docs"]) == (4, 3, 2)
    index = ms.read_index(tmp_path / "web-train-00000")
    side = ms.read_sidecar(tmp_path, "web-train-00000").to_pylist()
    assert [r["doc_id"] for r in side] == ["id-a", "id-d", "id-e", "id-f"]
    special = ms.read_tokens(index, 3)
    assert list(special[:-1]) == tok.encode(texts["f"], add_special_tokens=False).ids
    assert set(special[:-1].tolist()).isdisjoint(range(5)) and special[-1] == 0  # only the appended EOS is special
    assert tok.decode(ms.read_tokens(index, 1).tolist()) == "lone \ufffd surrogate"


def test_trace_tokens_leads_back_to_the_source_record(tmp_path, tokenizer_dir, wiki_docs):
    tok = load_worker_tokenizer(str(tokenizer_dir / "tokenizer.json"))
    rows = [{"shard": "wiki-valid-00003", "source_name": "wiki", "split": "valid", **d} for d in wiki_docs[:5]]
    write_shards(as_rows(rows), str(tmp_path), tok, 0, np.uint16, 3)
    traced = ms.trace_tokens(tmp_path, "wiki-valid-00003", 4)
    assert traced["doc_id"] == wiki_docs[4]["doc_id"] and traced["source"] == f"{WIKI.name}@5"  # piece 0 is blank
    assert traced["tokens"] == len(tok.encode(wiki_docs[4]["text"], add_special_tokens=False).ids) + 1
    with pytest.raises(IndexError):
        ms.trace_tokens(tmp_path, "wiki-valid-00003", 5)


_SLOW_WRITER = """
import sys, time, numpy as np
from curation.megatron_shards import ShardWriter
with ShardWriter(sys.argv[1], np.uint16) as w:
    for i in range(10_000):
        w.add_document(np.arange(1000, dtype=np.uint16), f"d{i}")
        if i == 5:
            print("writing", flush=True)
        time.sleep(0.01)
"""


def test_killed_writer_leaves_nothing_a_reader_accepts(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path / "web-train-00000")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers and all(re.match(r"^\.web-train-00000\.bin\.tmp-", n) for n in leftovers)
    assert ms.list_shards(tmp_path) == [] and not IndexedDataset.exists(str(tmp_path / "web-train-00000"))
    with pytest.raises(ms.ShardError, match="incomplete"):
        ms.read_index(tmp_path / "web-train-00000")
    # a complete shard whose .bin got truncated, and a .bin whose .idx never arrived
    ms.write_shard(tmp_path / "ok-train-00000", [(np.arange(50, dtype=np.uint16), "a", None, None)], np.uint16)
    ms.write_shard(tmp_path / "cut-train-00000", [(np.arange(50, dtype=np.uint16), "a", None, None)], np.uint16)
    with open(tmp_path / "cut-train-00000.bin", "r+b") as fh:
        fh.truncate(60)
    with pytest.raises(ms.ShardError, match="truncated"):
        ms.read_index(tmp_path / "cut-train-00000")
    (tmp_path / "orphan-train-00000.bin").write_bytes(b"\0" * 8)
    removed = ms.clean_partial(tmp_path)
    assert len(removed) == 2 and "orphan-train-00000.bin" in removed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ok-")) == [
        "ok-train-00000.bin", "ok-train-00000.docs.parquet", "ok-train-00000.idx"]
    with pytest.raises(ms.ShardError, match="blend.json"):
        ms.load_blend(tmp_path)  # no blend.json: not a finished tokenize output


def test_split_is_per_document_deterministic_and_proportional(wiki_docs):
    ids = [f"{d['doc_id']}-{i}" for d in wiki_docs for i in range(300)]
    splits = [split_of(i, "90,5,5") for i in ids]
    assert splits == [split_of(i, "90,5,5") for i in ids]
    share = {s: splits.count(s) / len(ids) for s in ("train", "valid", "test")}
    assert abs(share["train"] - 0.90) < 0.02 and abs(share["valid"] - 0.05) < 0.01 and abs(share["test"] - 0.05) < 0.01
    # growing the corpus never moves a document: the split depends on the doc_id only
    assert [split_of(i, "90,5,5") for i in ids[:100]] == splits[:100]


def test_external_readers_give_stable_ids_and_record_positions(tmp_path, shared_data):
    jsonl = shared_data / "web_text_samples_dolma" / "provided_documents_000.json.gz"
    docs = list(read_documents(jsonl))
    with gzip.open(jsonl, "rt") as fh:
        first = json.loads(fh.readline())
    assert len(docs) == 10 and docs[0]["text"] == first["text"] and docs[0]["url"] == first["id"]
    assert docs[0]["source"] == f"{jsonl.name}@1" and docs == list(read_documents(jsonl))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok \\ud800 x", "id": 1}\nnot json\n{"no_text": 1}\n')
    [doc] = list(read_documents(bad))
    assert valid_text(doc["text"]) == ("ok \ufffd x", True)
    shakespeare = list(read_documents(shared_data / "tinyshakespeare" / "input.txt.gz"))
    assert shakespeare[0]["text"].startswith("First Citizen:\nBefore we proceed") and len(shakespeare) > 7000


def test_units_cut_each_source_in_file_order_across_files_and_row_groups(tmp_path, tokenizer_dir, wiki_docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.tokenize import SourceSpec, plan_units, unit_rows

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"doc_id": d["doc_id"], "url": None, "source": d["source"], "text": d["text"]} for d in wiki_docs]
    rows[7]["doc_id"] = None  # filled in from the file's content hash + row, as read_documents does
    pq.write_table(pa.Table.from_pylist(rows[:25]), data / "part-00000.parquet", row_group_size=7)
    pq.write_table(pa.Table.from_pylist(rows[25:]), data / "part-00001.parquet", row_group_size=4)
    txt = tmp_path / "wiki.txt.gz"
    txt.write_bytes(WIKI.read_bytes())
    sources = [SourceSpec(name="web"), SourceSpec(name="wiki", path=str(txt), doc_separator=WIKI_SEPARATOR)]
    units = plan_units(sources, data, docs_per_shard=16)
    assert [(u["source_name"], u["part"]) for u in units] == [("web", i) for i in range(4)] + [("wiki", i) for i in range(4)]
    assert units[1]["pieces"] == [[str(data / "part-00000.parquet"), 16, 9, "part-00000.parquet"],
                                  [str(data / "part-00001.parquet"), 0, 7, "part-00001.parquet"]]
    expected = {"web": [d for f in sorted(data.iterdir()) for d in read_documents(f)], "wiki": list(read_documents(txt, WIKI_SEPARATOR))}
    for name in ("web", "wiki"):
        got = [r for u in units if u["source_name"] == name for r in unit_rows(u, "80,10,10", batch_size=3)]
        assert [r[3:] for r in got] == [(d["doc_id"], d["url"], d["source"], d["text"]) for d in expected[name]]
        assert all(r[0] == f"{name}-{r[2]}-{i // 16:05d}" and r[2] == split_of(r[3], "80,10,10") for i, r in enumerate(got))
    assert expected["web"][7]["doc_id"] != rows[7]["doc_id"]

    # one unit's rows interleave splits: each split's shard keeps its documents in input order
    tok = load_worker_tokenizer(str(tokenizer_dir / "tokenizer.json"))
    stats = write_shards(unit_rows(units[0], "50,25,25", 4), str(tmp_path), tok, 0, np.uint16, 4)
    # doc_ids (so splits) depend on the fixture's path; which splits the 16 documents reach is computed, not assumed
    splits = {split_of(d["doc_id"], "50,25,25") for d in expected["web"][:16]}
    assert len(splits) >= 2 and sorted(s["shard"] for s in stats) == sorted(f"web-{sp}-00000" for sp in splits)
    for s in stats:
        want = [d for d in expected["web"][:16] if split_of(d["doc_id"], "50,25,25") == s["split"]]
        index = ms.read_index(tmp_path / s["shard"])
        assert ms.read_sidecar(tmp_path, s["shard"]).column("doc_id").to_pylist() == [d["doc_id"] for d in want]
        assert all(ms.read_tokens(index, i).tolist() == tok.encode(valid_text(d["text"])[0], add_special_tokens=False).ids + [0]
                   for i, d in enumerate(want))
