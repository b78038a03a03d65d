"""The dpo stage's step loss (training/dpo.py DPOTask.loss) against references written here (issue 15):
ORPO's token-mean NLL, DPO + RPO NLL with special tokens masked, KTO with z0 from mismatched pairs,
at TRL's scale. Log-probs of the reference come from one sequence at a time, in float64."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.learner_backends import Dist
from training.losses import IGNORE_INDEX

MAX_LEN = 320
PAIRS = Path(__file__).resolve().parent / "data" / "post" / "pref_gsm8k.jsonl"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from training.data import prepare_tokenizer
    from training.models import resolve_model

    t = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    prepare_tokenizer(t)
    return t


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def seq_logp(model, ids, labels, skip=()):
    """Σ log π(label_t) over answer tokens (labels ≠ IGNORE, not in ``skip``) of one unpadded sequence, and their count."""
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    total, n = torch.zeros((), dtype=torch.float64), 0
    for t in range(1, len(ids)):
        if labels[t] != IGNORE_INDEX and labels[t] not in skip:
            total = total + logp[t - 1, labels[t]]
            n += 1
    return total, n


def make_task(tok, model, **config):
    from training.dpo import DPOTask

    task = DPOTask({"max_len": MAX_LEN, **config}, [str(PAIRS)])
    train, _, _ = task.prepare(tok)
    # the three shortest pairs whose answers end inside max_len (with <|im_end|>): a cheap, complete step
    whole = [i for i, p in enumerate(train) if tok.convert_tokens_to_ids("<|im_end|>") in p.chosen.labels]
    pairs = [train[i] for i in sorted(whole, key=lambda i: len(train[i].chosen.input_ids))[:3]]
    task.setup(model, pairs, [])  # the reference = the model now
    policy = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return task, train, pairs, policy


def step(task, policy, pairs):
    loss_sum, n, _ = task.loss(policy, pairs, Dist())
    value = loss_sum / n  # what the learner optimises on one rank
    grads = torch.autograd.grad(value, [p for p in policy.parameters() if p.requires_grad])
    return value.item(), grads


def check(task, policy, pairs, reference):
    value, grads = step(task, policy, pairs)
    ref_policy = copy.deepcopy(policy)
    want = reference(ref_policy)
    want_grads = torch.autograd.grad(want, [p for p in ref_policy.parameters() if p.requires_grad])
    assert value == pytest.approx(want.item(), rel=1e-4)  # the stage sums float32 log-probs
    num = sum(float((a.double() - b.double()).norm()) ** 2 for a, b in zip(grads, want_grads)) ** 0.5
    den = sum(float(b.double().norm()) ** 2 for b in want_grads) ** 0.5
    assert den > 0 and num / den < 1e-4


def test_orpo_step_loss_is_token_mean_nll_plus_odds_ratio_term(tok, model):
    task, _, pairs, policy = make_task(tok, model, loss="orpo", beta=0.2)

    def reference(m):
        nll, tokens, odds = 0.0, 0, []
        for p in pairs:
            sc, nc = seq_logp(m, p.chosen.input_ids, p.chosen.labels)
            sr, nr = seq_logp(m, p.rejected.input_ids, p.rejected.labels)
            nll, tokens = nll - sc, tokens + nc
            c, r = sc / nc, sr / nr
            log_odds = (c - r) - (torch.log(1 - torch.exp(c)) - torch.log(1 - torch.exp(r)))
            odds.append(-0.2 * F.logsigmoid(log_odds))
        return nll / tokens + torch.stack(odds).mean()  # TRL: CE over the batch's chosen tokens − β·mean log σ

    check(task, policy, pairs, reference)


def test_dpo_with_rpo_nll_and_masked_special_tokens(tok, model):
    task, _, pairs, policy = make_task(tok, model, loss="dpo", beta=0.3, rpo_alpha=0.2, mask_special_tokens=True)
    special = set(tok.all_special_ids)
    assert any(lab in special for p in pairs for lab in p.chosen.labels)  # <|im_end|> is an answer label

    def reference(m):
        with torch.no_grad():
            refs = [(seq_logp(model, p.chosen.input_ids, p.chosen.labels, special)[0],
                     seq_logp(model, p.rejected.input_ids, p.rejected.labels, special)[0]) for p in pairs]
        nll, tokens, dpo = 0.0, 0, []
        for p, (rc, rr) in zip(pairs, refs):
            sc, nc = seq_logp(m, p.chosen.input_ids, p.chosen.labels, special)
            sr, _ = seq_logp(m, p.rejected.input_ids, p.rejected.labels, special)
            nll, tokens = nll - sc, tokens + nc
            dpo.append(-F.logsigmoid(0.3 * ((sc - rc) - (sr - rr))))
        return torch.stack(dpo).mean() + 0.2 * nll / tokens

    check(task, policy, pairs, reference)


def test_kto_z0_from_mismatched_pairs_at_trl_scale(tok, model):
    task, train, pairs, policy = make_task(tok, model, loss="kto", beta=0.2)
    nxt = {id(p): train[(i + 1) % len(train)] for i, p in enumerate(train)}  # the next pair in file order

    def splice(p, answer):  # p's prompt, then another pair's answer (token level, as TRL's KL dataset)
        start = next(i for i, lab in enumerate(p.chosen.labels) if lab != IGNORE_INDEX)
        a = next(i for i, lab in enumerate(answer.labels) if lab != IGNORE_INDEX)
        return (p.chosen.input_ids[:start] + answer.input_ids[a:])[:MAX_LEN], ([IGNORE_INDEX] * start + answer.labels[a:])[:MAX_LEN]

    def ratios(m, seqs):
        out = []
        for ids, labels in seqs:
            with torch.no_grad():
                out.append(seq_logp(m, ids, labels)[0] - seq_logp(model, ids, labels)[0])
        return out

    def reference(m):
        kl_seqs = [splice(p, nxt[id(p)].chosen) for p in pairs] + [splice(p, nxt[id(p)].rejected) for p in pairs]
        z0 = torch.stack(ratios(m, kl_seqs)).mean().clamp(min=0)
        answers = []
        for p in pairs:
            with torch.no_grad():
                rc = seq_logp(model, p.chosen.input_ids, p.chosen.labels)[0]
                rr = seq_logp(model, p.rejected.input_ids, p.rejected.labels)[0]
            dc = seq_logp(m, p.chosen.input_ids, p.chosen.labels)[0] - rc
            dr = seq_logp(m, p.rejected.input_ids, p.rejected.labels)[0] - rr
            answers += [1 - torch.sigmoid(0.2 * (dc - z0)), 1 - torch.sigmoid(0.2 * (z0 - dr))]
        return torch.stack(answers).mean()  # TRL: mean over the 2N desirable and undesirable answers

    # the mismatched z0 is positive here (a perturbed policy, log-ratios of both signs): it matters
    z0 = torch.stack(ratios(policy, [splice(p, nxt[id(p)].chosen) for p in pairs])).mean()
    assert z0.abs() > 1e-3
    check(task, policy, pairs, reference)


def test_rpo_alpha_with_orpo_is_rejected():
    from training.dpo import DPOConfig

    with pytest.raises(ValueError, match="rpo_alpha"):
        DPOConfig(loss="orpo", rpo_alpha=0.2)
