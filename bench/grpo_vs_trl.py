"""GRPO step time: ours (training/rl) vs TRL's GRPOTrainer, same model, prompts, G, lengths, in one run.

SmolLM2-135M-Instruct, templated arithmetic prompts (chat template, same instruction), reward =
exact numeric answer, G completions per prompt, the same max completion length, temperature, lr, β = 0,
μ = 1, loss_type grpo, fp32 on CPU, generation with transformers on both sides (TRL use_vllm=False;
ours rollout_backend=hf unless --backend vllm). TRL runs in its own venv (.venv-trl, created here
with -c constraints.txt so it gets the same CPU torch). Step time = mean over steps after the first.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/grpo_vs_trl.py --steps 4
Last line: ``ratio_vs_trl <x>`` = TRL step time / ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_VENV = REPO / ".venv-trl"
TRL_PINS = ["torch==2.13.0", "transformers>=5.0,<5.20", "trl==1.16.0", "datasets", "accelerate"]


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    check = subprocess.run([str(python), "-c", "import trl, torch; print(trl.__version__)"], capture_output=True, text=True)
    if check.returncode:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), *TRL_PINS],
                       check=True)
    return python


def prompt_rows(n: int) -> list[dict]:
    from training.rl.rewards import arithmetic_prompts

    return [{"question": e.question, "answer": e.answer} for e in arithmetic_prompts(n, seed=0)]


def run_trl(args, rows: list[dict], model_dir: str) -> dict:
    """Runs inside .venv-trl."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REPO))  # training.rl.rewards is pure Python: the same reward function
    from training.rl.rewards import INSTRUCTION, correctness_reward

    torch.manual_seed(0)
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"{r['question']}\n{INSTRUCTION}"}], "answer": r["answer"]} for r in rows
    ])

    def reward(completions, answer, **kwargs):
        return [correctness_reward(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.time()

        def on_step_end(self, *a, **k):
            self.times.append(time.time() - self.t0)

    timer = Timer()
    batch = args.prompts_per_step * args.group_size
    cfg = GRPOConfig(
        output_dir=str(Path(args.out) / "trl"), max_steps=args.steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, learning_rate=args.lr, beta=0.0, loss_type="grpo", num_iterations=1,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=0,
        dataloader_num_workers=0, use_vllm=False,
    )
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=cfg, train_dataset=data, callbacks=[timer])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"step_s": timer.times, "reward": [h["reward"] for h in logs],
            "completion_len": [h.get("completions/mean_length", float("nan")) for h in logs]}


def run_ours(args, rows: list[dict], model_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.rl.grpo import GRPOConfig, train_grpo
    from training.rl.rewards import PromptExample
    from training.rl.rollout import make_engine

    torch.manual_seed(0)
    cfg = GRPOConfig(
        model=model_dir, rollout_backend=args.backend, aggregation="grpo", steps=args.steps,
        prompts_per_step=args.prompts_per_step, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, lr=args.lr, micro_batch_size=args.prompts_per_step * args.group_size,
        reward_weights={"correct": 1.0}, tis_cap=0.0,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = make_engine(args.backend, model_dir, "fp32", 0, max_model_len=512)
    examples = [PromptExample(r["question"], r["answer"]) for r in rows]
    history = train_grpo(policy, tokenizer, engine, examples, cfg)
    return {"step_s": [h["step_s"] for h in history], "reward": [h["reward_mean"] for h in history],
            "completion_len": [h["response_len_mean"] for h in history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--out", default="bench/out/grpo_vs_trl")
    parser.add_argument("--worker", choices=["trl", "ours"], help="internal: run one side, print its result")
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        rows = json.loads((out / "prompts.json").read_text())
        result = (run_trl if args.worker == "trl" else run_ours)(args, rows, args.model_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from training.models import resolve_model

    model_dir = str(resolve_model("smollm2"))
    (out / "prompts.json").write_text(json.dumps(prompt_rows(64)))
    trl_python = ensure_trl_venv()
    results = {}
    for side, python in (("ours", sys.executable), ("trl", str(trl_python))):
        cmd = [python, __file__, *sys.argv[1:], "--worker", side, "--model-dir", model_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-6000:])
            raise SystemExit(f"{side} failed (exit {proc.returncode})")
        results[side] = json.loads(lines[-1][len("RESULT "):])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("side | step s (after the first) | mean completion tokens | reward per step")
    mean_step = {}
    for side, r in results.items():
        steady = r["step_s"][1:] or r["step_s"]
        mean_step[side] = sum(steady) / len(steady)
        lens = [x for x in r["completion_len"] if x == x]
        print(f"{side} | {mean_step[side]:.1f} | {sum(lens) / max(len(lens), 1):.1f} | "
              f"{', '.join(f'{x:.2f}' for x in r['reward'])}")
    print(f"ratio_vs_trl {mean_step['trl'] / mean_step['ours']:.3f}")


if __name__ == "__main__":
    main()
