"""MinHash-LSH core: text normalisation, word n-gram shingles, vectorised 64-bit MinHash, LSH band keys.

Pure NumPy on one document or one batch; the Spark shell lives in ``curation/dedup.py``.

* shingles: word ``n``-grams of :func:`normalize_text`, each word hashed once with xxh3-64 and the
  ``n`` word hashes of a shingle combined with a vectorised mix (no n-gram strings are built).
  A document with fewer than ``n`` words is one shingle of all its words; an empty one has none.
* permutations: ``h_i(x) = a_i * x + b_i mod 2^64`` for odd ``a_i`` — a bijection of the 64-bit
  space; the shingle hashes ``x`` are already well mixed, so two multiply-adds per value suffice.
* LSH: ``bands × rows`` (FineWeb: 14 × 8 = 112) — a band key is a 63-bit hash of its ``rows`` values.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_DIGIT = re.compile(r"\d")
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


def normalize_text(text: str) -> str:
    """NFKC, case-fold, strip accents, digits → 0, punctuation → space, collapse whitespace."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = _DIGIT.sub("0", text)
    return " ".join(_NON_WORD.sub(" ", text).split())


def mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, element-wise on uint64 (wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(33))
    x = x * _M1
    x = x ^ (x >> np.uint64(33))
    x = x * _M2
    return x ^ (x >> np.uint64(33))


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """Distinct uint64 hashes of the word ``ngram``-grams of the normalised text."""
    import xxhash

    words = normalize_text(text).encode("utf-8", "surrogatepass").split()
    if not words:
        return np.empty(0, dtype=np.uint64)
    h = np.fromiter((xxhash.xxh3_64_intdigest(w) for w in words), dtype=np.uint64, count=len(words))
    n = min(ngram, len(h))
    with np.errstate(over="ignore"):
        acc = np.zeros(len(h) - n + 1, dtype=np.uint64)
        for k in range(n):  # position-dependent combine: "a b" and "b a" differ
            acc = mix64(acc * _GOLDEN + h[k : len(h) - n + 1 + k] + np.uint64(k))
    return np.unique(acc)


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
    """Signatures of a batch of texts (see :func:`signatures`)."""
    return signatures([shingle_hashes(t or "", params.ngram) for t in texts], params)


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
