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
import random
import time
from typing import Literal

from pydantic import Field, model_validator

from infra.stage import Stage, StageContext, StageResult
from training.rl.common import RLConfigBase, rl_external_inputs


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
               reward_functions=None, log: logging.Logger | None = None) -> list[dict]:
    """Run ``cfg.steps`` GRPO steps; returns one metrics dict per step. The policy is trained in place."""
    import torch

    from training.losses import constant_groups, grpo_loss, group_advantages, loss_normaliser, truncated_is_weights
    from training.rl.common import (
        Trainer, chat_prompt_ids, forward_logps, mismatch_stats, to_batch, warn_nucleus_tis,
    )
    from training.rl.rewards import overlong_penalty, score_samples
    from training.rl.rollout import Sampling

    log = log or logging.getLogger("refinery.grpo")
    g = cfg.group_size
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scale = cfg.scale_rewards if cfg.scale_rewards != "auto" else ("none" if cfg.aggregation == "dr_grpo" else "group")
    warn_nucleus_tis(cfg, log)
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    trainer = Trainer(policy.parameters(), cfg.precision, cfg.lr, cfg.grad_clip)
    order = list(range(len(examples)))
    rng.shuffle(order)
    history: list[dict] = []
    drawn = 0  # prompts drawn so far (the order is cycled)
    from tqdm import tqdm

    def rollout(step: int, n_prompts: int):
        """The next ``n_prompts`` prompts × G completions, their rewards (with the overlong punishment) and components."""
        nonlocal drawn
        picked = [examples[order[(drawn + i) % len(order)]] for i in range(n_prompts)]
        drawn += n_prompts
        completions = engine.generate([chat_prompt_ids(tokenizer, e.question) for e in picked], g, sampling)
        scored = score_samples(
            [picked[c.prompt_index].question for c in completions], [c.text for c in completions],
            [picked[c.prompt_index].answer for c in completions], cfg.reward_weights, reward_model, cfg.r1_alpha,
            reward_functions,
        )
        for name, n in scored.failures.items():
            log.warning("step %d: reward %r failed on %d/%d samples (first: %s); scored 0", step, name, n,
                        len(completions), scored.first_errors[name])
        components = dict(scored.components)
        rewards = list(scored.total)
        if cfg.overlong_buffer:
            components["overlong"] = [overlong_penalty(len(c.token_ids), cfg.max_new_tokens, cfg.overlong_buffer,
                                                       cfg.overlong_penalty) for c in completions]
            rewards = [r + p for r, p in zip(rewards, components["overlong"])]
        return completions, rewards, components, sum(scored.failures.values())

    for step in tqdm(range(cfg.steps), desc="grpo", mininterval=10):
        t0 = time.time()
        # sample; with dynamic sampling keep only groups with a reward spread and refill, up to a budget
        sampled, sampled_rewards, components, failures = [], [], {}, 0
        completions, kept_rewards = [], []
        for _ in range(1 + (cfg.resample_rounds if cfg.dynamic_sampling else 0)):
            need = cfg.prompts_per_step - len(completions) // g
            if not need:
                break
            new, new_rewards, comps, failed = rollout(step, need)
            sampled += new
            sampled_rewards += new_rewards
            failures += failed
            for k, v in comps.items():
                components.setdefault(k, []).extend(v)
            flat = constant_groups(torch.tensor(new_rewards), g) if cfg.dynamic_sampling else torch.zeros(need, dtype=torch.bool)
            for j in (~flat).nonzero().flatten().tolist():
                completions += new[j * g:(j + 1) * g]
                kept_rewards += new_rewards[j * g:(j + 1) * g]
        t_gen = time.time() - t0
        lengths = [len(c.token_ids) for c in sampled]
        all_rewards = torch.tensor(sampled_rewards)
        record = {
            "step": step, "reward_mean": float(all_rewards.mean()),
            "reward_std": float(all_rewards.std()) if len(all_rewards) > 1 else 0.0,
            **{f"reward_{k}": sum(v) / len(v) for k, v in components.items()},
            "response_len_mean": sum(lengths) / len(lengths), "response_len_max": max(lengths),
            "truncated": sum(not c.finished for c in sampled), "reward_failures": failures,
            **({"sampled_groups": len(sampled) // g, "kept_groups": len(completions) // g} if cfg.dynamic_sampling else {}),
        }
        if not completions:
            log.warning("grpo step %d: every sampled group had equal rewards after %d rounds; no update", step,
                        1 + cfg.resample_rounds)
            history.append({**record, "gen_s": round(t_gen, 3), "step_s": round(time.time() - t0, 3)})
            continue
        rewards = torch.tensor(kept_rewards)
        advantages = group_advantages(rewards, g, scale)
        batch = to_batch(completions, pad_id)
        mask = batch.completion_mask.clone()
        truncated = torch.tensor([not c.finished for c in completions])
        if cfg.mask_truncated:
            mask &= ~truncated.unsqueeze(1)

        policy.train()
        mb = cfg.micro_batch_size
        # μ = 1: the old policy is the current one, so its log-probs come from the training forward
        # itself (detached), saving a forward pass; μ > 1 needs them fixed before the first update.
        reuse_forward = cfg.mu == 1
        old_logps = ref_logps = None
        with torch.no_grad(), trainer.autocast():
            if not reuse_forward:
                old_logps = torch.cat([forward_logps(policy, batch.rows(slice(i, i + mb)), cfg.temperature)
                                       for i in range(0, len(completions), mb)])
            if cfg.beta:
                ref_logps = torch.cat([forward_logps(ref_model, batch.rows(slice(i, i + mb)), cfg.temperature)
                                       for i in range(0, len(completions), mb)])
        # one normaliser (rows, tokens or B·max_new_tokens) for the whole step: micro-batches only split the sum
        normaliser = loss_normaliser(mask, cfg.aggregation, cfg.max_new_tokens)
        losses, clip_fracs, kls, norms, seen_old = [], [], [], [], []
        for _ in range(cfg.mu):
            step_loss = 0.0
            for i in range(0, len(completions), mb):
                rows = slice(i, i + mb)
                with trainer.autocast():
                    logps = forward_logps(policy, batch.rows(rows), cfg.temperature)
                old = logps.detach() if reuse_forward else old_logps[rows]
                if reuse_forward:
                    seen_old.append(old)
                is_weights = truncated_is_weights(old, batch.rollout_logps[rows], cfg.tis_cap) if cfg.tis_cap else None
                loss, stats = grpo_loss(
                    logps, old, advantages[rows], mask[rows], cfg.aggregation, cfg.eps_low, cfg.eps_high,
                    cfg.beta, None if ref_logps is None else ref_logps[rows], is_weights, cfg.max_new_tokens, normaliser,
                )
                trainer.backward(loss)
                step_loss += loss.item()
                clip_fracs.append(stats["clip_frac"].item())
                kls.append(stats.get("kl", torch.tensor(0.0)).item())
            losses.append(step_loss)
            norms.append(trainer.step())
        if reuse_forward:
            old_logps = torch.cat(seen_old)
        gap = mismatch_stats(old_logps, batch.rollout_logps, batch.completion_mask, cfg.tis_cap)
        engine.update_weights(policy.state_dict())
        record.update({
            "loss": sum(losses) / len(losses), "clip_frac": sum(clip_fracs) / len(clip_fracs),
            "kl": sum(kls) / len(kls), "grad_norm": sum(norms) / len(norms),
            "zero_adv_groups": int(constant_groups(rewards, g).sum()), "groups": len(rewards) // g,
            "gen_s": round(t_gen, 3), "step_s": round(time.time() - t0, 3), **gap,
        })
        history.append(record)
        log.info(
            "grpo step %d: reward %.3f len %.1f loss %.4f |dlogp| mean %.2e max %.2e (%.1fs, gen %.1fs)", step,
            record["reward_mean"], record["response_len_mean"], record["loss"], gap.get("logp_gap_mean", 0.0),
            gap.get("logp_gap_max", 0.0), record["step_s"], t_gen,
        )
    return history


def run(ctx: StageContext) -> StageResult:
    import torch

    from training.rl.common import finish_stage, load_prompt_set, resolve_sources
    from training.rl.rewards import RewardModelScorer
    from training.rl.rollout import make_engine
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg: GRPOConfig = ctx.config
    policy_dir, rm_dir = resolve_sources(ctx, cfg)
    examples = load_prompt_set(cfg, ctx.external_inputs)
    ctx.log.info("grpo: policy %s, %d prompts, backend %s, precision %s, aggregation %s",
                 policy_dir, len(examples), cfg.rollout_backend, cfg.precision, cfg.aggregation)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval() if cfg.beta else None
    reward_model = RewardModelScorer(rm_dir) if rm_dir else None
    engine = make_engine(cfg.rollout_backend, policy_dir, cfg.precision, cfg.seed, max_model_len=1024)
    history = train_grpo(policy, tokenizer, engine, examples, cfg, ref, reward_model, log=ctx.log)
    return finish_stage(ctx, policy, tokenizer, history, f"GRPO ({cfg.aggregation}, G={cfg.group_size})",
                        {"policy": str(policy_dir), "aggregation": cfg.aggregation, "prompts": len(examples)})


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
