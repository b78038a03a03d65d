"""Evaluation: scoring primitives against a plain forward pass, lm-eval's conventions, answer
extraction, bad input (malformed lines, no tokenizer, no number, no stop), the lm-eval adapter,
and the eval stages through the executor with fake upstream checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "data" / "eval"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    texts = [json.loads(line)["ctx"] + " " + " ".join(json.loads(line)["endings"]) for line in open(FIX / "hellaswag_val.jsonl")]
    texts += [json.loads(line)["question"] + " " + json.loads(line)["answer"] for line in open(FIX / "gsm8k_train.jsonl")]
    texts += (FIX / "wikitext2_test_excerpt.txt").read_text().splitlines()
    return texts


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


def _llama_config(tokenizer, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw,
    )


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """A random 2-layer Llama causal LM and a reward model (num_labels=1), both with a BPE tokenizer
    trained on the fixtures, plus the same LM saved without its tokenizer."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(_llama_config(tokenizer))
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    lm.save_pretrained(root / "no_tokenizer")
    rm = LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1))
    rm.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    return {"lm": root / "lm", "no_tokenizer": root / "no_tokenizer", "rm": root / "rm"}


@pytest.fixture(scope="module")
def model(tiny_dirs):
    from evaluation.model import EvalModel

    return EvalModel(tiny_dirs["lm"], batch_size=5, generation_backend="hf")


def _reference_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """One unpadded forward pass over context+continuation, as lm-eval's HF backend scores it."""
    import torch

    with torch.no_grad():
        logits = model.model(torch.tensor([ctx + cont])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


# ---- model primitives ------------------------------------------------------------------------

def test_loglikelihood_matches_a_plain_forward_pass(model):
    """Shared contexts, batches of mixed lengths, one-token continuations: same sums as one pass each."""
    items = [json.loads(line) for line in open(FIX / "hellaswag_val.jsonl")][:4]
    requests = [(it["ctx"], " " + e) for it in items for e in it["endings"]] + [("Hello", " world"), ("", "Question")]
    scored = model.loglikelihood(requests, progress=False)
    for (ctx, cont), (lp, _) in zip(requests, scored):
        ce, xe = model.encode_pair(ctx, cont)
        assert lp == pytest.approx(_reference_loglikelihood(model, ce, xe), abs=1e-3)
    # the split follows lm-eval: context tokens first, trailing context spaces move to the continuation
    assert model.encode_pair("A man ", "runs") == (model.encode("A man"), model.encode("A man runs")[len(model.encode("A man")):])


def test_rolling_windows_are_lm_evals():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from evaluation.model import rolling_windows

    for n, window in [(1, 4), (4, 4), (5, 4), (13, 4), (40, 7)]:
        tokens = list(range(100, 100 + n))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, window, 1)]
        assert rolling_windows(tokens, 0, window) == [(list(a), list(b)) for a, b in theirs]
        assert [t for _, cont in rolling_windows(tokens, 0, window) for t in cont] == tokens


def test_rolling_loglikelihood_covers_every_token(model):
    text = (FIX / "wikitext2_test_excerpt.txt").read_text()[:400]
    (lp_long, n_long), = model.loglikelihood_rolling([text], window=256, progress=False)
    (lp_short, n_short), = model.loglikelihood_rolling([text], window=16, progress=False)
    tokens = model.encode(text)
    assert n_long == n_short == len(tokens)
    assert len(tokens) <= 256
    assert lp_long == pytest.approx(_reference_loglikelihood(model, [model.prefix_token_id], tokens), rel=1e-5)
    assert lp_short != pytest.approx(lp_long, abs=1e-3)  # shorter windows see less context


def test_generation_is_greedy_and_respects_the_token_budget(model):
    """Without a stop the output has exactly max_new_tokens tokens (same as HF greedy generate);
    a stop sequence cuts the text before it."""
    import torch

    prompts = ["Question: How many eggs?\nAnswer:", "A man is sitting on a roof. He"]
    free = model.generate_until(prompts, until=[], max_new_tokens=12, progress=False)
    for prompt, text in zip(prompts, free):
        ids = torch.tensor([model.encode(prompt)])
        ref = model.model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=model.eos_token_id,
                                   pad_token_id=model.pad_token_id)[0, ids.shape[1]:]
        assert text == model.tokenizer.decode(ref, skip_special_tokens=True)
        if model.eos_token_id not in ref.tolist():
            assert len(ref) == 12
    stop = free[0][len(free[0]) // 2 : len(free[0]) // 2 + 3]
    cut = model.generate_until(prompts[:1], until=[stop], max_new_tokens=12, progress=False)[0]
    assert cut == free[0][: free[0].find(stop)]


def test_checkpoint_without_tokenizer_is_a_clear_error(tiny_dirs, tmp_path):
    from evaluation.model import EvalModel, EvalModelError

    with pytest.raises(EvalModelError, match="no tokenizer"):
        EvalModel(tiny_dirs["no_tokenizer"])
    with pytest.raises(EvalModelError, match="neither 'smollm2' nor an existing directory"):
        EvalModel(tmp_path / "missing")


# ---- tasks -----------------------------------------------------------------------------------

def test_hellaswag_prompts_equal_lm_evals_process_docs():
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    from evaluation.tasks import hellaswag

    raw = [json.loads(line) for line in open(FIX / "hellaswag_val.jsonl")]
    assert hellaswag.split_ctx(raw[0]["ctx"]) == ("A man is sitting on a roof.", "he")
    docs = [{**r, **dict(zip(("ctx_a", "ctx_b"), hellaswag.split_ctx(r["ctx"])))} for r in raw]
    theirs = process_docs(datasets.Dataset.from_list(docs))
    ours = hellaswag.load(FIX / "hellaswag_val.jsonl").items
    assert [o.query for o in ours] == theirs["query"]
    assert [list(o.choices) for o in ours] == theirs["choices"]
    assert ours[0].query == "Roof shingle removal: A man is sitting on a roof. He"


def test_hellaswag_scores_by_lm_eval_rules(model):
    from evaluation.tasks import hellaswag

    res = hellaswag.evaluate(model, FIX / "hellaswag_val.jsonl", limit=6, progress=False)
    items = hellaswag.load(FIX / "hellaswag_val.jsonl").items[:6]
    assert res.n == 6 and res.malformed == 0
    acc = acc_norm = 0
    for item, sample in zip(items, res.samples):
        ll = [_reference_loglikelihood(model, *model.encode_pair(item.query, " " + c)) for c in item.choices]
        norm = [v / len(c) for v, c in zip(ll, item.choices)]
        assert sample["pred"] == ll.index(max(ll)) and sample["pred_norm"] == norm.index(max(norm))
        acc += ll.index(max(ll)) == item.gold
        acc_norm += norm.index(max(norm)) == item.gold
    assert res.metrics == {"acc": acc / 6, "acc_norm": acc_norm / 6}


def test_subset_selection_with_limit_and_seed():
    from evaluation.data import select

    items = list(range(50))
    assert select(items, 5, None) == [0, 1, 2, 3, 4]
    assert select(items, 5, 7) == select(items, 5, 7) != select(items, 5, 8)
    assert select(items, 5, 7) == sorted(select(items, 5, 7)) and select(items, None, 3) == items


def test_malformed_task_lines_are_skipped_and_counted(model, tmp_path):
    from evaluation.tasks import gsm8k, hellaswag

    good = (FIX / "hellaswag_val.jsonl").read_text().splitlines()
    bad = ["{not json", "[1, 2]", json.dumps({"ctx": "x", "activity_label": "a", "label": 0}),
           json.dumps({"ctx": "x", "activity_label": "a", "endings": ["a", "b"], "label": 5})]
    path = tmp_path / "hs.jsonl"
    path.write_text("\n".join(good[:3] + bad + good[3:5]) + "\n\n")
    res = hellaswag.evaluate(model, path, progress=False)
    assert (res.n, res.malformed) == (5, 4)
    assert any("JSONDecodeError" in n for n in res.notes) and any("out of range" in n for n in res.notes)

    gpath = tmp_path / "gsm.jsonl"
    gpath.write_text((FIX / "gsm8k_test.jsonl").read_text().splitlines()[0] + "\n"
                     + json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    loaded = gsm8k.load(gpath)
    assert (len(loaded.items), loaded.malformed) == (1, 1)


def test_gsm8k_answer_extraction():
    from evaluation.tasks import gsm8k

    assert gsm8k.extract_strict("so 3 + 4 = 7\n#### 7") == "7"
    assert gsm8k.extract_strict("The answer is 7.") == gsm8k.INVALID
    assert gsm8k.extract_flexible("She pays $1,234.50 in total, then 18.") == "18."
    assert gsm8k.extract_flexible("no digits here at all") == gsm8k.INVALID
    item = gsm8k.Item("q", "Janet sells 9 eggs.\n#### 1,018")
    metrics, samples = gsm8k.score_generations(
        [item] * 4, ["#### 1018", "The total is $1,018.", "I cannot tell.", "Maybe 1017"]
    )
    assert [s["exact_match_flexible"] for s in samples] == [1.0, 1.0, 0.0, 0.0]
    assert [s["exact_match_strict"] for s in samples] == [1.0, 0.0, 0.0, 0.0]
    assert samples[2]["flexible"] == gsm8k.INVALID and metrics["no_number"] == 0.25


def test_gsm8k_kshot_prompts_and_generation(model):
    from evaluation.tasks import gsm8k

    train = gsm8k.load(FIX / "gsm8k_train.jsonl").items
    test = gsm8k.load(FIX / "gsm8k_test.jsonl").items[:2]
    prompts = gsm8k.build_prompts(test, train, 2, 1234)
    assert prompts == gsm8k.build_prompts(test, train, 2, 1234) != gsm8k.build_prompts(test, train, 2, 99)
    assert prompts[0].count("Question:") == 3 and prompts[0].endswith(f"Question: {test[0].question}\nAnswer:")
    chat = gsm8k.build_prompts(test, train, 1, 1234, model, chat_template=True)[0]
    assert chat.count("<|im_start|>user") == 2 and chat.endswith("<|im_start|>assistant\n")
    res = gsm8k.evaluate(model, FIX / "gsm8k_test.jsonl", FIX / "gsm8k_train.jsonl", num_fewshot=1,
                         max_new_tokens=8, limit=3, progress=False)
    assert res.n == 3 and set(res.metrics) == {"exact_match_strict", "exact_match_flexible", "no_number"}
    assert all("Question:" not in s["generation"] for s in res.samples)


def test_perplexity_on_wikitext_articles(model):
    from evaluation.tasks import perplexity

    docs = perplexity.load(FIX / "wikitext2_test_excerpt.txt").items
    assert len(docs) == 3 and docs[0].startswith("= Robert <unk> =")
    res = perplexity.evaluate(model, FIX / "wikitext2_test_excerpt.txt", window=64, limit=1, progress=False)
    m = res.metrics
    assert res.n == 1 and m["bits_per_byte"] > 0 and m["token_perplexity"] > 1
    assert m["byte_perplexity"] == pytest.approx(2 ** m["bits_per_byte"])


def test_reward_accuracy(tiny_dirs, tmp_path):
    from evaluation.tasks import reward_accuracy

    rm = reward_accuracy.RewardModel(tiny_dirs["rm"], batch_size=3, max_length=64)
    pairs = reward_accuracy.load(FIX / "hh_rlhf_pairs.jsonl").items
    one_by_one = [rm.score([t], progress=False)[0] for t in (pairs[0].chosen, pairs[0].rejected, pairs[1].chosen)]
    assert rm.score([pairs[0].chosen, pairs[0].rejected, pairs[1].chosen], progress=False) == pytest.approx(one_by_one, abs=1e-4)
    res = reward_accuracy.evaluate(rm, FIX / "hh_rlhf_pairs.jsonl", progress=False)
    assert res.n == 8
    assert res.metrics["accuracy"] == sum(s["chosen_reward"] > s["rejected_reward"] for s in res.samples) / 8


# ---- lm-eval adapter --------------------------------------------------------------------------

def test_lm_eval_adapter_answers_lm_eval_requests(model):
    from lm_eval.api.instance import Instance

    from evaluation.lm_eval_adapter import RefineryLM

    lm = RefineryLM(model=model, max_gen_toks=6)
    ll = [Instance("loglikelihood", {}, ("The man", " runs fast"), 0), Instance("loglikelihood", {}, ("A", " b"), 1)]
    assert lm.loglikelihood(ll, disable_tqdm=True) == model.loglikelihood([r.args for r in ll], progress=False)
    text = "Robert is an English film actor."
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert rolling[0] == pytest.approx(model.loglikelihood_rolling([text], progress=False)[0][0])
    gen = lm.generate_until([
        Instance("generate_until", {}, ("Question: 2+2?\nAnswer:", {"until": ["Question:"], "do_sample": False}), 0),
        Instance("generate_until", {}, ("Hello", {"until": "\n", "max_gen_toks": 3}), 1),
    ], disable_tqdm=True)
    assert gen[0] == model.generate_until(["Question: 2+2?\nAnswer:"], ["Question:"], 6, progress=False)[0]
    assert gen[1] == model.generate_until(["Hello"], ["\n", model.tokenizer.eos_token], 3, progress=False)[0]


def test_lm_eval_runs_a_local_task_on_our_model_with_our_scores(model, tmp_path, monkeypatch):
    """lm-eval's own pipeline (local-file HellaSwag config, its process_docs) over the adapter gives our scores."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evaluation.lm_eval_adapter import RefineryLM
    from evaluation.tasks import hellaswag

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = [json.loads(line) for line in open(FIX / "hellaswag_val.jsonl")][:8]
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps({**r, **dict(zip(("ctx_a", "ctx_b"), hellaswag.split_ctx(r["ctx"])))}) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    (tasks / "t_hellaswag.yaml").write_text(
        f"task: t_hellaswag\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\nvalidation_split: validation\nprocess_docs: !function utils.process_docs\n"
        'doc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "choices"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    out = lm_eval.simple_evaluate(model=RefineryLM(model=model), tasks=["t_hellaswag"],
                                  task_manager=TaskManager(include_path=str(tasks)))
    ours = hellaswag.evaluate(model, data, progress=False)
    assert out["results"]["t_hellaswag"]["acc,none"] == pytest.approx(ours.metrics["acc"])
    assert out["results"]["t_hellaswag"]["acc_norm,none"] == pytest.approx(ours.metrics["acc_norm"])


# ---- stages through the executor --------------------------------------------------------------

def _fake_stage(run_root: Path, run_id: str, stage: str, outputs: dict[str, Path], config: dict | None = None,
                inputs: dict | None = None) -> None:
    """A completed upstream stage: its outputs copied under RUN/STAGE and a hand-written manifest."""
    from infra.runstore import content_hash, listing

    final = run_root / run_id / stage
    recorded = {}
    for name, src in outputs.items():
        shutil.copytree(src, final / name)
        recorded[name] = {"path": str(final / name), "uri": (final / name).as_uri(), "hash": content_hash(final / name),
                          "files": listing(final / name), "run_id": run_id, "stage": stage}
    (final / "manifest.json").write_text(json.dumps({
        "run_id": run_id, "stage": stage, "status": "completed", "cache_key": f"fake-{stage}", "outputs": recorded,
        "metrics": {}, "tables": {}, "inputs": inputs or {}, "config": config or {},
    }))


def _fake_shards(tokenizer_dir: Path, dest: Path) -> Path:
    """Megatron shards of a few WikiText articles for the 'valid' split, plus blend.json."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoTokenizer

    from evaluation.tasks import perplexity

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dest.mkdir(parents=True)
    builder = IndexedDatasetBuilder(str(dest / "wiki-valid-00000.bin"), dtype=np.uint16)
    for doc in perplexity.load(FIX / "wikitext2_test_excerpt.txt").items:
        ids = tok.encode(doc[:400]) + [tok.eos_token_id]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(dest / "wiki-valid-00000.idx"))
    (dest / "blend.json").write_text(json.dumps({
        "prefixes": [], "split": "98,1,1", "blend_per_split": {"train": [], "valid": [[1.0, "wiki-valid-00000"]], "test": []},
        "vocab_size": len(tok), "eos_id": tok.eos_token_id, "dtype": "uint16",
    }))
    return dest


def test_eval_stages_via_executor_and_compare(tiny_dirs, make_config, tmp_path, capsys):
    from evaluation.report import compare_runs
    from flows.cli import main
    from flows.registry import execute_stage

    small = {"hellaswag.limit": 4, "gsm8k.limit": 2, "gsm8k.max_new_tokens": 8, "perplexity.limit": 1,
             "perplexity.window": 64, "heldout.window": 64, "batch_size": 4, "progress": False}
    overrides = {f"{stage}.{k}": v for stage in ("eval_pretrain", "eval_dpo") for k, v in small.items()}
    overrides["eval_pretrain.tasks"] = ["hellaswag", "perplexity", "heldout"]
    overrides["eval_pretrain.heldout.split"] = "valid"
    overrides["eval_dpo.tasks"] = ["hellaswag", "gsm8k", "reward_accuracy", "heldout"]
    config = make_config(overrides)
    run_root = Path(config.run_root)
    shards = _fake_shards(tiny_dirs["lm"], tmp_path / "shards")
    for run in ("run-a", "run-b"):
        _fake_stage(run_root, run, "tokenize", {"shards": shards})
        _fake_stage(run_root, run, "pretrain", {"hf": tiny_dirs["lm"]})
        _fake_stage(run_root, run, "reward", {"hf": tiny_dirs["rm"]})
        _fake_stage(run_root, run, "dpo", {"hf": tiny_dirs["lm"]})

    manifest = execute_stage("eval_pretrain", config, "run-a")
    m = manifest["metrics"]
    assert m["tasks_skipped"] == 0, manifest["report_md"]
    assert m["hellaswag/n"] == 4 and 0 <= m["hellaswag/acc_norm"] <= 1
    assert m["perplexity/bits_per_byte"] > 0 and m["heldout/loss"] > 0 and m["heldout/n"] == 3
    assert {r["task"] for r in manifest["tables"]["eval"]} == {"hellaswag", "perplexity", "heldout"}
    results = Path(manifest["outputs"]["results"]["path"])
    assert len((results / "samples" / "hellaswag.jsonl").read_text().splitlines()) == 4
    assert "| hellaswag | acc |" in manifest["report_md"]

    dpo = execute_stage("eval_dpo", config, "run-a")
    assert dpo["metrics"]["reward_accuracy/n"] == 8 and dpo["metrics"]["gsm8k/n"] == 2
    assert dpo["metrics"]["tasks_skipped"] == 1  # heldout: eval_dpo has no tokenize input
    assert [w for w in dpo["warnings"] if w.startswith("missing input:")] == [
        "missing input: task heldout: no tokenize stage output (shards/) in this run (skipped)"]  # said aloud
    assert "### Along the pipeline" in dpo["report_md"] and "eval_pretrain" in dpo["report_md"]

    execute_stage("eval_pretrain", config, "run-b")
    rows, md = compare_runs(run_root, "run-a", "run-b")
    assert rows and all(r["delta"] == pytest.approx(0.0) for r in rows)
    assert {r["stage"] for r in rows} == {"eval_pretrain"} and "Eval stages in only one run: eval_dpo" in md

    assert main(["eval", "compare", "run-a", "run-b", "--run-root", str(run_root)]) == 0
    assert "| eval_pretrain | hellaswag | acc |" in capsys.readouterr().out


def test_eval_stage_scores_the_starting_model_on_the_same_items(tiny_dirs, make_config, tmp_path):
    """eval_sft of an sft that started from pretrain/hf: every comparable task is also scored on that
    model, and each before → after row's 'before' equals a direct evaluation of the starting model."""
    import torch
    from transformers import LlamaForCausalLM

    from evaluation.model import EvalModel
    from evaluation.tasks import arithmetic, hellaswag
    from flows.registry import execute_stage

    trained = tmp_path / "trained"
    lm = LlamaForCausalLM.from_pretrained(tiny_dirs["lm"])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lm.save_pretrained(trained)
    shutil.copy(tiny_dirs["lm"] / "tokenizer.json", trained)
    shutil.copy(tiny_dirs["lm"] / "tokenizer_config.json", trained)

    config = make_config({"eval_sft.tasks": ["hellaswag", "heldout", "arithmetic"], "eval_sft.hellaswag.limit": 6,
                          "eval_sft.heldout.split": "valid", "eval_sft.heldout.window": 64,
                          "eval_sft.arithmetic.limit": 5, "eval_sft.arithmetic.max_new_tokens": 4,
                          "eval_sft.generation_backend": "hf", "eval_sft.progress": False})
    run_root = Path(config.run_root)
    _fake_stage(run_root, "r", "tokenize", {"shards": _fake_shards(tiny_dirs["lm"], tmp_path / "shards")})
    # run r reused r0's pretrain: its hf/ files live under r0, its manifest says where
    _fake_stage(run_root, "r0", "pretrain", {"hf": tiny_dirs["lm"]})
    (run_root / "r" / "pretrain").mkdir(parents=True)
    shutil.copy(run_root / "r0" / "pretrain" / "manifest.json", run_root / "r" / "pretrain" / "manifest.json")
    start = run_root / "r0" / "pretrain" / "hf"
    _fake_stage(run_root, "r", "sft", {"hf": trained}, config={"model": "upstream"}, inputs={"pretrain/hf": {
        "uri": (run_root / "r" / "pretrain" / "hf").as_uri(), "run_id": "r", "stage": "pretrain", "output": "hf",
        "hash": "sha256:pretrain-hf"}})

    manifest = execute_stage("eval_sft", config, "r")
    effects = {row["metric"]: row for row in manifest["tables"]["effects"]}
    assert set(effects) == {"hellaswag/acc_norm", "heldout/loss", "arithmetic/accuracy"}
    assert all(row["stage"] == "sft" and row["verdict"] in ("improved", "worse", "no clear change") for row in effects.values())
    reference = EvalModel(start, batch_size=4, generation_backend="hf")
    assert effects["hellaswag/acc_norm"]["before"] == pytest.approx(
        hellaswag.evaluate(reference, FIX / "hellaswag_val.jsonl", limit=6, progress=False).metrics["acc_norm"])
    assert effects["arithmetic/accuracy"]["n"] == 5 and effects["arithmetic/accuracy"]["before"] == pytest.approx(
        arithmetic.evaluate(reference, 5, 4, progress=False).metrics["accuracy"])
    heldout = effects["heldout/loss"]
    assert heldout["after"] == pytest.approx(manifest["metrics"]["heldout/loss"])  # token-weighted = the task's loss
    assert heldout["before"] != heldout["after"]  # the perturbed weights changed the loss
    assert heldout["before_lo"] <= heldout["before"] <= heldout["before_hi"]
    assert manifest["metrics"]["effect/heldout/loss/delta"] == pytest.approx(heldout["after"] - heldout["before"])
    assert "Before → after" in manifest["report_md"]
    results = json.loads((Path(manifest["outputs"]["results"]["path"]) / "results.json").read_text())
    assert results["started_from"] == "sha256:pretrain-hf"  # by content: no run directory inside the results
    assert results["checkpoint"] == manifest["inputs"]["sft/hf"]["hash"]


def test_eval_stage_rejects_a_checkpoint_without_tokenizer(tiny_dirs, make_config):
    from evaluation.model import EvalModelError
    from flows.registry import execute_stage

    config = make_config({"eval_sft.tasks": ["hellaswag"], "eval_sft.hellaswag.limit": 2, "eval_sft.progress": False})
    _fake_stage(Path(config.run_root), "run-x", "sft", {"hf": tiny_dirs["no_tokenizer"]})
    with pytest.raises(EvalModelError, match="no tokenizer"):
        execute_stage("eval_sft", config, "run-x")
    assert not (Path(config.run_root) / "run-x" / "eval_sft").exists()
