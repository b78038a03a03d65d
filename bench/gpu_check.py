"""GPU validation kit: the project's GPU paths in one command, with MFU on the lent H200 (<= 8 minutes).

Every section runs the project's own code in a child process of its own (a hang or crash is
recorded and the next section still runs; a budget caps the whole run):

- ``mfu``: a bf16 8192³ matmul (the machine's achievable peak), then a Llama-shaped GPTModel
  (~1.0 B parameters, bf16, seq 4096, 16 × 4096 tokens a step) trained through
  ``training.pretrain.Trainer`` (megatron-core, Megatron DDP + optimizer, GPTDataset, TP = PP = 1)
  for 6 warm-up and 20 timed steps; tokens/s and MFU against the
  H200's bf16 dense spec (989 TFLOP/s) and against the measured matmul. FLOPs per token: see
  :func:`flops_per_token`. The trained weights are exported to an HF Llama directory
  (``training.megatron.convert``) for the two sections after it.
- ``numerics``: a tiny model from one random HF init, fp32, trained N steps on the device and on
  the CPU path (CUDA hidden: gloo + the CPU compat layer); the losses must agree within
  :data:`NUMERICS_RTOL`. On the device: save a checkpoint, take a step, load it, take the step
  again: the loss must be identical.
- ``deepspeed_sft``: the SFT learner (``training.learner``, DeepSpeed ZeRO-2, one rank) on the
  exported model, launched as the stage launches it.
- ``post_training``: the learner tasks sft, reward and dpo (torch backend, ``train_layers`` for reward
  and dpo as the demo runs them) and the RL loops grpo and ppo (HF rollouts) for a few steps each on the
  exported model, placed by ``training.devices``: every task's parameters, batches and cached states must
  live on the device (the CUDA peak memory each task allocates is recorded; 0 on the CPU).
- ``precision``: ``bench/precision_mismatch.py``'s measurement (trainer log-probs under autocast vs
  rollout log-probs from HF ``generate`` in the same precision, before and after a weight
  perturbation) for fp32, bf16 and fp16 on the device.

Data comes from the repository (no network): a byte-level BPE (``curation.tokenizer``) trained on
WikiText-2 valid (``tests/data/tokenize``), shards written with ``curation.megatron_shards``, SFT
conversations from ``tests/data/post``. ``--dry-run`` runs the same code on the CPU at tiny sizes, the
MFU model in fp32 (megatron's bf16 optimizer takes only CUDA parameters): tests/test_bench_gpu_check.py.

    python bench/gpu_check.py [--dry-run] [--out bench/out/gpu_check.json] [--budget-s 480]

Prints the JSON summary, then a last line ``mfu <x>`` (MFU vs the 989 TFLOP/s spec; nan if the
mfu section failed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM spec, bf16 dense (the 1979 figure is with sparsity)
WIKITEXT = REPO / "tests" / "data" / "tokenize" / "wikitext2_valid.txt.gz"
SFT_DATA = [REPO / "tests" / "data" / "post" / "sft_gsm8k.jsonl"]
PREFERENCE_DATA = [REPO / "tests" / "data" / "post" / "pref_gsm8k.jsonl"]
NUMERICS_RTOL = 5e-4  # fp32 losses, device vs CPU path, every step
NUMERICS_STEP0_RTOL = 1e-5  # the first loss is a forward pass on identical weights
FLOP_FORMULA = (
    "per token: 6*N_matmul + 6*L*s*d_q (causal attention); N_matmul = L*(2*h*d_q + 2*h*d_kv + 3*h*ffn) + V*h "
    "(every weight a token passes through a matmul, output layer included, embedding lookup excluded); "
    "d_q = heads*head_dim, d_kv = groups*head_dim; fwd+bwd = 3x fwd; QK^T and AV each 2*s*d_q per token "
    "over the causal half. mfu_noncausal counts 12*L*s*d_q (PaLM's and Megatron-LM's accounting)"
)


@dataclass(frozen=True)
class Plan:
    """Sizes for one mode: the GPU run or the CPU dry run."""

    vocab: int
    tiny: dict  # numerics model (training.pretrain_config.ModelConfig fields)
    tiny_seq: int
    numerics_steps: int
    big: dict  # MFU model
    dtype: str  # MFU model's parameter dtype (bf16 needs CUDA: megatron's Float16Optimizer)
    seq: int
    mbs: int
    gbs: int
    warmup: int
    timed: int
    matmul_n: int
    matmul_iters: int
    sft_steps: int
    sft_batch: int
    sft_max_len: int
    prompts: int
    samples_per_prompt: int
    max_new_tokens: int
    timeouts: dict = field(default_factory=dict)  # seconds per section (the budget caps them further)


TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=172)
GPU = Plan(
    vocab=32768, tiny=TINY, tiny_seq=128, numerics_steps=6,
    big=dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=4, ffn_hidden_size=8192),
    dtype="bfloat16", seq=4096, mbs=2, gbs=16, warmup=6, timed=20, matmul_n=8192, matmul_iters=100,
    sft_steps=2, sft_batch=4, sft_max_len=1024, prompts=16, samples_per_prompt=2, max_new_tokens=64,
    timeouts={"mfu": 210, "numerics_device": 90, "numerics_cpu": 90, "precision": 120, "deepspeed_sft": 150,
              "post_training": 150},
)
DRY = Plan(
    vocab=512, tiny=TINY, tiny_seq=64, numerics_steps=3, big=TINY, dtype="float32", seq=64, mbs=2, gbs=4, warmup=1, timed=2,
    matmul_n=256, matmul_iters=3, sft_steps=1, sft_batch=2, sft_max_len=512, prompts=2, samples_per_prompt=1,
    max_new_tokens=8,
    timeouts={"mfu": 240, "numerics_device": 180, "numerics_cpu": 180, "precision": 240, "deepspeed_sft": 300,
              "post_training": 400},
)
SECTIONS = ("mfu", "numerics_device", "numerics_cpu", "precision", "deepspeed_sft", "post_training")


# ---- FLOP accounting (pure) ---------------------------------------------------------------------------


def matmul_params(arch) -> int:
    """Weights every token passes through a matmul: attention, SwiGLU MLP, output layer (tied or not)."""
    h, hd = arch.hidden_size, arch.hidden_size // arch.num_attention_heads
    d_q, d_kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    return arch.num_layers * (2 * h * d_q + 2 * h * d_kv + 3 * h * arch.ffn_hidden_size) + arch.vocab_size * h


def param_count(arch) -> int:
    """All parameters of the Llama GPTModel: matmul weights, input embedding unless tied, RMSNorm gains."""
    embedding = 0 if arch.tie_embeddings else arch.vocab_size * arch.hidden_size
    return matmul_params(arch) + embedding + (2 * arch.num_layers + 1) * arch.hidden_size


def flops_per_token(arch, seq: int, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward), see :data:`FLOP_FORMULA`."""
    d_q = arch.num_attention_heads * (arch.hidden_size // arch.num_attention_heads)
    attention = (6 if causal else 12) * arch.num_layers * seq * d_q
    return 6.0 * matmul_params(arch) + attention


# ---- preparation (parent) -----------------------------------------------------------------------------


def wikitext_docs() -> list[str]:
    from curation.text_sources import BLANK_LINES

    text = gzip.open(WIKITEXT, "rt", encoding="utf-8").read()
    return [d.strip() for d in re.split(BLANK_LINES, text) if len(d.strip()) > 20]


def prepare(work: Path, plan: Plan) -> dict:
    """BPE tokenizer (HF dir), one train shard + blend.json, and a random tiny HF Llama for the numerics."""
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    from curation.megatron_shards import token_dtype, write_blend, write_shard
    from curation.tokenizer import TokenizerConfig, save_hf_tokenizer, tokenizer_info, train_bpe
    from training.megatron.convert import hf_config, write_hf
    from training.megatron.model import LlamaArch, pad_vocab

    docs = wikitext_docs()
    chats = [line for p in SFT_DATA for line in p.read_text().splitlines()]
    tok_cfg = TokenizerConfig(vocab_size=plan.vocab)
    tok = train_bpe(docs + chats, plan.vocab, tok_cfg.special_tokens())
    tok_dir = work / "tokenizer"
    save_hf_tokenizer(tok, tok_dir, tok_cfg)
    info = tokenizer_info(tok_dir)
    dtype = token_dtype(info["vocab_size"])
    shards = work / "shards"
    shards.mkdir()
    encoded = (np.array(e.ids + [info["eos_id"]]) for e in tok.encode_batch(docs, add_special_tokens=False))
    count = write_shard(shards / "wiki-train-00000", ((ids, f"wiki-{i}", None, "wikitext2_valid")
                                                     for i, ids in enumerate(encoded)), dtype)
    write_blend(shards, {"prefixes": [[1.0, "wiki-train-00000"]], "split": "100,0,0",
                         "vocab_size": info["vocab_size"], "eos_id": info["eos_id"], "dtype": dtype.name})
    arch = LlamaArch(**plan.tiny, vocab_size=pad_vocab(info["vocab_size"]), seq_length=plan.tiny_seq)
    torch.manual_seed(0)
    init = LlamaForCausalLM(hf_config(arch)).state_dict()
    write_hf(work / "init_tiny", arch, init, tok_dir)
    return {"documents": count, "tokenizer_vocab": info["vocab_size"]}


# ---- children -----------------------------------------------------------------------------------------


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pretrain_job(work: Path, name: str, model: dict, seq: int, mbs: int, gbs: int, steps: int,
                 dtype: str, init_from_dir: Path | None) -> dict:
    """A training.pretrain job spec (what the pretrain stage writes), spike guard off."""
    config = {"tp": 1, "pp": 1, "seq_length": seq, "micro_batch_size": mbs, "global_batch_size": gbs,
              "steps": steps, "warmup_steps": 2, "lr": 3e-4, "min_lr": 3e-5,
              "precision": {"float32": "fp32", "bfloat16": "bf16"}[dtype],
              "spike": {"enabled": False}, "model": model, "seed": 1234}
    run = work / name
    return {"config": config, "shards": str(work / "shards"), "init_from_dir": str(init_from_dir) if init_from_dir else None,
            "save_dir": str(run / "checkpoints"), "tensorboard_dir": str(run / "tb"),
            "metrics_path": str(run / "metrics.jsonl"), "cache_dir": str(run / "cache")}


def run_steps(trainer, count: int) -> list[float]:
    """``count`` steps of ``Trainer.fit``'s loop (no spike guard, no logging): losses."""
    from training.pretrain import next_batch

    losses = []
    for _ in range(count):
        samples, trainer.position = next_batch(trainer.position, trainer.cfg.global_batch_size, trainer.ledger,
                                               len(trainer.dataset))
        loss, _ = trainer.train_step(samples)
        trainer.step += 1
        trainer.scheduler.step(1)
        trainer.apply_lr()
        losses.append(loss)
    return losses


def measure_matmul(n: int, iters: int) -> dict:
    """bf16 n×n @ n×n on the device: achieved TFLOP/s (2n³ per product)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize()
    seconds = time.perf_counter() - t0
    return {"n": n, "dtype": "bfloat16", "iters": iters, "tflops": 2 * n**3 * iters / seconds / 1e12}


def child_mfu(work: Path, plan: Plan, name: str) -> dict:
    import torch

    from training.megatron.convert import megatron_to_hf, write_hf
    from training.megatron.parallel import teardown
    from training.pretrain import Trainer

    matmul = measure_matmul(plan.matmul_n, plan.matmul_iters)
    steps = plan.warmup + plan.timed
    trainer = Trainer(pretrain_job(work, "mfu", plan.big, plan.seq, plan.mbs, plan.gbs, steps, plan.dtype, None))
    try:
        trainer.apply_lr()
        warm = run_steps(trainer, plan.warmup)
        synchronize()
        t0 = time.perf_counter()
        timed = run_steps(trainer, plan.timed)
        synchronize()
        seconds = time.perf_counter() - t0
        arch = trainer.arch
        tokens_per_s = plan.timed * plan.gbs * plan.seq / seconds
        achieved = tokens_per_s * flops_per_token(arch, plan.seq) / 1e12
        result = {
            "arch": arch.to_dict(), "params": sum(p.numel() for p in trainer.model.parameters()),
            "params_formula": param_count(arch), "seq": plan.seq, "micro_batch": plan.mbs, "global_batch": plan.gbs,
            "dtype": plan.dtype, "core_attention": type(trainer.model.decoder.layers[0].self_attention.core_attention).__name__,
            "warmup_steps": plan.warmup, "timed_steps": plan.timed, "step_s": seconds / plan.timed,
            "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token(arch, plan.seq), "flop_formula": FLOP_FORMULA,
            "model_tflops": achieved, "peak_tflops_spec": H200_BF16_DENSE_TFLOPS, "matmul": matmul,
            "mfu": achieved / H200_BF16_DENSE_TFLOPS, "mfu_vs_measured_matmul": achieved / matmul["tflops"],
            "mfu_noncausal": tokens_per_s * flops_per_token(arch, plan.seq, causal=False) / 1e12 / H200_BF16_DENSE_TFLOPS,
            "losses": warm + timed,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }
        full = {k: v.detach().float().cpu() for k, v in trainer.model.state_dict().items() if not k.endswith("_extra_state")}
    finally:
        teardown()
    t0 = time.perf_counter()
    write_hf(work / "hf", arch, megatron_to_hf(full, arch), work / "tokenizer")
    result["export_s"] = time.perf_counter() - t0
    return result


def child_numerics(work: Path, plan: Plan, name: str) -> dict:
    """Tiny fp32 model from the shared HF init: N losses; on the device also save → step → load → step."""
    import torch

    from training.megatron.parallel import teardown
    from training.pretrain import Trainer

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    steps = plan.numerics_steps + 2
    trainer = Trainer(pretrain_job(work, name, plan.tiny, plan.tiny_seq, 2, 4, steps, "float32", work / "init_tiny"))
    try:
        trainer.apply_lr()
        result = {"device": device_name(), "dtype": "float32", "losses": run_steps(trainer, plan.numerics_steps)}
        if name == "numerics_device":
            ckpt = trainer.save()
            first = run_steps(trainer, 2)
            trainer.restore(ckpt)
            again = run_steps(trainer, 2)
            result["resume"] = {"checkpoint_step": plan.numerics_steps, "next_loss": first[0],
                                "next_loss_after_load": again[0], "identical": first[0] == again[0],
                                "second_loss": first[1], "second_loss_after_load": again[1]}
    finally:
        teardown()
    return result


def model_for_post_training(work: Path) -> tuple[Path, str]:
    """The exported MFU model, or the tiny init when the mfu section produced none."""
    return (work / "hf", "mfu model (exported)") if (work / "hf" / "config.json").is_file() else \
        (work / "init_tiny", "tiny random init (mfu export missing)")


def child_precision(work: Path, plan: Plan, name: str) -> dict:
    import torch

    from precision_mismatch import measure, pooled_mean

    model_dir, source = model_for_post_training(work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"model": source, "engine": "hf generate (sdpa)", "device": device_name()}
    for precision in ("fp32", "bf16", "fp16"):
        r = measure(precision, model_dir, "hf", device, plan.prompts, plan.samples_per_prompt, plan.max_new_tokens)
        result[precision] = {"before": r["before"], "after": r["after"], "mean": pooled_mean(r)}
    result["bf16_over_fp16"] = result["bf16"]["mean"] / result["fp16"]["mean"]
    return result


def child_deepspeed_sft(work: Path, plan: Plan, name: str) -> dict:
    from training.learner import RESULT_FILE
    from training.learner_stage import launch_deepspeed
    from training.sft import SFTConfig

    model_dir, source = model_for_post_training(work)
    data = [str(p) for p in SFT_DATA]
    cfg = SFTConfig(model=str(model_dir), backend="deepspeed", zero_stage=2, num_procs=1, steps=plan.sft_steps,
                    batch_size=plan.sft_batch, eval_batch_size=plan.sft_batch, max_len=plan.sft_max_len, lr=1e-5, warmup_steps=0,
                    max_examples=plan.sft_batch * plan.sft_steps * 4, max_eval_examples=plan.sft_batch, data=data)
    run = work / "sft"
    (run / ".learner").mkdir(parents=True)
    job_path = run / ".learner" / "job.json"
    job_path.write_text(json.dumps({"task": "sft", "config": cfg.model_dump(mode="json"), "data": data,
                                    "model_dir": str(model_dir), "out_dir": str(run)}))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    launch_deepspeed(job_path, 1, logging.getLogger("gpu_check.sft"))
    out = json.loads((job_path.parent / RESULT_FILE).read_text())
    m = out["metrics"]
    return {"model": source, "accelerator": os.environ.get("DS_ACCELERATOR") or "auto", "backend": m["backend"],
            "steps": m["steps"], "losses": [row["loss"] for row in out["train_log"]],
            "grad_norms": [row["grad_norm"] for row in out["train_log"]],
            "eval_loss_before": m.get("eval_loss_before"), "eval_loss_after": m.get("eval_loss_after"),
            "saved_hf": (run / "hf" / "config.json").is_file()}


def cuda_peak_mib() -> float:
    """CUDA memory allocated at peak since the last reset (0 without CUDA), then reset."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def child_post_training(work: Path, plan: Plan, name: str) -> dict:
    """sft, reward and dpo through ``training.learner.train`` (torch backend), grpo and ppo through their
    loops with HF rollouts: a few steps each on the device ``training.devices`` picks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.devices import compute_device, model_device
    from training.learner import train
    from training.rl.grpo import GRPOConfig, train_grpo
    from training.rl.ppo import PPOConfig, build_critic, train_ppo
    from training.rl.rewards import arithmetic_prompts
    from training.rl.rollout import make_engine

    model_dir, source = model_for_post_training(work)
    log = logging.getLogger("gpu_check.post_training")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = {"model": source, "device": str(compute_device())}
    common = dict(backend="torch", steps=plan.sft_steps, batch_size=plan.sft_batch, eval_batch_size=plan.sft_batch,
                  max_len=min(plan.sft_max_len, 256), lr=1e-5, warmup_steps=0, max_examples=plan.sft_batch * plan.sft_steps * 4,
                  max_eval_examples=plan.sft_batch, heldout_fraction=0.25)
    for task, data, extra in (("sft", SFT_DATA, {}), ("reward", PREFERENCE_DATA, {"train_layers": 1}),
                              ("dpo", PREFERENCE_DATA, {"train_layers": 1})):
        cuda_peak_mib()
        out_dir = work / f"post_{task}"
        config = {**common, **extra, "model": str(model_dir), "data": [str(p) for p in data]}
        out = train({"task": task, "config": config, "data": config["data"], "model_dir": str(model_dir),
                     "out_dir": str(out_dir)}, log)
        losses = [row["loss"] for row in out["train_log"]]
        result[task] = {"losses": losses, "finite": all(math.isfinite(x) for x in losses),
                        "effects": [e["metric"] for e in out["effects"]], "cuda_peak_mib": cuda_peak_mib(),
                        "saved_hf": (out_dir / "hf" / "config.json").is_file()}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = arithmetic_prompts(plan.prompts * plan.sft_steps, seed=0)
    rl = dict(rollout_backend="hf", steps=plan.sft_steps, prompts_per_step=plan.prompts // 2,
              max_new_tokens=plan.max_new_tokens, temperature=0.7, lr=1e-6, reward_weights={"correct": 1.0})
    for algo in ("grpo", "ppo"):
        cuda_peak_mib()
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(compute_device())
        engine = make_engine("hf", model_dir, "fp32", 0, max_model_len=1024)
        if algo == "grpo":
            history = train_grpo(policy, tokenizer, engine, prompts, GRPOConfig(**rl, group_size=2), log=log)
            losses = [h.get("loss", math.nan) for h in history]
        else:
            ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(compute_device()).eval()
            history = train_ppo(policy, tokenizer, engine, prompts, PPOConfig(**rl), ref, build_critic(policy, "shared"), log=log)
            losses = [h["pg_loss"] + h["vf_loss"] for h in history]
        result[algo] = {"steps": len(history), "losses": losses, "policy_device": str(model_device(policy)),
                        "rollout_device": str(engine.device), "cuda_peak_mib": cuda_peak_mib()}
    return result


CHILDREN = {"mfu": child_mfu, "numerics_device": child_numerics, "numerics_cpu": child_numerics,
            "precision": child_precision, "deepspeed_sft": child_deepspeed_sft, "post_training": child_post_training}


def run_child(name: str, work: Path, dry_run: bool, timeout: float) -> dict:
    """One section in its own process group (killed whole on timeout); its RESULT line, or the error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if name == "numerics_cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path: gloo + the CPU compat layer
    cmd = [sys.executable, __file__, "--child", name, "--work", str(work)] + (["--dry-run"] if dry_run else [])
    log_path = work / "logs" / f"{name}.log"
    log_path.parent.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    seconds = round(time.perf_counter() - t0, 1)
    text = log_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if rc == 0 and lines:
        return {"ok": True, "seconds": seconds, **json.loads(lines[-1][len("RESULT "):])}
    why = f"timed out after {timeout:.0f} s" if rc is None else f"exit {rc}"
    return {"ok": False, "seconds": seconds, "error": why, "log_tail": text[-3000:]}


# ---- summary --------------------------------------------------------------------------------------------


def environment() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": device_name(), "cpu_count": os.cpu_count()}
    env.update({name: version(name) for name in ("megatron-core", "deepspeed", "transformers", "accelerate")})
    if torch.cuda.is_available():
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return env


def check_numerics(device: dict, cpu: dict) -> dict:
    """Device vs CPU-path losses: relative differences against the stated tolerances."""
    if not (device.get("ok") and cpu.get("ok")):
        return {"ok": False, "error": "a numerics run failed (see numerics_device / numerics_cpu)"}
    a, b = device["losses"], cpu["losses"]
    rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    resume = device["resume"]
    return {"ok": bool(rel[0] <= NUMERICS_STEP0_RTOL and max(rel) <= NUMERICS_RTOL and resume["identical"]),
            "steps": len(a), "dtype": "float32", "device_losses": a, "cpu_losses": b, "step0_rel_diff": rel[0],
            "max_rel_diff": max(rel), "tolerance": {"step0_rtol": NUMERICS_STEP0_RTOL, "rtol": NUMERICS_RTOL},
            "checkpoint_resume": resume}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, same code path")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu_check.json", help="summary JSON")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock cap for all sections together")
    parser.add_argument("--work", type=Path, help="work folder (default: a temp dir, removed afterwards)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = DRY if args.dry_run else GPU
    if not args.dry_run and not args.child:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: torch sees no CUDA device; on a CPU machine run it with --dry-run")
    if args.child:
        print("RESULT " + json.dumps(CHILDREN[args.child](args.work, plan, args.child)), flush=True)
        return
    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"gpu_check: work folder {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    summary = {"mode": "dry-run (CPU, tiny sizes)" if args.dry_run else "gpu", "plan": asdict(plan),
               "environment": environment()}
    try:
        t0 = time.perf_counter()
        summary["data"] = {**prepare(work, plan), "seconds": round(time.perf_counter() - t0, 1)}
        results = {}
        for name in SECTIONS:
            left = args.budget_s - (time.perf_counter() - start)
            if left < 5:
                results[name] = {"ok": False, "error": "skipped: budget spent"}
                continue
            results[name] = run_child(name, work, args.dry_run, min(plan.timeouts[name], left))
            print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else results[name]['error']} "
                  f"({results[name].get('seconds', 0)} s)", file=sys.stderr, flush=True)
        summary["mfu"] = results["mfu"]
        summary["numerics"] = {**check_numerics(results["numerics_device"], results["numerics_cpu"]),
                               "runs": {"device": results["numerics_device"], "cpu": results["numerics_cpu"]}}
        summary["deepspeed_sft"] = results["deepspeed_sft"]
        summary["precision"] = results["precision"]
        summary["post_training"] = results["post_training"]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary["sections_ok"] = {k: summary[k]["ok"] for k in ("mfu", "numerics", "deepspeed_sft", "precision", "post_training")}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, args.out)
    print(json.dumps(summary, indent=1))
    mfu = summary["mfu"].get("mfu", math.nan)
    print(f"mfu {mfu:.4g}")


if __name__ == "__main__":
    main()
