"""bench/gpu_check.py: its FLOP accounting against published model sizes, and its CPU dry run end to end
(every section of the JSON summary present and sane, last line ``mfu <x>``), so the GPU kit cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def kit():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_param_count_matches_published_llama_sizes(kit):
    from training.megatron.model import LlamaArch

    llama2_7b = LlamaArch(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
                          ffn_hidden_size=11008, vocab_size=32000, tie_embeddings=False)
    llama32_1b = LlamaArch(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                           ffn_hidden_size=8192, vocab_size=128256, tie_embeddings=True)
    assert kit.param_count(llama2_7b) == 6_738_415_616  # Llama-2-7b-hf safetensors total
    assert kit.param_count(llama32_1b) == 1_235_814_400  # Llama-3.2-1B (tied embeddings)


def test_flops_per_token_from_the_formula(kit):
    from training.megatron.model import LlamaArch

    arch = LlamaArch(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=4,
                     ffn_hidden_size=8192, vocab_size=32768)
    h, kv, seq = 2048, 4 * 128, 4096
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * 8192  # q, k+v, o, gate+up+down
    dense = 6 * (16 * per_layer + 32768 * h)
    assert kit.flops_per_token(arch, seq) == dense + 6 * 16 * seq * h
    assert kit.flops_per_token(arch, seq, causal=False) == dense + 12 * 16 * seq * h
    gpu_model = LlamaArch(**kit.GPU.big, vocab_size=15232)  # the vocab its WikiText-2 BPE reaches
    assert 0.5e9 < kit.param_count(gpu_model) < 1.5e9 and 2048 <= kit.GPU.seq <= 4096  # the MFU sizes


@pytest.mark.slow
def test_dry_run_prints_every_section_and_the_mfu_line(tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    last = re.fullmatch(r"mfu (\S+)", lines[-1])
    assert last, lines[-1]
    summary = json.loads("\n".join(lines[:-1]))
    assert summary == json.loads(out.read_text())
    failed = {k: summary[k].get("error") or summary[k].get("runs") for k, ok in summary["sections_ok"].items() if not ok}
    assert not failed, json.dumps(failed)[:3000]
    assert summary["environment"]["megatron-core"] == "0.16.1" and summary["environment"]["deepspeed"] == "0.19.8"

    mfu = summary["mfu"]
    assert float(last.group(1)) == pytest.approx(mfu["mfu"], rel=1e-3)
    assert mfu["params"] == mfu["params_formula"]  # the model's own count = the formula the FLOPs use
    assert mfu["core_attention"] == "SdpaDotProductAttention"
    assert mfu["tokens_per_s"] > 0 and mfu["matmul"]["tflops"] > 0
    assert mfu["mfu"] == pytest.approx(mfu["tokens_per_s"] * mfu["flops_per_token"] / 1e12 / 989.0, rel=1e-9)
    assert 0 < mfu["mfu"] < mfu["mfu_noncausal"] < 1
    assert len(mfu["losses"]) == mfu["warmup_steps"] + mfu["timed_steps"]
    assert all(math.isfinite(x) and 0 < x < 1.5 * math.log(mfu["arch"]["vocab_size"]) for x in mfu["losses"])

    num = summary["numerics"]
    assert num["steps"] == len(num["cpu_losses"]) == len(num["device_losses"]) >= 3
    assert num["max_rel_diff"] <= num["tolerance"]["rtol"]  # on the dry run both runs are the CPU path
    assert all(math.isfinite(x) for x in num["cpu_losses"]) and len(set(num["cpu_losses"])) > 1  # it trained
    resume = num["checkpoint_resume"]
    assert resume["identical"] and resume["next_loss"] == resume["next_loss_after_load"]
    assert resume["second_loss"] == resume["second_loss_after_load"]

    sft = summary["deepspeed_sft"]
    assert sft["backend"] == "deepspeed-zero2x1" and sft["model"] == "mfu model (exported)" and sft["saved_hf"]
    assert len(sft["losses"]) == sft["steps"] >= 1 and all(math.isfinite(x) for x in sft["losses"])
    assert sft["eval_loss_after"] != sft["eval_loss_before"]  # the step changed the weights

    post = summary["post_training"]
    assert post["model"] == "mfu model (exported)" and post["device"] == "cpu"
    for task in ("sft", "reward", "dpo"):
        assert len(post[task]["losses"]) >= 1 and post[task]["finite"] and post[task]["saved_hf"], post[task]
    assert set(post["reward"]["effects"]) == {"accuracy"} and "reward_accuracy" in post["dpo"]["effects"]
    for algo in ("grpo", "ppo"):
        assert post[algo]["steps"] >= 1 and post[algo]["policy_device"] == post[algo]["rollout_device"] == "cpu"

    prec = summary["precision"]
    assert prec["model"] == "mfu model (exported)"
    for p in ("fp32", "bf16", "fp16"):
        assert prec[p]["before"]["tokens"] > 0 and prec[p]["after"]["tokens"] > 0
        assert 0 <= prec[p]["mean"] < 1
    assert prec["fp32"]["mean"] < prec["fp16"]["mean"] and prec["fp32"]["mean"] < prec["bf16"]["mean"]
    assert prec["bf16_over_fp16"] == pytest.approx(prec["bf16"]["mean"] / prec["fp16"]["mean"])
