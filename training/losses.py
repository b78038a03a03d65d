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
    return label_logps(logits, labels.masked_fill(~mask, 0)) * mask, mask


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at each position: logits (..., V), labels (...) → (...), in float32.

    gather − logsumexp: the same numbers as log_softmax + gather without keeping a (..., V) copy.
    """
    logits = logits.float()
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over supervised tokens: Σ_t −log p(y_t | y_<t), and the token count.

    Returned as (sum, count) so data-parallel ranks can normalise by the global token count.
    """
    logps, mask = token_logps(logits, labels)
    return -logps.sum(), mask.sum()


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


ORPO_MAX_LOGP = -1e-6  # length-averaged log-probs are clamped here: log(1 − p̄) is −inf at p̄ = 1


def orpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (TRL ORPOTrainer); inputs are length-averaged log-probs log p̄ (≤ 0).

    log odds(y) = log p̄ − log(1 − p̄);  loss = −β·log σ(log odds(y_c) − log odds(y_r))
    The full ORPO objective adds the chosen answers' NLL as a token mean over the batch (TRL's
    cross-entropy on the chosen half): :func:`chosen_nll` — the caller adds it, as it spans pairs.
    log p̄ is clamped to ≤ −1e-6 first, so p̄ = 1 gives a finite loss and gradient (TRL: NaN).
    Rewards are β·log p̄(y).
    """
    c, r = chosen.clamp(max=ORPO_MAX_LOGP), rejected.clamp(max=ORPO_MAX_LOGP)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    loss = -beta * F.logsigmoid(log_odds)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012): log(−expm1 x) near 0, log1p(−eˣ) below −ln 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def chosen_nll(chosen_sums: torch.Tensor, chosen_tokens: int | float | torch.Tensor) -> torch.Tensor:
    """Token-mean NLL of the chosen answers: −Σ_pairs log π(y_c) / N_tokens (ORPO's SFT term, RPO's NLL term).

    ``chosen_sums`` are summed log-probs; ``chosen_tokens`` the chosen-token count of the whole step,
    so a step split over ranks or micro-batches gives the same number.
    """
    return -chosen_sums.sum() / max(float(chosen_tokens), 1.0)


def kto_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    kl: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (TRL KTOTrainer), chosen = desirable, rejected = undesirable; ``kl`` is the reference point z₀.

    loss_c = w_d·(1 − σ(β·(Δ_c − z₀))),  loss_r = w_u·(1 − σ(β·(z₀ − Δ_r))),  Δ = log π − log π_ref
    Returns per-pair (loss_c + loss_r) / 2, so the mean over pairs is TRL's mean over all 2N answers.
    z₀ = max(0, mean over mismatched (prompt, other answer) pairs of log π − log π_ref), detached
    (TRL and the KTO paper); the dpo stage computes it (``kto_z0``).
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    loss = desirable_weight * (1 - torch.sigmoid(beta * (chosen_ratio - kl))) + undesirable_weight * (
        1 - torch.sigmoid(beta * (kl - rejected_ratio))
    )
    return loss / 2, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


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
# Shapes: B completions × T completion tokens; ``mask`` (B, T) is 1 on real completion tokens.
# Log-probs are per-token log π(o_t | q, o_<t) of the sampled tokens.

PG_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
MAX_LOG_RATIO = 20.0  # |log ratio| is clamped here before exp (veRL): e^20 ≈ 4.9e8, never inf


def constant_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n_groups,) bool: the groups whose rewards are all equal (they carry no learning signal)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    return grouped.max(dim=1).values == grouped.min(dim=1).values


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages, one per completion; ``rewards`` (B·G,) ordered group by group. Computed in float64.

    A_i = r_i − mean_g(r)                        (scale="none": Dr. GRPO)
    A_i = (r_i − mean_g(r)) / (std_g(r) + eps)   (scale="group": GRPO)
    A_i = (r_i − mean_g(r)) / (std(r) + eps)     (scale="batch": std over all B·G rewards, TRL)
    std is the unbiased estimate (TRL), 0 for a single value. A group whose rewards are all equal
    gets A = 0 exactly (its float mean can be one ulp off, which std scaling would blow up).
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown reward scaling {scale!r}; choose one of {SCALE_REWARDS}")
    constant = constant_groups(rewards, group_size)
    grouped = rewards.double().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True, correction=1 if group_size > 1 else 0) + eps)
    elif scale == "batch":
        centered = centered / (grouped.std(correction=1 if grouped.numel() > 1 else 0) + eps)
    centered = centered.masked_fill(constant.unsqueeze(1), 0.0)
    return centered.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis, in float32: H = logsumexp(l) − Σ_v softmax(l)_v · l_v."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π‖π_ref) (Schulman): e^(ref − logp) − (ref − logp) − 1, always ≥ 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def truncated_is_weights(trainer_logps: torch.Tensor, rollout_logps: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance sampling (TIS): w_t = min(exp(clamp(logp_trainer_old − logp_rollout, ±20)), C), no gradient.

    Corrects for the rollout engine sampling from a slightly different distribution than the
    trainer computes (kernels, precision); C bounds the variance. Both log-probs must be of the
    same distribution: with top_p < 1 the engines report log-probs renormalised over the nucleus
    (≥ the trainer's full-softmax ones), which biases w below 1.
    """
    delta = (trainer_logps.detach() - rollout_logps.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(delta).clamp(max=cap)


def clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped objective as a per-token loss, and where the clip was active.

    ρ_t = exp(clamp(logp − logp_old, ±20));  ℓ_t = −min(ρ_t·A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A_t)
    ``advantages`` is (B,) (one per sequence, broadcast) or (B, T). The clamp (veRL) keeps ρ finite.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp((logps - old_logps).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped)


def loss_normaliser(mask: torch.Tensor, aggregation: str, max_completion_len: int | None = None) -> float:
    """The denominator of ``aggregation`` for a whole optimizer step whose loss mask is ``mask`` (B, T).

    grpo: B (rows);  bnpo, dapo: Σ m (tokens, ≥ 1);  dr_grpo: B · max_completion_len.
    Computed once per step and passed to every micro-batch, the accumulated gradient equals the
    one-batch gradient however the rows are split.
    """
    if aggregation == "grpo":
        return float(mask.shape[0])
    if aggregation in ("bnpo", "dapo"):
        return max(float(mask.sum()), 1.0)
    if aggregation == "dr_grpo":
        if not max_completion_len:
            raise ValueError("dr_grpo aggregation needs max_completion_len")
        return float(mask.shape[0] * max_completion_len)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {PG_AGGREGATIONS}")


def aggregate_token_loss(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, max_completion_len: int | None = None,
    normaliser: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar; the names follow TRL's ``loss_type``.

    grpo:        Σ_i (1/|o_i|) Σ_t ℓ_it / B        per-sequence token mean, then mean (length-biased)
    bnpo, dapo:  Σ_it ℓ_it / Σ_it m_it             token mean
    dr_grpo:     Σ_it ℓ_it / (B · max_completion_len)  a constant normaliser: no length bias
    B and the token count are the whole optimizer step's (``normaliser``, see :func:`loss_normaliser`);
    without it, this batch's. So bnpo and dapo coincide here: in TRL they differ only in that bnpo
    normalises per micro-batch, which makes the objective depend on the micro-batching.
    """
    if normaliser is None:
        normaliser = loss_normaliser(mask, aggregation, max_completion_len)
    elif aggregation not in PG_AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {PG_AGGREGATIONS}")
    mask = mask.to(per_token.dtype)
    if aggregation == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / normaliser
    return (per_token * mask).sum() / normaliser


def grpo_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    aggregation: str = "grpo", eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
    ref_logps: torch.Tensor | None = None, is_weights: torch.Tensor | None = None,
    max_completion_len: int | None = None, normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO family policy loss, aggregated by ``aggregation`` (see :func:`aggregate_token_loss`).

    ℓ_it = w_it · clipped_surrogate(logp, logp_old, A_i) + β · k3(logp, logp_ref)
    w = truncated IS weights (or 1). Returns (loss, {clip_frac, kl}) with the stats detached.
    """
    per_token, was_clipped = clipped_surrogate(logps, old_logps, advantages, eps_low, eps_high)
    if is_weights is not None:
        per_token = per_token * is_weights
    m = mask.to(per_token.dtype)
    stats = {"clip_frac": (was_clipped.to(m.dtype) * m).sum() / m.sum().clamp(min=1)}
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        stats["kl"] = ((kl * m).sum() / m.sum().clamp(min=1)).detach()
    loss = aggregate_token_loss(per_token, mask, aggregation, max_completion_len, normaliser)
    return loss, {k: v.detach() for k, v in stats.items()}


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / √(var + eps) over the n masked entries; masked-out entries become 0.

    var is the unbiased estimate Σ(x − mean)² / (n − 1), as TRL's and veRL's ``masked_whiten``
    (the biased one for n = 1, where the numerator is 0).
    """
    m = mask.to(values.dtype)
    n = m.sum()
    mean = (values * m).sum() / n.clamp(min=1)
    var = (((values - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def ppo_token_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO reward: r_t = −β·(logp_t − logp_ref_t)  (k1 KL), plus the sequence score at its last token.

    Returns (rewards (B, T), k1 KL (B, T)); both 0 on masked positions.
    """
    m = mask.to(logps.dtype)
    kl = (logps - ref_logps) * m
    rewards = -kl_coef * kl
    last = (m.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards * m, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded (B, T) tensors.

    δ_t = r_t + γ·V_{t+1} − V_t  (V past the last real token = 0);  A_t = δ_t + γλ·A_{t+1};  R_t = A_t + V_t
    Returns (advantages, returns), 0 on masked positions.
    """
    m = mask.to(values.dtype)
    values = values * m
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * m


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2,
    normaliser: float | None = None,
) -> torch.Tensor:
    """PPO value loss with value clipping: ½ · Σ_t max((V − R)², (clip(V, V_old ± c) − R)²) / N_tokens.

    N_tokens is the whole step's token count (``normaliser``), without it this batch's.
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * aggregate_token_loss(per_token, mask, "bnpo", normaliser=normaliser)
