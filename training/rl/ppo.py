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
import time
from typing import Literal

from pydantic import Field

from infra.stage import Stage, StageContext, StageResult
from training.devices import model_device
from training.rl.common import (
    PrecisionOptimizer, RLConfigBase, finish_stage, load_run, mismatch_stats, pad_token_id, rl_external_inputs,
    warn_nucleus_tis,
)
from training.rl.experience import RolloutSource, make_experience, policy_forward


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

    def to(self, device) -> "ValueModel":
        """Head and backbone moved to ``device`` (in place)."""
        self.head.to(device)
        if self.backbone is not None:
            self.backbone.to(device)
        return self

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

    device = model_device(policy)
    if critic == "shared":
        return ValueModel(policy.config.hidden_size).to(device)
    if reward_model_dir is not None:
        rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32)
        return ValueModel(rm.config.hidden_size, backbone=rm.model, head=rm.score).to(device)
    backbone = AutoModel.from_pretrained(policy_dir, dtype=torch.float32)
    return ValueModel(policy.config.hidden_size, backbone=backbone).to(device)


def train_ppo(policy, tokenizer, engine, examples, cfg: PPOConfig, ref_model, critic: ValueModel,
              reward_model=None, reward_functions=None, log: logging.Logger | None = None) -> list[dict]:
    """Run ``cfg.steps`` PPO steps; returns one metrics dict per step. Policy and critic train in place."""
    import torch
    from tqdm import tqdm

    from training.losses import (
        aggregate_token_loss, clipped_surrogate, clipped_value_loss, gae, loss_normaliser, masked_whiten,
        ppo_token_rewards, truncated_is_weights,
    )

    log = log or logging.getLogger("refinery.ppo")
    torch.manual_seed(cfg.seed)
    warn_nucleus_tis(cfg, log)
    source = RolloutSource(engine, tokenizer, examples, cfg, reward_model, reward_functions, log)
    trainer = PrecisionOptimizer(list(policy.parameters()) + list(critic.parameters()), cfg.precision, cfg.lr, cfg.grad_clip)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    history: list[dict] = []

    for step in tqdm(range(cfg.steps), desc="ppo", mininterval=10):
        t0 = time.time()
        rollout = source.sample(step, cfg.prompts_per_step, cfg.samples_per_prompt)
        t_gen = time.time() - t0
        policy.train()
        exp = make_experience(rollout.completions, rollout.rewards, pad_token_id(tokenizer), cfg, trainer.autocast,
                              model_device(policy),
                              policy=policy, critic=critic, ref_model=ref_model)
        batch, mask, old_logps, old_values = exp.batch, exp.mask, exp.old_logps, exp.values
        token_rewards, kl = ppo_token_rewards(exp.rewards, old_logps, exp.ref_logps, mask, kl_ctl.value)
        advantages, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        gap = mismatch_stats(old_logps, batch.rollout_logps, batch.completion_mask, cfg.tis_cap)
        is_weights = truncated_is_weights(old_logps, batch.rollout_logps, cfg.tis_cap) if cfg.tis_cap else None
        tokens = loss_normaliser(mask, "bnpo")  # the step's token count normalises every micro-batch
        pg_losses, vf_losses, entropies, clip_fracs, norms = [], [], [], [], []
        for _ in range(cfg.ppo_epochs):
            pg_sum = vf_sum = entropy_sum = 0.0
            for rows in exp.micro_batches(cfg.micro_batch_size):
                with trainer.autocast():
                    logps, values, entropy = policy_forward(policy, batch.rows(rows), cfg.temperature, critic,
                                                            entropy=cfg.entropy_coef > 0)
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
        kl_ctl.update(seq_kl, len(exp))
        record = {
            "step": step, **rollout.metrics(),
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
    cfg: PPOConfig = ctx.config
    rl = load_run(ctx, with_ref=True, detail=f"critic {cfg.critic}")
    critic = build_critic(rl.policy, cfg.critic, rl.reward_model_dir, rl.policy_dir)
    history = train_ppo(rl.policy, rl.tokenizer, rl.engine, rl.examples, cfg, rl.ref, critic, rl.reward_model,
                        log=ctx.log)
    return finish_stage(ctx, rl, history, f"PPO ({cfg.critic} critic)",
                        {"policy": str(rl.policy_dir), "critic": cfg.critic, "prompts": len(rl.examples),
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
