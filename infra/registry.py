"""The list of stage modules. Each module exposes ``STAGES: list[Stage]``.

Add a stage by appending its module here; order is the default pipeline order.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from infra.stage import Stage

STAGE_MODULES: tuple[str, ...] = (
    "curation.ingest",
    "curation.extract",
    "curation.langid",
    "curation.heuristics",
    "curation.quality",  # train_quality, quality (after curation.heuristics)
    "curation.dedup",
    "curation.tokenizer",
    "curation.tokenize",
    "training.pretrain_stage",  # pretrain (megatron-core, torchrun)
    "training.sft",
    "training.reward",
    "training.dpo",
    "training.rl.grpo",
    "training.rl.ppo",
    "evaluation.stages",  # eval_pretrain, eval_sft, eval_dpo, eval_grpo, eval_ppo
)


@lru_cache(maxsize=1)
def all_stages() -> dict[str, Stage]:
    """Every registered stage by name, in pipeline order."""
    stages: dict[str, Stage] = {}
    for module_name in STAGE_MODULES:
        for stage in importlib.import_module(module_name).STAGES:
            if stage.name in stages:
                raise RuntimeError(f"stage {stage.name!r} registered twice ({module_name})")
            stages[stage.name] = stage
    return stages


def get_stage(name: str) -> Stage:
    stages = all_stages()
    if name not in stages:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(stages)}")
    return stages[name]
