"""Tokens/s of our megatron-core training step vs a plain-PyTorch loop, same model size, batch and data.

Both loops train the same Llama (RMSNorm, SwiGLU, RoPE, GQA, tied embeddings) on byte-level tokens of
tinyshakespeare, in separate child processes of this one run (so each reports its own peak RSS),
alternating megatron/torch twice and keeping each loop's best rate:
- megatron: ``training.pretrain.Trainer.train_step`` (GPTModel, Megatron DDP, get_megatron_optimizer,
  get_forward_backward_func, GPTDataset batches) at TP=PP=DP=1 over gloo with the CPU compat layer;
- torch: ``transformers.LlamaForCausalLM`` (SDPA attention) + ``torch.optim.AdamW`` + ``clip_grad_norm_``.

Same math and optimizer semantics: next-token cross entropy over all ``seq`` positions, 2 microbatches
of 4 per step, AdamW (torch's, on both sides; betas 0.9/0.95, weight decay 0.1 except on 1-D params,
as Megatron groups them), grad clip 1.0, linear warm-up then cosine LR. What differs is only how:
see :data:`DIFFERENCES` (printed with the result).

    .venv/bin/python bench/pretrain_throughput.py [--steps 12] [--hidden 256] [--layers 4] [--seq 256]

Last line: ``ratio_vs_plain_torch <megatron tokens/s ÷ torch tokens/s>``.

``--sweep``: the megatron loop alone for hidden sizes ``--widths`` (FFN 8/3·h rounded to 8, heads
h/64 ≥ 4) × every TP/PP/DP layout of 1 or 2 ranks (2 ranks: ``torch.distributed.run``, one thread
each; 1 rank: ``--threads``). Per run: tokens/s and the fraction of the cores' matmul peak — model
FLOPs/token (PaLM's ``6·N + 12·L·h·seq``, N = every matmul weight incl. the LM head) × tokens/s,
divided by the FLOP/s that ``torch.mm`` reaches on the same cores at the model's GEMM shapes
(ranks × the peak of one rank's thread count; each GEMM's fastest of 5 calls) (each linear's forward and its two backward products, tokens = mbs·seq).
Last line: ``cpu_flop_utilisation <x>`` of the widest model's best layout.

    .venv/bin/python bench/pretrain_throughput.py --sweep [--widths 256,512,1024] [--layers 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("REFINERY_SHARED_DATA", REPO.parent / "shared" / "data")) / "tinyshakespeare" / "input.txt.gz"
EOS = 256
DIFFERENCES = (
    "megatron fuses Q/K/V and gate/up into one matmul each (HF: separate), uses torch.nn.RMSNorm (HF: Python "
    "ops), runs SDPA through our core-attention module, and its timed step also assembles the batch from "
    "GPTDataset, accumulates grads into Megatron DDP's fp32 buffer and all-reduces the loss (1-rank gloo)"
)


def write_byte_shards(out: Path) -> Path:
    """tinyshakespeare paragraphs as byte tokens (eos=256) in one megatron-core indexed shard + blend.json."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [d for d in gzip.open(DATA, "rb").read().split(b"\n\n") if d.strip()]
    shards = out / "shards"
    shards.mkdir(parents=True)
    builder = IndexedDatasetBuilder(str(shards / "bytes-00000.bin"), dtype=np.uint16)
    for d in docs:
        ids = list(d) + [EOS]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(shards / "bytes-00000.idx"))
    (shards / "blend.json").write_text(json.dumps(
        {"prefixes": [[1.0, "bytes-00000"]], "split": "98,1,1", "vocab_size": 257, "eos_id": EOS, "dtype": "uint16"}))
    return shards


def job_config(args) -> dict:
    return {
        "tp": args.tp, "pp": args.pp, "seq_length": args.seq, "micro_batch_size": args.mbs, "global_batch_size": args.gbs,
        "steps": args.steps + args.warmup, "warmup_steps": 2, "grad_clip": 1.0, "spike": {"enabled": False},
        "model": {"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
                  "num_query_groups": args.heads // 2, "ffn_hidden_size": args.ffn},
    }


def run_megatron(args, work: Path) -> dict:
    from training.pretrain import Trainer, next_batch

    job = {"config": job_config(args), "shards": str(work / "shards"), "init_from_dir": None,
           "save_dir": str(work / "ckpt"), "tensorboard_dir": str(work / "tb"), "metrics_path": str(work / "m.jsonl"),
           "cache_dir": str(work / "cache")}
    trainer = Trainer(job)
    trainer.apply_lr()
    position, elapsed = 0, 0.0
    for step in range(args.warmup + args.steps):
        samples, position = next_batch(position, args.gbs, [], len(trainer.dataset))
        t0 = time.perf_counter()
        loss, _ = trainer.train_step(samples)
        trainer.scheduler.step(1)
        if step >= args.warmup:
            elapsed += time.perf_counter() - t0
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"tokens_per_s": args.steps * args.gbs * args.seq / elapsed, "final_loss": loss, "params": params}


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of Megatron's OptimizerParamScheduler (linear warm-up, cosine decay to min_lr)."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def run_torch(args, work: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.megatron.model import pad_vocab
    from training.pretrain_config import PretrainConfig

    cfg = PretrainConfig(**job_config(args))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=pad_vocab(257), hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads // 2, max_position_embeddings=args.seq,
        tie_word_embeddings=True, initializer_range=0.02, attn_implementation="sdpa"))
    model.train()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.steps, cfg.min_lr / cfg.lr))
    ds = IndexedDataset(str(work / "shards" / "bytes-00000"))
    flat = torch.cat([torch.from_numpy(ds[i].astype("int64")) for i in range(len(ds))])
    n = args.seq + 1
    elapsed, micro = 0.0, args.gbs // args.mbs
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for m in range(micro):
            start = (step * args.gbs + m * args.mbs) * n
            batch = flat[start:start + args.mbs * n].view(args.mbs, n)
            logits = model(batch[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) / micro
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        if step >= args.warmup:
            elapsed += time.perf_counter() - t0
    return {"tokens_per_s": args.steps * args.gbs * args.seq / elapsed, "final_loss": float(loss) * micro,
            "params": sum(p.numel() for p in model.parameters())}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = (run_megatron if args.loop == "megatron" else run_torch)(args, Path(args.work))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)
    if args.loop == "megatron":
        from training.megatron.parallel import teardown

        teardown()


LAYOUTS = ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2))  # (tp, pp, dp): everything that fits 1 or 2 ranks


def shape_args(args, hidden: int) -> None:
    """The sweep's model at width ``hidden``: FFN 8/3·h (multiple of 8), heads h/64 (at least 4)."""
    args.hidden, args.ffn, args.heads = hidden, 8 * round(hidden * 8 / 3 / 8), max(4, hidden // 64)


def gemms(args) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count per step-microbatch) of the model's matmuls: each linear's forward
    ``(tokens × k) @ (k × n)`` and its backward ``dX``, ``dW`` products (same FLOPs)."""
    from training.megatron.model import pad_vocab

    tokens, h, kv = args.mbs * args.seq, args.hidden, args.hidden // 2  # num_query_groups = heads / 2
    linear = [(h, h + 2 * kv), (h, h), (h, 2 * args.ffn), (args.ffn, h)]
    shapes = [(tokens, k, n, args.layers) for k, n in linear] + [(tokens, h, pad_vocab(257), 1)]
    return [s for m, k, n, c in shapes for s in ((m, k, n, c), (m, n, k, c), (k, m, n, c))]


def flops_per_token(args) -> float:
    """PaLM's model FLOPs per trained token: 6 × matmul weights + 12 · layers · hidden · seq (attention)."""
    weights = sum(k * n * c for m, k, n, c in gemms(args)[::3])
    return 6 * weights + 12 * args.layers * args.hidden * args.seq


def matmul_peak(args, threads: int, reps: int = 5) -> float:
    """FLOP/s of ``torch.mm`` with ``threads`` threads over the model's GEMM shapes, weighted by their
    count, each timed as its fastest of ``reps`` calls (a peak: the machine is shared)."""
    import torch

    torch.set_num_threads(threads)
    total_flops, total_s = 0.0, 0.0
    for m, k, n, count in gemms(args):
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        total_s += count * best
        total_flops += count * 2.0 * m * k * n
    return total_flops / total_s


def sweep(args, work: str) -> None:
    rows = []
    for hidden in (int(w) for w in args.widths.split(",")):
        shape_args(args, hidden)
        per_token = flops_per_token(args)
        peaks = {t: matmul_peak(args, t) for t in {args.threads, 1}}
        for tp, pp, dp in LAYOUTS:
            if pp > args.layers:
                continue
            ranks = tp * pp * dp
            threads = max(1, args.threads // ranks)
            peak = ranks * peaks[threads]  # the cores' peak: each rank's threads at their own mm peak
            flags = [f"--hidden={hidden}", f"--ffn={args.ffn}", f"--heads={args.heads}", f"--layers={args.layers}",
                     f"--seq={args.seq}", f"--mbs={args.mbs}", f"--gbs={args.gbs}", f"--steps={args.steps}",
                     f"--warmup={args.warmup}", f"--tp={tp}", f"--pp={pp}", f"--threads={threads}",
                     "--loop=megatron", f"--work={work}"]
            launcher = [sys.executable] if ranks == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
            out = subprocess.run([*launcher, __file__, *flags], capture_output=True, text=True, cwd=REPO)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"hidden {hidden} tp{tp} pp{pp} dp{dp} failed:\n{out.stderr[-3000:]}")
            res = json.loads(line[7:])
            util = res["tokens_per_s"] * per_token / peak
            rows.append((hidden, tp, pp, dp, res["params"], res["tokens_per_s"], per_token, peak, util))
            print(f"hidden {hidden:5d} tp{tp} pp{pp} dp{dp}  params/rank {res['params']:>10,}  {res['tokens_per_s']:9.1f} tok/s"
                  f"  {per_token / 1e6:7.1f} MFLOP/token  mm peak {peak / 1e9:6.1f} GFLOP/s  utilisation {util:.3f}", flush=True)
    print("\n| hidden | TP | PP | DP | params (rank 0) | tokens/s | model GFLOP/s | torch.mm peak GFLOP/s | fraction of peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for hidden, tp, pp, dp, params, tps, per_token, peak, util in rows:
        print(f"| {hidden} | {tp} | {pp} | {dp} | {params:,} | {tps:.1f} | {tps * per_token / 1e9:.2f} | {peak / 1e9:.1f} | {util:.3f} |")
    widest = max(r[0] for r in rows)
    best = max((r for r in rows if r[0] == widest), key=lambda r: r[-1])
    print(f"model: {args.layers} layers, seq {args.seq}, batch {args.gbs}x{args.seq}, {args.steps} timed steps after "
          f"{args.warmup}; widest best layout tp{best[1]} pp{best[2]} dp{best[3]}; load avg {os.getloadavg()}")
    print(f"cpu_flop_utilisation {best[-1]:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sweep", action="store_true", help="megatron loop over --widths × TP/PP/DP layouts of ≤ 2 ranks")
    p.add_argument("--widths", default="256,512,1024")
    p.add_argument("--loop", choices=["megatron", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loop:
        child(args)
        return
    if args.sweep:
        with tempfile.TemporaryDirectory() as tmp:
            write_byte_shards(Path(tmp))
            sweep(args, tmp)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_byte_shards(Path(tmp))
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for loop in ("megatron", "torch"):
                out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--loop", loop, "--work", tmp],
                                     capture_output=True, text=True, cwd=REPO)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{loop} loop failed:\n{out.stderr[-3000:]}")
                res = json.loads(line[7:])
                print(f"{loop:8s} tokens/s {res['tokens_per_s']:9.1f}  peak RSS/rank {res['peak_rss_mb']:7.0f} MB  "
                      f"params {res['params']}  loss {res['final_loss']:.3f}", flush=True)
                if loop not in best or res["tokens_per_s"] > best[loop]["tokens_per_s"]:
                    best[loop] = res
    print(f"differs: {DIFFERENCES}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, batch {args.gbs}x{args.seq} tokens, "
          f"threads {args.threads}; best of {args.repeats}")
    print(f"megatron_tokens_per_s {best['megatron']['tokens_per_s']:.1f}")
    print(f"torch_tokens_per_s {best['torch']['tokens_per_s']:.1f}")
    print(f"ratio_vs_plain_torch {best['megatron']['tokens_per_s'] / best['torch']['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
