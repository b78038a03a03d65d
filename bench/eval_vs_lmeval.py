"""Agreement and speed of Refinery's evaluation vs lm-evaluation-harness on the same items, same run.

Model: SmolLM2-135M-Instruct (fp32 HF dir from the PyPI GGUF). Items: the first N HellaSwag
validation items and the first N GSM8K test items. lm-eval (its HF backend) reads local-file task
configs written here: HellaSwag with lm-eval's own ``process_docs`` (ctx_a/ctx_b recovered from
the converted file's ``ctx`` exactly as our loader does), GSM8K as lm-eval's ``gsm8k`` task
(``Question: ...\\nAnswer:``, its stop sequences, strict and flexible filters).

    .venv/bin/python bench/eval_vs_lmeval.py --hellaswag 500 --gsm8k 200

Last line: ``max_abs_delta_pt <x>`` — the largest |ours − lm-eval| over HellaSwag acc/acc_norm and
GSM8K strict/flexible exact match, in percentage points.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("REFINERY_SHARED_DATA", REPO.parent / "shared" / "data"))

HELLASWAG_YAML = """\
task: refinery_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GSM8K_YAML = """\
task: refinery_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: generate_until
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_new_tokens}
num_fewshot: {num_fewshot}
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
"""


def write_inputs(tmp: Path, n_hs: int, n_gsm: int, args) -> dict[str, Path]:
    """First-N item files (HellaSwag with ctx_a/ctx_b for lm-eval's process_docs) and task configs."""
    from evaluation.tasks.hellaswag import split_ctx

    hs = tmp / "hellaswag.jsonl"
    with gzip.open(args.hellaswag_path, "rt") if args.hellaswag_path.suffix == ".gz" else open(args.hellaswag_path) as fh, hs.open("w") as out:
        for k, line in enumerate(fh):
            if k >= n_hs:
                break
            rec = json.loads(line)
            ctx_a, ctx_b = split_ctx(rec["ctx"])
            out.write(json.dumps({**rec, "ctx_a": ctx_a, "ctx_b": ctx_b}) + "\n")
    gsm = tmp / "gsm8k_test.jsonl"
    gsm.write_text("".join(args.gsm8k_path.read_text().splitlines(keepends=True)[:n_gsm]))
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    (tasks / "refinery_hellaswag.yaml").write_text(HELLASWAG_YAML.format(path=hs))
    (tasks / "refinery_gsm8k.yaml").write_text(
        GSM8K_YAML.format(train=args.gsm8k_train, test=gsm, num_fewshot=args.num_fewshot, max_new_tokens=args.max_new_tokens)
    )
    return {"hellaswag": hs, "gsm8k": gsm, "tasks": tasks}


def run_lm_eval(model_dir: Path, files: dict[str, Path], args) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out: dict = {}
    t0, c0 = time.time(), time.process_time()
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
    manager = TaskManager(include_path=str(files["tasks"]))
    if args.hellaswag:
        t = time.time()
        res = lm_eval.simple_evaluate(model=lm, tasks=["refinery_hellaswag"], task_manager=manager, log_samples=True,
                                      num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
        r = res["results"]["refinery_hellaswag"]
        samples = sorted(res["samples"]["refinery_hellaswag"], key=lambda s: s["doc_id"])
        out["hellaswag"] = {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"], "seconds": time.time() - t,
                            "per_item": [(s["acc"], s["acc_norm"]) for s in samples]}
    if args.gsm8k:
        t = time.time()
        res = lm_eval.simple_evaluate(model=lm, tasks=["refinery_gsm8k"], task_manager=manager, log_samples=True,
                                      apply_chat_template=args.chat_template, fewshot_as_multiturn=args.chat_template,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0)
        r = res["results"]["refinery_gsm8k"]
        strict = sorted((s for s in res["samples"]["refinery_gsm8k"] if s["filter"] == "strict-match"), key=lambda s: s["doc_id"])
        out["gsm8k"] = {"exact_match_strict": r["exact_match,strict-match"],
                        "exact_match_flexible": r["exact_match,flexible-extract"], "seconds": time.time() - t,
                        "generations": [s["resps"][0][0] for s in strict]}
    out["seconds"], out["cpu_seconds"] = time.time() - t0, time.process_time() - c0
    return out


def run_ours(model_dir: Path, files: dict[str, Path], args) -> dict:
    from evaluation.model import EvalModel
    from evaluation.tasks import gsm8k, hellaswag

    out: dict = {}
    t0, c0 = time.time(), time.process_time()
    model = EvalModel(model_dir, batch_size=args.batch_size, generation_backend="hf")
    if args.hellaswag:
        t = time.time()
        res = hellaswag.evaluate(model, files["hellaswag"])
        out["hellaswag"] = {**res.metrics, "seconds": time.time() - t,
                            "per_item": [(s["acc"], s["acc_norm"]) for s in res.samples]}
    if args.gsm8k:
        t = time.time()
        res = gsm8k.evaluate(model, files["gsm8k"], train_path=args.gsm8k_train, num_fewshot=args.num_fewshot,
                             chat_template=args.chat_template, max_new_tokens=args.max_new_tokens)
        out["gsm8k"] = {**res.metrics, "seconds": time.time() - t, "generations": [s["generation"] for s in res.samples]}
    out["seconds"], out["cpu_seconds"] = time.time() - t0, time.process_time() - c0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hellaswag", type=int, default=500, help="first N HellaSwag validation items (0 = skip)")
    parser.add_argument("--gsm8k", type=int, default=200, help="first N GSM8K test items (0 = skip)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    parser.add_argument("--hellaswag-path", type=Path, default=SHARED / "hellaswag_val" / "hellaswag_val.jsonl.gz")
    parser.add_argument("--gsm8k-path", type=Path, default=SHARED / "gsm8k" / "test.jsonl")
    parser.add_argument("--gsm8k-train", type=Path, default=SHARED / "gsm8k" / "train.jsonl")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from training.models import resolve_model

    model_dir = resolve_model("smollm2")
    with tempfile.TemporaryDirectory(prefix="eval-vs-lmeval-") as tmp:
        files = write_inputs(Path(tmp), args.hellaswag, args.gsm8k, args)
        theirs = run_lm_eval(model_dir, files, args)
        ours = run_ours(model_dir, files, args)

    deltas = {}
    print(f"model {model_dir}  hellaswag {args.hellaswag} items  gsm8k {args.gsm8k} items "
          f"({args.num_fewshot}-shot, chat template {args.chat_template})  batch {args.batch_size}")
    if args.hellaswag:
        a, b = ours["hellaswag"], theirs["hellaswag"]
        agree = sum(x == y for x, y in zip(a["per_item"], b["per_item"]))
        for m in ("acc", "acc_norm"):
            deltas[f"hellaswag_{m}"] = 100 * (a[m] - b[m])
            print(f"hellaswag {m:9s} ours {a[m]:.4f}  lm-eval {b[m]:.4f}  delta {deltas[f'hellaswag_{m}']:+.2f} pt")
        print(f"hellaswag items with identical (acc, acc_norm): {agree}/{args.hellaswag}")
        print(f"hellaswag seconds ours {a['seconds']:.1f}  lm-eval {b['seconds']:.1f}  ratio {a['seconds'] / b['seconds']:.2f}")
    if args.gsm8k:
        a, b = ours["gsm8k"], theirs["gsm8k"]
        same = sum(x.strip() == y.strip() for x, y in zip(a["generations"], b["generations"]))
        for m in ("exact_match_strict", "exact_match_flexible"):
            deltas[f"gsm8k_{m}"] = 100 * (a[m] - b[m])
            items = round(args.gsm8k * abs(a[m] - b[m]))
            print(f"gsm8k {m:21s} ours {a[m]:.4f}  lm-eval {b[m]:.4f}  delta {deltas[f'gsm8k_{m}']:+.2f} pt ({items} items)")
        print(f"gsm8k identical generations: {same}/{args.gsm8k}")
        print(f"gsm8k seconds ours {a['seconds']:.1f}  lm-eval {b['seconds']:.1f}  ratio {a['seconds'] / b['seconds']:.2f}")
    print(f"total seconds ours {ours['seconds']:.1f}  lm-eval {theirs['seconds']:.1f}  "
          f"time_ratio_ours_over_lmeval {ours['seconds'] / theirs['seconds']:.2f}")
    print(f"total cpu seconds ours {ours['cpu_seconds']:.1f}  lm-eval {theirs['cpu_seconds']:.1f}  "
          f"cpu_ratio_ours_over_lmeval {ours['cpu_seconds'] / theirs['cpu_seconds']:.2f}")
    print(f"max_abs_delta_pt {max(abs(v) for v in deltas.values()) if deltas else 0.0:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
