"""What GRPO and PPO share: rollout batches as tensors, trainer-side log-probs, the precision contract,
the trainer-vs-rollout mismatch metrics, model sources, prompt sets, loading a run's models (``load_run``)
and the stage's outputs (HF checkpoint, TensorBoard scalars, reward-curve plot). The rollout → experience
step itself is in :mod:`training.rl.experience`.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from infra.stage import StageConfig, StageContext, StageResult
from training.devices import compute_device
from training.models import Precision, model_input, stage_model_dir
from training.rl.rewards import INSTRUCTION, RewardModelScorer, arithmetic_prompts, load_gsm8k_jsonl, require_verifiable
from training.rl.rollout import make_engine

if TYPE_CHECKING:  # torch is imported where it runs, not at module import
    import torch


WALL_CLOCK_KEYS = ("gen_s", "step_s")  # per-step seconds: manifest metrics, not output data


class RLConfigBase(StageConfig):
    """Fields GRPO and PPO share: model and reward sources, rollout engine, precision, optimisation."""

    model: str = Field("upstream", description="'upstream' (sft's hf/), 'smollm2', or a local HF model directory")
    prompts: str = Field(
        "arithmetic", description="'arithmetic' (bundled templated problems) or a GSM8K-format JSONL path"
    )
    num_prompts: int = Field(64, ge=1, description="prompts drawn from the prompt set (cycled over steps)")
    rollout_backend: Literal["vllm", "hf"] = Field("vllm", description="rollout engine: vLLM, or transformers generate")
    precision: Precision = Field("fp32", description="one contract for trainer (autocast; fp16 with loss scaling) and rollout")
    steps: int = Field(10, ge=1, description="RL steps (rollout + update + weight sync)")
    prompts_per_step: int = Field(4, ge=1, description="prompts per step")
    max_new_tokens: int = Field(64, ge=1, description="completion length cap")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the trainer's log-probs use the same)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (< 1 biases TIS: see tis_cap)")
    lr: float = Field(1e-6, gt=0, description="AdamW learning rate (constant)")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    micro_batch_size: int = Field(8, ge=1, description="completions per forward/backward")
    tis_cap: float = Field(
        2.0, ge=0, description="truncated importance sampling cap C (0 = off); assumes top_p = 1 (the engines' "
        "log-probs are renormalised over the nucleus)",
    )
    reward_weights: dict[str, float] = Field(
        default_factory=lambda: {"correct": 1.0, "format": 0.2},
        description="weights of reward components: correct, format, reward_model",
    )
    r1_alpha: float | None = Field(
        None, description="set for R1 shaping: r = w_correct*((c - 1) + s), s in (0, 1) from sigmoid(alpha*r_m) and the "
        "other weighted components, so a wrong answer always scores below a right one (needs a reward model)",
    )
    reward_model: str = Field("upstream", description="'upstream' (reward stage's hf/) or a local dir; used when weighted")
    mask_truncated: bool = Field(False, description="drop completions that hit max_new_tokens from the loss (DAPO)")
    seed: int = Field(0, description="seed for prompt order, sampling and init")


# ---- rollouts as tensors ----------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    """Prompts left-padded to P, completions right-padded to T, concatenated: (B, P + T)."""

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor"
    position_ids: "torch.Tensor"
    completion_mask: "torch.Tensor"  # (B, T) 1 on completion tokens
    rollout_logps: "torch.Tensor"  # (B, T) the engine's log-probs, 0 on padding
    prompt_width: int

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
            self.completion_mask.to(device), self.rollout_logps.to(device), self.prompt_width,
        )

    def rows(self, idx) -> "RolloutBatch":
        return RolloutBatch(
            self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx], self.completion_mask[idx],
            self.rollout_logps[idx], self.prompt_width,
        )


def to_batch(completions, pad_id: int) -> RolloutBatch:
    import torch

    width = max(len(c.prompt_ids) for c in completions)
    length = max(max(len(c.token_ids) for c in completions), 1)
    ids, attn, cmask, logps = [], [], [], []
    for c in completions:
        lp, lc = len(c.prompt_ids), len(c.token_ids)
        ids.append([pad_id] * (width - lp) + c.prompt_ids + c.token_ids + [pad_id] * (length - lc))
        attn.append([0] * (width - lp) + [1] * (lp + lc) + [0] * (length - lc))
        cmask.append([1] * lc + [0] * (length - lc))
        logps.append(list(c.logprobs) + [0.0] * (length - lc))
    attention = torch.tensor(attn)
    return RolloutBatch(
        torch.tensor(ids), attention, (attention.cumsum(-1) - 1).clamp(min=0), torch.tensor(cmask, dtype=torch.bool),
        torch.tensor(logps, dtype=torch.float32), width,
    )


def forward_logps(model, batch: RolloutBatch, temperature: float, hidden: bool = False, entropy: bool = False):
    """Per-token log π(o_t) of the completion tokens under ``model`` at ``temperature``: (B, T) float32.

    With ``hidden`` and/or ``entropy`` returns a tuple: the log-probs, then the last hidden states of the
    completion-predicting positions (B, T, H) and/or the full-distribution entropy per token (B, T).
    """
    from training.losses import token_entropy

    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
        output_hidden_states=hidden, use_cache=False,
    )
    p = batch.prompt_width
    logits = out.logits[:, p - 1:-1].float() / temperature
    targets = batch.input_ids[:, p:].unsqueeze(-1)
    logps = (logits.log_softmax(-1).gather(2, targets).squeeze(-1)) * batch.completion_mask
    if not (hidden or entropy):
        return logps
    extra = [out.hidden_states[-1][:, p - 1:-1]] if hidden else []
    if entropy:
        extra.append(token_entropy(logits) * batch.completion_mask)
    return (logps, *extra)


def mismatch_stats(trainer_logps, rollout_logps, mask, cap: float) -> dict[str, float]:
    """Trainer-vs-rollout gap: mean/max |Δ logp| and the distribution of the IS ratio exp(Δ) over real tokens."""
    import torch

    m = mask.bool()
    delta = (trainer_logps - rollout_logps)[m].double()
    if delta.numel() == 0:
        return {}
    ratio = delta.exp()
    q = torch.quantile(ratio, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64, device=ratio.device)).tolist()
    return {
        "logp_gap_mean": delta.abs().mean().item(), "logp_gap_max": delta.abs().max().item(),
        "is_ratio_min": ratio.min().item(), "is_ratio_p01": q[0], "is_ratio_p50": q[1], "is_ratio_p99": q[2],
        "is_ratio_max": ratio.max().item(),
        "is_clamped_frac": (ratio > cap).double().mean().item() if cap else 0.0,
    }


def warn_nucleus_tis(cfg: RLConfigBase, log) -> None:
    """TIS divides the trainer's full-softmax probability by the engine's; with top_p < 1 the engines
    report nucleus-renormalised log-probs, so the ratio sits below 1 and TIS under-weights every token."""
    if cfg.tis_cap and cfg.top_p < 1:
        log.warning("top_p=%s with tis_cap=%s: the rollout log-probs are renormalised over the nucleus, which "
                    "biases the TIS ratio below 1; TIS assumes top_p = 1 (set tis_cap: 0 to turn it off)",
                    cfg.top_p, cfg.tis_cap)


# ---- precision contract -----------------------------------------------------------------------------


class PrecisionOptimizer:
    """The learner's optimiser under the precision contract: fp32 master weights, autocast compute in
    bf16/fp16, and loss scaling for fp16 (``torch.amp.GradScaler``). Plain torch, one process."""

    def __init__(self, params, precision: Precision, lr: float, grad_clip: float):
        import torch

        self.device = compute_device().type
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler(self.device, enabled=precision == "fp16")
        self.grad_clip = grad_clip

    def autocast(self):
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.dtype)

    def backward(self, loss) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> float:
        """Unscale, clip, step (skipped by the scaler on inf/NaN gradients); returns the gradient norm."""
        import torch

        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)


# ---- sources ----------------------------------------------------------------------------------------


def load_prompt_set(cfg: RLConfigBase, external: dict[str, Path]):
    if cfg.prompts == "arithmetic":
        examples = arithmetic_prompts(cfg.num_prompts, seed=cfg.seed)
    else:
        examples = load_gsm8k_jsonl(external["prompts"])
    if cfg.reward_weights.get("correct"):
        examples = require_verifiable(examples, cfg.prompts)
    return examples[:cfg.num_prompts]


def rl_external_inputs(cfg: RLConfigBase) -> dict[str, str]:
    """Non-upstream model / reward model / prompt file: hashed into the cache key and the lineage."""
    out = model_input("model", cfg.model)
    if cfg.reward_model != "upstream" and uses_reward_model(cfg):
        out["reward_model"] = cfg.reward_model
    if cfg.prompts != "arithmetic":
        out["prompts"] = cfg.prompts
    return out


def uses_reward_model(cfg: RLConfigBase) -> bool:
    """A reward-model weight or R1 shaping (which always scores with the reward model)."""
    return bool(cfg.reward_weights.get("reward_model")) or cfg.r1_alpha is not None


def resolve_sources(ctx: StageContext, cfg: RLConfigBase) -> tuple[Path, Path | None]:
    """(policy HF dir, reward-model HF dir or None when no reward-model weight); clear errors otherwise."""
    policy = stage_model_dir(ctx, "model", cfg.model, "sft")
    if not uses_reward_model(cfg):
        return policy, None
    return policy, stage_model_dir(ctx, "reward_model", cfg.reward_model, "reward", hint="a local HF reward-model directory")


@dataclass
class RLRun:
    """What an RL stage trains with: its sources, prompts, tokenizer, policy, frozen reference (or None),
    reward-model scorer (or None) and rollout engine."""

    policy_dir: Path
    reward_model_dir: Path | None
    examples: list
    tokenizer: Any
    policy: Any
    ref: Any
    reward_model: Any
    engine: Any


def load_run(ctx: StageContext, with_ref: bool, detail: str) -> RLRun:
    """Resolve the sources, load the prompt set and the models (fp32) and start the rollout engine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg: RLConfigBase = ctx.config
    policy_dir, rm_dir = resolve_sources(ctx, cfg)
    examples = load_prompt_set(cfg, ctx.external_inputs)
    ctx.log.info("%s: policy %s, reward model %s, %d prompts, backend %s, precision %s, %s", ctx.stage, policy_dir,
                 rm_dir, len(examples), cfg.rollout_backend, cfg.precision, detail)
    torch.manual_seed(cfg.seed)
    device = compute_device()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).to(device)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).to(device).eval() if with_ref else None
    reward_model = RewardModelScorer(rm_dir) if rm_dir else None
    engine = make_engine(cfg.rollout_backend, policy_dir, cfg.precision, cfg.seed, max_model_len=1024)
    return RLRun(policy_dir, rm_dir, examples, tokenizer, policy, ref, reward_model, engine)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """The question as a user turn with the generation prompt (chat template if the tokenizer has one)."""
    text = f"{question}\n{INSTRUCTION}"
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(text + "\n")["input_ids"]


# ---- outputs ----------------------------------------------------------------------------------------


def save_hf_model(model, tokenizer, out_dir: Path) -> None:
    """The trained policy as an fp32 HF checkpoint (safetensors) with its tokenizer."""
    import torch

    model.to(torch.float32).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """Mean reward and mean response length per step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [h["reward_mean"] for h in history], marker="o")
    a.set(xlabel="step", ylabel="mean reward", title=title)
    b.plot(steps, [h["response_len_mean"] for h in history], marker="o", color="tab:orange")
    b.set(xlabel="step", ylabel="mean response tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def finish_stage(ctx: StageContext, run: RLRun, history: list[dict], label: str, extra: dict):
    """End of an RL stage: the policy as ``hf/``, the curve and scalars, summary metrics and a report."""
    cfg = ctx.config
    save_hf_model(run.policy, run.tokenizer, ctx.output("hf"))
    metrics = {**finish_outputs(ctx, history), **extra, "rollout_backend": cfg.rollout_backend,
               "precision": cfg.precision}
    report = (
        f"{label}, {cfg.rollout_backend} rollouts, {cfg.precision}: mean reward "
        f"{metrics['reward_first']:.3f} → {metrics['reward_last']:.3f} over {cfg.steps} steps; trainer-vs-rollout "
        f"|Δ logp| mean {metrics['logp_gap_mean']:.2e}, max {metrics['logp_gap_max']:.2e}.\n\n![reward](reward_curve.png)"
    )
    warnings = []
    if history and "groups" in history[0] and all(h["zero_adv_groups"] == h["groups"] for h in history):
        warnings.append("no learning signal: in every step every group's rewards were equal (all advantages 0)")
    return StageResult(metrics=metrics, tables={"steps": history}, report_md=report,
                       images={"reward_curve": "reward_curve.png"}, warnings=warnings)


def finish_outputs(ctx: StageContext, history: list[dict]) -> dict:
    """Write history.json, the TensorBoard scalars and the curve PNG; return summary metrics."""
    from torch.utils.tensorboard import SummaryWriter

    tb = ctx.output("tensorboard")
    writer = SummaryWriter(str(tb))
    for h in history:
        for k, v in h.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                writer.add_scalar(f"{ctx.stage}/{k}", v, h["step"])
    writer.close()
    timeless = [{k: v for k, v in h.items() if k not in WALL_CLOCK_KEYS} for h in history]
    (ctx.out_dir / "history.json").write_text(json.dumps(timeless, indent=1))  # timings stay in the manifest
    plot_history(history, ctx.out_dir / "reward_curve.png", f"{ctx.stage}: mean reward")
    first, last = history[0], history[-1]
    k = max(1, len(history) // 4)
    summary = {
        "steps": len(history),
        "reward_first": first["reward_mean"], "reward_last": last["reward_mean"],
        "reward_first_quarter": sum(h["reward_mean"] for h in history[:k]) / k,
        "reward_last_quarter": sum(h["reward_mean"] for h in history[-k:]) / k,
        "response_len_mean": sum(h["response_len_mean"] for h in history) / len(history),
        "logp_gap_mean": sum(h.get("logp_gap_mean", 0.0) for h in history) / len(history),
        "logp_gap_max": max(h.get("logp_gap_max", 0.0) for h in history),
        "is_ratio_min": min(h.get("is_ratio_min", 1.0) for h in history),
        "is_ratio_max": max(h.get("is_ratio_max", 1.0) for h in history),
        "reward_failures": sum(h.get("reward_failures", 0) for h in history),
        "truncated_completions": sum(h.get("truncated", 0) for h in history),
    }
    return summary
