"""Does RL learn? Held-out accuracy curves of our GRPO and TRL's GRPOTrainer, same budget, same scorer.

SmolLM2-135M-Instruct (or ``--model DIR``) on the templated arithmetic task with its verifiable reward
(``correctness_reward``: 1 when the answer's number is right). Both sides get the same model, training
prompts (in the same order), reward function, group size G, sampling temperature, learning rate,
completion cap, loss (``grpo`` aggregation, group-std scaling, β = 0, μ = 1) and number of steps. Ours is
the stage's own loop (``training.rl.grpo.train_grpo`` with the demo's HF rollout engine); TRL runs in
its own venv (.venv-trl, as bench/grpo_vs_trl.py makes it). Every ``--eval-every`` steps both policies
answer the held-out questions greedily (``heldout_arithmetic_prompts``: never a training prompt; 206 at
``--max-operand 13``), scored by the one function below. Seeds change the prompt order and sampling.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rl_learns.py   # 12 steps x 4 prompts x G=4, ours seeds 0,1, TRL seed 0
Prints the curves (accuracy per side and seed, every K steps), the paired gains with 95% intervals
(bootstrap over the held-out items, seeds averaged per item), our final accuracy minus TRL's, writes
``rl_learns.png`` + ``results.json``; last line ``heldout_gain_ci_low <x>`` (lower end of our gain's interval).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]


def heldout_items(max_operand: int) -> list[dict]:
    from training.rl.rewards import heldout_arithmetic_prompts

    return [{"question": e.question, "answer": e.answer} for e in heldout_arithmetic_prompts(None, max_operand)]


def training_rows(count: int, seed: int, max_operand: int) -> list[dict]:
    from training.rl.rewards import arithmetic_prompts

    return [{"question": e.question, "answer": e.answer} for e in arithmetic_prompts(count, seed, max_operand)]


def greedy_correct(model, tokenizer, items: list[dict], max_new_tokens: int, batch_size: int = 64) -> list[int]:
    """1/0 per held-out item: the greedy answer to the chat-formatted question, as the eval stage asks it."""
    import torch

    from training.rl.rewards import INSTRUCTION, correctness_reward

    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{it['question']}\n{INSTRUCTION}"}],
                                             add_generation_prompt=True, tokenize=False) for it in items]
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [int(correctness_reward(t, it["answer"])) for t, it in zip(texts, items[i:i + batch_size])]
    model.train(was_training)
    return out


def run_ours(args, seed: int, rows: list[dict], items: list[dict]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.rl.grpo import GRPOConfig, train_grpo
    from training.rl.rewards import PromptExample
    from training.rl.rollout import make_engine

    cfg = GRPOConfig(
        model=args.model_dir, rollout_backend=args.backend, aggregation=args.aggregation, steps=args.steps,
        prompts_per_step=args.prompts_per_step, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, lr=args.lr, micro_batch_size=args.prompts_per_step * args.group_size,
        reward_weights={"correct": 1.0}, tis_cap=0.0, num_prompts=len(rows), seed=seed,
    )
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    policy = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    engine = make_engine(args.backend, args.model_dir, "fp32", seed, max_model_len=512)
    curve = [{"step": 0, "correct": json.loads((Path(args.out) / "step0.json").read_text())}]

    def evaluate(record: dict) -> None:
        done = record["step"] + 1
        if done % args.eval_every == 0 or done == args.steps:
            curve.append({"step": done, "correct": greedy_correct(policy, tokenizer, items, args.max_new_tokens)})
            print(f"step {done}: held-out accuracy {sum(curve[-1]['correct']) / len(items):.3f}", file=sys.stderr, flush=True)

    t0 = time.time()
    history = train_grpo(policy, tokenizer, engine, [PromptExample(r["question"], r["answer"]) for r in rows], cfg,
                         on_step=evaluate)
    return {"curve": curve, "train_reward": [h["reward_mean"] for h in history], "seconds": time.time() - t0}


def run_trl(args, seed: int, rows: list[dict], items: list[dict]) -> dict:
    """Runs inside .venv-trl: TRL's GRPOTrainer, prompts in our order (no shuffling), same scorer."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from training.rl.rewards import INSTRUCTION, correctness_reward

    torch.manual_seed(seed)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # the order our RolloutSource draws prompts in
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"{rows[i]['question']}\n{INSTRUCTION}"}], "answer": rows[i]["answer"]}
        for i in order
    ])

    def reward(completions, answer, **kwargs):
        return [correctness_reward(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)

    curve = [{"step": 0, "correct": json.loads((Path(args.out) / "step0.json").read_text())}]

    class HeldOut(TrainerCallback):
        def on_step_end(self, _args, state, control, model=None, **kwargs):
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                curve.append({"step": state.global_step,
                              "correct": greedy_correct(model, tokenizer, items, args.max_new_tokens)})

    cfg = GRPOConfig(
        output_dir=str(Path(args.out) / f"trl-{seed}"), max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.group_size, gradient_accumulation_steps=1,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=args.temperature,
        top_p=1.0, top_k=0, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, loss_type=args.aggregation, scale_rewards="group", num_iterations=1,
        shuffle_dataset=False, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
        fp16=False, seed=seed, dataloader_num_workers=0, use_vllm=False,
    )
    trainer = GRPOTrainer(model=args.model_dir, reward_funcs=reward, args=cfg, train_dataset=data,
                          processing_class=tokenizer, callbacks=[HeldOut()])
    t0 = time.time()
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"curve": curve, "train_reward": rewards, "seconds": time.time() - t0}


def accuracy_table(results: dict) -> list[str]:
    """step | each side-seed's accuracy | each side's mean over seeds."""
    from infra.effects import wilson_interval

    runs = sorted(results)
    sides = sorted({r.split("-")[0] for r in runs})
    steps = [p["step"] for p in results[runs[0]]["curve"]]
    lines = ["step | " + " | ".join(runs) + " | " + " | ".join(f"{s} mean [95%]" for s in sides)]
    for k, step in enumerate(steps):
        cells = [f"{sum(results[r]['curve'][k]['correct']) / len(results[r]['curve'][k]['correct']):.3f}" for r in runs]
        for side in sides:
            per_seed = [results[r]["curve"][k]["correct"] for r in runs if r.startswith(side)]
            n = sum(len(c) for c in per_seed)
            p = sum(map(sum, per_seed)) / n
            lo, hi = wilson_interval(p, n)
            cells.append(f"{p:.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"{step} | " + " | ".join(cells))
    return lines


def per_item_mean(results: dict, side: str, index: int) -> list[float]:
    """Per held-out item, the mean correctness over the side's seeds at curve point ``index``."""
    curves = [results[r]["curve"][index]["correct"] for r in sorted(results) if r.startswith(side + "-")]
    return [sum(col) / len(col) for col in zip(*curves)]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infra.effects import wilson_interval

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for side, colour in (("ours", "tab:blue"), ("trl", "tab:orange")):
        runs = [r for r in sorted(results) if r.startswith(side + "-")]
        if not runs:
            continue
        steps = [p["step"] for p in results[runs[0]]["curve"]]
        means = [sum(per_item_mean(results, side, k)) / len(per_item_mean(results, side, k)) for k in range(len(steps))]
        n = len(results[runs[0]]["curve"][0]["correct"]) * len(runs)
        ci = [wilson_interval(p, n) for p in means]
        ax.plot(steps, means, marker="o", color=colour, label=f"{side} ({len(runs)} seeds)")
        ax.fill_between(steps, [c[0] for c in ci], [c[1] for c in ci], color=colour, alpha=0.15)
    ax.set(xlabel="GRPO step", ylabel="held-out accuracy (greedy)", title="SmolLM2-135M, arithmetic: held-out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local HF model directory")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--aggregation", choices=["grpo", "dr_grpo"], default="grpo")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="our rollout engine")
    parser.add_argument("--max-operand", type=int, default=13, help="operands 2..N (206 held-out questions at 13)")
    parser.add_argument("--eval-every", type=int, default=6)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--trl-seeds", default="0", help="TRL's seeds")
    parser.add_argument("--sides", default="ours,trl")
    parser.add_argument("--jobs", type=int, default=3, help="runs at once (one thread each)")
    parser.add_argument("--out", default="bench/out/rl_learns")
    parser.add_argument("--worker", help="internal: SIDE-SEED, run it and print its result")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        import logging

        import torch

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        side, seed = args.worker.split("-")
        rows = json.loads((out / f"prompts-{seed}.json").read_text())
        items = json.loads((out / "heldout.json").read_text())
        result = (run_trl if side == "trl" else run_ours)(args, int(seed), rows, items)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from infra.effects import effect_row, format_effect
    from grpo_vs_trl import ensure_trl_venv
    from training.models import resolve_model

    model_dir = str(resolve_model(args.model))
    seeds = [int(s) for s in args.seeds.split(",")]
    sides = args.sides.split(",")
    items = heldout_items(args.max_operand)
    (out / "heldout.json").write_text(json.dumps(items))
    for seed in seeds:
        rows = training_rows(args.steps * args.prompts_per_step, seed, args.max_operand)
        (out / f"prompts-{seed}.json").write_text(json.dumps(rows))
    # step 0 is the same model for every run: scored once here (greedy, so the same on both sides)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = {"model": model_dir, "max_operand": args.max_operand, "max_new_tokens": args.max_new_tokens}
    cached = out / "step0-key.json"
    if not (cached.exists() and json.loads(cached.read_text()) == key and (out / "step0.json").exists()):
        start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        (out / "step0.json").write_text(json.dumps(
            greedy_correct(start, AutoTokenizer.from_pretrained(model_dir), items, args.max_new_tokens)))
        cached.write_text(json.dumps(key))
        del start
    step0 = json.loads((out / "step0.json").read_text())
    print(f"step 0: held-out accuracy {sum(step0) / len(items):.3f} ({len(items)} questions)", flush=True)
    python = {"ours": sys.executable, **({"trl": str(ensure_trl_venv())} if "trl" in sides else {})}

    def work(run: str) -> tuple[str, dict]:
        done = out / f"{run}.json"  # a finished run's result: kept, so a rerun of the bench only runs what is missing
        if done.exists() and json.loads(done.read_text()).get("key") == run_key:
            return run, json.loads(done.read_text())["result"]
        cmd = [python[run.split("-")[0]], __file__, *sys.argv[1:], "--worker", run, "--model-dir", model_dir]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        log = out / f"{run}.log"  # the worker's progress (tail -f it)
        with log.open("w") as err:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(log.read_text()[-6000:])
            raise SystemExit(f"{run} failed (exit {proc.returncode}); log {log}")
        result = json.loads(lines[-1][len("RESULT "):])
        done.write_text(json.dumps({"key": run_key, "result": result}))
        print(f"{run}: done in {result['seconds']:.0f} s", flush=True)
        return run, result

    run_key = {k: v for k, v in vars(args).items() if k not in ("worker", "jobs", "seeds", "trl_seeds", "sides")}
    trl_seeds = [int(s) for s in args.trl_seeds.split(",")]
    runs = [f"{side}-{seed}" for side in sides for seed in (trl_seeds if side == "trl" else seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(work, runs))
    (out / "results.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                                  "n_heldout": len(items), "runs": results}, indent=1))
    plot(results, out / "rl_learns.png")

    print(f"held-out accuracy (greedy, {len(items)} questions never trained on); {len(seeds)} seed(s) per side")
    print("\n".join(accuracy_table(results)))
    print("train reward, mean of first / last quarter of steps: " + "; ".join(
        f"{r} {sum(v['train_reward'][:max(1, len(v['train_reward']) // 4)]) / max(1, len(v['train_reward']) // 4):.3f} / "
        f"{sum(v['train_reward'][-max(1, len(v['train_reward']) // 4):]) / max(1, len(v['train_reward']) // 4):.3f}"
        for r, v in sorted(results.items())))
    gains = {}
    for side in sides:
        gains[side] = effect_row(side, f"{side} held-out accuracy gain", per_item_mean(results, side, 0),
                                 per_item_mean(results, side, -1), kind="proportion", better="higher")
        print(format_effect(gains[side]))
    if "trl" in sides:
        gap = effect_row("gap", "ours − TRL at the last step", per_item_mean(results, "trl", -1),
                         per_item_mean(results, "ours", -1), kind="proportion", better="higher")
        print(format_effect(gap))
    print(f"heldout_gain_ci_low {gains['ours']['delta_lo']:.3f}" if "ours" in gains else "heldout_gain_ci_low nan")


if __name__ == "__main__":
    main()
