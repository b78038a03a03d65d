"""``reward``: a Bradley–Terry reward model on the policy backbone.

The HF checkpoint is loaded as ``AutoModelForSequenceClassification`` (num_labels=1: the
backbone of the causal LM plus a new scalar ``score`` head; the reward is the score at the last
non-pad token, as transformers computes it, so ``hf/`` scores the same when loaded elsewhere).
Loss: −log σ(r_c − r_r − margin) + c·(r_c + r_r)². Metric: held-out pairwise accuracy.
With ``train_layers: N`` the frozen blocks' output is cached once per sequence (training.frozen).
"""

from __future__ import annotations

from pydantic import Field

from infra.stage import Stage, StageContext, StageResult
from training.frozen import cache_pair_states, pair_top_hidden
from training.learner_config import LearnerConfig, external_inputs
from training.learner_stage import run_stage

class RewardConfig(LearnerConfig):
    """Preference data and the Bradley–Terry options; optimisation fields come from LearnerConfig."""

    data: list[str] = Field(
        default_factory=list,
        description="required: preference jsonl files (prompt/chosen/rejected or HH-RLHF transcripts, e.g. "
                    "../shared/data/hh_rlhf_harmless_test/harmless-base_test.jsonl.gz)",
    )
    lr: float = Field(2e-5, gt=0, description="peak learning rate")
    margin: float = Field(0.0, description="margin m in −log σ(r_c − r_r − m)")
    center_coef: float = Field(0.0, ge=0, description="weight of the centering term (r_c + r_r)²")


class RewardTask:
    def __init__(self, config: dict, data_paths: list[str]):
        self.cfg = RewardConfig.model_validate(config)
        self.paths = data_paths
        self.bottom: dict = {}  # id(Encoded) → frozen blocks' output (train_layers only)

    def prepare(self, tokenizer):
        from training.data import load_preference_pairs

        self.pad_id = tokenizer.pad_token_id
        return load_preference_pairs(self.paths, tokenizer, self.cfg.max_len, self.cfg.heldout_fraction)

    def load_model(self, model_dir, tokenizer):
        import torch
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def setup(self, model, train_items, eval_items) -> None:
        """With train_layers: cache the frozen blocks' output of every sequence this rank will score."""
        if self.cfg.train_layers:
            self.bottom = cache_pair_states(model, [*train_items, *eval_items], self.pad_id, self.cfg.train_layers,
                                            2 * self.cfg.eval_batch_size)

    def rewards(self, model, pairs):
        """(r_chosen, r_rejected) for a list of EncodedPair: the score at the last non-pad token."""
        import torch

        from training.data import collate_pairs
        from training.devices import model_device, to_device

        batch = to_device(collate_pairs(pairs, self.pad_id), model_device(model))
        if self.bottom:
            hidden = pair_top_hidden(model, self.bottom, pairs, self.cfg.train_layers)
            ids = batch["input_ids"]
            last = (torch.arange(ids.shape[1], device=ids.device) * (ids != self.pad_id)).argmax(-1)  # as transformers picks it
            rm = getattr(model, "module", model)  # the DeepSpeed engine wraps the HF model
            scores = rm.score(hidden[torch.arange(len(ids), device=ids.device), last]).squeeze(-1).float()
        else:
            scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            scores = scores.squeeze(-1).float()
        return scores[: len(pairs)], scores[len(pairs):]

    def loss(self, model, pairs, dist):
        from training.losses import bradley_terry_loss

        chosen, rejected = self.rewards(model, pairs)
        loss = bradley_terry_loss(chosen, rejected, self.cfg.margin, self.cfg.center_coef) * len(pairs)
        n = len(pairs)
        return loss, n, {"accuracy": ((chosen > rejected).sum().item(), n),
                         "reward_margin": ((chosen - rejected).sum().item(), n)}

    # held-out metrics measured before and after training: kind, which direction is better, unit
    EFFECTS = {"accuracy": {"kind": "proportion", "better": "higher", "unit": "pairs ranked right (tie ½)"}}

    def evaluate(self, model, pairs) -> dict:
        """Per pair: 1 if r(chosen) > r(rejected), ½ for a tie, else 0; and the margin r(chosen) − r(rejected)."""
        import torch

        correct, margin = [], []
        order = sorted(range(len(pairs)), key=lambda i: max(len(pairs[i].chosen.input_ids), len(pairs[i].rejected.input_ids)))
        with torch.no_grad():
            for i in range(0, len(order), self.cfg.eval_batch_size):  # similar lengths together: less padding
                chosen, rejected = self.rewards(model, [pairs[j] for j in order[i:i + self.cfg.eval_batch_size]])
                correct += ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).tolist()
                margin += (chosen - rejected).double().tolist()
        ones = [1.0] * len(pairs)
        return {"accuracy": (correct, ones), "reward_margin": (margin, ones)}


def run(ctx: StageContext) -> StageResult:
    return run_stage(ctx, "reward", upstream="sft")


STAGES = [
    Stage(
        name="reward",
        description="Bradley–Terry reward model (sequence classification, num_labels=1) → hf/",
        config_model=RewardConfig,
        run=run,
        optional_inputs=("sft",),
        external_inputs=external_inputs,
        resumable=True,
    )
]
