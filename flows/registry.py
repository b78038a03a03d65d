"""The stage list (the application layer knows every stage) and the entry points bound to it.

Each stage module exposes ``STAGES: list[Stage]``; add a stage by importing its module here and
listing it in :data:`STAGE_MODULES`. Pipeline order comes from every stage's declared inputs
(:func:`topological_order`), not from a list kept by hand.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from curation import dedup, extract, heuristics, ingest, langid, quality, tokenize, tokenizer
from evaluation import stages as eval_stages
from infra import config as config_lib
from infra.config import BaseRefineryConfig
from infra.executor import execute
from infra.stage import Stage
from training import dpo, pretrain_stage, reward, sft
from training.rl import grpo, ppo

STAGE_MODULES: tuple = (
    ingest, extract, langid, heuristics,
    quality,  # train_quality, quality (after heuristics)
    dedup, tokenizer, tokenize,
    pretrain_stage,  # pretrain (megatron-core, torchrun)
    sft, reward, dpo, grpo, ppo,
    eval_stages,  # eval_pretrain, eval_sft, eval_dpo, eval_grpo, eval_ppo
)


@lru_cache(maxsize=1)
def all_stages() -> dict[str, Stage]:
    """Every registered stage by name, in pipeline order (:func:`topological_order` of the declared inputs)."""
    registered: dict[str, Stage] = {}
    for module in STAGE_MODULES:
        for stage in module.STAGES:
            if stage.name in registered:
                raise RuntimeError(f"stage {stage.name!r} registered twice ({module.__name__})")
            registered[stage.name] = stage
    return {name: registered[name] for name in topological_order(registered)}


def stage_groups() -> dict[str, list[str]]:
    """Named stage sets that ``--stages`` and the pipeline form accept beside stage names: ``curation``
    (the stages of the curation package: web archives to token shards), ``training`` (training and the
    evaluations after it), ``all``; each in pipeline order."""
    stages = all_stages()
    curation = [name for name, st in stages.items() if st.run.__module__.startswith("curation.")]
    return {"curation": curation, "training": [name for name in stages if name not in curation], "all": list(stages)}


def expand_stages(names: list[str]) -> list[str]:
    """Stage names with group names (:func:`stage_groups`) replaced by their stages, each once."""
    groups = stage_groups()
    return list(dict.fromkeys(s for name in names for s in groups.get(name, [name])))


def topological_order(stages: dict[str, Stage]) -> list[str]:
    """Stage names so that each comes after every stage it reads. Among ready stages, those nothing else
    reads (evaluations) go first — a checkpoint is evaluated as soon as it exists — then registration order."""
    needs = {name: {s for s in (*st.inputs, *st.optional_inputs) if s in stages} for name, st in stages.items()}
    read = {s for deps in needs.values() for s in deps}
    order: list[str] = []
    while needs:
        ready = sorted((name for name, deps in needs.items() if not deps), key=lambda name: name in read)
        if not ready:
            raise RuntimeError(f"stages with circular inputs: {sorted(needs)}")
        order.append(ready[0])
        del needs[ready[0]]
        for deps in needs.values():
            deps.discard(ready[0])
    return order


def get_stage(name: str) -> Stage:
    stages = all_stages()
    if name not in stages:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(stages)}")
    return stages[name]


def execution_metrics() -> dict[str, tuple[str, ...]]:
    """Stage → metric names that describe how a run computed (see :attr:`Stage.execution_metrics`)."""
    return {name: st.execution_metrics for name, st in all_stages().items() if st.execution_metrics}


def load_config(path: str | Path | None = None, overrides: Any = None) -> BaseRefineryConfig:
    """:func:`infra.config.load_config` with this stage list: the file + overrides, validated once."""
    return config_lib.load_config(path, overrides, all_stages())


def validate_config(data: dict) -> BaseRefineryConfig:
    return config_lib.validate_config(data, all_stages())


def execute_stage(name: str, config: BaseRefineryConfig, run_id: str, from_ref: str | None = None,
                  force: bool = False, log=None) -> dict:
    """Run (or skip, or reuse) the stage called ``name``; see :func:`infra.executor.execute`."""
    return execute(get_stage(name), config, run_id, from_ref, force, log)
