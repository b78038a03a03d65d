"""The shared RL experience path: prompts → scored :class:`Rollout` → :func:`make_experience`.

The old / reference log-probs and the values are checked against a reference written here: each
completion run through the model on its own, unpadded, in float64 from the logits — so the left
padding, position ids, micro-batching and loss mask of the batched path are all under test.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from training.rl.experience import Rollout, RolloutSource, make_experience
from training.rl.grpo import GRPOConfig
from training.rl.ppo import ValueModel
from training.rl.rewards import PromptExample
from training.rl.rollout import Completion

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg).eval()
    torch.manual_seed(1)
    ref = LlamaForCausalLM(cfg).eval()
    head = torch.nn.Linear(cfg.hidden_size, 1)
    return policy, ref, head


def completions() -> list[Completion]:
    """Ragged prompts (2..5 tokens) and completions (1..4 tokens); rows 1 and 4 hit the cap unfinished."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(3, 2, True), (5, 4, False), (2, 1, True), (4, 3, True), (2, 4, False), (3, 1, True), (5, 2, True)]
    out = []
    for i, (p, c, finished) in enumerate(shapes):
        prompt = torch.randint(1, 97, (p,), generator=gen).tolist()
        tokens = torch.randint(1, 97, (c,), generator=gen).tolist()
        out.append(Completion(i, prompt, tokens, (-torch.rand(c, generator=gen)).tolist(), f"c{i}", finished))
    return out


def unpadded(model, c: Completion, hidden=False):
    """float64 log π(o_t | prefix) of one completion (and the hidden states before each token)."""
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=hidden)
    p, n = len(c.prompt_ids), len(c.token_ids)
    logits = out.logits[0, p - 1:p - 1 + n].double() / TEMPERATURE
    logps = logits.log_softmax(-1)[torch.arange(n), torch.tensor(c.token_ids)]
    return (logps, out.hidden_states[-1][0, p - 1:p - 1 + n]) if hidden else logps


@pytest.mark.parametrize("micro_batch_size", [1, 3, 16])
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_make_experience_matches_per_row_reference(tiny, micro_batch_size, mask_truncated):
    policy, ref, head = tiny
    comps = completions()
    rewards = [0.1 * i for i in range(len(comps))]
    cfg = GRPOConfig(micro_batch_size=micro_batch_size, mask_truncated=mask_truncated, temperature=TEMPERATURE)
    critic = ValueModel(32, head=head)
    exp = make_experience(comps, rewards, 0, cfg, contextlib.nullcontext, "cpu", policy=policy, critic=critic, ref_model=ref)

    assert len(exp) == 7 and exp.batch.input_ids.shape == (7, 5 + 4)
    assert exp.truncated.tolist() == [False, True, False, False, True, False, False]
    assert exp.rewards.tolist() == pytest.approx(rewards)
    assert not (exp.old_logps.requires_grad or exp.values.requires_grad or exp.ref_logps.requires_grad)
    for i, c in enumerate(comps):
        n = len(c.token_ids)
        keep = not (mask_truncated and not c.finished)
        assert exp.mask[i].tolist() == [keep] * n + [False] * (4 - n)
        assert exp.batch.completion_mask[i].tolist() == [True] * n + [False] * (4 - n)  # the raw mask is untouched
        want, hidden = unpadded(policy, c, hidden=True)
        torch.testing.assert_close(exp.old_logps[i, :n].double(), want, atol=2e-5, rtol=0)
        torch.testing.assert_close(exp.ref_logps[i, :n].double(), unpadded(ref, c), atol=2e-5, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(exp.values[i, :n], head(hidden).squeeze(-1), atol=2e-5, rtol=0)
        assert not exp.old_logps[i, n:].any() and not exp.values[i, n:].any() and not exp.ref_logps[i, n:].any()


def test_make_experience_without_models_only_batches(tiny):
    cfg = GRPOConfig(micro_batch_size=2)
    exp = make_experience(completions(), [1.0] * 7, 0, cfg, contextlib.nullcontext, "cpu")
    assert exp.old_logps is None and exp.values is None and exp.ref_logps is None
    assert exp.micro_batches(2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


class EchoEngine:
    """Completion text = '<prompt index>:<k>' for k < n; token count = k + 1."""

    def generate(self, prompts, n, sampling):
        return [Completion(i, list(p), [7] * (k + 1), [-1.0] * (k + 1), f"{i}:{k}", k + 1 < sampling.max_tokens)
                for i, p in enumerate(prompts) for k in range(n)]


class Tokenizer:
    chat_template = None

    def __call__(self, text):
        return {"input_ids": [len(text)]}


def test_rollout_source_cycles_prompts_and_counts_failed_rewards(caplog):
    examples = [PromptExample(f"q{i}", str(i)) for i in range(5)]
    seen = []

    def reward(completion, answer, prompt):
        seen.append(prompt.split("\n")[0])
        if completion.endswith(":1"):
            raise RuntimeError("boom")
        return float(answer)

    cfg = GRPOConfig(reward_weights={"r": 2.0}, max_new_tokens=2, seed=3)
    source = RolloutSource(EchoEngine(), Tokenizer(), examples, cfg, reward_functions={"r": reward},
                           log=logging.getLogger("test.rl"))
    with caplog.at_level(logging.WARNING, "test.rl"):
        first = source.sample(0, 3, 2)
        second = source.sample(1, 3, 2)
    # a seeded shuffle, cycled: 6 prompt draws over 5 prompts repeat the first one
    order = seen[::2]
    assert len(set(order[:5])) == 5 and order[5] == order[0]
    import random

    want = list(range(5))
    random.Random(3).shuffle(want)
    assert order == [f"q{want[i % 5]}" for i in range(6)]
    # every second completion's reward raised: scored 0, counted, logged once per call
    assert first.failures == 3 and second.failures == 3
    assert first.rewards[1::2] == [0.0] * 3 and first.rewards[::2] == [2.0 * want[i] for i in range(3)]
    assert sum("reward 'r' failed on 3/6 samples (first: RuntimeError: boom)" in r.getMessage()
               for r in caplog.records) == 2

    both = Rollout()
    both.extend(first)
    both.extend(second)
    both.add_component("bonus", [1.0] * 12)
    m = both.metrics(spread=True)
    assert m["reward_mean"] == pytest.approx(sum(first.rewards + second.rewards) / 12 + 1.0, rel=1e-6)
    assert m["reward_bonus"] == 1.0 and m["reward_failures"] == 6
    assert (m["response_len_mean"], m["response_len_max"], m["truncated"]) == (1.5, 2, 6)
    assert list(m)[:2] == ["reward_mean", "reward_std"] and "reward_std" not in first.metrics()
