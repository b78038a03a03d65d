"""One step of ``train_grpo`` / ``train_ppo`` against the reference loss on the same batch (issue 15).

A fake engine returns fixed ragged completions (some truncated) with rollout log-probs off the
trainer's, a reward function returns fixed rewards (one group all equal, not exactly representable),
and a tiny Llama is the policy. The loop runs 20 completions in micro-batches of 8, 8, 4; the
gradient it hands to the optimizer must equal the gradient of the reference loss written here
from the formulas (float64 on the model's float32 log-probs) over the whole batch at once.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from training.rl.common import PrecisionOptimizer
from training.rl.rollout import Completion

ROWS, WIDTH = 20, 6


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from training.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return tok, policy, ref.eval()


class FakeEngine:
    """Fixed completions: ragged lengths 1..WIDTH (length WIDTH = truncated), rollout log-probs ~ −U(0, 12)."""

    def __init__(self, vocab: int, rows: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, WIDTH + 1, (rows,), generator=gen).tolist()
        self.tokens = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
        self.logps = [(-12 * torch.rand(n, generator=gen)).tolist() for n in lengths]
        self.synced = 0

    def generate(self, prompts, n, sampling):
        out = []
        for j in range(len(prompts) * n):
            p = j // n
            out.append(Completion(p, list(prompts[p]), self.tokens[j], self.logps[j], f"c{j}",
                                  len(self.tokens[j]) < sampling.max_tokens))
        return out

    def update_weights(self, state_dict):
        self.synced += 1


# rewards per completion: group 0 all 1.2 (float32 mean one ulp off), the others mixed
REWARDS = [1.2] * 4 + [0.0, 1.0, 1.2, 0.2] + [50.3, 50.3, 0.0, 50.3] + [1.0, 0.0, 0.0, 0.0] + [0.2, 1.2, 1.2, 0.0]


def fake_reward(completion, answer, prompt):
    return REWARDS[int(completion[1:])]


def spy_gradients(monkeypatch, named) -> list[dict]:
    """Record every parameter's gradient when the loop calls PrecisionOptimizer.step (before clipping)."""
    seen: list[dict] = []
    original = PrecisionOptimizer.step

    def step(self):
        seen.append({name: p.grad.detach().clone() for name, p in named if p.grad is not None})
        return original(self)

    monkeypatch.setattr(PrecisionOptimizer, "step", step)
    return seen


def batch_logps(model, batch, temperature, hidden=False):
    """log π of the completion tokens, written out: logits of the positions before each completion token."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                output_hidden_states=hidden, use_cache=False)
    p = batch.prompt_width
    logits = out.logits[:, p - 1:-1].double() / temperature
    lp = torch.log_softmax(logits, -1).gather(2, batch.input_ids[:, p:].unsqueeze(-1)).squeeze(-1)
    lp = lp * batch.completion_mask
    return (lp, out.hidden_states[-1][:, p - 1:-1], logits) if hidden else lp


def group_adv(rewards, g, scale):
    out = []
    for k in range(0, len(rewards), g):
        grp = [float(torch.tensor(r, dtype=torch.float32)) for r in rewards[k:k + g]]
        if max(grp) == min(grp):
            out += [0.0] * g
            continue
        mean = math.fsum(grp) / g
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in grp) / (g - 1))
        out += [(x - mean) / (std + 1e-4 if scale else 1.0) for x in grp]
    return torch.tensor(out, dtype=torch.float64)


def compare(seen: dict, want: dict, tol: float):
    assert set(seen) == set(want)
    num = math.sqrt(sum(float((seen[k].double() - want[k].double()).norm()) ** 2 for k in want))
    den = math.sqrt(sum(float(want[k].double().norm()) ** 2 for k in want))
    assert den > 0 and num / den < tol, num / den


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_one_grpo_step_gives_the_reference_gradient(tiny, monkeypatch, aggregation):
    from training.rl.common import chat_prompt_ids, to_batch
    from training.rl.grpo import GRPOConfig, train_grpo
    from training.rl.rewards import arithmetic_prompts

    tok, policy0, ref_model = tiny
    policy = copy.deepcopy(policy0)
    cfg = GRPOConfig(
        steps=1, prompts_per_step=5, group_size=4, micro_batch_size=8, max_new_tokens=WIDTH, temperature=0.7,
        aggregation=aggregation, beta=0.05, tis_cap=2.0, reward_weights={"fake": 1.0}, lr=1e-3,
    )
    examples = arithmetic_prompts(5, seed=0)
    engine = FakeEngine(len(tok), ROWS)
    seen = spy_gradients(monkeypatch, list(policy.named_parameters()))
    history = train_grpo(policy, tok, engine, examples, cfg, ref_model, reward_functions={"fake": fake_reward},
                         log=logging.getLogger("test"))
    assert len(seen) == 1 and engine.synced == 1
    assert history[0]["zero_adv_groups"] == 1  # the 1.2 × 4 group

    # the reference on the same batch (the loop shuffles prompts with its seed: rebuild its order)
    import random

    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    picked = [examples[order[i % len(order)]] for i in range(cfg.prompts_per_step)]
    completions = engine.generate([chat_prompt_ids(tok, e.question) for e in picked], cfg.group_size,
                                  type("S", (), {"max_tokens": WIDTH})())
    batch = to_batch(completions, tok.pad_token_id)
    model = copy.deepcopy(policy0)
    logps = batch_logps(model, batch, cfg.temperature)
    with torch.no_grad():
        ref = batch_logps(ref_model, batch, cfg.temperature)
    mask = batch.completion_mask
    adv = group_adv(REWARDS, 4, scale=aggregation != "dr_grpo")
    old = logps.detach()  # μ = 1: the old policy is the current one (ratio 1, nothing clipped)
    w = torch.exp(old - batch.rollout_logps.double()).clamp(max=cfg.tis_cap)
    surrogate = -w * torch.exp(logps - old) * adv.unsqueeze(1)
    k3 = torch.exp(ref - logps) - (ref - logps) - 1
    per_token = (surrogate + cfg.beta * k3) * mask
    lengths = mask.sum(1).clamp(min=1)
    if aggregation == "grpo":
        loss = (per_token.sum(1) / lengths).sum() / ROWS
    elif aggregation == "dr_grpo":
        loss = per_token.sum() / (ROWS * WIDTH)
    else:
        loss = per_token.sum() / mask.sum()
    loss.backward()
    compare(seen[0], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, 1e-4)
    assert history[0]["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_one_ppo_step_gives_the_reference_gradient(tiny, monkeypatch, entropy_coef):
    from training.rl.common import chat_prompt_ids, to_batch
    from training.rl.ppo import PPOConfig, ValueModel, train_ppo
    from training.rl.rewards import arithmetic_prompts

    tok, policy0, ref_model = tiny
    policy = copy.deepcopy(policy0)
    torch.manual_seed(3)
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    head0 = copy.deepcopy(head)
    critic = ValueModel(policy.config.hidden_size, head=head)
    cfg = PPOConfig(
        steps=1, prompts_per_step=ROWS, micro_batch_size=8, max_new_tokens=WIDTH, temperature=0.7, ppo_epochs=1,
        gamma=0.9, lam=0.8, kl_coef=0.1, vf_coef=0.1, tis_cap=2.0, reward_weights={"fake": 1.0}, lr=1e-3,
        entropy_coef=entropy_coef,
    )
    examples = arithmetic_prompts(ROWS, seed=0)
    engine = FakeEngine(len(tok), ROWS)
    named = list(policy.named_parameters()) + [(f"head.{n}", p) for n, p in head.named_parameters()]
    seen = spy_gradients(monkeypatch, named)
    history = train_ppo(policy, tok, engine, examples, cfg, ref_model, critic, reward_functions={"fake": fake_reward},
                        log=logging.getLogger("test"))
    assert len(seen) == 1 and ("entropy" in history[0]) == bool(entropy_coef)

    import random

    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    picked = [examples[order[i % len(order)]] for i in range(ROWS)]
    completions = engine.generate([chat_prompt_ids(tok, e.question) for e in picked], 1,
                                  type("S", (), {"max_tokens": WIDTH})())
    batch = to_batch(completions, tok.pad_token_id)
    model = copy.deepcopy(policy0)
    logps, hidden, logits = batch_logps(model, batch, cfg.temperature, hidden=True)
    values = head0(hidden.float()).squeeze(-1).double() * batch.completion_mask
    with torch.no_grad():
        ref = batch_logps(ref_model, batch, cfg.temperature)
    mask = batch.completion_mask
    old, old_v = logps.detach(), values.detach()
    scores = [REWARDS[int(c.text[1:])] for c in completions]
    n_tok = int(mask.sum())
    # per-token rewards, GAE (γ 0.9, λ 0.8) and unbiased whitening, row by row
    adv = torch.zeros_like(old)
    ret = torch.zeros_like(old)
    for i in range(ROWS):
        n = int(mask[i].sum())
        r = [-cfg.kl_coef * float(old[i, t] - ref[i, t]) for t in range(n)]
        r[n - 1] += float(torch.tensor(scores[i], dtype=torch.float32))
        running = 0.0
        for t in reversed(range(n)):
            nxt = float(old_v[i, t + 1]) if t + 1 < n else 0.0
            running = r[t] + cfg.gamma * nxt - float(old_v[i, t]) + cfg.gamma * cfg.lam * running
            adv[i, t] = running
            ret[i, t] = running + float(old_v[i, t])
    flat = adv[mask]
    adv = (adv - flat.mean()) / torch.sqrt(flat.var(correction=1) + 1e-8) * mask
    w = torch.exp(old - batch.rollout_logps.double()).clamp(max=cfg.tis_cap)
    pg = (-w * torch.exp(logps - old) * adv * mask).sum() / n_tok
    vf = 0.5 * (((values - ret) ** 2) * mask).sum() / n_tok  # V = V_old on the first epoch: the clip is inactive
    p_tok = torch.softmax(logits, -1)
    entropy = -(p_tok * torch.log_softmax(logits, -1)).sum(-1)  # H = −Σ_v p log p of the full distribution
    (pg + cfg.vf_coef * vf - entropy_coef * (entropy * mask).sum() / n_tok).backward()
    if entropy_coef:
        assert history[0]["entropy"] == pytest.approx(float((entropy.detach() * mask).sum() / n_tok), rel=1e-4)
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want.update({f"head.{n}": p.grad for n, p in head0.named_parameters()})
    compare(seen[0], want, 1e-4)


class SequenceEngine(FakeEngine):
    """Every call returns new completions: texts 'c<k>' with a running k, so rewards can differ per round."""

    def __init__(self, vocab: int):
        super().__init__(vocab, 64)
        self.calls, self.served = [], 0

    def generate(self, prompts, n, sampling):
        self.calls.append(len(prompts))
        out = []
        for j in range(len(prompts) * n):
            k = self.served + j
            out.append(Completion(j // n, list(prompts[j // n]), self.tokens[k], self.logps[k], f"c{k}", True))
        self.served += len(prompts) * n
        return out


def test_dynamic_sampling_refills_flat_groups_and_gives_up_after_the_budget(tiny):
    """Groups of 2. Round 1: [flat, spread, flat] → keep 1, ask 2 more; round 2: [spread, flat] → ask 1;
    round 3: [spread] → full. A second step with only flat groups makes no update after 1 + 2 rounds."""
    from training.rl.grpo import GRPOConfig, train_grpo
    from training.rl.rewards import arithmetic_prompts

    tok, policy0, _ = tiny
    table = [1.0, 1.0, 0.0, 1.0, 0.5, 0.5] + [0.0, 1.0, 2.0, 2.0] + [1.0, 0.0] + [0.3] * 12
    engine = SequenceEngine(len(tok))
    cfg = GRPOConfig(steps=2, prompts_per_step=3, group_size=2, micro_batch_size=4, max_new_tokens=WIDTH,
                     dynamic_sampling=True, resample_rounds=2, reward_weights={"fake": 1.0}, lr=1e-3)
    history = train_grpo(copy.deepcopy(policy0), tok, engine, arithmetic_prompts(8), cfg,
                         reward_functions={"fake": lambda c, a, p: table[int(c[1:])]}, log=logging.getLogger("test"))
    assert engine.calls == [3, 2, 1, 3, 3, 3]
    first, second = history
    assert (first["sampled_groups"], first["kept_groups"], first["zero_adv_groups"]) == (6, 3, 0)
    assert first["reward_mean"] == pytest.approx(sum(table[:12]) / 12)  # over every sampled completion
    assert "loss" in first and "loss" not in second
    assert (second["sampled_groups"], second["kept_groups"]) == (9, 0)


def test_overlong_punishment_enters_the_rewards(tiny):
    from training.rl.grpo import GRPOConfig, train_grpo
    from training.rl.rewards import arithmetic_prompts

    tok, policy0, _ = tiny
    engine = FakeEngine(len(tok), ROWS)
    cfg = GRPOConfig(steps=1, prompts_per_step=5, group_size=4, micro_batch_size=8, max_new_tokens=WIDTH,
                     overlong_buffer=4, overlong_penalty=0.5, reward_weights={"fake": 1.0}, lr=1e-3)
    history = train_grpo(copy.deepcopy(policy0), tok, engine, arithmetic_prompts(5), cfg,
                         reward_functions={"fake": fake_reward}, log=logging.getLogger("test"))
    # DAPO: 0 up to L − B = 2 tokens, then linear down to −0.5 at L = 6
    want = [0.5 * min(0.0, (2 - len(t)) / 4) for t in engine.tokens]
    assert history[0]["reward_overlong"] == pytest.approx(sum(want) / ROWS)
    assert history[0]["reward_mean"] == pytest.approx((sum(REWARDS) + sum(want)) / ROWS, rel=1e-6)
    with pytest.raises(ValueError, match="overlong_buffer"):
        GRPOConfig(max_new_tokens=4, overlong_buffer=5)
