"""``ppo``: PPO with a critic, per-token KL-penalised rewards, GAE and an adaptive or fixed KL controller.

Each step: one completion per prompt from the rollout engine → score (reward model and/or
verifiable rewards) → per-token reward r_t = −β·KL_k1 + score at the last token → GAE(γ, λ) →
whitened advantages → ``ppo_epochs`` passes of clipped policy + clipped value loss (with truncated
IS weights against the engine's log-probs) → in-place weight sync. The critic is a value head on
the policy backbone (``critic: shared``) or a separate model initialised from the reward model
(``critic: separate``, as in InstructGPT / TRL).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Literal

from pydantic import Field

from infra.stage import Stage, StageContext, StageResult
from training.rl.common import RLConfigBase, rl_external_inputs


class PPOConfig(RLConfigBase):
    """PPO settings on top of the shared RL fields."""

    critic: Literal["shared", "separate"] = Field(
        "shared", description="value head on the policy backbone, or a separate model (from the reward model if any)"
    )
    samples_per_prompt: int = Field(1, ge=1, description="completions per prompt")
    ppo_epochs: int = Field(2, ge=1, description="passes over each rollout batch")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip: float = Field(0.2, gt=0, description="policy ratio clip")
    value_clip: float = Field(0.2, gt=0, description="value clip around the old values")
    vf_coef: float = Field(0.1, ge=0, description="value-loss coefficient")
    entropy_coef: float = Field(
        0.0, ge=0, description="entropy bonus β_S: the loss subtracts β_S times the token-mean entropy of π (0 = off)"
    )
    whiten_advantages: bool = Field(True, description="whiten advantages over the batch")
    kl_coef: float = Field(0.05, ge=0, description="initial β of the per-token k1 KL penalty")
    kl_target: float | None = Field(6.0, description="adaptive controller target KL (nats per sequence); null = fixed β")
    kl_horizon: int = Field(10000, ge=1, description="adaptive controller horizon")


class AdaptiveKLController:
    """Ziegler et al. (2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon); fixed when target is None."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_samples / self.horizon


class ValueModel:
    """Per-token values: a linear head over a backbone's last hidden states (the policy's, or its own)."""

    def __init__(self, hidden_size: int, backbone=None, head=None):
        import torch

        self.backbone = backbone
        self.head = head if head is not None else torch.nn.Linear(hidden_size, 1)
        if head is None:
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

    def parameters(self):
        yield from self.head.parameters()
        if self.backbone is not None:
            yield from self.backbone.parameters()

    def values(self, batch, policy_hidden=None):
        """(B, T) values of the completion positions; uses ``policy_hidden`` when the critic is shared."""
        if self.backbone is None:
            hidden = policy_hidden
        else:
            out = self.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, use_cache=False)
            hidden = out.last_hidden_state[:, batch.prompt_width - 1:-1]
        return self.head(hidden.float()).squeeze(-1) * batch.completion_mask


def build_critic(policy, critic: str, reward_model_dir=None, policy_dir=None) -> ValueModel:
    """Shared: a fresh zero head on the policy. Separate: backbone + score head of the reward model
    (or the policy's backbone with a fresh head when there is no reward model)."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    if critic == "shared":
        return ValueModel(policy.config.hidden_size)
    if reward_model_dir is not None:
        rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32)
        return ValueModel(rm.config.hidden_size, backbone=rm.model, head=rm.score)
    return ValueModel(policy.config.hidden_size, backbone=AutoModel.from_pretrained(policy_dir, dtype=torch.float32))


def train_ppo(policy, tokenizer, engine, examples, cfg: PPOConfig, ref_model, critic: ValueModel,
              reward_model=None, reward_functions=None, log: logging.Logger | None = None) -> list[dict]:
    """Run ``cfg.steps`` PPO steps; returns one metrics dict per step. Policy and critic train in place."""
    import torch
    from tqdm import tqdm

    from training.losses import (
        aggregate_token_loss, clipped_surrogate, clipped_value_loss, gae, loss_normaliser, masked_whiten,
        ppo_token_rewards, truncated_is_weights,
    )
    from training.rl.common import (
        Trainer, chat_prompt_ids, forward_logps, mismatch_stats, to_batch, warn_nucleus_tis,
    )
    from training.rl.rewards import score_samples
    from training.rl.rollout import Sampling

    log = log or logging.getLogger("refinery.ppo")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    warn_nucleus_tis(cfg, log)
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    shared = critic.backbone is None
    params = list(policy.parameters()) + list(critic.parameters())
    trainer = Trainer(params, cfg.precision, cfg.lr, cfg.grad_clip)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    order = list(range(len(examples)))
    rng.shuffle(order)
    mb = cfg.micro_batch_size
    history: list[dict] = []

    def policy_and_values(rows_batch, entropy=False):
        """(log-probs, values, entropy per token or None)."""
        out = forward_logps(policy, rows_batch, cfg.temperature, hidden=shared, entropy=entropy)
        out = out if isinstance(out, tuple) else (out,)
        values = critic.values(rows_batch, out[1]) if shared else critic.values(rows_batch)
        return out[0], values, out[-1] if entropy else None

    for step in tqdm(range(cfg.steps), desc="ppo", mininterval=10):
        t0 = time.time()
        picked = [examples[order[(step * cfg.prompts_per_step + i) % len(order)]] for i in range(cfg.prompts_per_step)]
        completions = engine.generate([chat_prompt_ids(tokenizer, e.question) for e in picked], cfg.samples_per_prompt, sampling)
        t_gen = time.time() - t0
        scored = score_samples(
            [picked[c.prompt_index].question for c in completions], [c.text for c in completions],
            [picked[c.prompt_index].answer for c in completions], cfg.reward_weights, reward_model, cfg.r1_alpha,
            reward_functions,
        )
        for name, n in scored.failures.items():
            log.warning("step %d: reward %r failed on %d/%d samples (first: %s); scored 0", step, name, n,
                        len(completions), scored.first_errors[name])
        scores = torch.tensor(scored.total)
        batch = to_batch(completions, pad_id)
        mask = batch.completion_mask.clone()
        truncated = torch.tensor([not c.finished for c in completions])
        if cfg.mask_truncated:
            mask &= ~truncated.unsqueeze(1)
        n = len(completions)

        policy.train()
        with torch.no_grad(), trainer.autocast():
            old = [policy_and_values(batch.rows(slice(i, i + mb)))[:2] for i in range(0, n, mb)]
            old_logps, old_values = torch.cat([o[0] for o in old]).float(), torch.cat([o[1] for o in old]).float()
            ref_logps = torch.cat([forward_logps(ref_model, batch.rows(slice(i, i + mb)), cfg.temperature)
                                   for i in range(0, n, mb)])
        token_rewards, kl = ppo_token_rewards(scores, old_logps, ref_logps, mask, kl_ctl.value)
        advantages, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        gap = mismatch_stats(old_logps, batch.rollout_logps, batch.completion_mask, cfg.tis_cap)
        is_weights = truncated_is_weights(old_logps, batch.rollout_logps, cfg.tis_cap) if cfg.tis_cap else None
        tokens = loss_normaliser(mask, "bnpo")  # the step's token count normalises every micro-batch
        pg_losses, vf_losses, entropies, clip_fracs, norms = [], [], [], [], []
        for _ in range(cfg.ppo_epochs):
            pg_sum = vf_sum = entropy_sum = 0.0
            for i in range(0, n, mb):
                rows = slice(i, i + mb)
                with trainer.autocast():
                    logps, values, entropy = policy_and_values(batch.rows(rows), entropy=cfg.entropy_coef > 0)
                per_token, was_clipped = clipped_surrogate(logps, old_logps[rows], advantages[rows], cfg.clip, cfg.clip)
                if is_weights is not None:
                    per_token = per_token * is_weights[rows]
                pg = aggregate_token_loss(per_token, mask[rows], "bnpo", normaliser=tokens)
                vf = clipped_value_loss(values.float(), old_values[rows], returns[rows], mask[rows], cfg.value_clip, tokens)
                loss = pg + cfg.vf_coef * vf
                if entropy is not None:
                    mean_entropy = aggregate_token_loss(entropy, mask[rows], "bnpo", normaliser=tokens)
                    loss = loss - cfg.entropy_coef * mean_entropy
                    entropy_sum += mean_entropy.item()
                trainer.backward(loss)
                pg_sum += pg.item()
                vf_sum += vf.item()
                m = mask[rows].float()
                clip_fracs.append(((was_clipped.float() * m).sum() / m.sum().clamp(min=1)).item())
            pg_losses.append(pg_sum)
            vf_losses.append(vf_sum)
            entropies.append(entropy_sum)
            norms.append(trainer.step())
        engine.update_weights(policy.state_dict())
        seq_kl = float(kl.sum(1).mean())
        kl_ctl.update(seq_kl, n)
        lengths = [len(c.token_ids) for c in completions]
        record = {
            "step": step, "reward_mean": float(scores.mean()),
            **{f"reward_{k}": sum(v) / len(v) for k, v in scored.components.items()},
            "response_len_mean": sum(lengths) / len(lengths), "response_len_max": max(lengths),
            "truncated": int(truncated.sum()), "reward_failures": sum(scored.failures.values()),
            "pg_loss": sum(pg_losses) / len(pg_losses), "vf_loss": sum(vf_losses) / len(vf_losses),
            **({"entropy": sum(entropies) / len(entropies)} if cfg.entropy_coef else {}),
            "clip_frac": sum(clip_fracs) / len(clip_fracs), "kl_seq": seq_kl, "kl_coef": kl_ctl.value,
            "grad_norm": sum(norms) / len(norms), "gen_s": round(t_gen, 3), "step_s": round(time.time() - t0, 3), **gap,
        }
        history.append(record)
        log.info("ppo step %d: reward %.3f len %.1f pg %.4f vf %.4f kl %.3f β %.4f |dlogp| max %.2e (%.1fs)", step,
                 record["reward_mean"], record["response_len_mean"], record["pg_loss"], record["vf_loss"], seq_kl,
                 kl_ctl.value, gap.get("logp_gap_max", 0.0), record["step_s"])
    return history


def run(ctx: StageContext) -> StageResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.rl.common import finish_stage, load_prompt_set, resolve_sources
    from training.rl.rewards import RewardModelScorer
    from training.rl.rollout import make_engine

    cfg: PPOConfig = ctx.config
    policy_dir, rm_dir = resolve_sources(ctx, cfg)
    examples = load_prompt_set(cfg, ctx.external_inputs)
    ctx.log.info("ppo: policy %s, reward model %s, %d prompts, critic %s, backend %s, precision %s",
                 policy_dir, rm_dir, len(examples), cfg.critic, cfg.rollout_backend, cfg.precision)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    reward_model = RewardModelScorer(rm_dir) if rm_dir else None
    critic = build_critic(policy, cfg.critic, rm_dir, policy_dir)
    engine = make_engine(cfg.rollout_backend, policy_dir, cfg.precision, cfg.seed, max_model_len=1024)
    history = train_ppo(policy, tokenizer, engine, examples, cfg, ref, critic, reward_model, log=ctx.log)
    return finish_stage(ctx, policy, tokenizer, history, f"PPO ({cfg.critic} critic)",
                        {"policy": str(policy_dir), "critic": cfg.critic, "prompts": len(examples),
                         "kl_coef_final": history[-1]["kl_coef"]})


STAGES = [
    Stage(
        name="ppo",
        description="PPO (critic, GAE, KL-penalised rewards, adaptive KL) on reward-model and verifiable rewards; writes hf/",
        config_model=PPOConfig,
        run=run,
        optional_inputs=("sft", "reward"),
        external_inputs=rl_external_inputs,
        version="1",
    )
]
