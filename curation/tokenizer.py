"""``tokenizer``: a byte-level BPE trained on the curated corpus, or a copy of an existing HF tokenizer.

Core: :func:`train_bpe` (texts → ``tokenizers.Tokenizer``; special tokens first, so they get the
ids 0..k in config order) and :func:`save_hf_tokenizer` (→ ``tokenizer.json`` + ``tokenizer_config.json`` +
ChatML ``chat_template.jinja``, loadable with ``AutoTokenizer``). The training text is a
deterministic sample by ``doc_id`` hash, so the same documents give the same tokenizer whatever
order the upstream files come in. With ``pretrained: smollm2`` (or an HF dir) the tokenizer of
that model is copied instead, for continued pretraining of a real model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from pydantic import Field, model_validator

from curation.text_sources import doc_hash, read_documents, source_files, valid_text
from infra.stage import Stage, StageConfig, StageContext, StageResult
from training.models import SMOLLM2, SMOLLM2_GGUF, resolve_model, smollm2_gguf_dir

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FERTILITY_DOCS = 2000  # training documents encoded to report bytes per token


class TokenizerConfig(StageConfig):
    """Byte-level BPE settings, or a pretrained tokenizer to copy."""

    pretrained: str | None = Field(
        None, description="'smollm2' or a local HF model/tokenizer dir to copy instead of training (null = train)"
    )
    vocab_size: int = Field(32768, ge=300, le=1_000_000, description="target vocabulary size incl. special tokens")
    min_frequency: int = Field(2, ge=1, description="minimum pair count for a BPE merge")
    bos_token: str = Field("<|startoftext|>", description="beginning-of-sequence token (not added automatically)")
    eos_token: str = Field("<|endoftext|>", description="end-of-document token appended by tokenize (Megatron eod)")
    pad_token: str = Field("<|pad|>", description="padding token (distinct from eos so Megatron can mask it)")
    chat_tokens: list[str] = Field(
        default_factory=lambda: ["<|im_start|>", "<|im_end|>"], description="ChatML turn markers used by the chat template"
    )
    extra_special_tokens: list[str] = Field(default_factory=list, description="more special tokens, ids after the above")
    extra_paths: list[str] = Field(
        default_factory=list, description="extra text for training (.parquet dir/file, .jsonl(.gz), .txt(.gz))"
    )
    max_train_chars: int = Field(
        200_000_000, ge=1, description="train on a doc_id-hash sample of about this many characters"
    )

    @model_validator(mode="after")
    def _distinct_specials(self):
        specials = self.special_tokens()
        if len(set(specials)) != len(specials) or any(not t for t in specials):
            raise ValueError(f"special tokens must be distinct and non-empty, got {specials}")
        return self

    def special_tokens(self) -> list[str]:
        return [self.eos_token, self.bos_token, self.pad_token, *self.chat_tokens, *self.extra_special_tokens]


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (valid str)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_hf_tokenizer(tokenizer, out_dir: Path, cfg: TokenizerConfig) -> None:
    """Write ``tokenizer`` as HF files (``PreTrainedTokenizerFast``) with the ChatML chat template."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=cfg.bos_token,
        eos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
        additional_special_tokens=[*cfg.chat_tokens, *cfg.extra_special_tokens],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(out_dir)


def copy_pretrained(ref: str, out_dir: Path) -> None:
    """Save the tokenizer of ``ref`` ('smollm2' or an HF dir) into ``out_dir``; it must be a fast tokenizer."""
    from transformers import AutoTokenizer

    src = resolve_model(ref) if ref == SMOLLM2 else Path(ref).expanduser()
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"pretrained tokenizer {ref!r}: {src} has no tokenizer.json (need a fast HF tokenizer)")
    AutoTokenizer.from_pretrained(src).save_pretrained(out_dir)


def tokenizer_info(tokenizer_dir: str | Path, eod_token: str | None = None) -> dict:
    """What tokenize needs to know about a saved tokenizer: ``{vocab_size, eos_id, pad_id, eod_token}``.

    ``vocab_size`` is one past the largest id (added tokens included); ``eod_token`` defaults to
    the tokenizer's ``eos_token``.
    """

    from tokenizers import Tokenizer

    tokenizer_dir = Path(tokenizer_dir)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    config_path = tokenizer_dir / "tokenizer_config.json"
    hf_config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    def token_str(value):
        return value.get("content") if isinstance(value, dict) else value

    eod = eod_token or token_str(hf_config.get("eos_token"))
    if not eod:
        raise ValueError(f"tokenizer {tokenizer_dir} has no eos_token; set tokenize.eod_token")
    eos_id = tok.token_to_id(eod)
    if eos_id is None:
        raise ValueError(f"end-of-document token {eod!r} is not in the vocabulary of {tokenizer_dir}")
    pad = token_str(hf_config.get("pad_token"))
    return {
        "vocab_size": max(tok.get_vocab(with_added_tokens=True).values()) + 1,
        "eos_id": eos_id,
        "pad_id": tok.token_to_id(pad) if pad else None,
        "eod_token": eod,
    }


def sample_texts(paths: list[Path], max_chars: int) -> Iterator[str]:
    """Texts of the documents under ``paths``, a deterministic ``doc_id``-hash sample of ~``max_chars``.

    Two passes: the first sums the characters, the second keeps a document when its hash bucket
    falls below ``max_chars / total``; repaired (U+FFFD) text is used for invalid UTF-8.
    """
    files = [f for p in paths for f in source_files(p)]
    total = sum(len(doc["text"] or "") for f in files for doc in read_documents(f))
    keep = min(1.0, max_chars / total) if total else 1.0
    for f in files:
        for doc in read_documents(f):
            text, _ = valid_text(doc["text"])
            if text.strip() and (keep >= 1.0 or (doc_hash(doc["doc_id"]) % 1_000_000) < keep * 1_000_000):
                yield text


def bytes_per_token(tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes per token over ``texts`` (higher = the tokenizer compresses better)."""
    if not texts:
        return 0.0
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
    return sum(len(t.encode("utf-8")) for t in texts) / max(tokens, 1)


def run(ctx: StageContext) -> StageResult:
    from tokenizers import Tokenizer

    cfg: TokenizerConfig = ctx.config
    out = ctx.output("tokenizer")
    paths = [ctx.input("dedup").path("data")]
    paths += [ctx.external_inputs[k] for k in sorted(ctx.external_inputs) if k.startswith("extra_")]
    texts = list(sample_texts(paths, cfg.max_train_chars))
    if cfg.pretrained:
        ctx.log.info("tokenizer: copying pretrained tokenizer %s", cfg.pretrained)
        copy_pretrained(cfg.pretrained, out)
    else:
        if not texts:
            raise ValueError("tokenizer: no non-empty documents to train on")
        ctx.log.info("tokenizer: training byte-level BPE (vocab %d) on %d docs", cfg.vocab_size, len(texts))
        save_hf_tokenizer(train_bpe(texts, cfg.vocab_size, cfg.special_tokens(), cfg.min_frequency), out, cfg)
    info = tokenizer_info(out)
    fertility = bytes_per_token(Tokenizer.from_file(str(out / "tokenizer.json")), texts[:FERTILITY_DOCS])
    metrics = {
        "vocab_size": info["vocab_size"], "eos_id": info["eos_id"], "pad_id": info["pad_id"],
        "pretrained": cfg.pretrained, "train_docs": 0 if cfg.pretrained else len(texts),
        "train_chars": 0 if cfg.pretrained else sum(map(len, texts)),
        "bytes_per_token": round(fertility, 4),
    }
    table = [{"metric": k, "value": v} for k, v in metrics.items()]
    return StageResult(metrics=metrics, tables={"tokenizer": table})


def _external(cfg: TokenizerConfig) -> dict[str, str]:
    """Extra training text, and the pretrained tokenizer's files (hashed into the cache key)."""
    paths = {f"extra_{i}": p for i, p in enumerate(cfg.extra_paths)}
    if cfg.pretrained == SMOLLM2:
        paths["pretrained"] = str(smollm2_gguf_dir() / SMOLLM2_GGUF)
    elif cfg.pretrained:
        paths["pretrained"] = cfg.pretrained
    return paths


STAGES = [
    Stage(
        name="tokenizer",
        description="byte-level BPE trained on the curated corpus (or a pretrained HF tokenizer copied) → tokenizer/",
        config_model=TokenizerConfig,
        run=run,
        inputs=("dedup",),
        external_inputs=_external,
        version="2",  # 2: documents of extra_paths get ids from their content (the sample follows ids)
    )
]
