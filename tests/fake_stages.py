"""Two tiny stages without Spark, used to test the executor, cache, lineage and flows quickly."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from infra.effects import EFFECTS_TABLE, effect_row
from infra.stage import Stage, StageConfig, StageContext, StageResult


class CountConfig(StageConfig):
    source: str = Field("", description="text file to read")
    min_len: int = Field(0, description="lines shorter than this are dropped")
    fail: bool = Field(False, description="raise after writing part of the output (a killed stage)")


def count_lines(ctx: StageContext) -> StageResult:
    lines = Path(ctx.external_inputs["source"]).read_text().splitlines()
    kept = [line for line in lines if len(line) >= ctx.config.min_len]
    out = ctx.output("data")
    out.mkdir()
    (out / "lines.txt").write_text("\n".join(kept))
    ctx.output("stats").mkdir()
    (ctx.output("stats") / "n.txt").write_text(str(len(kept)))
    if ctx.config.fail:
        raise RuntimeError("injected failure")
    return StageResult(metrics={"rows_in": len(lines), "kept": len(kept)})


class UpperConfig(StageConfig):
    suffix: str = Field("", description="appended to each line")


def upper(ctx: StageContext) -> StageResult:
    src = ctx.input("alpha").path("data") / "lines.txt"
    text = "\n".join(line.upper() + ctx.config.suffix for line in src.read_text().splitlines())
    ctx.output("data").mkdir()
    (ctx.output("data") / "upper.txt").write_text(text)
    # a before → after row as a training stage reports one (upper-casing "improves" the share of capitals)
    before = [float(line[:1].isupper()) for line in src.read_text().splitlines()]
    after = [float(line[:1].isupper()) for line in text.splitlines()]
    effect = effect_row("beta", "capitalised", before, after, kind="proportion", better="higher")
    return StageResult(metrics={"lines": len(text.splitlines())}, tables={"t": [{"a": 1}], EFFECTS_TABLE: [effect]},
                       report_md="done")


STAGES = [
    Stage("alpha", "count lines of a file", CountConfig, count_lines, external_inputs=lambda c: {"source": c.source}),
    Stage("beta", "upper-case alpha's lines", UpperConfig, upper, inputs=("alpha",)),
]
