"""Short CPU GRPO run on SmolLM2-135M-Instruct with templated arithmetic prompts: GRPO vs Dr. GRPO
from the same start, same prompts and sampling seed. Writes the reward / response-length curves
(PNG + JSON) and prints the mean reward of the first and last quarter of the steps.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/grpo_curve.py --steps 8 --max-new-tokens 32 --lr 2e-5
Last line: ``dr_grpo_len_over_grpo_len <x>`` (mean response length, Dr. GRPO / GRPO, over all steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path


def run_one(aggregation: str, args) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.models import resolve_model
    from training.rl.grpo import GRPOConfig, train_grpo
    from training.rl.rewards import arithmetic_prompts
    from training.rl.rollout import make_engine

    model_dir = resolve_model("smollm2")
    cfg = GRPOConfig(
        model="smollm2", rollout_backend=args.backend, aggregation=aggregation, steps=args.steps,
        prompts_per_step=args.prompts_per_step, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, lr=args.lr, micro_batch_size=8, reward_weights={"correct": 1.0, "format": 0.2},
    )
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = make_engine(args.backend, model_dir, "fp32", 0, max_model_len=512)
    examples = arithmetic_prompts(cfg.num_prompts, seed=0, max_operand=10)
    return train_grpo(policy, tokenizer, engine, examples, cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--out", default="bench/out/grpo_curve")
    parser.add_argument("--only", choices=["grpo", "dr_grpo"], help="run one aggregation (used internally)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only:
        (out / f"{args.only}.json").write_text(json.dumps(run_one(args.only, args), indent=1))
        return
    # the two runs are independent: one process each, in parallel (one thread each on this 2-core box)
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--only", agg]) for agg in ("grpo", "dr_grpo")]
    if any(p.wait() for p in procs):
        raise SystemExit("a GRPO run failed")
    runs = {agg: json.loads((out / f"{agg}.json").read_text()) for agg in ("grpo", "dr_grpo")}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for agg, hist in runs.items():
        a.plot([h["step"] for h in hist], [h["reward_mean"] for h in hist], marker="o", label=agg)
        b.plot([h["step"] for h in hist], [h["response_len_mean"] for h in hist], marker="o", label=agg)
    a.set(xlabel="step", ylabel="mean reward", title="SmolLM2-135M GRPO, arithmetic")
    b.set(xlabel="step", ylabel="mean response tokens")
    a.legend()
    fig.tight_layout()
    fig.savefig(out / "grpo_curve.png", dpi=90)
    k = max(1, args.steps // 4)
    print("aggregation | reward first quarter | reward last quarter | mean response len | step s")
    for agg, hist in runs.items():
        first = sum(h["reward_mean"] for h in hist[:k]) / k
        last = sum(h["reward_mean"] for h in hist[-k:]) / k
        length = sum(h["response_len_mean"] for h in hist) / len(hist)
        secs = sum(h["step_s"] for h in hist) / len(hist)
        print(f"{agg} | {first:.3f} | {last:.3f} | {length:.1f} | {secs:.1f}")
    ratio = (sum(h["response_len_mean"] for h in runs["dr_grpo"]) / sum(h["response_len_mean"] for h in runs["grpo"]))
    print(f"dr_grpo_len_over_grpo_len {ratio:.3f}")


if __name__ == "__main__":
    main()
