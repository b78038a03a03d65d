"""``dpo``: direct preference optimisation and its family (dpo | ipo | simpo | orpo | kto).

The reference model is the starting policy: its log-probs of every chosen/rejected answer the
run will see are computed once before training and cached (SimPO and ORPO need none for the
loss; the held-out metrics still compare with the reference). Metrics, held-out, before/after:
log-prob accuracy (log π(y_c) > log π(y_r)), the chosen-minus-rejected log-prob margin, chosen
and rejected log-prob means, and the implicit-reward accuracy β·(Δ_c − Δ_r) > 0 (Δ = log π − log π_ref;
before training every implicit reward is 0, so that accuracy starts at 0). With ``train_layers: N``
the frozen blocks' output is cached once per sequence too (training.frozen).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from infra.stage import Stage, StageContext, StageResult
from training.learner import LearnerConfig, external_inputs, run_stage

AVERAGED = ("ipo", "simpo", "orpo")  # losses on length-averaged log-probs (as TRL computes them)
REFERENCE_FREE = ("simpo", "orpo")


class DPOConfig(LearnerConfig):
    """The preference loss and its parameters; optimisation fields come from LearnerConfig."""

    data: list[str] = Field(
        default_factory=lambda: ["tests/data/post/pref_gsm8k.jsonl"],
        description="preference jsonl files (prompt/chosen/rejected or HH-RLHF transcripts)",
    )
    loss: Literal["dpo", "ipo", "simpo", "orpo", "kto"] = Field("dpo", description="DPO-family loss")
    beta: float = Field(0.1, gt=0, description="β: inverse temperature of the implicit reward (SimPO: reward scale)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε of conservative DPO / SimPO")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target margin γ")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO weight of chosen (desirable) answers")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO weight of rejected (undesirable) answers")
    lr: float = Field(5e-6, gt=0, description="peak learning rate")


class DPOTask:
    def __init__(self, config: dict, data_paths: list[str]):
        self.cfg = DPOConfig.model_validate(config)
        self.paths = data_paths
        self.ref: dict[int, tuple[float, float, float, float]] = {}  # id(pair) → ref (sum_c, sum_r, avg_c, avg_r)
        self.bottom: dict = {}  # id(Encoded) → frozen blocks' output (train_layers only)

    def prepare(self, tokenizer):
        from training.data import load_preference_pairs

        self.pad_id = tokenizer.pad_token_id
        return load_preference_pairs(self.paths, tokenizer, self.cfg.max_len, self.cfg.heldout_fraction)

    def load_model(self, model_dir, tokenizer):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def logps(self, model, pairs):
        """Summed and length-averaged log-probs of chosen and rejected answers: (sum_c, sum_r, avg_c, avg_r).

        The LM head runs only on the positions that predict an answer token (as TRL's fused head
        does), so no (batch, length, vocab) logits tensor is built for the prompts and padding.
        """
        import torch

        from training.data import collate_pairs
        from training.frozen import pair_top_hidden
        from training.losses import IGNORE_INDEX, label_logps

        batch = collate_pairs(pairs, self.pad_id)
        lm = getattr(model, "module", model)  # the DeepSpeed engine wraps the HF model
        if self.bottom:
            hidden = pair_top_hidden(model, self.bottom, pairs, self.cfg.train_layers)
        else:
            hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      use_cache=False).last_hidden_state
        hidden = hidden[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        tok = label_logps(lm.get_output_embeddings()(hidden[mask]), labels[mask])  # answer tokens only
        rows = mask.nonzero()[:, 0]
        total = torch.zeros(labels.shape[0], dtype=tok.dtype).index_add(0, rows, tok)
        avg = total / mask.sum(-1).clamp(min=1)
        n = len(pairs)
        return total[:n], total[n:], avg[:n], avg[n:]

    def setup(self, model, train_items, eval_items) -> None:
        """Cache (once, before any update) the reference log-probs of every pair this rank will see,
        and with train_layers the frozen blocks' output of every sequence (computed first, so the
        reference log-probs then cost only the top blocks)."""
        import torch
        from tqdm import tqdm

        from training.frozen import cache_pair_states

        if self.cfg.train_layers:
            self.bottom = cache_pair_states(model, [*train_items, *eval_items], self.pad_id, self.cfg.train_layers,
                                            2 * self.cfg.eval_batch_size)
        # held-out pairs in the very batches evaluate() uses: "before", π = π_ref holds bit for bit
        chunks = ([] if self.cfg.loss in REFERENCE_FREE else self._chunks(train_items)) + self._chunks(eval_items)
        model.eval()
        with torch.no_grad():
            for chunk in tqdm(chunks, desc="reference log-probs", mininterval=10):
                for j, values in enumerate(zip(*(t.tolist() for t in self.logps(model, chunk)))):
                    self.ref[id(chunk[j])] = values

    def _chunks(self, pairs) -> list[list]:
        """Length-sorted batches of eval_batch_size pairs (less padding)."""
        pairs = sorted(pairs, key=lambda p: max(len(p.chosen.input_ids), len(p.rejected.input_ids)))
        return [pairs[i:i + self.cfg.eval_batch_size] for i in range(0, len(pairs), self.cfg.eval_batch_size)]

    def _ref(self, pairs, averaged: bool):
        import torch

        cols = (2, 3) if averaged else (0, 1)
        return tuple(torch.tensor([self.ref[id(p)][c] for p in pairs]) for c in cols)

    def loss(self, model, pairs, dist):
        import torch

        from training import losses

        cfg = self.cfg
        sum_c, sum_r, avg_c, avg_r = self.logps(model, pairs)
        c, r = (avg_c, avg_r) if cfg.loss in AVERAGED else (sum_c, sum_r)
        if cfg.loss in REFERENCE_FREE:
            loss, rc, rr = (
                losses.simpo_loss(c, r, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing) if cfg.loss == "simpo"
                else losses.orpo_loss(c, r, cfg.beta)
            )
        else:
            ref_c, ref_r = self._ref(pairs, averaged=cfg.loss in AVERAGED)
            if cfg.loss == "dpo":
                loss, rc, rr = losses.dpo_loss(c, r, ref_c, ref_r, cfg.beta, cfg.label_smoothing)
            elif cfg.loss == "ipo":
                loss, rc, rr = losses.ipo_loss(c, r, ref_c, ref_r, cfg.beta)
            else:
                # z0 from this step's global batch: mean log-ratio over all answers of all ranks
                local = torch.stack([(c - ref_c).sum() + (r - ref_r).sum(), torch.tensor(2.0 * len(pairs))]).detach()
                total = dist.sum(local.double())
                kl = (total[0] / total[1]).clamp(min=0).float()
                loss, rc, rr = losses.kto_loss(c, r, ref_c, ref_r, kl, cfg.beta,
                                               cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
        n = len(pairs)
        stats = {
            "reward_accuracy": ((rc > rr).sum().item(), n), "reward_margin": ((rc - rr).sum().item(), n),
            "logps_chosen": (sum_c.sum().item(), n), "logps_rejected": (sum_r.sum().item(), n),
        }
        return loss.sum(), n, stats

    def evaluate(self, model, pairs) -> dict:
        import torch

        acc = margin = chosen = rejected = reward_acc = reward_margin = 0.0
        with torch.no_grad():
            for chunk in self._chunks(pairs):
                sum_c, sum_r, _, _ = self.logps(model, chunk)
                ref_c, ref_r = self._ref(chunk, averaged=False)
                implicit = self.cfg.beta * ((sum_c - ref_c) - (sum_r - ref_r))
                acc += float((sum_c > sum_r).sum())
                margin += float((sum_c - sum_r).sum())
                chosen += float(sum_c.sum())
                rejected += float(sum_r.sum())
                reward_acc += float((implicit > 0).sum())
                reward_margin += float(implicit.sum())
        n = len(pairs)
        return {"logp_accuracy": (acc, n), "logp_margin": (margin, n), "logps_chosen": (chosen, n),
                "logps_rejected": (rejected, n), "reward_accuracy": (reward_acc, n), "reward_margin": (reward_margin, n)}


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
    )
]
