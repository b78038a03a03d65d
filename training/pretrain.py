"""Megatron-core pretraining loop; torchrun entry: ``torchrun --nproc_per_node N -m training.pretrain --job J``.

One process per rank. ``parallel_state`` splits the ranks into TP × PP × DP groups; the model is
megatron-core's ``GPTModel`` (Llama layer spec) wrapped in Megatron's ``DistributedDataParallel``,
trained with ``get_megatron_optimizer`` (Adam, grad clipping) and the pipeline schedule from
``get_forward_backward_func()``. Samples come from megatron-core's ``GPTDataset`` over the
blend in ``shards/blend.json``. Each step's global batch is the next ``global_batch_size``
sample indices from the sampler position, minus samples on the skip ledger.

After every step the :class:`~training.spike.SpikeGuard` judges (loss, grad norm); a spike
restores the last valid checkpoint, puts the step's samples on the skip ledger, optionally cuts
the LR for N steps, and training continues. Rank 0 writes metrics.jsonl and TensorBoard scalars.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.devices import compute_device
from training.faults import FaultInjector
from training.megatron import checkpoint, cpu
from training.megatron.checkpoint import latest_valid
from training.megatron.convert import hf_to_megatron, load_into_model, read_hf, shard_for_rank
from training.megatron.model import LlamaArch, build_model, pad_vocab
from training.megatron.parallel import initialize, layout
from training.models import PRECISION_DTYPES
from training.pretrain_config import PretrainConfig
from training.spike import SpikeGuard, in_ranges, ledger_entry, recurring


class ShardInfo:
    """The two tokenizer facts GPTDataset needs (end-of-document id, vocab size); no pad token."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod, self.vocab_size = eod, vocab_size
        self.unique_identifiers = {"class": "ShardInfo", "eod": eod, "vocab_size": vocab_size}  # cache key part


def read_blend(shards: Path) -> dict:
    path = shards / "blend.json"
    if not path.is_file():
        raise FileNotFoundError(f"{shards} has no blend.json (is it the tokenize stage's shards/ output?)")
    blend = json.loads(path.read_text())
    for key in ("prefixes", "vocab_size", "eos_id"):
        if key not in blend:
            raise ValueError(f"{path}: missing key {key!r}")
    return blend


def build_train_dataset(shards: Path, blend: dict, seq_length: int, num_samples: int, seed: int, cache_dir: Path):
    """megatron-core's GPTDataset (blended when there are several prefixes), train split."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes = [str(shards / rel) for _, rel in blend["prefixes"]]
    weights = [float(w) for w, _ in blend["prefixes"]]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights if len(prefixes) > 1 else None),
        split=blend.get("split", "98,1,1"), tokenizer=ShardInfo(blend["eos_id"], blend["vocab_size"]),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=str(cache_dir), mid_level_dataset_surplus=0.05,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


def sample_documents(dataset, sample: int) -> list[list]:
    """[shard name, sequence index in the shard] of each document a training sample takes tokens from, in
    token order: megatron-core's blend index → the shard's GPTDataset → shuffle → sample → document index
    (``_query_document_sample_shuffle_indices``, megatron-core 0.16)."""
    if hasattr(dataset, "datasets"):  # BlendedDataset: which shard, which of its samples
        if dataset.dataset_index is None:
            dataset[sample]  # memory-maps its indices on first access
        dataset, sample = dataset.datasets[int(dataset.dataset_index[sample])], int(dataset.dataset_sample_index[sample])
    _, documents = dataset._query_document_sample_shuffle_indices(sample)
    shard = Path(dataset.dataset.path_prefix).name
    return [[shard, int(d)] for d in documents]


def next_batch(position: int, count: int, ledger: list[dict], size: int) -> tuple[list[int], int]:
    """(the next ``count`` sample indices from ``position`` not on the skip ledger, new position)."""
    ranges = [r for e in ledger for r in e["skipped_samples"]]
    picked = []
    while len(picked) < count:
        if position >= size:
            raise RuntimeError(f"the dataset ran out of samples ({size}); raise its size or lower steps")
        if not in_ranges(position, ranges):
            picked.append(position)
        position += 1
    return picked, position


class Trainer:
    """Model, optimizer, scheduler, data and guard of one rank, with checkpoint save/restore."""

    def __init__(self, job: dict):
        import torch
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.job = job
        cfg = self.cfg = PretrainConfig(**job["config"])
        initialize(cfg.tp, cfg.pp, cfg.seed)
        cpu.check_optimizer_options(cfg.use_distributed_optimizer, PRECISION_DTYPES[cfg.precision])
        self.layout = layout()
        self.dp = self.layout["dp"]
        if cfg.global_batch_size % (cfg.micro_batch_size * self.dp):
            raise ValueError(
                f"global_batch_size {cfg.global_batch_size} must be a multiple of micro_batch_size × dp "
                f"= {cfg.micro_batch_size} × {self.dp}"
            )
        self.num_microbatches = cfg.global_batch_size // (cfg.micro_batch_size * self.dp)
        self.shards = Path(job["shards"])
        self.blend = read_blend(self.shards)

        hf_state = None
        if job.get("init_from_dir"):
            self.arch, hf_state = read_hf(job["init_from_dir"], cfg.seq_length)
            if self.arch.vocab_size < self.blend["vocab_size"]:
                raise ValueError(
                    f"init model vocab {self.arch.vocab_size} < shard vocab {self.blend['vocab_size']}: "
                    "the shards were tokenized with a different tokenizer"
                )
        else:
            m = cfg.model
            self.arch = LlamaArch(
                num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
                num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size,
                vocab_size=pad_vocab(self.blend["vocab_size"]), seq_length=cfg.seq_length, rope_theta=m.rope_theta,
                norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings, init_std=m.init_std,
            )
        self.model = build_model(self.arch, cfg.tp, cfg.pp, PRECISION_DTYPES[cfg.precision])
        if hf_state is not None:
            local = shard_for_rank(hf_to_megatron(hf_state, self.arch), self.arch, cfg.tp,
                                   self.layout["tp_rank"], cfg.pp, self.layout["pp_rank"])
            load_into_model(self.model, local)
        self.model.config.finalize_model_grads_func = finalize_model_grads
        self.ddp = DistributedDataParallel(
            self.model.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.use_distributed_optimizer),
            self.model,
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, adam_beta1=0.9,
                adam_beta2=cfg.adam_beta2, adam_eps=1e-8, clip_grad=cfg.grad_clip, bf16=cfg.precision == "bf16",
                params_dtype=getattr(torch, PRECISION_DTYPES[cfg.precision]), use_distributed_optimizer=cfg.use_distributed_optimizer,
            ),
            [self.ddp],
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=min(cfg.warmup_steps, cfg.steps - 1),
            lr_decay_steps=cfg.steps, lr_decay_style="cosine", start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay, wd_incr_steps=cfg.steps, wd_incr_style="constant",
        )
        spare_steps = cfg.spike.max_rollbacks + 2
        self.dataset = build_train_dataset(
            self.shards, self.blend, cfg.seq_length, (cfg.steps + spare_steps) * cfg.global_batch_size,
            cfg.seed, Path(job["cache_dir"]),
        )
        s = cfg.spike
        self.guard = SpikeGuard(s.window, s.sigma, s.min_history, s.min_rel_std)
        self.step, self.position, self.ledger, self.lr_cut_until = 0, 0, [], -1
        self.faults = FaultInjector(cfg.fault_injection, self.blend["vocab_size"])
        self.is_reporter = ps.get_pipeline_model_parallel_rank() == ps.get_pipeline_model_parallel_world_size() - 1 \
            and ps.get_tensor_model_parallel_rank() == 0

    # ---- state ------------------------------------------------------------------------------

    def train_state(self) -> dict:
        return {
            "step": self.step, "position": self.position, "scheduler": self.scheduler.state_dict(),
            "spike_guard": self.guard.state_dict(), "skip_ledger": self.ledger, "lr_cut_until": self.lr_cut_until,
        }

    def save(self) -> Path:
        return checkpoint.save(self.job["save_dir"], self.step, self.model, self.optimizer, self.train_state(),
                               self.arch.to_dict(), self.cfg.keep_checkpoints)

    def restore(self, ckpt: Path, keep_ledger: bool = False) -> None:
        """Load a checkpoint; a rollback keeps the in-memory ledger (it is newer than the checkpoint's)."""
        state = checkpoint.load(ckpt, self.model, self.optimizer)
        self.step, self.position = state["step"], state["position"]
        self.scheduler.num_steps = 0  # load_state_dict advances by the saved step count
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.load_state_dict(state["spike_guard"])
        if not keep_ledger:
            self.ledger, self.lr_cut_until = state["skip_ledger"], state["lr_cut_until"]
        self.apply_lr()

    def newest_valid(self) -> tuple[Path | None, list]:
        """Rank 0 validates the checkpoints, every rank gets its answer."""
        import torch.distributed as dist

        box = [latest_valid(self.job["save_dir"]) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def apply_lr(self) -> None:
        """Scheduler LR for the current step, times the spike LR cut while it lasts."""
        self.scheduler.step(0)
        if self.step < self.lr_cut_until:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.cfg.spike.lr_cut

    # ---- one step -----------------------------------------------------------------------------

    def microbatches(self, samples: list[int]) -> list[dict]:
        import torch

        per_rank = len(samples) // self.dp
        mine = samples[self.layout["dp_rank"] * per_rank:(self.layout["dp_rank"] + 1) * per_rank]
        items = [self.dataset[i] for i in mine]
        batch = {k: torch.stack([it[k] for it in items]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        batch = self.faults.corrupt_batch(batch)
        mbs, device = self.cfg.micro_batch_size, compute_device()
        return [{k: v[i * mbs:(i + 1) * mbs].to(device) for k, v in batch.items()} for i in range(self.num_microbatches)]

    def train_step(self, samples: list[int]) -> tuple[float, float]:
        import torch
        import torch.distributed as dist
        from megatron.core.pipeline_parallel import get_forward_backward_func

        scale = self.faults.loss_scale()

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])

            def loss_func(per_token):
                mask = mb["loss_mask"].float()
                loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1) * scale
                return loss, {"lm loss": loss.detach().clone()}  # the schedule divides loss in place

            return output, loss_func

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(self.microbatches(samples)), model=[self.ddp],
            num_microbatches=self.num_microbatches, seq_length=self.cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size, forward_only=False,
        )
        _, grad_norm, _ = self.optimizer.step()
        local = torch.zeros(2, dtype=torch.float64, device=compute_device())  # NCCL reduces device tensors only
        if self.is_reporter:
            local[0] = sum(float(x["lm loss"]) for x in losses) / len(losses)
            local[1] = 1.0
        dist.all_reduce(local)  # mean over the DP replicas of the last stage; every rank gets it
        return float(local[0] / local[1]), (float(grad_norm) if grad_norm is not None else None)

    # ---- loop -----------------------------------------------------------------------------------

    def fit(self) -> None:
        import torch.distributed as dist

        cfg, rank0 = self.cfg, dist.get_rank() == 0
        ckpt, rejected = self.newest_valid()
        if ckpt is not None:
            self.restore(ckpt)
        log = MetricsLog(self.job, rank0, resume_step=self.step)  # 0 when starting afresh
        for path, reason in rejected:
            log.event("rejected_checkpoint", self.step, checkpoint=path, reason=reason)
        if ckpt is not None:
            log.event("resumed", self.step, checkpoint=str(ckpt))
            if rank0:
                print(f"resumed from step {self.step} ({ckpt})", flush=True)
        else:
            self.apply_lr()
            last_good = self.save()  # step 0: a rollback target always exists
            log.event("checkpoint", 0, checkpoint=str(last_good))
        tokens_per_step = cfg.global_batch_size * cfg.seq_length
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            samples, position = next_batch(self.position, cfg.global_batch_size, self.ledger, len(self.dataset))
            lr = self.optimizer.param_groups[0]["lr"]  # the LR this step trains with
            self.faults.arm(self.step)
            loss, grad_norm = self.train_step(samples)
            verdict = self.guard.check(loss, grad_norm) if cfg.spike.enabled else None
            if verdict is not None and verdict.spike and recurring(self.step, self.ledger, cfg.spike.max_retries,
                                                                   loss, grad_norm):
                self.guard.accept(loss, grad_norm)
                log.event("spike_accepted", self.step, reason=f"{verdict.reason}; it recurred after "
                          f"{cfg.spike.max_retries} rollbacks with other samples: accepted as the trend")
            elif verdict is not None and verdict.spike:
                if len(self.ledger) >= cfg.spike.max_rollbacks:
                    raise RuntimeError(f"step {self.step}: {verdict.reason}; gave up after {len(self.ledger)} rollbacks")
                target, _ = self.newest_valid()
                meta_step = int(target.name.split("_")[1])
                documents = [{"sample": s, "documents": sample_documents(self.dataset, s)} for s in samples]
                entry = ledger_entry(self.step, verdict, loss, grad_norm, samples, meta_step,
                                     cfg.spike.lr_cut, cfg.spike.lr_cut_steps, documents)
                self.ledger.append(entry)
                self.restore(target, keep_ledger=True)
                self.lr_cut_until = self.step + cfg.spike.lr_cut_steps if cfg.spike.lr_cut < 1 else -1
                self.apply_lr()
                log.event("spike", **entry)
                continue
            self.position = position
            self.step += 1
            self.scheduler.step(1)
            self.apply_lr()
            dt = time.perf_counter() - t0
            log.step(self, loss, grad_norm, lr, tokens_per_step / dt, samples)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                log.event("checkpoint", self.step, checkpoint=str(self.save()))
        log.close()


class MetricsLog:
    """Rank 0's metrics.jsonl, TensorBoard scalars and console lines.

    Training starts at step N (0, or the step of the checkpoint it resumed from): records an interrupted
    attempt wrote past N are dropped (from metrics.jsonl and, with ``purge_step``, from TensorBoard),
    so each step appears once.
    """

    def __init__(self, job: dict, active: bool, resume_step: int = 0):
        self.active = active
        self.every = PretrainConfig(**job["config"]).log_every
        if active:
            from torch.utils.tensorboard import SummaryWriter

            path = Path(job["metrics_path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                kept = [line for line in path.read_text().splitlines()
                        if _complete_record(line) and json.loads(line)["step"] <= resume_step]
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(path)
            self.fh = open(path, "a")
            self.tb = SummaryWriter(job["tensorboard_dir"], purge_step=resume_step + 1)

    def _write(self, rec: dict) -> None:
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()

    def step(self, trainer: Trainer, loss: float, grad_norm: float | None, lr: float, tokens_per_s: float,
             samples: list[int]):
        if not self.active:
            return
        s = trainer.step
        rec = {"step": s, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tokens_per_s,
               "tokens": s * trainer.cfg.global_batch_size * trainer.cfg.seq_length, "dp": trainer.dp,
               "first_sample": samples[0], "last_sample": samples[-1]}
        self._write(rec)
        for key in ("loss", "grad_norm", "lr", "tokens_per_s"):
            if rec[key] is not None:
                self.tb.add_scalar(f"train/{key}", rec[key], s)
        if s % self.every == 0:
            print(f"step {s} loss {loss:.4f} grad_norm {grad_norm if grad_norm is not None else float('nan'):.3f} lr {lr:.2e} tok/s {tokens_per_s:.0f}", flush=True)

    def event(self, kind: str, step: int, **fields):
        if not self.active:
            return
        self._write({"event": kind, "step": step, **fields})
        if kind == "spike":
            self.tb.add_scalar("train/skipped_samples", fields["num_skipped"], step)
        print(f"[{kind}] step {step} " + json.dumps(fields), flush=True)

    def close(self):
        if self.active:
            self.fh.close()
            self.tb.close()


def _complete_record(line: str) -> bool:
    """False for the torn last line a killed writer can leave."""
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Megatron-core pretraining rank (launch with torchrun).")
    parser.add_argument("--job", required=True, help="job spec JSON written by the pretrain stage")
    args = parser.parse_args(argv)
    job = json.loads(Path(args.job).read_text())
    trainer = Trainer(job)
    try:
        trainer.fit()
    finally:
        from training.megatron.parallel import teardown

        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
