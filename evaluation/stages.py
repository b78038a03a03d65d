"""``eval_pretrain``, ``eval_sft``, ``eval_dpo``, ``eval_grpo``, ``eval_ppo``: the benchmark harness
run on each training stage's ``hf/`` checkpoint.

Each stage runs its configured task list (hellaswag, gsm8k, perplexity, heldout — the
``tokenize`` stage's validation shards, arithmetic — the RL stages' verifiable task on held-out
questions, reward_accuracy — the ``reward`` stage's model on held-out preference pairs) and writes
``results/`` (``results.json`` + ``samples/<task>.jsonl``), the results as flat manifest metrics, a
Prefect table (``eval``) and a markdown report that puts this stage next to the run's other eval stages.

With ``compare_to_start`` the same items are also scored on the model the training stage started
from, giving before → after rows with 95% intervals (``tables["effects"]``, ``infra.effects``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from evaluation.data import EvalDataError
from evaluation.model import EvalModel
from evaluation.report import (EVAL_TABLE, EVALUATED, eval_tables, flat_metrics, markdown_table, result_rows,
                               stages_side_by_side)
from evaluation.tasks import arithmetic, gsm8k, heldout, hellaswag, perplexity, reward_accuracy
from infra.effects import EFFECTS_TABLE, effect_metrics, effect_row, format_effect
from infra.stage import MISSING_INPUT, Stage, StageConfig, StageContext, StageResult
from training.models import resolve_model

TaskName = Literal["hellaswag", "gsm8k", "perplexity", "web_perplexity", "heldout", "reward_accuracy", "arithmetic"]

# eval stage → the training stage whose hf/ checkpoint it evaluates
# training stage → the stage whose hf/ it starts from when its `model` is "upstream"
STARTS_FROM = {"sft": "pretrain", "dpo": "sft", "grpo": "sft", "ppo": "sft"}
# task → (metric, kind, better, per-sample value, per-sample weight or None): the before → after rows
EFFECT_SPECS = {
    "hellaswag": ("acc_norm", "proportion", "higher", lambda s: s["acc_norm"], None),
    "gsm8k": ("exact_match_flexible", "proportion", "higher", lambda s: s["exact_match_flexible"], None),
    "arithmetic": ("accuracy", "proportion", "higher", lambda s: s["accuracy"], None),
    "heldout": ("loss", "mean", "lower", lambda s: -s["loglikelihood"] / s["tokens"], lambda s: s["tokens"]),
    "perplexity": ("bits_per_byte", "mean", "lower", lambda s: -s["loglikelihood"] / s["bytes"] / math.log(2), lambda s: s["bytes"]),
    "web_perplexity": ("bits_per_byte", "mean", "lower", lambda s: -s["loglikelihood"] / s["bytes"] / math.log(2), lambda s: s["bytes"]),
}


class HellaSwagConfig(StageConfig):
    path: str = Field("", description="HellaSwag JSON lines (.gz ok), required when listed in tasks, e.g. ../shared/data/hellaswag_val/hellaswag_val.jsonl.gz")
    limit: int | None = Field(8, ge=1, description="items to score (null = all)")


class GSM8KConfig(StageConfig):
    path: str = Field("", description="GSM8K test JSON lines, required when listed in tasks, e.g. ../shared/data/gsm8k/test.jsonl")
    train_path: str = Field("", description="GSM8K train JSON lines (k-shot examples; required when num_fewshot > 0)")
    limit: int | None = Field(2, ge=1, description="problems to solve (null = all)")
    num_fewshot: int = Field(0, ge=0, description="k-shot examples drawn from train_path per problem")
    fewshot_seed: int = Field(1234, description="seed of the k-shot draw (lm-eval's default)")
    chat_template: bool = Field(False, description="wrap prompts in the tokenizer's chat template (k-shot as turns)")
    max_new_tokens: int = Field(64, ge=1, description="generation budget per problem (lm-eval: 256)")


class PerplexityConfig(StageConfig):
    path: str = Field("", description="text file (.gz ok; .jsonl[.gz] with `text`), required when listed in tasks, e.g. ../shared/data/wikitext2_valid_test/test.txt.gz")
    limit: int | None = Field(1, ge=1, description="documents (WikiText articles) to score (null = all)")
    window: int = Field(512, ge=2, description="rolling-window length in tokens")


class HeldoutConfig(StageConfig):
    split: Literal["valid", "test"] = Field("valid", description="which Megatron split of the tokenize shards")
    limit: int | None = Field(None, ge=1, description="documents to score (null = all in the split)")
    window: int = Field(512, ge=2, description="tokens per scoring window")


class RewardAccuracyConfig(StageConfig):
    path: str = Field("", description="preference pairs {chosen, rejected[, prompt]}, required when listed in tasks, e.g. ../shared/data/hh_rlhf_harmless_test/harmless-base_test.jsonl.gz")
    limit: int | None = Field(None, ge=1, description="pairs to score (null = all)")
    max_length: int = Field(512, ge=8, description="tokens kept per text (from the end)")


class ArithmeticConfig(StageConfig):
    limit: int | None = Field(None, ge=1, description="held-out arithmetic questions to ask (null = all 118)")
    max_new_tokens: int = Field(24, ge=1, description="generation budget per question")


class EvalConfig(StageConfig):
    """Which tasks to run on the checkpoint and how."""

    renamed = {"dtype": "precision"}

    tasks: list[TaskName] = Field(
        default_factory=list,
        description="tasks to run (each file-backed task needs its `path`); heldout needs the tokenize stage, reward_accuracy the reward stage",
    )
    seed: int | None = Field(None, description="draw each task's `limit` items with this seed (null = the first items)")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="model weights' precision")
    max_length: int | None = Field(None, ge=16, description="max tokens per sequence (null = the model's)")
    generation_backend: Literal["auto", "hf", "vllm"] = Field("auto", description="vLLM when installed (auto), else transformers")
    progress: bool = Field(True, description="tqdm progress bars")
    compare_to_start: bool = Field(
        True, description="also score the model the training stage started from on the same items: before → after "
                          "rows with 95% intervals (doubles the time; a pretrain from random init has no before)")
    hellaswag: HellaSwagConfig = Field(default_factory=HellaSwagConfig, description="HellaSwag settings")
    gsm8k: GSM8KConfig = Field(default_factory=GSM8KConfig, description="GSM8K settings")
    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig, description="WikiText perplexity settings")
    web_perplexity: PerplexityConfig = Field(
        default_factory=lambda: PerplexityConfig(limit=None),
        description="bits per byte on held-out web text (a .jsonl[.gz] with `text`, e.g. "
                    "../shared/data/web_text_samples_dolma/cc_en_head-0091.jsonl.gz)",
    )
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig, description="held-out shard loss settings")
    reward_accuracy: RewardAccuracyConfig = Field(default_factory=RewardAccuracyConfig, description="reward-model accuracy settings")
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig, description="held-out arithmetic (the RL task) settings")

    @model_validator(mode="after")
    def _task_files_are_set(self) -> "EvalConfig":
        unset = [setting for _, setting, path in _task_file_settings(self) if not path]
        if unset:
            raise ValueError(f"{', '.join(unset)} not set (needed by tasks {self.tasks})")
        return self


def task_files(cfg: EvalConfig) -> dict[str, str]:
    """The external files the configured tasks read (hashed into the cache key and lineage)."""
    return {key: path for key, _, path in _task_file_settings(cfg)}


def _task_file_settings(cfg: EvalConfig) -> list[tuple[str, str, str]]:
    """(file key, setting, path) for every file the configured tasks read."""
    out = [(t, f"{t}.path", getattr(cfg, t).path) for t in ("hellaswag", "gsm8k", "perplexity", "web_perplexity") if t in cfg.tasks]
    if "gsm8k" in cfg.tasks and cfg.gsm8k.num_fewshot:
        out.append(("gsm8k_train", "gsm8k.train_path", cfg.gsm8k.train_path))
    if "reward_accuracy" in cfg.tasks:
        out.append(("reward_pairs", "reward_accuracy.path", cfg.reward_accuracy.path))
    return out


def start_model(trained: dict, run_root: Path) -> tuple[str | None, str | None]:
    """The model a training stage started from, from its manifest, as (where to load it, how the results
    name it): ``pretrain.init_from`` (None for a random init); the upstream stage's ``hf/`` when ``model``
    is "upstream" (loaded where its files are: a reused stage's outputs live in the run that computed
    them; named by content hash, since that path names a run); else ``model`` itself."""
    cfg, stage = trained["config"], trained["stage"]
    if stage == "pretrain":
        return cfg.get("init_from"), cfg.get("init_from")
    if cfg.get("model") != "upstream":
        return cfg.get("model"), cfg.get("model")
    source = trained["inputs"].get(f"{STARTS_FROM[stage]}/hf")
    if not source:
        return None, None
    producer = Path(run_root) / source["run_id"] / source["stage"] / "manifest.json"
    return json.loads(producer.read_text())["outputs"][source["output"]]["path"], source["hash"]


def task_effects(stage: str, before: list, after: list) -> list[dict]:
    """Before → after rows (95% intervals) for the tasks scored on both models."""
    earlier = {r.task: r for r in before}
    rows = []
    for res in after:
        if res.task not in EFFECT_SPECS or res.task not in earlier:
            continue
        metric, kind, better, value, weight = EFFECT_SPECS[res.task]
        b, a = earlier[res.task].samples, res.samples
        rows.append(effect_row(stage, f"{res.task}/{metric}", [value(x) for x in b], [value(x) for x in a],
                               kind=kind, better=better, weights=[weight(x) for x in b] if weight else None))
    return rows


def run_tasks(ctx: StageContext, hf_dir, shards_dir=None, reward_dir=None, tasks=None):
    """Run the configured tasks (or ``tasks``); returns (results, notes about tasks that could not run)."""
    cfg: EvalConfig = ctx.config
    files = ctx.external_inputs
    model = EvalModel(hf_dir, batch_size=cfg.batch_size, max_length=cfg.max_length, precision=cfg.precision,
                      generation_backend=cfg.generation_backend)
    results, skipped = [], []
    for task in tasks or cfg.tasks:
        ctx.log.info("eval: %s on %s", task, hf_dir)
        try:
            res = _run_task(task, cfg, model, files, shards_dir, reward_dir)
        except EvalDataError as exc:
            ctx.log.warning("eval: %s skipped: %s", task, exc)
            skipped.append(f"{task}: {exc}")
            continue
        if res.malformed:
            ctx.log.warning("eval: %s skipped %d malformed lines (%s)", task, res.malformed, "; ".join(res.notes[:2]))
        ctx.log.info("eval: %s %s", task, {k: round(v, 4) for k, v in res.metrics.items()})
        results.append(res)
    return results, skipped


def _run_task(task: str, cfg: EvalConfig, model, files, shards_dir, reward_dir):
    if task == "arithmetic":
        return arithmetic.evaluate(model, cfg.arithmetic.limit, cfg.arithmetic.max_new_tokens, cfg.progress)
    if task == "hellaswag":
        return hellaswag.evaluate(model, files["hellaswag"], cfg.hellaswag.limit, cfg.seed, cfg.progress)
    if task == "gsm8k":
        g = cfg.gsm8k
        return gsm8k.evaluate(model, files["gsm8k"], files.get("gsm8k_train"), g.num_fewshot, g.fewshot_seed,
                              g.chat_template, g.max_new_tokens, g.limit, cfg.seed, cfg.progress)
    if task == "perplexity":
        p = cfg.perplexity
        return perplexity.evaluate(model, files["perplexity"], p.window, p.limit, cfg.seed, cfg.progress)
    if task == "web_perplexity":
        p = cfg.web_perplexity
        return perplexity.evaluate(model, files["web_perplexity"], p.window, p.limit, cfg.seed, cfg.progress,
                                   task="web_perplexity")
    if task == "heldout":
        if shards_dir is None:
            raise EvalDataError("no tokenize stage output (shards/) in this run")
        h = cfg.heldout
        return heldout.evaluate(model, shards_dir, h.split, h.window, h.limit, cfg.seed, cfg.progress)
    if reward_dir is None:
        raise EvalDataError("no reward stage output (hf/) in this run")
    r = cfg.reward_accuracy
    rm = reward_accuracy.RewardModel(reward_dir, batch_size=cfg.batch_size, max_length=r.max_length, precision=cfg.precision)
    return reward_accuracy.evaluate(rm, files["reward_pairs"], r.limit, cfg.seed, cfg.progress)


def run(ctx: StageContext) -> StageResult:
    cfg: EvalConfig = ctx.config
    upstream = ctx.input(EVALUATED[ctx.stage])
    optional = {name: inp for name, inp in ctx.inputs.items() if name in ("tokenize", "reward")}
    shards_dir = optional["tokenize"].path("shards") if "tokenize" in optional else None
    results, skipped = run_tasks(ctx, upstream.path("hf"), shards_dir=shards_dir,
                                 reward_dir=optional["reward"].path("hf") if "reward" in optional else None)
    effects = []
    start, start_name = start_model(upstream.manifest, ctx.run_root) if cfg.compare_to_start else (None, None)
    comparable = [r.task for r in results if r.task in EFFECT_SPECS]
    if start and comparable:
        ctx.log.info("eval: the same items on the starting model %s (the before of each row)", start)
        before, _ = run_tasks(ctx, resolve_model(start), shards_dir=shards_dir, tasks=comparable)
        effects = task_effects(EVALUATED[ctx.stage], before, results)
        for row in effects:
            ctx.log.info("eval: %s before → after: %s", EVALUATED[ctx.stage], format_effect(row))
    elif cfg.compare_to_start:
        ctx.log.info("eval: no before: %s started from %s", EVALUATED[ctx.stage], start or "a random init")
    out = ctx.output("results")
    (out / "samples").mkdir(parents=True)
    rows = result_rows(results)
    summary = {
        "checkpoint": upstream.manifest["outputs"]["hf"]["hash"], "started_from": start_name,
        "rows": rows, "effects": effects, "skipped": skipped,
        "malformed": {r.task: {"count": r.malformed, "examples": r.notes} for r in results},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    for r in results:
        with (out / "samples" / f"{r.task}.jsonl").open("w") as fh:
            for sample in r.samples:
                fh.write(json.dumps(sample) + "\n")

    md = [f"## {ctx.stage}: {upstream.run_id}/{upstream.stage}/hf", ""]
    md.append(markdown_table(["task", "metric", "value", "n", "malformed"],
                             [[r["task"], r["metric"], r["value"], r["n"], r["malformed"]] for r in rows]))
    if skipped:
        md += [""] + [f"- {s}" for s in skipped]
    if effects:
        md += ["", f"### Before → after (starting model {start}; 95% intervals)", ""]
        md += [f"- {format_effect(r)}" for r in effects]
    earlier = {s: t for s, t in eval_tables(ctx.run_root, ctx.run_id).items() if s != ctx.stage}
    if earlier:
        md += ["", "### Along the pipeline", "", stages_side_by_side({**earlier, ctx.stage: rows})]
    metrics = {**flat_metrics(rows), **effect_metrics(effects), "tasks_skipped": len(skipped)}
    warnings = [f"evaluated checkpoint {upstream.run_id}/{upstream.stage}: {w}" for w in upstream.manifest.get("warnings", [])]
    # a configured task that could not run is a gap in the results, not a footnote (fails under pipeline.strict_inputs)
    warnings += [f"{MISSING_INPUT} task {s} (skipped)" for s in skipped]
    if warnings:
        md += ["", "**Warnings**", "", *(f"- {w}" for w in warnings)]
    return StageResult(metrics=metrics, tables={EVAL_TABLE: rows, EFFECTS_TABLE: effects}, report_md="\n".join(md),
                       warnings=warnings)


def _stage(name: str, optional_inputs: tuple[str, ...]) -> Stage:
    return Stage(
        name=name,
        description=f"benchmark the {EVALUATED[name]} checkpoint (hf/): HellaSwag, GSM8K, perplexity, held-out loss, reward accuracy",
        config_model=EvalConfig,
        run=run,
        inputs=(EVALUATED[name],),
        optional_inputs=optional_inputs,
        external_inputs=task_files,
    )


STAGES = [
    _stage("eval_pretrain", ("tokenize",)),
    _stage("eval_sft", ("tokenize",)),
    _stage("eval_dpo", ("reward",)),
    _stage("eval_grpo", ("reward",)),
    _stage("eval_ppo", ("reward",)),
]
