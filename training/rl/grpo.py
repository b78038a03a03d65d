"""``grpo``: group-relative policy optimisation on verifiable (and/or reward-model) rewards.

Each step: G samples per prompt from the rollout engine (with DAPO dynamic sampling, groups whose
rewards are all equal are replaced by new prompts' groups, up to a budget) → rewards (optionally with
DAPO's soft overlong punishment) → group advantages (std of the group / batch / none) → μ inner
updates on the clipped surrogate with old-policy log-probs, aggregated as ``grpo`` / ``bnpo`` /
``dr_grpo`` / ``dapo`` with step-global normalisers, optional k3 KL to the initial policy, truncated
importance sampling against the engine's log-probs → in-place weight sync to the engine.
``dr_grpo`` means Dr. GRPO as published: the constant normaliser *and* no std scaling.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Literal

from pydantic import Field, model_validator

from infra.stage import Stage, StageContext, StageResult
from training.devices import model_device
from training.rl.common import (
    PrecisionOptimizer, RLConfigBase, finish_stage, forward_logps, load_run, mismatch_stats, pad_token_id,
    rl_external_inputs, warn_nucleus_tis,
)
from training.rl.experience import Rollout, RolloutSource, make_experience
from training.rl.rewards import overlong_penalty


class GRPOConfig(RLConfigBase):
    """GRPO settings on top of the shared RL fields."""

    group_size: int = Field(4, ge=1, description="G: completions sampled per prompt")
    aggregation: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("grpo", description="token-loss aggregation")
    scale_rewards: Literal["auto", "group", "batch", "none"] = Field(
        "auto", description="divide advantages by the reward std of the group, of the whole batch (TRL), or not; "
        "auto = group, except none for dr_grpo",
    )
    mu: int = Field(1, ge=1, description="inner updates per rollout batch (old-policy ratios when > 1)")
    eps_low: float = Field(0.2, ge=0, description="clip range below 1")
    eps_high: float = Field(0.2, ge=0, description="clip range above 1 (DAPO clip-higher: 0.28)")
    beta: float = Field(0.0, ge=0, description="k3 KL coefficient to the initial policy (0 = no reference model)")
    dynamic_sampling: bool = Field(
        False, description="DAPO dynamic sampling: drop groups whose rewards are all equal and sample new prompts "
        "in their place, for up to resample_rounds more rounds; the step trains on the groups kept",
    )
    resample_rounds: int = Field(3, ge=0, description="extra sampling rounds per step with dynamic_sampling")
    overlong_buffer: int = Field(
        0, ge=0, description="DAPO soft overlong punishment: over the last N tokens before max_new_tokens the reward "
        "falls linearly to -overlong_penalty (0 = off)",
    )
    overlong_penalty: float = Field(1.0, ge=0, description="the overlong punishment at max_new_tokens")

    @model_validator(mode="after")
    def _buffer_fits(self):
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"overlong_buffer {self.overlong_buffer} exceeds max_new_tokens {self.max_new_tokens}")
        return self


def train_grpo(policy, tokenizer, engine, examples, cfg: GRPOConfig, ref_model=None, reward_model=None,
               reward_functions=None, log: logging.Logger | None = None,
               on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``cfg.steps`` GRPO steps; returns one metrics dict per step. The policy is trained in place;
    ``on_step`` (e.g. a held-out evaluation) sees each step's record after its update and weight sync."""
    import torch
    from tqdm import tqdm

    from training.losses import constant_groups, grpo_loss, group_advantages, loss_normaliser, truncated_is_weights

    log = log or logging.getLogger("refinery.grpo")
    g = cfg.group_size
    torch.manual_seed(cfg.seed)
    scale = cfg.scale_rewards if cfg.scale_rewards != "auto" else ("none" if cfg.aggregation == "dr_grpo" else "group")
    warn_nucleus_tis(cfg, log)
    source = RolloutSource(engine, tokenizer, examples, cfg, reward_model, reward_functions, log)
    trainer = PrecisionOptimizer(policy.parameters(), cfg.precision, cfg.lr, cfg.grad_clip)
    history: list[dict] = []

    for step in tqdm(range(cfg.steps), desc="grpo", mininterval=10):
        t0 = time.time()
        # sample; with dynamic sampling keep only groups with a reward spread and refill, up to a budget
        sampled, kept = Rollout(), Rollout()
        for _ in range(1 + (cfg.resample_rounds if cfg.dynamic_sampling else 0)):
            need = cfg.prompts_per_step - len(kept.completions) // g
            if not need:
                break
            new = source.sample(step, need, g)
            if cfg.overlong_buffer:
                new.add_component("overlong", [overlong_penalty(len(c.token_ids), cfg.max_new_tokens,
                                                                cfg.overlong_buffer, cfg.overlong_penalty)
                                               for c in new.completions])
            sampled.extend(new)
            flat = constant_groups(torch.tensor(new.rewards), g) if cfg.dynamic_sampling else torch.zeros(need, dtype=torch.bool)
            for j in (~flat).nonzero().flatten().tolist():
                kept.completions += new.completions[j * g:(j + 1) * g]
                kept.rewards += new.rewards[j * g:(j + 1) * g]
        t_gen = time.time() - t0
        record = {
            "step": step, **sampled.metrics(spread=True),
            **({"sampled_groups": len(sampled.completions) // g, "kept_groups": len(kept.completions) // g}
               if cfg.dynamic_sampling else {}),
        }
        if not kept.completions:
            log.warning("grpo step %d: every sampled group had equal rewards after %d rounds; no update", step,
                        1 + cfg.resample_rounds)
            history.append({**record, "gen_s": round(t_gen, 3), "step_s": round(time.time() - t0, 3)})
            if on_step:
                on_step(history[-1])
            continue

        policy.train()
        # μ = 1: the old policy is the current one, so its log-probs come from the training forward
        # itself (detached), saving a forward pass; μ > 1 needs them fixed before the first update.
        reuse_forward = cfg.mu == 1
        exp = make_experience(kept.completions, kept.rewards, pad_token_id(tokenizer), cfg, trainer.autocast,
                              model_device(policy),
                              policy=None if reuse_forward else policy, ref_model=ref_model if cfg.beta else None)
        advantages = group_advantages(exp.rewards, g, scale)
        batch, mask = exp.batch, exp.mask
        # one normaliser (rows, tokens or B·max_new_tokens) for the whole step: micro-batches only split the sum
        normaliser = loss_normaliser(mask, cfg.aggregation, cfg.max_new_tokens)
        losses, clip_fracs, kls, norms, seen_old = [], [], [], [], []
        for _ in range(cfg.mu):
            step_loss = 0.0
            for rows in exp.micro_batches(cfg.micro_batch_size):
                with trainer.autocast():
                    logps = forward_logps(policy, batch.rows(rows), cfg.temperature)
                old = logps.detach() if reuse_forward else exp.old_logps[rows]
                if reuse_forward:
                    seen_old.append(old)
                is_weights = truncated_is_weights(old, batch.rollout_logps[rows], cfg.tis_cap) if cfg.tis_cap else None
                loss, stats = grpo_loss(
                    logps, old, advantages[rows], mask[rows], cfg.aggregation, cfg.eps_low, cfg.eps_high, cfg.beta,
                    None if exp.ref_logps is None else exp.ref_logps[rows], is_weights, cfg.max_new_tokens, normaliser,
                )
                trainer.backward(loss)
                step_loss += loss.item()
                clip_fracs.append(stats["clip_frac"].item())
                kls.append(stats.get("kl", torch.tensor(0.0)).item())
            losses.append(step_loss)
            norms.append(trainer.step())
        old_logps = torch.cat(seen_old) if reuse_forward else exp.old_logps
        gap = mismatch_stats(old_logps, batch.rollout_logps, batch.completion_mask, cfg.tis_cap)
        engine.update_weights(policy.state_dict())
        record.update({
            "loss": sum(losses) / len(losses), "clip_frac": sum(clip_fracs) / len(clip_fracs),
            "kl": sum(kls) / len(kls), "grad_norm": sum(norms) / len(norms),
            "zero_adv_groups": int(constant_groups(exp.rewards, g).sum()), "groups": len(exp) // g,
            "gen_s": round(t_gen, 3), "step_s": round(time.time() - t0, 3), **gap,
        })
        history.append(record)
        if on_step:
            on_step(record)
        log.info(
            "grpo step %d: reward %.3f len %.1f loss %.4f |dlogp| mean %.2e max %.2e (%.1fs, gen %.1fs)", step,
            record["reward_mean"], record["response_len_mean"], record["loss"], gap.get("logp_gap_mean", 0.0),
            gap.get("logp_gap_max", 0.0), record["step_s"], t_gen,
        )
    return history


def run(ctx: StageContext) -> StageResult:
    cfg: GRPOConfig = ctx.config
    rl = load_run(ctx, with_ref=bool(cfg.beta), detail=f"aggregation {cfg.aggregation}")
    history = train_grpo(rl.policy, rl.tokenizer, rl.engine, rl.examples, cfg, rl.ref, rl.reward_model, log=ctx.log)
    return finish_stage(ctx, rl, history, f"GRPO ({cfg.aggregation}, G={cfg.group_size})",
                        {"policy": str(rl.policy_dir), "aggregation": cfg.aggregation, "prompts": len(rl.examples)})


STAGES = [
    Stage(
        name="grpo",
        description="GRPO / Dr. GRPO / DAPO on verifiable rewards with a vLLM (or HF) rollout engine; writes hf/",
        config_model=GRPOConfig,
        run=run,
        optional_inputs=("sft", "reward"),
        external_inputs=rl_external_inputs,
        version="1",
    )
]
