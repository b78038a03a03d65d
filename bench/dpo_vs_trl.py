"""DPO training steps/s: ours (training.dpo on the torch learner) vs TRL's DPOTrainer, same run.

Same model, same preference pairs (only pairs that fit ``--max-len`` untruncated, so both see the
same tokens), same batch, AdamW + cosine schedule, sigmoid loss, β = 0.1; both precompute the
reference log-probs before training, and the first step of each is left out of the timing.
TRL lives in its own venv (``.venv-bench-trl``, created here on first use: it sees .venv's
packages through a .pth file and adds only TRL, installed with ``-c constraints.txt``; the script
checks that torch is still the CPU build there).

    .venv/bin/python bench/dpo_vs_trl.py        # SmolLM2-135M, HH-RLHF pairs <= 64 tokens, 10 steps of 2 pairs

Last line: ``ratio_vs_trl <ours steps/s ÷ TRL steps/s>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_VENV = REPO / ".venv-bench-trl"
TRL_SPEC = "trl==1.16.0"
MARK = "TRL_RESULT "


def ensure_trl_venv() -> Path:
    """The TRL venv's python; created once, verified to keep this venv's torch."""
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([_base_python(), "-m", "venv", str(TRL_VENV)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        Path(purelib, "refinery_main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = "import importlib.util as u, torch; print(torch.__version__, u.find_spec('trl') is not None)"
    version, has_trl = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout.split()
    if has_trl != "True":
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), TRL_SPEC], check=True)
        version = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout.split()[0]
    import torch

    if version != torch.__version__:
        raise SystemExit(f"{TRL_VENV}: torch {version} != {torch.__version__}; delete the venv and rerun")
    return python


def _base_python() -> str:
    """The interpreter .venv was made from (a venv made from a venv's python would nest)."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def prepare_pairs(model_dir: Path, data: str, n: int, max_len: int) -> list[dict]:
    """The first n pairs of ``data`` whose chosen and rejected both fit max_len untruncated."""
    from transformers import AutoTokenizer

    from training.data import BadExample, Skips, encode_pair, load_records, prepare_tokenizer, record_to_pair

    tok = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tok)
    chosen = []
    for pair in load_records([data], lambda rec: [record_to_pair(rec)], Skips()):
        try:
            enc = encode_pair(tok, pair, 10**6)
        except BadExample:
            continue
        if max(len(enc.chosen.input_ids), len(enc.rejected.input_ids)) <= max_len:
            chosen.append({"prompt": pair.prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
                           "rejected": [{"role": "assistant", "content": pair.rejected}]})
        if len(chosen) == n:
            return chosen
    raise SystemExit(f"only {len(chosen)} pairs of {data} fit max_len {max_len}; lower --steps/--batch or raise --max-len")


def run_ours(model_dir: Path, pairs_file: Path, args) -> dict:
    from training.dpo import DPOTask
    from training.learner import step_schedule
    from training.learner_backends import TorchBackend
    from transformers import AutoTokenizer

    from training.data import prepare_tokenizer

    cfg = {"steps": args.steps, "batch_size": args.batch, "max_len": args.max_len, "lr": args.lr,
           "warmup_steps": 1, "beta": 0.1, "heldout_fraction": 0.0, "eval_batch_size": args.batch}
    task = DPOTask(cfg, [str(pairs_file)])
    tok = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tok)
    train_items, _, _ = task.prepare(tok)
    model = task.load_model(model_dir, tok)
    task.setup(model, train_items, [])
    backend = TorchBackend(model, task.cfg)
    marks = []
    for ids in step_schedule(len(train_items), args.batch, args.steps, seed=0):
        model.train()
        loss, count, _ = task.loss(model, [train_items[i] for i in ids], None)
        backend.step(loss / count)
        marks.append(time.perf_counter())
        print(f"ours step {len(marks)} loss {loss.item() / count:.4f}", flush=True)
    return {"steps_per_s": (len(marks) - 1) / (marks[-1] - marks[0]), "tokens": sum(
        len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in train_items)}


def trl_worker(args) -> int:
    """Runs inside the TRL venv: DPOTrainer on the same pairs, prints MARK + JSON."""
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    marks = []

    class Timer(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            marks.append(time.perf_counter())

    rows = [json.loads(line) for line in open(args.pairs_file)]
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=1.0, beta=0.1,
        loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=True, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, bf16=False, fp16=False,
    )
    trainer = DPOTrainer(model=args.model_dir, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Timer()])
    trainer.train()
    print(MARK + json.dumps({"steps_per_s": (len(marks) - 1) / (marks[-1] - marks[0])}), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="DPO steps/s: ours vs TRL DPOTrainer")
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local HF dir")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/hh_rlhf_harmless_test/harmless-base_test.jsonl.gz"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--worker-trl", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_trl:
        return trl_worker(args)

    sys.path.insert(0, str(REPO))
    from training.models import resolve_model

    trl_python = ensure_trl_venv()
    model_dir = resolve_model(args.model)
    pairs = prepare_pairs(model_dir, args.data, args.steps * args.batch, args.max_len)
    pairs_file = Path(tempfile.mkdtemp(prefix="dpo-bench-")) / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))

    ours = run_ours(model_dir, pairs_file, args)
    cmd = [str(trl_python), __file__, "--worker-trl", "--pairs-file", str(pairs_file), "--model-dir", str(model_dir),
           "--steps", str(args.steps), "--batch", str(args.batch), "--max-len", str(args.max_len), "--lr", str(args.lr)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-3000:], sep="\n")
        raise SystemExit("TRL worker failed")
    trl = json.loads(next(line for line in out.stdout.splitlines() if line.startswith(MARK))[len(MARK):])
    print(f"model {model_dir.name}, {len(pairs)} pairs ({ours['tokens']} tokens), batch {args.batch}, "
          f"max_len {args.max_len}, {args.steps} steps (first step untimed)")
    print(f"ours {ours['steps_per_s']:.4f} steps/s, TRL DPOTrainer {trl['steps_per_s']:.4f} steps/s")
    print(f"ratio_vs_trl {ours['steps_per_s'] / trl['steps_per_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
