"""Post-training effects on SmolLM2-135M-Instruct (CPU, small budgets): runs the sft / reward / dpo
stages through the executor (same code as the pipeline) on the real data sets and prints the
held-out figures: SFT loss before/after, RM pairwise accuracy, DPO implicit-reward accuracy and
the chosen-minus-rejected log-prob margin before/after.

    .venv/bin/python bench/post_training_smollm2.py --stage sft      # one stage from smollm2
    .venv/bin/python bench/post_training_smollm2.py --stage reward -o reward.max_steps=40

Every stage starts from SmolLM2 (model: smollm2) so the three can run side by side; the last line
is the stage's headline figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
HH = str(SHARED / "hh_rlhf_harmless_test" / "harmless-base_test.jsonl.gz")

# Budgets sized for a shared 2-core CPU; raise max_steps / max_eval_examples on a real machine.
DEFAULTS = {
    "sft": {"data": [str(SHARED / "gsm8k" / "train.jsonl"), str(SHARED / "self_instruct_sft" / "seed_tasks.jsonl")],
            "max_steps": 8, "batch_size": 2, "max_len": 128, "lr": 3e-5, "warmup_steps": 1,
            "heldout_fraction": 0.02, "max_eval_examples": 4, "eval_batch_size": 2},
    "reward": {"data": [HH], "max_steps": 10, "batch_size": 4, "max_len": 96, "lr": 5e-5, "warmup_steps": 1,
               "heldout_fraction": 0.1, "max_eval_examples": 16, "eval_batch_size": 4},
    "dpo": {"data": [HH], "max_steps": 8, "batch_size": 2, "max_len": 96, "lr": 5e-5, "warmup_steps": 1,
            "beta": 0.1, "heldout_fraction": 0.1, "max_eval_examples": 16, "eval_batch_size": 4},
}
HEADLINE = {"sft": "eval_loss_after", "reward": "eval_accuracy_after", "dpo": "eval_reward_accuracy_after"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=sorted(DEFAULTS), required=True)
    parser.add_argument("-o", "--override", action="append", default=[], help="stage.key=value")
    parser.add_argument("--run-root", default=None, help="default: a temp dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")

    from infra.config import load_config
    from infra.executor import execute_stage

    run_root = args.run_root or tempfile.mkdtemp(prefix="post-smollm2-")
    overrides = {"run_root": run_root, f"{args.stage}.model": "smollm2",
                 **{f"{args.stage}.{k}": v for k, v in DEFAULTS[args.stage].items()}}
    config = load_config(overrides=overrides | dict(o.split("=", 1) for o in args.override))
    manifest = execute_stage(args.stage, config, run_id=f"bench-{args.stage}", force=True)
    metrics = manifest["metrics"]
    print(json.dumps(metrics, indent=1))
    print(f"{args.stage}_{HEADLINE[args.stage]} {metrics[HEADLINE[args.stage]]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
