"""MinHash-LSH core: text normalisation, word n-gram shingles, 64-bit MinHash, LSH band keys.

Pure functions on one document or one batch; the Spark shell lives in ``curation/dedup.py``.

* normalisation: NFKC in C (skipped for ASCII text, which is NFKC already), then one lookup per
  code point in a table built once per process that folds in case folding, NFKD, dropping
  combining marks, digits → 0 and non-word → space (:func:`_expansions`); no per-character Python.
* shingles: word ``n``-grams of :func:`normalize_text`, each word hashed from its code points
  (:func:`word_hashes`) and the ``n`` word hashes of a shingle combined with a mix (no word or
  n-gram strings are built). A document with fewer than ``n`` words is one shingle of all its
  words; an empty one has none.
* permutations: datasketch's ``affine64`` scheme, ``h_i(x) = a_i * fmix64(x) + b_i mod 2^64`` for odd
  ``a_i`` (MurmurHash3's finaliser once per shingle, then one multiply-add per permutation: a bijection
  of the 64-bit space), with ``(a, b)`` drawn as datasketch draws them for the seed — so
  ``datasketch.MinHash(scheme="affine64")`` fed :func:`shingle_texts` through :func:`shingle_hash`
  gives the same signatures (:func:`datasketch_signatures`, the reference backend).
* LSH: ``bands × rows`` (FineWeb: 14 × 8 = 112) — a band key is a 63-bit hash of its ``rows`` values.

Hashing and the min over permutations are compiled with numba (``cache=True``: compiled once per
machine, then loaded), fused over a whole batch: one pass over the batch's code points, with no
per-document NumPy calls.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit

_NON_WORD_CHAR = re.compile(r"[\W_]")
_NON_DIGIT = re.compile(r"\D")
_DELETE = np.uint32(0xFFFFFFFF)
_SPACE = np.uint32(ord(" "))
_NEWLINE = np.uint32(ord("\n"))
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S33 = np.uint64(33)
_S21 = np.uint64(21)
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


@lru_cache(maxsize=1)
def _expansions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What normalisation makes of each code point ``c`` of NFKC text — case fold, NFKD, then
    :func:`_char_map`, deleted marks dropped: ``values[offsets[c]:offsets[c] + lengths[c]]``.

    Per code point is exact: case folding and NFKD decomposition act on each character alone, and
    NFKD's one cross-character step (reordering runs of combining marks) moves nothing that
    survives, since the char map deletes every combining mark.
    """
    n = sys.maxunicode + 1
    # every code point but U+0000, each followed by U+0000 (a starter nothing folds or decomposes to)
    joined = "\0".join(map(chr, range(1, n))) + "\0"
    folded = _code_points(unicodedata.normalize("NFKD", joined.casefold()))
    is_end = folded == 0
    owner = np.cumsum(is_end) + 1  # the code point each folded value came from
    mapped = _char_map()[folded]
    keep = ~is_end & (mapped != _DELETE)
    values = np.r_[_char_map()[0], mapped[keep]]
    lengths = np.bincount(np.r_[0, owner[keep]], minlength=n).astype(np.int32)
    offsets = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)
    return values, offsets, lengths


def _nfkc(text: str) -> str:
    """NFKC; ASCII text (already NFKC) as is."""
    return text if text.isascii() else unicodedata.normalize("NFKC", text)


def _nfkc_code_points(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The texts' NFKC code points, concatenated, and the ``len(texts) + 1`` offsets of each text."""
    nfkc = [_nfkc(t or "") for t in texts]
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in nfkc], out=starts[1:])
    return _code_points("".join(nfkc)), starts


@njit(cache=True)
def _expand_into(code_points, values, offsets, lengths, out):
    """NFKC ``code_points`` → normalised code points (see :func:`_expansions`) into ``out``
    (at least ``lengths[code_points].sum()`` long); returns their count."""
    n = 0
    for c in code_points:
        for k in range(offsets[c], offsets[c] + lengths[c]):
            out[n] = values[k]
            n += 1
    return n


def _normalized_code_points(text: str) -> np.ndarray:
    """:func:`normalize_text` as code points, before its spaces are collapsed."""
    values, offsets, lengths = _expansions()
    code_points, _ = _nfkc_code_points([text])
    out = np.empty(int(lengths[code_points].sum()), dtype=np.uint32)
    return out[: _expand_into(code_points, values, offsets, lengths, out)]


def normalize_text(text: str) -> str:
    """NFKC, case-fold, strip accents (NFKD, combining marks dropped), digits → 0, punctuation and
    ``_`` → space, whitespace collapsed."""
    return " ".join(_normalized_code_points(text).tobytes().decode("utf-32-le").split())


@njit(cache=True, inline="always")
def _mix64(x):
    """MurmurHash3's 64-bit finaliser on a uint64 (wraps mod 2^64)."""
    x = (x ^ (x >> _S33)) * _M1
    x = (x ^ (x >> _S33)) * _M2
    return x ^ (x >> _S33)


@njit(cache=True)
def _word_hashes_into(code_points, out):
    """Hashes of the space-separated words of normalised ``code_points`` into ``out``; returns
    their count. A word's hash mixes the sum over its characters of ``mix64(position << 21 | code point)``."""
    n = 0
    acc = np.uint64(0)
    pos = np.uint64(0)
    for c in code_points:
        if c == _SPACE:
            if pos:
                out[n] = _mix64(acc + _GOLDEN)
                n += 1
                acc = np.uint64(0)
                pos = np.uint64(0)
        else:
            acc += _mix64((pos << _S21) | np.uint64(c))
            pos += np.uint64(1)
    if pos:
        out[n] = _mix64(acc + _GOLDEN)
        n += 1
    return n


@njit(cache=True)
def _shingles_into(words, n_words, ngram, out):
    """Hashes of the word ``ngram``-grams of ``words[:n_words]`` (position-dependent: "a b" ≠ "b a")
    into ``out``; returns their count (fewer words than ``ngram`` → one shingle of all of them)."""
    if n_words == 0:
        return 0
    n = min(ngram, n_words)
    for i in range(n_words - n + 1):
        acc = np.uint64(0)
        for k in range(n):
            acc = _mix64(acc * _GOLDEN + words[i + k] + np.uint64(k))
        out[i] = acc
    return n_words - n + 1


@njit(cache=True)
def _min_into(row, shingles, n_shingles, a, b):
    """``row[j] = min(row[j], min over shingles x of a[j] * fmix64(x) + b[j])`` (mod 2^64)."""
    for i in range(n_shingles):
        x = _mix64(shingles[i])
        for j in range(row.shape[0]):
            row[j] = min(row[j], a[j] * x + b[j])


@njit(cache=True)
def _batch_signatures_kernel(code_points, starts, values, offsets, lengths, ngram, a, b, out):
    """Per NFKC text ``d`` (``code_points[starts[d]:starts[d+1]]``): normalise → words → shingles → ``out[d]``."""
    longest = 1
    for d in range(len(starts) - 1):
        size = 0
        for c in code_points[starts[d] : starts[d + 1]]:
            size += lengths[c]
        longest = max(longest, size)
    chars = np.empty(longest, dtype=np.uint32)
    words = np.empty(longest, dtype=np.uint64)
    shingles = np.empty(longest, dtype=np.uint64)
    for d in range(len(starts) - 1):
        n_chars = _expand_into(code_points[starts[d] : starts[d + 1]], values, offsets, lengths, chars)
        n_words = _word_hashes_into(chars[:n_chars], words)
        n_shingles = _shingles_into(words, n_words, ngram, shingles)
        _min_into(out[d], shingles, n_shingles, a, b)


@njit(cache=True)
def _line_hashes_into(code_points, values, offsets, lengths, hashes, has_words):
    """Per ``\n``-separated line of NFKC ``code_points``: its word hashes mixed in order into
    ``hashes``, and whether it has any word into ``has_words``; returns the number of lines."""
    size = 1
    for c in code_points:
        size += lengths[c]
    chars = np.empty(size, dtype=np.uint32)
    words = np.empty(size, dtype=np.uint64)
    n_lines, start = 0, 0
    for end in range(len(code_points) + 1):
        if end < len(code_points) and code_points[end] != _NEWLINE:
            continue
        n_chars = _expand_into(code_points[start:end], values, offsets, lengths, chars)
        n_words = _word_hashes_into(chars[:n_chars], words)
        line = np.uint64(0)
        for w in range(n_words):
            line = _mix64(line * _GOLDEN + words[w])
        hashes[n_lines] = line
        has_words[n_lines] = n_words > 0
        n_lines += 1
        start = end + 1
    return n_lines


def line_hashes(text: str | None) -> list[int | None]:
    """One signed 64-bit hash per ``\n``-separated line of the text: equal for lines that
    :func:`normalize_text` makes equal (NFKC does not act across a newline); None for a line with
    no words."""
    code_points, _ = _nfkc_code_points([text or ""])
    n = int((code_points == _NEWLINE).sum()) + 1
    hashes, has_words = np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.bool_)
    _line_hashes_into(code_points, *_expansions(), hashes, has_words)
    signed = hashes.view(np.int64).tolist()
    return [h if ok else None for h, ok in zip(signed, has_words.tolist())]


def word_hashes(code_points: np.ndarray) -> np.ndarray:
    """One uint64 hash per space-separated word of normalised ``code_points``."""
    out = np.empty(len(code_points), dtype=np.uint64)
    return out[: _word_hashes_into(np.ascontiguousarray(code_points, dtype=np.uint32), out)]


def _shingles(text: str, ngram: int) -> np.ndarray:
    """uint64 hashes of the word ``ngram``-grams of the normalised text, repeats included."""
    words = word_hashes(_normalized_code_points(text))
    out = np.empty(len(words), dtype=np.uint64)
    return out[: _shingles_into(words, len(words), ngram, out)]


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """Distinct uint64 hashes of the word ``ngram``-grams of the normalised text."""
    return np.unique(_shingles(text, ngram))


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the ``num_perm`` hash permutations, ``a`` odd: what ``datasketch.MinHash(num_perm,
    seed, scheme="affine64")`` draws (``RandomState(seed)``, ``a`` then ``b``)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = gen.randint(0, 1 << 64, num_perm, dtype=np.uint64)
    a.flags.writeable = b.flags.writeable = False  # cached: shared by every caller
    return a, b


def signatures(shingle_sets: list[np.ndarray], params: MinHashParams = MinHashParams()) -> np.ndarray:
    """MinHash signatures of shingle-hash sets: ``(len(shingle_sets), num_perm)`` uint64; no shingles → all EMPTY."""
    a, b = permutations(params.num_perm, params.seed)
    out = np.full((len(shingle_sets), params.num_perm), EMPTY, dtype=np.uint64)
    for row, shingles in zip(out, shingle_sets):
        _min_into(row, np.ascontiguousarray(shingles, dtype=np.uint64), len(shingles), a, b)
    return out


def batch_signatures(texts: list[str], params: MinHashParams = MinHashParams()) -> np.ndarray:
    """Signatures of a batch of texts, equal to ``signatures([shingles of each text])`` (a repeated
    shingle changes no minimum), computed in one compiled pass over the batch."""
    a, b = permutations(params.num_perm, params.seed)
    out = np.full((len(texts), params.num_perm), EMPTY, dtype=np.uint64)
    code_points, starts = _nfkc_code_points(texts)
    _batch_signatures_kernel(code_points, starts, *_expansions(), params.ngram, a, b, out)
    return out


def shingle_texts(text: str | None, ngram: int = 5) -> list[str]:
    """The word ``ngram``-grams of :func:`normalize_text` as strings (fewer words → one of all of
    them), repeats included: what the datasketch backend feeds ``MinHash.update_batch``."""
    words = normalize_text(text or "").split()
    n = min(ngram, len(words))
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)] if words else []


def shingle_hash(shingle: str) -> int:
    """The native core's 64-bit hash of one shingle string of normalised words (the hash function
    the datasketch backend passes to ``MinHash``)."""
    words = word_hashes(_code_points(shingle))
    out = np.empty(1, dtype=np.uint64)
    _shingles_into(words, len(words), len(words), out)
    return int(out[0])


def datasketch_signatures(texts: list[str], params: MinHashParams = MinHashParams()) -> np.ndarray:
    """:func:`batch_signatures` computed by datasketch: one ``MinHash(scheme="affine64")`` per text with
    :func:`shingle_hash` and this module's :func:`permutations` passed in, updated with
    :func:`shingle_texts`, kept as a ``LeanMinHash``. Slow (Python per shingle): the reference backend."""
    from datasketch import LeanMinHash, MinHash

    perms = np.array(permutations(params.num_perm, params.seed))
    out = np.empty((len(texts), params.num_perm), dtype=np.uint64)
    for row, text in zip(out, texts):
        m = MinHash(params.num_perm, params.seed, hashfunc=shingle_hash, permutations=perms, scheme="affine64")
        m.update_batch(shingle_texts(text, params.ngram))
        row[:] = LeanMinHash(m).hashvalues
    return out


@njit(cache=True)
def _band_keys_kernel(sigs, bands, rows, out):
    for i in range(sigs.shape[0]):
        for band in range(bands):
            key = np.uint64(0)
            for r in range(rows):
                key = _mix64(key * _GOLDEN + sigs[i, band * rows + r])
            out[i, band] = np.int64(key >> np.uint64(1))


def band_keys(sigs: np.ndarray, params: MinHashParams = MinHashParams()) -> np.ndarray:
    """``(n, bands)`` int64 LSH bucket keys (non-negative, 63-bit) of ``(n, num_perm)`` signatures:
    each band's ``rows`` values mixed in order."""
    out = np.empty((sigs.shape[0], params.bands), dtype=np.int64)
    _band_keys_kernel(np.ascontiguousarray(sigs, dtype=np.uint64), params.bands, params.rows, out)
    return out


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
