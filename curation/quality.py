"""``train_quality`` and ``quality``: a supervised fastText quality classifier, trained and scored.

``train_quality`` reads positive texts (clean reference text: WikiText, SFT answers) and negative
texts (documents the heuristics rejected, spammy Common Crawl pages), cuts them into word chunks,
holds out a fraction of the source documents, trains ``__label__hq`` vs ``__label__lq`` and writes
``model/`` (``model.bin`` + ``metrics.json``); held-out precision/recall go into the manifest.

``quality`` scores every document (``quality_score`` = P(hq)) in a Spark pandas UDF that loads the
model once per partition, and drops ``low_quality`` documents below a threshold or outside a top
fraction. Only doc_id and text are read; every other column passes through.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Iterator

from pydantic import Field

from curation.ledger import funnel_rows, write_decisions
from infra.jsonl import open_text, read_jsonl
from infra.stage import MISSING_INPUT, Stage, StageConfig, StageContext, StageResult

HQ, LQ = "__label__hq", "__label__lq"
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_WIKI_HEADING = re.compile(r"^\s*=( =)*\s.*\s=( =)*\s*$")
_WIKI_DETOK = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", ""))
_JSON_TEXT_KEYS = ("text", "response", "output", "answer", "completion")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz", ".warc", ".warc.gz", ".parquet")


class TrainQualityConfig(StageConfig):
    """Training data and fastText hyper-parameters of the quality classifier."""

    positives: list[str] = Field(
        default_factory=list,
        description="files/folders of high-quality text (.txt[.gz] paragraphs, .jsonl[.gz], .warc[.gz], Parquet)",
    )
    negatives: list[str] = Field(
        default_factory=list,
        description="files/folders of low-quality text, used besides the heuristics stage's rejected/ documents",
    )
    fallback_positives: str | None = Field(None, description="used when none of `positives` exists")
    fallback_negatives: str | None = Field(None, description="used when none of `negatives` exists")
    use_rejected: bool = Field(True, description="add the heuristics stage's rejected/ documents to the negatives")
    chunk_words: int = Field(120, ge=5, description="texts are cut into chunks of at most this many words")
    min_words: int = Field(8, ge=1, description="shorter chunks are ignored")
    max_per_class: int = Field(20000, ge=10, description="at most this many training chunks per class")
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of source documents held out")
    epoch: int = Field(10, ge=1, description="fastText epochs")
    lr: float = Field(0.5, gt=0.0, description="fastText learning rate")
    word_ngrams: int = Field(2, ge=1, description="fastText word n-grams")
    dim: int = Field(32, ge=2, description="fastText vector size")
    seed: int = Field(0, description="seed of the holdout split, the sampling and fastText")


class QualityConfig(StageConfig):
    """How documents are kept by their quality score."""

    threshold: float = Field(0.5, ge=0.0, le=1.0, description="keep documents with quality_score ≥ this")
    top_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="if set, keep this top fraction by score instead of the threshold"
    )


# ---------------------------------------------------------------- pure core

def fasttext_line(text: str) -> str:
    """The classifier's view of a text: lower-case word and punctuation tokens on one line."""
    return " ".join(_TOKEN.findall(text.lower()))


def detokenize_wikitext(line: str) -> str:
    for old, new in _WIKI_DETOK:
        line = line.replace(old, new)
    return line


def chunk_words(text: str, size: int, min_words: int) -> list[str]:
    """Consecutive chunks of ≤ ``size`` words; chunks shorter than ``min_words`` are dropped."""
    words = text.split()
    chunks = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    return [c for c in chunks if len(c.split()) >= min_words]


def _json_text(obj: dict) -> str:
    for key in _JSON_TEXT_KEYS:
        if isinstance(obj.get(key), str) and obj[key].strip():
            return obj[key]
    return "\n".join(i.get("output", "") for i in obj.get("instances", []) if isinstance(i, dict))


def _warc_texts(path: Path) -> Iterator[str]:
    import trafilatura
    from warcio.archiveiterator import ArchiveIterator

    texts = []
    with open(path, "rb") as fh:
        try:
            for record in ArchiveIterator(fh, arc2warc=True):
                if record.rec_type == "response":
                    texts.append(trafilatura.extract(record.content_stream().read().decode("utf-8", "replace")))
        except Exception:  # a broken archive: the records read so far still count
            pass
    yield from (t for t in texts if t)


def read_texts(path: str | Path) -> Iterator[str]:
    """Texts in a file or folder: paragraphs of .txt[.gz] (WikiText markup removed), one per line of
    .jsonl[.gz]/.json.gz (``text``/``response``/``output``… or self-instruct ``instances[].output``),
    extracted pages of .warc[.gz], the ``text`` column of .parquet."""
    path = Path(path)
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES)):
            yield from read_texts(f)
        return
    name = path.name
    if name.endswith((".txt", ".txt.gz")):
        with open_text(path, errors="replace") as fh:
            para: list[str] = []
            for line in [*fh, ""]:
                if line.strip() and not _WIKI_HEADING.match(line):
                    para.append(detokenize_wikitext(line.strip()))
                elif para:
                    yield " ".join(para)
                    para = []
    elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        for _, obj in read_jsonl(path, errors="replace"):  # a bad line is an error: training data must parse
            text = _json_text(obj)
            if text.strip():
                yield text
    elif name.endswith((".warc", ".warc.gz")):
        yield from _warc_texts(path)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        raise ValueError(f"unsupported text file {str(path)!r} (expected one of {TEXT_SUFFIXES})")


def _in_holdout(text: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha1(f"{seed}:{text}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def build_examples(positives: list[str], negatives: list[str], cfg: TrainQualityConfig) -> tuple[list[str], list[str]]:
    """fastText lines (train, holdout): chunks of each source text, split by source document so no
    document feeds both; the larger class is capped and the smaller one repeated to balance training."""
    rng = random.Random(cfg.seed)
    split: dict[str, tuple[list[str], list[str]]] = {HQ: ([], []), LQ: ([], [])}
    for label, texts in ((HQ, positives), (LQ, negatives)):
        for text in texts:
            part = split[label][1 if _in_holdout(text, cfg.holdout_fraction, cfg.seed) else 0]
            part.extend(f"{label} {fasttext_line(c)}" for c in chunk_words(text, cfg.chunk_words, cfg.min_words))
    train = {}
    for label, (tr, _) in split.items():
        rng.shuffle(tr)
        train[label] = tr[: cfg.max_per_class]
    if not train[HQ] or not train[LQ]:
        raise ValueError(f"quality training needs both classes; got {len(train[HQ])} positive and {len(train[LQ])} negative chunks")
    target = max(len(v) for v in train.values())
    lines = []
    for rows in train.values():
        lines.extend(rows[i % len(rows)] for i in range(target))
    rng.shuffle(lines)
    holdout = split[HQ][1] + split[LQ][1]
    return lines, holdout


def precision_recall(model, holdout: list[str], threshold: float = 0.5) -> dict[str, float]:
    """Precision/recall/F1 of the hq class on held-out ``__label__x text`` lines."""
    labels = [line.partition(" ")[0] == HQ for line in holdout]
    scores = score_texts(model, [line.partition(" ")[2] for line in holdout]) if holdout else []
    tp = sum(s >= threshold and a for s, a in zip(scores, labels))
    fp = sum(s >= threshold and not a for s, a in zip(scores, labels))
    fn = sum(s < threshold and a for s, a in zip(scores, labels))
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"holdout_precision": round(precision, 4), "holdout_recall": round(recall, 4), "holdout_f1": round(f1, 4),
            "holdout_positives": tp + fn, "holdout_negatives": fp + tn}


def score_texts(model, lines: list[str]) -> list[float]:
    """P(hq) for each already-``fasttext_line``-formatted text."""
    labels, probs = model.predict(lines, k=2)
    return [float(dict(zip(lab, pr)).get(HQ, 0.0)) for lab, pr in zip(labels, probs)]


def train_model(train_lines: list[str], cfg: TrainQualityConfig, workdir: Path, retries: int = 3):
    """(fastText model, learning rate it trained at): a run whose loss became NaN is retried at half the
    learning rate, up to ``retries`` times, then the error is raised."""
    import fasttext

    train_file = workdir / "train.txt"
    train_file.write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    lr = cfg.lr
    try:
        for attempt in range(retries + 1):
            try:
                model = fasttext.train_supervised(
                    input=str(train_file), epoch=cfg.epoch, lr=lr, wordNgrams=cfg.word_ngrams, dim=cfg.dim,
                    seed=cfg.seed, thread=1, verbose=0, minCount=1,
                )
                return model, lr
            except RuntimeError as exc:
                if "NaN" not in str(exc) or attempt == retries:
                    raise
                lr /= 2
    finally:
        train_file.unlink()


# ---------------------------------------------------------------- stage shells

def training_sources(cfg: TrainQualityConfig) -> dict[str, str]:
    """Named external paths: the configured ones that exist, else the class's fallback."""
    out = {}
    for kind, paths, fallback in (("positives", cfg.positives, cfg.fallback_positives), ("negatives", cfg.negatives, cfg.fallback_negatives)):
        existing = [p for p in paths if Path(p).expanduser().exists()] or ([fallback] if fallback else [])
        if not existing:
            raise ValueError(f"train_quality: none of {kind} {paths} exists and fallback_{kind} is not set")
        out.update({f"{kind}_{i}": p for i, p in enumerate(existing)})
    return out


def missing_sources(cfg: TrainQualityConfig) -> list[str]:
    """One ``missing input:`` warning per configured positives/negatives path that does not exist,
    saying what the stage uses instead (the class's other paths, or its fallback)."""
    out = []
    for kind, paths, fallback in (("positives", cfg.positives, cfg.fallback_positives), ("negatives", cfg.negatives, cfg.fallback_negatives)):
        absent = [p for p in paths if not Path(p).expanduser().exists()]
        if not absent:
            continue
        if len(absent) < len(paths):
            instead = "trained without them"
        else:
            instead = f"trained on fallback_{kind} {fallback!r} instead" if fallback else "no fallback"
        out.append(f"{MISSING_INPUT} train_quality.{kind} {absent} do(es) not exist; {instead}")
    return out


def run_train(ctx: StageContext) -> StageResult:
    cfg: TrainQualityConfig = ctx.config
    sources = {"positives": [], "negatives": []}
    for name, path in ctx.external_inputs.items():
        sources[name.split("_")[0]].append(path)
    for kind, paths in sources.items():
        ctx.log.info("train_quality: %s from %s", kind, ", ".join(map(str, paths)))
    positives = [t for p in sources["positives"] for t in read_texts(p)]
    negatives = [t for p in sources["negatives"] for t in read_texts(p)]
    rejected = 0
    if cfg.use_rejected and "heuristics" in ctx.inputs:
        extra = list(read_texts(ctx.input("heuristics").path("rejected")))
        rejected = len(extra)
        negatives += extra
    train, holdout = build_examples(positives, negatives, cfg)
    model_dir = ctx.output("model")
    model_dir.mkdir(parents=True)
    model, lr = train_model(train, cfg, ctx.out_dir)
    model.save_model(str(model_dir / "model.bin"))
    warnings = [] if lr == cfg.lr else [f"fastText's loss became NaN at lr {cfg.lr}; trained at lr {lr}"]
    metrics = {
        "positive_docs": len(positives), "negative_docs": len(negatives), "rejected_negatives": rejected,
        "train_lines": len(train), **precision_recall(model, holdout),
        # by file name, no location (equal data, equal hash): where they were is in the manifest's inputs
        "sources": {k: [Path(p).name for p in v] for k, v in sources.items()},
    }
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ctx.log.info("train_quality: held-out precision %.3f recall %.3f", metrics["holdout_precision"], metrics["holdout_recall"])
    return StageResult(metrics=metrics, tables={"holdout": [{k: metrics[k] for k in metrics if k.startswith("holdout")}]},
                       warnings=warnings)


def score_column(model_path: str):
    """A Spark pandas UDF: text → P(hq), the model loaded once per partition."""
    import pandas as pd
    from pyspark.sql import functions as F

    def score(batches):
        import fasttext

        model = fasttext.load_model(model_path)
        for texts in batches:
            yield pd.Series(score_texts(model, [fasttext_line(t or "") for t in texts]), dtype="float64")

    # real type objects (this module's annotations are strings) tell Spark it is an iterator UDF
    score.__annotations__ = {"batches": Iterator[pd.Series], "return": Iterator[pd.Series]}
    return F.pandas_udf(score, "double")


def run_score(ctx: StageContext) -> StageResult:
    from pyspark.sql import functions as F

    cfg: QualityConfig = ctx.config
    spark = ctx.spark()
    model_path = ctx.input("train_quality").path("model") / "model.bin"
    df = spark.read.parquet(str(ctx.input("heuristics").path("data")))
    if "drop_reason" not in df.columns:
        df = df.withColumn("drop_reason", F.lit(None).cast("string"))
    df = df.withColumn("quality_score", score_column(str(model_path))("text")).localCheckpoint()
    threshold = cfg.threshold
    if cfg.top_fraction is not None:
        quantile = df.approxQuantile("quality_score", [1.0 - cfg.top_fraction], 0.001)
        threshold = quantile[0] if quantile else 0.0
    df = df.withColumn(
        "drop_reason",
        F.when(F.col("drop_reason").isNull() & (F.col("quality_score") < threshold), F.lit("low_quality")).otherwise(F.col("drop_reason")),
    )
    counts = write_decisions(df, ctx.output("data"), ctx.output("rejected"))
    buckets = [
        {"score_from": r["b"] / 10, "documents": int(r["count"])}
        for r in df.groupBy(F.least(F.floor(F.col("quality_score") * 10), F.lit(9)).alias("b")).count().orderBy("b").collect()
    ]
    metrics = {**counts, "threshold_applied": round(float(threshold), 6)}
    return StageResult(metrics=metrics, tables={"funnel": funnel_rows("quality", counts), "score_histogram": buckets})


STAGES = [
    Stage(
        name="train_quality",
        description="train the fastText quality classifier (positives vs heuristics-rejected/spam negatives)",
        config_model=TrainQualityConfig,
        run=run_train,
        optional_inputs=("heuristics",),
        external_inputs=training_sources,
        input_warnings=missing_sources,
        version="2",  # 2: model/metrics.json names its sources by file name, not by absolute path
    ),
    Stage(
        name="quality",
        description="score quality_score with the trained fastText model; keep by threshold or top fraction",
        config_model=QualityConfig,
        run=run_score,
        inputs=("heuristics", "train_quality"),
        version="1",
        uses_spark=True,
    ),
]
