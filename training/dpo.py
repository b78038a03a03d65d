"""``dpo``: direct preference optimisation and its family (dpo | ipo | simpo | orpo | kto).

The reference model is the starting policy: its log-probs of every chosen/rejected answer the
run will see are computed once before training and cached (SimPO and ORPO need none for the
loss; the held-out metrics still compare with the reference). Metrics, held-out, before/after:
log-prob accuracy (log π(y_c) > log π(y_r)), the chosen-minus-rejected log-prob margin, chosen
and rejected log-prob means, and the implicit-reward accuracy β·(Δ_c − Δ_r) > 0 (Δ = log π − log π_ref;
before training every implicit reward is 0, so that accuracy starts at 0). With ``train_layers: N``
the frozen blocks' output is cached once per sequence too (training.frozen). KTO's reference point
z0 comes from mismatched sequences (each pair's prompt + the next training pair's answers), fixed in
``prepare`` before the split over ranks, with their reference log-probs cached alongside.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from infra.stage import Stage, StageContext, StageResult
from training.frozen import cache_bottom_states, cache_pair_states, pair_sequences, top_hidden
from training.learner_config import LearnerConfig, external_inputs
from training.learner_stage import run_stage

AVERAGED = ("ipo", "simpo", "orpo")  # losses on length-averaged log-probs (as TRL computes them)
REFERENCE_FREE = ("simpo", "orpo")


class DPOConfig(LearnerConfig):
    """The preference loss and its parameters; optimisation fields come from LearnerConfig."""

    data: list[str] = Field(
        default_factory=list,
        description="required: preference jsonl files (prompt/chosen/rejected or HH-RLHF transcripts)",
    )
    loss: Literal["dpo", "ipo", "simpo", "orpo", "kto"] = Field("dpo", description="DPO-family loss")
    beta: float = Field(0.1, gt=0, description="β: inverse temperature of the implicit reward (SimPO: reward scale)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε of conservative DPO / SimPO")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target margin γ")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO weight of chosen (desirable) answers")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO weight of rejected (undesirable) answers")
    kto_z0: Literal["mismatched", "matched"] = Field(
        "mismatched", description="KTO reference point z0 = max(0, mean log-ratio) over mismatched (prompt, the next "
        "training pair's answer) sequences (TRL, KTO paper), or over the step's own answers",
    )
    rpo_alpha: float = Field(
        0.0, ge=0, description="weight of an NLL term on the chosen answers, token mean over the batch (RPO; "
        "Llama 3 DPO used 0.2); not with orpo, whose loss has this term with weight 1",
    )
    mask_special_tokens: bool = Field(
        False, description="leave the tokenizer's special tokens (e.g. <|im_end|>) out of the chosen and rejected "
        "log-probs (Llama 3 DPO masks formatting tokens)",
    )
    lr: float = Field(5e-6, gt=0, description="peak learning rate")

    @model_validator(mode="after")
    def _rpo_not_orpo(self):
        if self.loss == "orpo" and self.rpo_alpha:
            raise ValueError("rpo_alpha adds ORPO's own NLL term; set it to 0 with loss: orpo")
        return self


class DPOTask:
    def __init__(self, config: dict, data_paths: list[str]):
        self.cfg = DPOConfig.model_validate(config)
        self.paths = data_paths
        self.ref: dict[int, tuple[float, ...]] = {}  # id(pair) → ref (sum_c, sum_r, avg_c, avg_r, n_c, n_r)
        self.bottom: dict = {}  # id(Encoded) → frozen blocks' output (train_layers only)
        self.mismatched: dict[int, tuple] = {}  # id(pair) → KTO z0 sequences (prompt, next pair's answers)
        self.ref_mismatched: dict[int, tuple[float, float]] = {}  # id(pair) → their reference log-probs
        self.special: list[int] = []

    def prepare(self, tokenizer):
        from training.data import load_preference_pairs

        self.pad_id = tokenizer.pad_token_id
        if self.cfg.mask_special_tokens:
            self.special = sorted(set(tokenizer.all_special_ids))
        train, heldout, metrics = load_preference_pairs(self.paths, tokenizer, self.cfg.max_len, self.cfg.heldout_fraction)
        if self.cfg.loss == "kto" and self.cfg.kto_z0 == "mismatched":
            if len(train) < 2:
                raise ValueError("kto_z0: mismatched needs at least 2 training pairs (set kto_z0: matched)")
            # fixed before any split over ranks or steps, so every backend sees the same z0 sequences
            for i, pair in enumerate(train):
                self.mismatched[id(pair)] = mismatched_pair(pair, train[(i + 1) % len(train)], self.cfg.max_len)
        return train, heldout, metrics

    def load_model(self, model_dir, tokenizer):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def sequence_logps(self, model, sequences):
        """Summed answer log-probs of each sequence and its answer-token count: (sums, counts).

        The LM head runs only on the positions that predict an answer token (as TRL's fused head
        does), so no (batch, length, vocab) logits tensor is built for the prompts and padding.
        With ``mask_special_tokens`` special-token labels are not answer tokens.
        """
        import torch

        from training.data import collate_padded
        from training.devices import model_device, to_device
        from training.losses import IGNORE_INDEX, label_logps

        lm = getattr(model, "module", model)  # the DeepSpeed engine wraps the HF model
        batch = to_device(collate_padded(sequences, self.pad_id), model_device(lm))
        if self.bottom:
            hidden = top_hidden(lm.base_model, [self.bottom[id(e)] for e in sequences], self.cfg.train_layers)
        else:
            hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      use_cache=False).last_hidden_state
        hidden = hidden[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        if self.special:
            mask &= ~torch.isin(labels, torch.tensor(self.special, device=labels.device))
        tok = label_logps(lm.get_output_embeddings()(hidden[mask]), labels[mask])  # answer tokens only
        rows = mask.nonzero()[:, 0]
        total = torch.zeros(labels.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
        return total, mask.sum(-1).to(tok.dtype)

    def logps(self, model, pairs):
        """Summed and length-averaged log-probs of chosen and rejected answers, and their token counts:
        (sum_c, sum_r, avg_c, avg_r, n_c, n_r)."""
        total, count = self.sequence_logps(model, pair_sequences(pairs))
        avg = total / count.clamp(min=1)
        n = len(pairs)
        return total[:n], total[n:], avg[:n], avg[n:], count[:n], count[n:]

    def _mismatched_logps(self, model, pairs):
        """(chosen-answer, rejected-answer) summed log-probs of each pair's KTO z0 sequences."""
        seqs = [self.mismatched[id(p)][0] for p in pairs] + [self.mismatched[id(p)][1] for p in pairs]
        total, _ = self.sequence_logps(model, seqs)
        return total[:len(pairs)], total[len(pairs):]

    def setup(self, model, train_items, eval_items) -> None:
        """Cache (once, before any update) the reference log-probs of every pair this rank will see
        (and of its KTO z0 sequences), and with train_layers the frozen blocks' output of every sequence
        (computed first, so the reference log-probs then cost only the top blocks)."""
        import torch
        from tqdm import tqdm

        kto_seqs = [e for p in train_items if id(p) in self.mismatched for e in self.mismatched[id(p)]]
        if self.cfg.train_layers:
            self.bottom = cache_pair_states(model, [*train_items, *eval_items], self.pad_id, self.cfg.train_layers,
                                            2 * self.cfg.eval_batch_size)
            if kto_seqs:
                self.bottom.update(cache_bottom_states(model, kto_seqs, self.pad_id, self.cfg.train_layers,
                                                       2 * self.cfg.eval_batch_size))
        # held-out pairs in the very batches evaluate() uses: "before", π = π_ref holds bit for bit
        chunks = ([] if self.cfg.loss in REFERENCE_FREE else self._chunks(train_items)) + self._chunks(eval_items)
        model.eval()
        with torch.no_grad():
            for chunk in tqdm(chunks, desc="reference log-probs", mininterval=10):
                for j, values in enumerate(zip(*(t.tolist() for t in self.logps(model, chunk)))):
                    self.ref[id(chunk[j])] = values
            if kto_seqs:
                for chunk in tqdm(self._chunks(train_items), desc="KTO z0 reference log-probs", mininterval=10):
                    for pair, c, r in zip(chunk, *(t.tolist() for t in self._mismatched_logps(model, chunk))):
                        self.ref_mismatched[id(pair)] = (c, r)

    def _chunks(self, pairs) -> list[list]:
        """Length-sorted batches of eval_batch_size pairs (less padding)."""
        pairs = sorted(pairs, key=lambda p: max(len(p.chosen.input_ids), len(p.rejected.input_ids)))
        return [pairs[i:i + self.cfg.eval_batch_size] for i in range(0, len(pairs), self.cfg.eval_batch_size)]

    def _ref(self, pairs, averaged: bool, device):
        import torch

        cols = (2, 3) if averaged else (0, 1)
        return tuple(torch.tensor([self.ref[id(p)][c] for p in pairs], device=device) for c in cols)

    def loss(self, model, pairs, dist):
        import torch

        from training import losses

        cfg = self.cfg
        sum_c, sum_r, avg_c, avg_r, n_c, _ = self.logps(model, pairs)
        c, r = (avg_c, avg_r) if cfg.loss in AVERAGED else (sum_c, sum_r)
        if cfg.loss in REFERENCE_FREE:
            loss, rc, rr = (
                losses.simpo_loss(c, r, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing) if cfg.loss == "simpo"
                else losses.orpo_loss(c, r, cfg.beta)
            )
        else:
            ref_c, ref_r = self._ref(pairs, averaged=cfg.loss in AVERAGED, device=c.device)
            if cfg.loss == "dpo":
                loss, rc, rr = losses.dpo_loss(c, r, ref_c, ref_r, cfg.beta, cfg.label_smoothing)
            elif cfg.loss == "ipo":
                loss, rc, rr = losses.ipo_loss(c, r, ref_c, ref_r, cfg.beta)
            else:
                loss, rc, rr = losses.kto_loss(c, r, ref_c, ref_r, self._kto_z0(model, pairs, c, r, ref_c, ref_r, dist),
                                               cfg.beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
        n = len(pairs)
        nll_weight = 1.0 if cfg.loss == "orpo" else cfg.rpo_alpha
        if nll_weight:
            # token mean over the step's global batch (TRL): × global pairs, as the learner divides by them
            counts = dist.sum(torch.stack([n_c.sum().detach(), torch.tensor(float(n), device=n_c.device)]).double())
            nll = losses.chosen_nll(sum_c, counts[0].item())
            loss = loss + nll_weight * nll * counts[1].item() / n
        stats = {
            "reward_accuracy": ((rc > rr).sum().item(), n), "reward_margin": ((rc - rr).sum().item(), n),
            "logps_chosen": (sum_c.sum().item(), n), "logps_rejected": (sum_r.sum().item(), n),
        }
        return loss.sum(), n, stats

    def _kto_z0(self, model, pairs, c, r, ref_c, ref_r, dist):
        """z0 = max(0, mean log π − log π_ref) over the step's global batch, detached: on the mismatched
        sequences (``kto_z0: mismatched``, computed without gradient) or on the answers themselves."""
        import torch

        if self.cfg.kto_z0 == "mismatched":
            with torch.no_grad():
                mc, mr = self._mismatched_logps(model, pairs)
            ref = torch.tensor([self.ref_mismatched[id(p)] for p in pairs], device=mc.device)
            ratio_sum = (mc - ref[:, 0]).sum() + (mr - ref[:, 1]).sum()
        else:
            ratio_sum = (c - ref_c).sum() + (r - ref_r).sum()
        total = dist.sum(torch.stack([ratio_sum.detach(), torch.tensor(2.0 * len(pairs), device=ratio_sum.device)]).double())
        return (total[0] / total[1]).clamp(min=0).float()

    # held-out metrics measured before and after training: kind, which direction is better, unit
    EFFECTS = {
        "reward_accuracy": {"kind": "proportion", "better": "higher", "unit": "implicit reward ranks the pair right (tie ½)"},
        "logp_margin": {"kind": "mean", "better": "higher", "unit": "log π(chosen) − log π(rejected), nats"},
    }

    def evaluate(self, model, pairs) -> dict:
        """Per pair: log-prob accuracy and margin, the sequences' log-probs, and the implicit reward
        β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)]: accuracy (tie ½) and margin."""
        import torch

        scores: dict[str, list[float]] = {k: [] for k in (
            "logp_accuracy", "logp_margin", "logps_chosen", "logps_rejected", "reward_accuracy", "reward_margin")}
        with torch.no_grad():
            for chunk in self._chunks(pairs):
                sum_c, sum_r = self.logps(model, chunk)[:2]
                ref_c, ref_r = self._ref(chunk, averaged=False, device=sum_c.device)
                implicit = self.cfg.beta * ((sum_c - ref_c) - (sum_r - ref_r))
                scores["logp_accuracy"] += (sum_c > sum_r).double().tolist()
                scores["logp_margin"] += (sum_c - sum_r).double().tolist()
                scores["logps_chosen"] += sum_c.double().tolist()
                scores["logps_rejected"] += sum_r.double().tolist()
                scores["reward_accuracy"] += ((implicit > 0).double() + 0.5 * (implicit == 0).double()).tolist()
                scores["reward_margin"] += implicit.double().tolist()
        ones = [1.0] * len(pairs)
        return {k: (v, ones) for k, v in scores.items()}


def mismatched_pair(pair, other, max_len: int):
    """KTO's z0 sequences for ``pair``: its prompt followed by ``other``'s chosen, then rejected, answer
    (token level, as TRL builds its KL dataset), cut to ``max_len``."""
    from training.data import Encoded
    from training.losses import IGNORE_INDEX

    start = next(i for i, lab in enumerate(pair.chosen.labels) if lab != IGNORE_INDEX)
    out = []
    for answer in (other.chosen, other.rejected):
        a = next(i for i, lab in enumerate(answer.labels) if lab != IGNORE_INDEX)
        out.append(Encoded((pair.chosen.input_ids[:start] + answer.input_ids[a:])[:max_len],
                           ([IGNORE_INDEX] * start + answer.labels[a:])[:max_len]))
    return tuple(out)


def run(ctx: StageContext) -> StageResult:
    return run_stage(ctx, "dpo", upstream="sft")


STAGES = [
    Stage(
        name="dpo",
        description="DPO family (dpo | ipo | simpo | orpo | kto) with cached reference log-probs → hf/",
        config_model=DPOConfig,
        run=run,
        optional_inputs=("sft",),
        external_inputs=external_inputs,
        resumable=True,
    )
]
