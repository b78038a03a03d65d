"""The experience path GRPO and PPO share (after OpenRLHF's ``ppo_utils/experience.py``).

:class:`RolloutSource` draws prompts in a seeded, cycled order, samples ``n`` completions per prompt
from the rollout engine and scores them into a :class:`Rollout` (failing reward calls are logged and
counted, never fatal). :func:`make_experience` turns the completions and their rewards into an
:class:`Experience`: the padded batch, the loss mask (completion tokens, minus truncated completions
with ``mask_truncated``) and, without gradients, the old policy's log-probs, the critic's values and
the reference model's log-probs. The algorithms keep only their advantages and losses.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from training.rl.common import RLConfigBase, RolloutBatch, chat_prompt_ids, forward_logps, to_batch
from training.rl.rewards import PromptExample, score_samples
from training.rl.rollout import Completion, Sampling

if TYPE_CHECKING:  # torch is imported where it runs, not at module import
    import torch


@dataclass
class Rollout:
    """Sampled completions (``n`` per prompt, prompt by prompt), the total reward of each, each reward
    component's values, and how many reward calls failed."""

    completions: list[Completion] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    components: dict[str, list[float]] = field(default_factory=dict)
    failures: int = 0

    def extend(self, other: "Rollout") -> None:
        """Append another sampling round (components by name)."""
        self.completions += other.completions
        self.rewards += other.rewards
        for k, v in other.components.items():
            self.components.setdefault(k, []).extend(v)
        self.failures += other.failures

    def add_component(self, name: str, values: list[float]) -> None:
        """A reward term added on top of the scored total (e.g. DAPO's overlong punishment)."""
        self.components[name] = values
        self.rewards = [r + v for r, v in zip(self.rewards, values)]

    def metrics(self, spread: bool = False) -> dict:
        """Mean reward (and its std with ``spread``), each component's mean, response lengths,
        truncated completions and failed reward calls."""
        import torch

        rewards = torch.tensor(self.rewards)
        lengths = [len(c.token_ids) for c in self.completions]
        return {
            "reward_mean": float(rewards.mean()),
            **({"reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0} if spread else {}),
            **{f"reward_{k}": sum(v) / len(v) for k, v in self.components.items()},
            "response_len_mean": sum(lengths) / len(lengths), "response_len_max": max(lengths),
            "truncated": sum(not c.finished for c in self.completions), "reward_failures": self.failures,
        }


class RolloutSource:
    """Prompts in a seeded order (cycled) → ``n`` completions each from the engine → scored :class:`Rollout`."""

    def __init__(self, engine, tokenizer, examples: list[PromptExample], cfg: RLConfigBase, reward_model=None,
                 reward_functions=None, log: logging.Logger | None = None):
        self.engine, self.tokenizer, self.examples, self.cfg = engine, tokenizer, examples, cfg
        self.reward_model, self.reward_functions = reward_model, reward_functions
        self.log = log or logging.getLogger("refinery.rl")
        self.sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        self.order = list(range(len(examples)))
        random.Random(cfg.seed).shuffle(self.order)
        self.drawn = 0  # prompts drawn so far

    def sample(self, step: int, n_prompts: int, n: int) -> Rollout:
        """The next ``n_prompts`` prompts × ``n`` completions with their rewards."""
        cfg = self.cfg
        picked = [self.examples[self.order[(self.drawn + i) % len(self.order)]] for i in range(n_prompts)]
        self.drawn += n_prompts
        completions = self.engine.generate([chat_prompt_ids(self.tokenizer, e.question) for e in picked], n,
                                           self.sampling)
        scored = score_samples(
            [picked[c.prompt_index].question for c in completions], [c.text for c in completions],
            [picked[c.prompt_index].answer for c in completions], cfg.reward_weights, self.reward_model,
            cfg.r1_alpha, self.reward_functions,
        )
        for name, count in scored.failures.items():
            self.log.warning("step %d: reward %r failed on %d/%d samples (first: %s); scored 0", step, name, count,
                             len(completions), scored.first_errors[name])
        return Rollout(completions, list(scored.total), dict(scored.components), sum(scored.failures.values()))


@dataclass
class Experience:
    """One training batch: rollouts as tensors (B rows), their rewards (B,), the loss mask (B, T), which
    rows were truncated (B,), and — when computed — old-policy log-probs, values and reference log-probs (B, T)."""

    batch: RolloutBatch
    rewards: "torch.Tensor"
    mask: "torch.Tensor"
    truncated: "torch.Tensor"
    old_logps: "torch.Tensor | None" = None
    values: "torch.Tensor | None" = None
    ref_logps: "torch.Tensor | None" = None

    def __len__(self) -> int:
        return len(self.rewards)

    def micro_batches(self, size: int) -> list[slice]:
        """Row slices of at most ``size`` rows covering the batch in order."""
        return [slice(i, i + size) for i in range(0, len(self), size)]


def policy_forward(policy, batch: RolloutBatch, temperature: float, critic=None, entropy: bool = False):
    """(log-probs, values or None, per-token entropy or None) of ``batch`` under the policy; a shared
    critic (``critic.backbone is None``) reads the policy's hidden states from the same forward."""
    shared = critic is not None and critic.backbone is None
    out = forward_logps(policy, batch, temperature, hidden=shared, entropy=entropy)
    out = out if isinstance(out, tuple) else (out,)
    values = None if critic is None else critic.values(batch, out[1]) if shared else critic.values(batch)
    return out[0], values, out[-1] if entropy else None


def make_experience(completions: list[Completion], rewards: list[float], pad_id: int, cfg: RLConfigBase, autocast,
                    device, policy=None, critic=None, ref_model=None) -> Experience:
    """Batch the completions onto ``device`` (the policy's) and, without gradients under ``autocast()`` in micro-batches of
    ``cfg.micro_batch_size``, compute the old log-probs (and values with a ``critic``) when ``policy`` is
    given and the reference log-probs when ``ref_model`` is given."""
    import torch

    batch = to_batch(completions, pad_id).to(device)
    mask = batch.completion_mask.clone()
    truncated = torch.tensor([not c.finished for c in completions], device=device)
    if cfg.mask_truncated:
        mask &= ~truncated.unsqueeze(1)
    exp = Experience(batch, torch.tensor(rewards, device=device), mask, truncated)
    parts = [batch.rows(rows) for rows in exp.micro_batches(cfg.micro_batch_size)]
    with torch.no_grad(), autocast():
        if policy is not None:
            old = [policy_forward(policy, p, cfg.temperature, critic)[:2] for p in parts]
            exp.old_logps = torch.cat([o[0] for o in old]).float()
            exp.values = torch.cat([o[1] for o in old]).float() if critic is not None else None
        if ref_model is not None:
            exp.ref_logps = torch.cat([forward_logps(ref_model, p, cfg.temperature) for p in parts])
    return exp
