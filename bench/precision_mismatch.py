"""Trainer-vs-rollout log-prob gap under the precision contract: bf16 vs fp16 (and fp32) per rollout engine.

For each precision, on one model (SmolLM2-135M-Instruct by default) and the same prompts: the
rollout engine (vLLM — its CPU build here — or HF ``generate``) samples completions in that
precision; the trainer (fp32 master weights, autocast in that precision — what training/rl uses)
re-scores them; |Δ logp| per token is measured before and after a weight perturbation synced in
place (p += s·std(p)·N(0,1)), as in a training step. Each precision runs in its own process (one
vLLM engine per process). ``bench/gpu_check.py`` runs :func:`measure` with the HF engine on a GPU.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/precision_mismatch.py [--engine hf] [--precisions fp32,bf16,fp16]
Last line: ``fp16_over_bf16_gap <x>`` = mean |Δ logp| fp16 / bf16 over both phases (< 1: FP16 wins).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(precision: str, model_dir, engine: str = "vllm", device: str = "cpu", prompts: int = 8, n: int = 2,
            max_new_tokens: int = 32, perturb: float = 0.02) -> dict:
    """Mean/max |Δ logp| between the trainer and the rollout engine, before and after a perturbation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.rl.common import PrecisionOptimizer, chat_prompt_ids, forward_logps, to_batch
    from training.rl.rewards import arithmetic_prompts
    from training.rl.rollout import HFEngine, Sampling, VLLMEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    trainer = PrecisionOptimizer(model.parameters(), precision, lr=1e-6, grad_clip=1.0)  # only for its autocast
    t0 = time.time()
    if engine == "vllm":
        rollout = VLLMEngine(model_dir, precision=precision, seed=0, max_model_len=512)
    else:
        rollout = HFEngine(model_dir, precision=precision, seed=0, device=device)
    start_s = time.time() - t0
    prompt_ids = [chat_prompt_ids(tokenizer, e.question) for e in arithmetic_prompts(prompts, seed=0)]
    out = {"precision": precision, "engine": engine, "device": str(device), "engine_start_s": round(start_s, 1)}
    for phase in ("before", "after"):
        if phase == "after":
            torch.manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(perturb * p.std() * torch.randn_like(p))
            t0 = time.time()
            rollout.update_weights(model.state_dict())
            out["sync_s"] = round(time.time() - t0, 3)
        comps = rollout.generate(prompt_ids, n, Sampling(max_new_tokens, 1.0, 1.0))
        batch = to_batch(comps, tokenizer.pad_token_id).to(device)
        with torch.no_grad(), trainer.autocast():
            logps = forward_logps(model, batch, 1.0)
        delta = (logps - batch.rollout_logps)[batch.completion_mask].abs().double()
        out[phase] = {"tokens": delta.numel(), "sum": delta.sum().item(), "mean": delta.mean().item(),
                      "max": delta.max().item()}
    return out


def pooled_mean(result: dict) -> float:
    """Mean |Δ logp| over the tokens of both phases."""
    return (result["before"]["sum"] + result["after"]["sum"]) / (result["before"]["tokens"] + result["after"]["tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' or an HF model directory")
    parser.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--precisions", default="bf16,fp16", help="comma-separated subset of fp32,bf16,fp16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--perturb", type=float, default=0.02, help="noise scale relative to each tensor's std")
    parser.add_argument("--only", choices=["fp32", "bf16", "fp16"], help="measure one precision (used internally)")
    args = parser.parse_args()
    if args.only:
        from training.models import resolve_model

        result = measure(args.only, resolve_model(args.model), args.engine, "cpu", args.prompts, args.n,
                         args.max_new_tokens, args.perturb)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    for precision in args.precisions.split(","):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", precision],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{precision} run failed (exit {proc.returncode})")
        results[precision] = json.loads(lines[-1][len("RESULT "):])
    print("precision | phase | tokens | mean |Δ logp| | max |Δ logp| | engine start s")
    for precision, r in results.items():
        for phase in ("before", "after"):
            print(f"{precision} | {phase} | {r[phase]['tokens']} | {r[phase]['mean']:.3e} | {r[phase]['max']:.3e} | "
                  f"{r['engine_start_s']}")
    if "bf16" in results and "fp16" in results:
        for phase in ("before", "after"):
            print(f"fp16/bf16 mean gap {phase}: {results['fp16'][phase]['mean'] / results['bf16'][phase]['mean']:.3f}")
        print(f"fp16_over_bf16_gap {pooled_mean(results['fp16']) / pooled_mean(results['bf16']):.3f}")


if __name__ == "__main__":
    main()
