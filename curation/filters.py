"""Heuristic quality signals (Gopher quality, Gopher repetition, C4, FineWeb) and the rules on them.

Pure module, DataTrove-style but split in two halves so thresholds can change without recomputing:

- signal functions: ``text -> {signal_name: number}``, one per filter, no thresholds inside;
- rules: each declared once in :data:`RULE_SPECS` (filter, name, signal, op, default threshold, what it
  drops; the heuristics config is generated from it); ``Rule(filter, name, signal, op, threshold)`` rows are
  built from the config; :func:`first_failure` returns the reason of the first rule a document fails
  (``"gopher_quality:min_doc_words"``).

The signals follow DataTrove's ``GopherQualityFilter``, ``GopherRepetitionFilter``, ``C4QualityFilter``
and ``FineWebQualityFilter`` (same definitions and default thresholds) with one difference: words come
from a regex tokenizer (``\\w+`` runs and single punctuation marks) instead of NLTK's ``word_tokenize``.
Bump :data:`SIGNALS_VERSION` whenever a signal's definition changes (it keys the signals cache).
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

SIGNALS_VERSION = "1"

_TOKEN = re.compile(r"\w+|[^\w\s]")
_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_SENTENCE_END = re.compile(r"[.!?。！？]+(?:[\"'”’)\]]*)(?=\s|$)")
_C4_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")

GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
C4_POLICY_SUBSTRINGS = (
    "terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies",
)
FINEWEB_STOP_CHARS = (".", "'", '"', "!", "?")
GOPHER_TOP_NGRAMS = (2, 3, 4)
GOPHER_DUP_NGRAMS = (5, 6, 7, 8, 9, 10)


def tokens(text: str) -> list[str]:
    """Word tokens (``\\w+`` runs) and punctuation tokens (one non-space, non-word character each)."""
    return _TOKEN.findall(text)


def _is_word(token: str) -> bool:
    return token[0].isalnum() or token[0] == "_"


def gopher_quality_signals(text: str) -> dict[str, float]:
    """Gopher quality numbers: word count, mean word length, symbol ratios, bullet/ellipsis lines, alpha words, stop words."""
    toks = tokens(text)
    words = [t for t in toks if _is_word(t)]
    n_words = len(words)
    lines = text.splitlines() or [""]
    denom = max(n_words, 1)
    return {
        "gopher_n_words": n_words,
        "gopher_mean_word_length": (sum(map(len, words)) / n_words) if n_words else 0.0,
        "gopher_hash_word_ratio": text.count("#") / denom,
        "gopher_ellipsis_word_ratio": (text.count("...") + text.count("…")) / denom,
        "gopher_bullet_lines_ratio": sum(s.lstrip().startswith("•") for s in lines) / len(lines),
        "gopher_ellipsis_lines_ratio": sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines),
        "gopher_alpha_words_ratio": sum(any(c.isalpha() for c in w) for w in words) / denom,
        "gopher_stop_words": sum(t in GOPHER_STOP_WORDS for t in toks),
    }


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated elements, their total characters), first occurrences not counted."""
    seen: set[str] = set()
    dup_elements = dup_chars = 0
    for item in items:
        if item in seen:
            dup_elements += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_elements, dup_chars


def _ngrams(words: list[str], n: int) -> list[str]:
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def _top_ngram_chars(ngrams: list[str]) -> int:
    """Characters of the most frequent n-gram times its count (0 when no n-gram repeats)."""
    if not ngrams:
        return 0
    gram, count = Counter(ngrams).most_common(1)[0]
    return len(gram) * count if count > 1 else 0


def _dup_ngram_chars(ngrams: list[str], n: int) -> int:
    """Characters in repeated n-grams, skipping past each repeat so overlapping words count once."""
    seen: set[str] = set()
    chars, i = 0, 0
    while i < len(ngrams):
        gram = ngrams[i]
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def gopher_repetition_signals(text: str) -> dict[str, float]:
    """Gopher repetition numbers: duplicate lines/paragraphs (count and char fractions), top and duplicate n-gram char fractions."""
    n_chars = max(len(text), 1)
    paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
    para_dups, para_dup_chars = _duplicates(paragraphs)
    lines = text.splitlines() or [""]
    line_dups, line_dup_chars = _duplicates(lines)
    words = [t for t in tokens(text) if _is_word(t)]
    out = {
        "gopher_dup_para_frac": para_dups / len(paragraphs),
        "gopher_dup_para_char_frac": para_dup_chars / n_chars,
        "gopher_dup_line_frac": line_dups / len(lines),
        "gopher_dup_line_char_frac": line_dup_chars / n_chars,
    }
    for n in GOPHER_TOP_NGRAMS:
        out[f"gopher_top_{n}gram_char_frac"] = _top_ngram_chars(_ngrams(words, n)) / n_chars
    for n in GOPHER_DUP_NGRAMS:
        out[f"gopher_dup_{n}gram_char_frac"] = _dup_ngram_chars(_ngrams(words, n), n) / n_chars
    return out


def c4_kept_lines(text: str) -> tuple[list[str], bool, bool]:
    """Apply C4's line rules; return (kept lines, saw "lorem ipsum", saw "{") as DataTrove's C4QualityFilter does.

    A line is kept when no word is over 1000 chars and, after removing citation marks like ``[1]``,
    it ends in terminal punctuation (not an ellipsis), has >= 3 words and mentions neither
    "javascript" nor a cookie/terms-of-use phrase. "lorem ipsum" and "{" are looked for in lines
    that passed the punctuation and length rules (a document-level drop in C4).
    """
    kept: list[str] = []
    lorem = curly = False
    for raw in text.splitlines():
        line = raw.strip()
        words = line.split()
        if any(len(w) > 1000 for w in words):
            continue
        line = _C4_CITATION.sub("", line)
        if not line.endswith(C4_END_PUNCTUATION) or line.endswith("..."):
            continue
        if len(words) < 3:
            continue
        lower = line.lower()
        lorem = lorem or "lorem ipsum" in lower
        curly = curly or "{" in line
        if "javascript" in lower or any(p in lower for p in C4_POLICY_SUBSTRINGS):
            continue
        kept.append(line)
    return kept, lorem, curly


def count_sentences(line: str) -> int:
    """Sentences in one line: terminal-punctuation boundaries, at least 1 for a non-empty line."""
    return max(1, len(_SENTENCE_END.findall(line))) if line.strip() else 0


def c4_signals(text: str) -> dict[str, float]:
    """C4 numbers: sentences in the lines C4 keeps, share of lines it removes, lorem ipsum / curly bracket flags."""
    kept, lorem, curly = c4_kept_lines(text)
    n_lines = max(len(text.splitlines()), 1)
    return {
        "c4_sentences": sum(count_sentences(line) for line in kept),
        "c4_removed_lines_frac": 1.0 - len(kept) / n_lines,
        "c4_lorem_ipsum": int(lorem),
        "c4_curly_bracket": int(curly),
    }


def fineweb_signals(text: str) -> dict[str, float]:
    """FineWeb numbers: lines ending in punctuation, short lines, duplicate-line chars, newlines per word."""
    lines = text.split("\n")
    non_empty = [line for line in lines if line.strip()]
    n_words = max(len(tokens(text)), 1)
    return {
        "fineweb_line_punct_ratio": sum(line.endswith(FINEWEB_STOP_CHARS) for line in lines) / len(lines),
        "fineweb_short_line_ratio": sum(len(line) <= 30 for line in lines) / len(lines),
        "fineweb_dup_line_char_frac": _duplicates(non_empty)[1] / max(len(text.replace("\n", "")), 1),
        "fineweb_newline_word_ratio": text.count("\n") / n_words,
    }


SIGNAL_FUNCTIONS: tuple[Callable[[str], dict[str, float]], ...] = (
    gopher_quality_signals, gopher_repetition_signals, c4_signals, fineweb_signals,
)


def all_signals(text: str) -> dict[str, float]:
    """Every heuristic signal of one document (floats; counts and flags as whole numbers)."""
    out: dict[str, float] = {}
    for fn in SIGNAL_FUNCTIONS:
        out.update(fn(text))
    return {k: float(v) for k, v in out.items()}


def signal_names() -> list[str]:
    """Names of the signals :func:`all_signals` returns, in order."""
    return list(all_signals("a b c.\n\nd e f."))


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


@dataclass(frozen=True)
class Rule:
    """A document fails when ``signals[signal] <op> threshold`` holds; its drop reason is ``filter:name``."""

    filter: str
    name: str
    signal: str
    op: str
    threshold: float

    @property
    def reason(self) -> str:
        return f"{self.filter}:{self.name}"

    def fails(self, signals: dict[str, Any]) -> bool:
        value = signals.get(self.signal)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return _OPS[self.op](value, self.threshold)


@dataclass(frozen=True)
class RuleSpec:
    """One heuristic rule, declared once (as DataTrove's ``gopher_quality_filter.py`` does): the filter it
    belongs to, its config key ``name`` (the drop reason is ``filter:name``), the test — a document fails when
    ``signal <op> threshold`` — the default threshold and what it drops. ``kind`` is the config type: ``int``
    or ``float`` (null disables the rule) or ``bool`` for a flag rule (True = drop when the flag is set)."""

    filter: str
    name: str
    signal: str
    op: str
    default: float | bool | None
    description: str
    kind: type = float


_TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
_DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

# In this order: the first rule a document fails is its drop reason. Defaults are DataTrove's.
RULE_SPECS: tuple[RuleSpec, ...] = (
    RuleSpec("gopher_quality", "min_doc_words", "gopher_n_words", "<", 50, "drop documents with fewer words", int),
    RuleSpec("gopher_quality", "max_doc_words", "gopher_n_words", ">", 100_000, "drop documents with more words", int),
    RuleSpec("gopher_quality", "min_avg_word_length", "gopher_mean_word_length", "<", 3,
             "drop when the mean word length is below"),
    RuleSpec("gopher_quality", "max_avg_word_length", "gopher_mean_word_length", ">", 10,
             "drop when the mean word length is above"),
    RuleSpec("gopher_quality", "max_hash_word_ratio", "gopher_hash_word_ratio", ">", 0.1, "max '#' symbols per word"),
    RuleSpec("gopher_quality", "max_ellipsis_word_ratio", "gopher_ellipsis_word_ratio", ">", 0.1,
             "max '...'/'…' per word"),
    RuleSpec("gopher_quality", "max_bullet_lines_ratio", "gopher_bullet_lines_ratio", ">", 0.9,
             "max share of lines starting with a bullet"),
    RuleSpec("gopher_quality", "max_ellipsis_lines_ratio", "gopher_ellipsis_lines_ratio", ">", 0.3,
             "max share of lines ending with an ellipsis"),
    RuleSpec("gopher_quality", "min_alpha_words_ratio", "gopher_alpha_words_ratio", "<", 0.8,
             "min share of words with a letter"),
    RuleSpec("gopher_quality", "min_stop_words", "gopher_stop_words", "<", 2,
             "min count of English stop words (the, be, to, of, ...)", int),
    RuleSpec("gopher_repetition", "max_dup_para_frac", "gopher_dup_para_frac", ">", 0.3,
             "max share of duplicate paragraphs"),
    RuleSpec("gopher_repetition", "max_dup_para_char_frac", "gopher_dup_para_char_frac", ">", 0.2,
             "max share of chars in duplicate paragraphs"),
    RuleSpec("gopher_repetition", "max_dup_line_frac", "gopher_dup_line_frac", ">", 0.3, "max share of duplicate lines"),
    RuleSpec("gopher_repetition", "max_dup_line_char_frac", "gopher_dup_line_char_frac", ">", 0.2,
             "max share of chars in duplicate lines"),
    *(RuleSpec("gopher_repetition", f"max_top_{n}gram_char_frac", f"gopher_top_{n}gram_char_frac", ">", v,
               f"max char share of the most frequent {n}-gram") for n, v in _TOP_NGRAM_MAX.items()),
    *(RuleSpec("gopher_repetition", f"max_dup_{n}gram_char_frac", f"gopher_dup_{n}gram_char_frac", ">", v,
               f"max char share in duplicated {n}-grams") for n, v in _DUP_NGRAM_MAX.items()),
    RuleSpec("c4", "lorem_ipsum", "c4_lorem_ipsum", ">=", True, "drop documents containing 'lorem ipsum'", bool),
    RuleSpec("c4", "curly_bracket", "c4_curly_bracket", ">=", True, "drop documents containing '{'", bool),
    RuleSpec("c4", "min_sentences", "c4_sentences", "<", 5, "min sentences after C4's line rules", int),
    RuleSpec("fineweb", "min_line_punct_ratio", "fineweb_line_punct_ratio", "<=", 0.12,
             "drop when <= this share of lines ends in . ! ? \" '"),
    RuleSpec("fineweb", "max_short_line_ratio", "fineweb_short_line_ratio", ">=", 0.67,
             "drop when >= this share of lines is <= 30 chars"),
    RuleSpec("fineweb", "max_dup_line_char_frac", "fineweb_dup_line_char_frac", ">=", 0.01,
             "drop when >= this share of chars is in duplicate lines"),
    RuleSpec("fineweb", "max_newline_word_ratio", "fineweb_newline_word_ratio", ">", 0.3,
             "drop when newlines per word exceed this"),
)
FILTERS: tuple[str, ...] = tuple(dict.fromkeys(spec.filter for spec in RULE_SPECS))


def build_rules(thresholds: dict[str, dict[str, float | None]]) -> list[Rule]:
    """Rules in :data:`RULE_SPECS` order from ``{filter: {rule name: threshold}}``; None/False disable a rule."""
    rules = []
    for spec in RULE_SPECS:
        threshold = thresholds[spec.filter][spec.name]  # a bool for flag rules: True = drop when the flag is set
        if threshold is not None and threshold is not False:
            rules.append(Rule(spec.filter, spec.name, spec.signal, spec.op, float(threshold)))
    return rules


def first_failure(signals: dict[str, Any], rules: Iterable[Rule]) -> str | None:
    """The reason of the first rule the document fails, or None when it passes them all."""
    for rule in rules:
        if rule.fails(signals):
            return rule.reason
    return None
