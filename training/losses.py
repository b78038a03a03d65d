"""Every training loss as a pure function of tensors, formula in the docstring.

Read top to bottom: language modelling, preference (DPO family), reward modelling, then
policy-gradient losses (PPO / GRPO family). No module state, no models: tensors in, tensors out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---- language modelling / preference / reward losses (owner: post-training I) ------------------

IGNORE_INDEX = -100  # label value of tokens that carry no loss (prompt, padding, example boundaries)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) with the causal shift: logits[:, t] scores labels[:, t + 1].

    Returns (logps, mask), both (B, T-1); logps is 0 where the label is IGNORE_INDEX.
    """
    logits, labels = logits[:, :-1, :], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logps = torch.gather(logits.float().log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over supervised tokens: Σ_t −log p(y_t | y_<t), and the token count.

    Returned as (sum, count) so data-parallel ranks can normalise by the global token count.
    """
    logps, mask = token_logps(logits, labels)
    return -logps.sum(), mask.sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log π(y|x) per sequence: Σ_t log p(y_t) over supervised tokens, or the mean when ``average``."""
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float = 0.1, label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (TRL ``loss_type="sigmoid"``), inputs are summed sequence log-probs.

    h = β·[(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))]
    loss = −(1−ε)·log σ(h) − ε·log σ(−h)          (ε = label smoothing, cDPO)
    Returns per-pair (loss, chosen reward β·Δ_c, rejected reward β·Δ_r).
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    h = beta * (chosen_ratio - rejected_ratio)
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (TRL ``loss_type="ipo"``; TRL feeds length-averaged log-probs, so do callers).

    h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r));  loss = (h − 1/(2β))²
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    loss = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (TRL CPOTrainer ``loss_type="simpo"``): reference-free, on length-averaged log-probs.

    h = β·(log π̄(y_c) − log π̄(y_r)) − γ;  loss = −(1−ε)·log σ(h) − ε·log σ(−h)
    (TRL writes it as β·(Δ − γ/β), the same number.) Rewards are β·log π̄(y).
    """
    h = beta * (chosen - rejected) - gamma
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def orpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (TRL ORPOTrainer): reference-free; inputs are length-averaged log-probs log p̄ (< 0).

    log odds(y) = log p̄ − log(1 − p̄);  loss = −log p̄(y_c) − β·log σ(log odds(y_c) − log odds(y_r))
    (the first term is the chosen response's mean-token NLL, the SFT part). Rewards are β·log p̄(y).
    """
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    loss = -chosen - beta * F.logsigmoid(log_odds)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def kto_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    kl: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (TRL KTOTrainer), chosen = desirable, rejected = undesirable; ``kl`` is the reference point z₀.

    loss_c = w_d·(1 − σ(β·(Δ_c − z₀))),  loss_r = w_u·(1 − σ(β·(z₀ − Δ_r))),  Δ = log π − log π_ref
    z₀ is a detached, clamped (≥ 0) estimate of KL(π‖π_ref); see :func:`kto_reference_point`.
    Returns per-pair loss_c + loss_r.
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    loss = desirable_weight * (1 - torch.sigmoid(beta * (chosen_ratio - kl))) + undesirable_weight * (
        1 - torch.sigmoid(beta * (kl - rejected_ratio))
    )
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_reference_point(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """z₀ = max(0, mean(log π − log π_ref)), detached — TRL's KL estimate (there: on mismatched pairs)."""
    return (policy_logps - ref_logps).mean().clamp(min=0).detach()


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float = 0.0,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Reward-model loss (TRL RewardTrainer), mean over pairs.

    loss = −log σ(r_c − r_r − m) + c·(r_c + r_r)²      (c: centering term keeping rewards near 0)
    """
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return loss.mean()

# ---- policy-gradient losses: PPO, GRPO family (owner: post-training II) ------------------------
