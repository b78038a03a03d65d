"""Post-training effects on SmolLM2-135M-Instruct (CPU, small budgets): runs the sft / reward / dpo
stages through the executor (same code as the pipeline) on the real data sets and prints the
held-out figures: SFT loss before/after, RM pairwise accuracy, DPO implicit-reward accuracy and
the chosen-minus-rejected log-prob margin before/after, accuracies with 95% confidence intervals.

    .venv/bin/python bench/post_training_smollm2.py --stage sft      # one stage from smollm2
    .venv/bin/python bench/post_training_smollm2.py --stage reward -o reward.max_steps=40

Every stage starts from SmolLM2 (model: smollm2) so the three can run side by side; the last line
is the stage's headline figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from infra.effects import Z95, wilson_interval  # noqa: E402 (after the repo is on the path)
SHARED = REPO.parent / "shared" / "data"
HH = str(SHARED / "hh_rlhf_harmless_test" / "harmless-base_test.jsonl.gz")

# Budgets for a 2-core CPU (~11 min per stage when idle, reward ~20). Held-out: 30% (by content hash)
# of the HH-RLHF pairs whose prompt fits max_len (answers are cut at max_len): 190 pairs at 64 tokens,
# 346 at 128, so an accuracy's 95% CI is about ±0.07 / ±0.05. reward and dpo train the top 4 of 30
# blocks only (train_layers): the frozen bottom runs once per sequence, which buys epochs over the
# training pairs (reward 2 over 838, dpo 2 over 444) and the full held-out set twice within the budget.
HELDOUT = {"max_len": 64, "heldout_fraction": 0.3, "max_eval_examples": 100_000, "eval_batch_size": 16}
DEFAULTS = {
    "sft": {"data": [str(SHARED / "gsm8k" / "train.jsonl"), str(SHARED / "self_instruct_sft" / "seed_tasks.jsonl")],
            "steps": 8, "batch_size": 2, "max_len": 128, "lr": 3e-5, "warmup_steps": 1,
            "heldout_fraction": 0.02, "max_eval_examples": 4, "eval_batch_size": 2},
    # reward at 128 tokens: 838 train / 346 held-out pairs (64 tokens left 444 / 190 and only 0.579 [0.508, 0.647])
    "reward": {"data": [HH], **HELDOUT, "max_len": 128, "train_layers": 4, "steps": 100, "batch_size": 16,
               "lr": 1e-4, "warmup_steps": 5},
    "dpo": {"data": [HH], **HELDOUT, "train_layers": 4, "steps": 110, "batch_size": 8, "lr": 5e-5,
            "warmup_steps": 5, "beta": 0.1},
}
HEADLINE = {"sft": "eval_loss_after", "reward": "eval_accuracy_after", "dpo": "eval_reward_accuracy_after"}


def accuracy_effect(name: str, before: float, after: float, n: int) -> str:
    """Before → after with 95% CIs; the change's CI treats the two as independent samples (wider than paired)."""
    lo_b, hi_b = wilson_interval(before, n)
    lo_a, hi_a = wilson_interval(after, n)
    half = Z95 * (before * (1 - before) / n + after * (1 - after) / n) ** 0.5
    delta = after - before
    return (f"{name} on {n} held-out pairs: {before:.3f} [{lo_b:.3f}, {hi_b:.3f}] -> {after:.3f} [{lo_a:.3f}, {hi_a:.3f}]; "
            f"change {delta:+.3f} [{delta - half:+.3f}, {delta + half:+.3f}] (95% CIs)")


def effects(stage: str, m: dict) -> list[str]:
    """Human-readable effect lines (no data text is ever printed: HH-RLHF holds offensive content)."""
    if stage == "sft":
        return [f"sft held-out loss per assistant token: {m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f}"]
    n = int(m["eval_items"])
    if stage == "reward":
        lo, hi = wilson_interval(m["eval_accuracy_after"], n)
        return [accuracy_effect("reward pairwise accuracy", m["eval_accuracy_before"], m["eval_accuracy_after"], n),
                f"reward accuracy after vs chance 0.5: 95% CI [{lo:.3f}, {hi:.3f}] "
                f"({'excludes' if lo > 0.5 else 'includes'} 0.5)",
                f"reward margin r_c - r_r: {m['eval_reward_margin_before']:+.4f} -> {m['eval_reward_margin_after']:+.4f}"]
    lo, hi = wilson_interval(m["eval_reward_accuracy_after"], n)
    return [accuracy_effect("dpo log-prob accuracy (log pi(y_c) > log pi(y_r))",
                            m["eval_logp_accuracy_before"], m["eval_logp_accuracy_after"], n),
            f"dpo implicit-reward accuracy {m['eval_reward_accuracy_after']:.3f} on {n} held-out pairs, 95% CI "
            f"[{lo:.3f}, {hi:.3f}] ({'excludes' if lo > 0.5 else 'includes'} chance 0.5; it is 0 before training: all ties)",
            f"dpo chosen-minus-rejected log-prob margin: {m['eval_logp_margin_before']:+.4f} -> {m['eval_logp_margin_after']:+.4f}; "
            f"implicit reward margin after {m['eval_reward_margin_after']:+.4f}",
            f"dpo log-probs chosen {m['eval_logps_chosen_before']:.3f} -> {m['eval_logps_chosen_after']:.3f}, "
            f"rejected {m['eval_logps_rejected_before']:.3f} -> {m['eval_logps_rejected_after']:.3f}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=sorted(DEFAULTS), required=True)
    parser.add_argument("-o", "--override", action="append", default=[], help="stage.key=value")
    parser.add_argument("--run-root", default=None, help="default: a temp dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")

    from flows.registry import execute_stage, load_config

    t0, load0 = time.time(), os.getloadavg()[0]
    run_root = args.run_root or tempfile.mkdtemp(prefix="post-smollm2-")
    overrides = {"run_root": run_root, f"{args.stage}.model": "smollm2",
                 **{f"{args.stage}.{k}": v for k, v in DEFAULTS[args.stage].items()}}
    config = load_config(overrides=overrides | dict(o.split("=", 1) for o in args.override))
    manifest = execute_stage(args.stage, config, run_id=f"bench-{args.stage}", force=True)
    metrics = manifest["metrics"]
    print(json.dumps(metrics, indent=1))
    print(f"wall {time.time() - t0:.0f} s; 1-min load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    for line in effects(args.stage, metrics):
        print(line)
    print(f"{args.stage}_{HEADLINE[args.stage]} {metrics[HEADLINE[args.stage]]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
