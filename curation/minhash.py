"""MinHash-LSH core: text normalisation, word n-gram shingles, vectorised 64-bit MinHash, LSH band keys.

Pure NumPy on one document or one batch; the Spark shell lives in ``curation/dedup.py``.

* normalisation: NFKC + case-fold + NFKD in C, then one lookup per code point in a table built once
  per process (combining mark → dropped, digit → 0, non-word → space); no per-character Python.
* shingles: word ``n``-grams of :func:`normalize_text`, each word hashed vectorised from its code
  points (:func:`word_hashes`) and the ``n`` word hashes of a shingle combined with a vectorised mix
  (no word or n-gram strings are built).
  A document with fewer than ``n`` words is one shingle of all its words; an empty one has none.
* permutations: ``h_i(x) = a_i * x + b_i mod 2^64`` for odd ``a_i`` — a bijection of the 64-bit
  space; the shingle hashes ``x`` are already well mixed, so two multiply-adds per value suffice.
* LSH: ``bands × rows`` (FineWeb: 14 × 8 = 112) — a band key is a 63-bit hash of its ``rows`` values.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_NON_WORD_CHAR = re.compile(r"[\W_]")
_NON_DIGIT = re.compile(r"\D")
_DELETE = np.uint32(0xFFFFFFFF)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
EMPTY = np.iinfo(np.uint64).max  # signature value of a document without shingles


@dataclass(frozen=True)
class MinHashParams:
    """FineWeb's setting by default: word 5-grams, 14 bands × 8 rows = 112 permutations."""

    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


@lru_cache(maxsize=1)
def _char_map() -> np.ndarray:
    """Per code point, what :func:`normalize_text` makes of it after NFKD: a combining mark →
    :data:`_DELETE`, a digit → ``0``, a letter or other word character → itself, anything else → space."""
    everything = "".join(map(chr, range(sys.maxunicode + 1)))
    table = np.full(sys.maxunicode + 1, ord(" "), dtype=np.uint32)
    is_word = _code_points(_NON_WORD_CHAR.sub("\0", everything)) != 0
    table[is_word] = np.nonzero(is_word)[0]
    table[_code_points(_NON_DIGIT.sub("\0", everything)) != 0] = ord("0")
    combining = np.fromiter(map(unicodedata.combining, everything), dtype=np.int32, count=len(everything))
    table[combining != 0] = _DELETE
    return table


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _normalized_code_points(text: str) -> np.ndarray:
    """:func:`normalize_text` as code points, before its spaces are collapsed: one table lookup each."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
    mapped = _char_map()[_code_points(text)]
    return mapped[mapped != _DELETE]


def normalize_text(text: str) -> str:
    """NFKC, case-fold, strip accents (NFKD, combining marks dropped), digits → 0, punctuation and
    ``_`` → space, whitespace collapsed."""
    return " ".join(_normalized_code_points(text).tobytes().decode("utf-32-le").split())


def mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, element-wise on uint64 (wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(33))
    x = x * _M1
    x = x ^ (x >> np.uint64(33))
    x = x * _M2
    return x ^ (x >> np.uint64(33))


def word_hashes(code_points: np.ndarray) -> np.ndarray:
    """One uint64 hash per space-separated word of ``code_points``, vectorised: the sum over the
    word's characters of ``mix64(position << 21 | code point)``, mixed again."""
    is_word = np.r_[False, code_points != ord(" "), False]
    edges = np.flatnonzero(is_word[1:] != is_word[:-1])  # word i spans [edges[2i], edges[2i+1])
    if not len(edges):
        return np.empty(0, dtype=np.uint64)
    lengths = edges[1::2] - edges[::2]
    chars = code_points[is_word[1:-1]].astype(np.uint64)
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    position = np.arange(len(chars), dtype=np.uint64) - np.repeat(first, lengths).astype(np.uint64)
    with np.errstate(over="ignore"):
        return mix64(np.add.reduceat(mix64((position << np.uint64(21)) | chars), first) + _GOLDEN)


def _shingles(text: str, ngram: int) -> np.ndarray:
    """uint64 hashes of the word ``ngram``-grams of the normalised text, repeats included."""
    h = word_hashes(_normalized_code_points(text))
    if not len(h):
        return h
    n = min(ngram, len(h))
    with np.errstate(over="ignore"):
        acc = np.zeros(len(h) - n + 1, dtype=np.uint64)
        for k in range(n):  # position-dependent combine: "a b" and "b a" differ
            acc = mix64(acc * _GOLDEN + h[k : len(h) - n + 1 + k] + np.uint64(k))
    return acc


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """Distinct uint64 hashes of the word ``ngram``-grams of the normalised text."""
    return np.unique(_shingles(text, ngram))


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the ``num_perm`` hash permutations, ``a`` odd; deterministic in ``seed``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
    return a, b


def signatures(shingle_sets: list[np.ndarray], params: MinHashParams = MinHashParams(), chunk: int = 4096) -> np.ndarray:
    """MinHash signatures of a batch: ``(len(shingle_sets), num_perm)`` uint64; no shingles → all EMPTY.

    The shingles of the whole batch are concatenated and processed ``chunk`` at a time into one
    reused cache-sized buffer, so the work is three NumPy passes per chunk, not a loop per document.
    """
    a, b = permutations(params.num_perm, params.seed)
    out = np.full((len(shingle_sets), params.num_perm), EMPTY, dtype=np.uint64)
    lengths = np.array([len(s) for s in shingle_sets], dtype=np.int64)
    if lengths.sum() == 0:
        return out
    flat = np.concatenate([s for s in shingle_sets if len(s)])
    owner = np.repeat(np.nonzero(lengths)[0], lengths[lengths > 0])
    buf = np.empty((min(chunk, len(flat)), params.num_perm), dtype=np.uint64)
    for start in range(0, len(flat), chunk):
        x, who = flat[start : start + chunk], owner[start : start + chunk]
        hashed = buf[: len(x)]
        np.multiply(x[:, None], a[None, :], out=hashed)  # wraps mod 2^64
        hashed += b
        bounds = np.r_[0, np.nonzero(np.diff(who))[0] + 1]  # shingles are grouped by document
        docs = who[bounds]
        out[docs] = np.minimum(out[docs], np.minimum.reduceat(hashed, bounds, axis=0))
    return out


def batch_signatures(texts: list[str], params: MinHashParams = MinHashParams()) -> np.ndarray:
    """Signatures of a batch of texts (see :func:`signatures`; a repeated shingle changes no minimum)."""
    return signatures([_shingles(t or "", params.ngram) for t in texts], params)


def band_keys(sigs: np.ndarray, params: MinHashParams = MinHashParams()) -> np.ndarray:
    """``(n, bands)`` int64 LSH bucket keys (non-negative, 63-bit) of ``(n, num_perm)`` signatures."""
    n = sigs.shape[0]
    rows = sigs.reshape(n, params.bands, params.rows)
    with np.errstate(over="ignore"):
        key = np.zeros((n, params.bands), dtype=np.uint64)
        for r in range(params.rows):
            key = mix64(key * _GOLDEN + rows[:, :, r])
    return (key >> np.uint64(1)).astype(np.int64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal signature values — an unbiased estimate of the shingle-set Jaccard."""
    return float(np.mean(sig_a == sig_b))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two shingle-hash sets (both empty → 1.0)."""
    union = len(np.union1d(a, b))
    return 1.0 if union == 0 else len(np.intersect1d(a, b, assume_unique=True)) / union


def s_curve(bands: int, rows: int, jaccards=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)) -> dict[str, float]:
    """P(a pair of Jaccard ``j`` shares at least one band) = ``1 - (1 - j^rows)^bands``."""
    return {f"{j:.2f}": round(1.0 - (1.0 - j**rows) ** bands, 4) for j in jaccards}
