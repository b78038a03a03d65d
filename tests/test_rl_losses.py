"""Policy-gradient losses (training/losses.py, PPO/GRPO section) against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    aggregate_token_loss, clipped_surrogate, clipped_value_loss, gae, group_advantages, grpo_loss, k3_kl,
    masked_whiten, ppo_token_rewards, truncated_is_weights,
)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # groups of 3: mean 1/3, mean 5/3
    plain = group_advantages(r, 3, "none")
    assert torch.allclose(plain, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased, both groups alike
    scaled = group_advantages(r, 3, "group", eps=0.0)
    assert torch.allclose(scaled, plain / std)
    batch_std = r.std().item()  # TRL scale_rewards="batch": unbiased std of all six rewards
    assert torch.allclose(group_advantages(r, 3, "batch", eps=0.0), plain / batch_std)
    with pytest.raises(ValueError, match="unknown reward scaling"):
        group_advantages(r, 3, "std")


def test_identical_group_rewards_give_zero_advantage_not_nan():
    r = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 1.0, 0.0])
    for scale in ("group", "batch", "none"):
        a = group_advantages(r, 4, scale)
        assert not torch.isnan(a).any()
        assert torch.equal(a[:4], torch.zeros(4))
        assert (a[4:] != 0).all()
    assert torch.equal(group_advantages(torch.tensor([3.0, 5.0]), 1), torch.zeros(2))  # G = 1
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -1.5])
    d = ref - logp  # 0, 1, -1
    want = torch.tensor([0.0, math.e - 1 - 1, math.exp(-1) + 1 - 1])
    assert torch.allclose(k3_kl(logp, ref), want)
    assert torch.allclose(want, torch.exp(d) - d - 1)


def test_truncated_is_weights_clamp_at_cap():
    trainer = torch.tensor([-1.0, -1.0, -1.0, -0.2])
    rollout = torch.tensor([-1.0, -1.5, -3.0, -0.1])
    w = truncated_is_weights(trainer, rollout, cap=2.0)
    assert torch.allclose(w, torch.tensor([1.0, math.exp(0.5), 2.0, math.exp(-0.1)]))
    assert not w.requires_grad
    assert truncated_is_weights(trainer, rollout, cap=1.0).max().item() == 1.0


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    # ratio 1 → -1; 1.5 clipped to 1.28 for A>0 → -1.28; 0.5 with A<0 → min(-0.5, -0.8)=-0.8 → 0.8; 1.1·-1 → 1.1
    assert torch.allclose(loss, torch.tensor([[-1.0, -1.28, 0.8, 1.1]]))
    assert clipped.tolist() == [[False, True, True, False]]


def _loss_mask(lengths, width):
    return torch.tensor([[1] * n + [0] * (width - n) for n in lengths], dtype=torch.bool)


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = _loss_mask([3, 1], 4)
    assert aggregate_token_loss(per_token, mask, "grpo").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_token_loss(per_token, mask, "bnpo").item() == pytest.approx(10.0 / 4)
    assert aggregate_token_loss(per_token, mask, "dapo").item() == pytest.approx(10.0 / 4)
    # a step-wide normaliser (here: this batch is part of a 10-token step) replaces this batch's count
    assert aggregate_token_loss(per_token, mask, "dapo", normaliser=10).item() == pytest.approx(1.0)
    assert aggregate_token_loss(per_token, mask, "grpo", normaliser=4).item() == pytest.approx((2.0 + 4.0) / 4)
    assert aggregate_token_loss(per_token, mask, "dr_grpo", max_completion_len=8).item() == pytest.approx(10.0 / 16)
    with pytest.raises(ValueError, match="max_completion_len"):
        aggregate_token_loss(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_token_loss(per_token, mask, "mean")


def _token_weights(aggregation: str, correct_len: int) -> torch.Tensor:
    """Gradient of the loss w.r.t. the correct response's first 3 token log-probs (on-policy, ratio 1)."""
    width = 12
    logps = torch.full((2, width), -1.0, requires_grad=True)
    mask = _loss_mask([correct_len, 4], width)
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2, "none" if aggregation == "dr_grpo" else "group")
    loss, _ = grpo_loss(logps, logps.detach(), adv, mask, aggregation, max_completion_len=width)
    loss.backward()
    return logps.grad[0, :3]


def test_dr_grpo_has_no_length_bias_grpo_has():
    """Making the correct response longer (3 → 9 tokens) leaves Dr. GRPO's per-token weight on its
    tokens unchanged; GRPO's 1/|o| normalisation divides it by 3 (shorter correct answers favoured)."""
    dr_short, dr_long = _token_weights("dr_grpo", 3), _token_weights("dr_grpo", 9)
    assert torch.allclose(dr_short, dr_long)
    assert (dr_short < 0).all()  # descending the loss raises the correct tokens' log-probs
    g_short, g_long = _token_weights("grpo", 3), _token_weights("grpo", 9)
    assert torch.allclose(g_short, 3 * g_long)


def test_grpo_loss_with_kl_and_is_weights_by_hand():
    logps = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = torch.tensor([[1.0, 2.0]])
    loss, stats = grpo_loss(logps, old, torch.tensor([0.5]), mask, "bnpo", beta=0.1, ref_logps=ref, is_weights=w)
    kl = torch.tensor([0.0, math.e - 2])
    want = ((-0.5 * w[0]) + 0.1 * kl).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert stats["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, torch.tensor([0.5]), mask, "bnpo", beta=0.1)


def test_ppo_token_rewards_and_gae_by_hand():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = _loss_mask([3, 2], 3)
    rewards, kl = ppo_token_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -0.5], [0.0, -1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.05 + 1.0], [0.0, 0.1 + 2.0, 0.0]]))

    values = torch.tensor([[0.5, 0.2, 0.1], [1.0, 0.4, 9.0]])  # 9.0 sits on padding and must be ignored
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.05 - 0.1
    d1 = 0.0 + 0.1 - 0.2
    d0 = -0.05 + 0.2 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    e1 = 2.1 - 0.4
    e0 = 0.0 + 0.4 - 1.0 + 0.5 * e1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2], [e0, e1, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, adv + values * mask, atol=1e-6)


def test_whiten_and_value_clip_by_hand():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = _loss_mask([2], 3)
    w = masked_whiten(x, mask)
    # unbiased variance (TRL / veRL): ((1−2)² + (3−2)²) / (2 − 1) = 2. This test used to lock in the
    # biased estimate (var 1 → ±1); issue 15 switched to the anchors' estimator.
    assert torch.allclose(w, torch.tensor([[-1.0, 1.0, 0.0]]) / math.sqrt(2.0), atol=1e-6)
    three = masked_whiten(torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3, dtype=torch.bool), eps=0.0)
    assert three[0, 0].item() == pytest.approx(-0.8728715609)  # (1 − 7/3) / √(14/9 · 3/2); biased: −1.069
    v, old, ret = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]])
    # unclipped (1-0)^2 = 1, clipped V = 0.2 → 0.04; max → 1; ½ → 0.5
    assert clipped_value_loss(v, old, ret, torch.ones(1, 1, dtype=torch.bool), clip=0.2).item() == pytest.approx(0.5)
    ret = torch.tensor([[2.0]])  # unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 → max 3.24
    assert clipped_value_loss(v, old, ret, torch.ones(1, 1, dtype=torch.bool), clip=0.2).item() == pytest.approx(1.62)
