"""MinHash core on real text: normalisation, shingles, signature accuracy, LSH keys, S-curve."""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
import unicodedata

import numpy as np
import pytest

from curation.minhash import (
    EMPTY,
    MinHashParams,
    band_keys,
    batch_signatures,
    datasketch_signatures,
    estimated_jaccard,
    jaccard,
    line_hashes,
    normalize_text,
    permutations,
    s_curve,
    shingle_hash,
    shingle_hashes,
    shingle_texts,
    signatures,
    word_hashes,
)


@pytest.fixture(scope="module")
def wiki_docs(shared_data):
    words = gzip.open(shared_data / "wikitext2_valid_test" / "valid.txt.gz", "rt").read().split()
    return [" ".join(words[i : i + 300]) for i in range(0, 300 * 120, 300)]


def test_normalize_text_unicode_edge_cases():
    # NFKC ligature and full-width forms, combining vs precomposed accents, case, digits, punctuation
    assert normalize_text("The ﬁnal ＡＢＣ") == normalize_text("the final abc") == "the final abc"
    assert normalize_text("Cafe\u0301 déjà") == normalize_text("CAFÉ deja") == "cafe deja"
    assert normalize_text("Straße, 2024!") == "strasse 0000"
    assert normalize_text("a\u00a0b\u2003c\n\td") == "a b c d"  # exotic spaces
    assert normalize_text("日本語のテキスト。") == "日本語のテキスト"
    assert normalize_text("") == normalize_text("  \n ") == normalize_text("!!! ...") == ""
    assert normalize_text("bad \ud800 surrogate") == "bad surrogate"


def reference_normalize(text: str) -> str:
    """The definition of :func:`normalize_text`, written plainly."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
    text = re.sub(r"\d", "0", "".join(ch for ch in text if not unicodedata.combining(ch)))
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def test_normalize_text_equals_its_definition_on_every_code_point():
    """The lookup tables give what the plain definition gives, for all of Unicode (surrogates too)."""
    everything = "".join(map(chr, range(sys.maxunicode + 1)))
    for start in range(0, len(everything), 1009):  # chunks: marks next to letters, digits, spaces
        chunk = everything[start : start + 1009]
        assert normalize_text(chunk) == reference_normalize(chunk), hex(start)


def test_normalize_text_equals_its_definition_on_75_languages(shared_data):
    """Real sentences and words of 75 languages (scripts with marks, ligatures, Hangul, Indic vowel
    signs), one sentence each and all of a language's at once: same text as the plain definition."""
    by_lang: dict[str, list[str]] = {}
    with gzip.open(shared_data / "langid_lingua_testdata" / "lingua_testdata.jsonl.gz", "rt") as fh:
        for line in fh:
            row = json.loads(line)
            by_lang.setdefault(row["lang"], []).append(row["text"])
    assert len(by_lang) == 75
    for lang, texts in by_lang.items():
        sample = texts[:: max(1, len(texts) // 200)]
        assert [normalize_text(t) for t in sample] == [reference_normalize(t) for t in sample], lang
        joined = "\n".join(sample)
        assert normalize_text(joined) == reference_normalize(joined), lang


def test_line_hashes_equal_exactly_when_normalised_lines_are_equal(shared_data):
    """Real sentences of 75 languages as the lines of documents, with case/width/punctuation
    variants and blank lines mixed in: one hash per line, None exactly for lines that normalise to
    nothing, equal hashes exactly for equal normalised lines."""
    rng = random.Random(3)
    with gzip.open(shared_data / "langid_lingua_testdata" / "lingua_testdata.jsonl.gz", "rt") as fh:
        sentences = [json.loads(line)["text"] for i, line in enumerate(fh) if i % 50 == 0]
    variants = [s.upper() + " !!" for s in sentences[:300]] + ["", "  ", "...", "\t"] * 20
    lines = sentences + variants
    by_norm: dict[str, int] = {}
    for start in range(0, len(lines), 40):
        chunk = rng.sample(lines, 40)
        hashes = line_hashes("\n".join(chunk))
        assert len(hashes) == len(chunk)
        for line, h in zip(chunk, hashes):
            norm = normalize_text(line)
            assert (h is None) == (norm == "")
            if h is not None:
                assert by_norm.setdefault(norm, h) == h
    assert len(set(by_norm.values())) == len(by_norm) > 1000  # different lines, different hashes
    assert line_hashes(None) == [None] and line_hashes("x\n")[1] is None


def test_word_hashes_identify_words(wiki_docs):
    from curation.minhash import _normalized_code_points

    text = " ".join(wiki_docs[:3])
    words = normalize_text(text).split()
    hashes = word_hashes(_normalized_code_points(text)).tolist()
    assert len(hashes) == len(words)
    by_word = dict(zip(words, hashes))
    assert all(by_word[w] == h for w, h in zip(words, hashes))  # the same word, the same hash
    assert len(set(by_word.values())) == len(by_word)  # different words, different hashes
    anagrams = word_hashes(_normalized_code_points("ab ba"))
    assert len(anagrams) == 2 and anagrams[0] != anagrams[1]  # position matters inside a word
    assert len(word_hashes(_normalized_code_points(" ... "))) == 0


def test_shingles_short_and_empty_documents():
    assert len(shingle_hashes("")) == 0 and len(shingle_hashes("?!")) == 0
    short = shingle_hashes("only three words")  # shorter than the 5-gram: one shingle of all words
    assert len(short) == 1
    assert not np.array_equal(short, shingle_hashes("only three other"))
    assert len(shingle_hashes("one two three four five six")) == 2
    assert not np.array_equal(shingle_hashes("a b c d e"), shingle_hashes("e d c b a"))  # order matters
    sigs = batch_signatures(["", "only three words", "only three words"])
    assert (sigs[0] == EMPTY).all()
    assert np.array_equal(sigs[1], sigs[2]) and not (sigs[1] == EMPTY).any()


def test_estimated_jaccard_is_unbiased_on_real_text(wiki_docs):
    rng = random.Random(0)
    errors, variances = [], []
    for doc in wiki_docs:
        words = doc.split()
        for _ in range(rng.randint(2, 40)):
            words[rng.randrange(len(words))] = f"edit{rng.randrange(10**6)}"
        a, b = shingle_hashes(doc), shingle_hashes(" ".join(words))
        true_j = jaccard(a, b)
        sa, sb = signatures([a, b])
        errors.append(estimated_jaccard(sa, sb) - true_j)
        variances.append(true_j * (1 - true_j) / 112)
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.015
    assert np.sqrt((errors**2).mean()) < 1.3 * np.sqrt(np.mean(variances))  # within the theoretical spread


def test_batch_equals_single_and_band_keys(wiki_docs):
    params = MinHashParams()
    batch = batch_signatures(wiki_docs[:20], params)
    for i in (0, 7, 19):
        assert np.array_equal(batch[i], batch_signatures([wiki_docs[i]], params)[0])
    keys = band_keys(batch, params)
    assert keys.shape == (20, 14) and (keys >= 0).all()
    # unrelated documents share no bucket; a copy shares all of them
    assert len(set(map(tuple, keys.T.tolist()))) == 14
    assert (band_keys(batch_signatures([wiki_docs[0]] * 2, params), params)[0] == keys[0]).all()
    assert not any((keys[0] == keys[j]).any() for j in range(1, 20))


def test_s_curve_fineweb_setting():
    curve = s_curve(14, 8)
    assert curve["0.50"] < 0.06 and curve["1.00"] == 1.0
    assert 0.90 < curve["0.80"] < 0.95 and curve["0.90"] > 0.999
    values = list(curve.values())
    assert values == sorted(values)


def _fmix64(x: int) -> int:
    """MurmurHash3's 64-bit finaliser on Python ints (the reference, written from the formula)."""
    mask = (1 << 64) - 1
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & mask
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & mask
    return x ^ (x >> 33)


def test_datasketch_backend_gives_the_native_signatures_on_real_pages(shared_data, wiki_docs):
    """Real Common Crawl pages (Dolma samples), WikiText, near copies and awkward documents: the
    native core, datasketch's MinHash (affine64, our hash function and permutations passed in) and the
    formula on Python ints, ``min_x (a_j * fmix64(x) + b_j) mod 2^64``, give the same signatures."""
    from datasketch import MinHash

    base = shared_data / "web_text_samples_dolma"
    pages = [json.loads(line)["text"] for name in ("cc_en_head-0091.jsonl.gz", "provided_documents_000.json.gz")
             for line in gzip.open(base / name, "rt")]
    near = [" ".join(w if i % 37 else "edited" for i, w in enumerate(p.split())) for p in pages[:5]]
    awkward = ["", " \n ", "!!!", "only three words", "Café déjà ﬁnal ＡＢＣ 2024", "日本語のテキスト。", "a b c d e"]
    docs = pages + wiki_docs[:10] + near + awkward
    params = MinHashParams()
    a, b = permutations(params.num_perm, params.seed)
    default = MinHash(params.num_perm, params.seed, scheme="affine64").permutations  # datasketch's own draw
    assert np.array_equal(default[0], a) and np.array_equal(default[1], b)
    native, reference = batch_signatures(docs, params), datasketch_signatures(docs, params)
    assert np.array_equal(native, reference)
    assert (native[len(pages) + 10 + len(near)] == EMPTY).all() and not (native[: len(pages)] == EMPTY).any()
    mask = (1 << 64) - 1
    for doc, row in zip(docs[:3] + awkward[3:], native[:3].tolist() + native[-4:].tolist()):
        shingles = {int(x) for x in shingle_hashes(doc)}
        assert {shingle_hash(s) for s in shingle_texts(doc)} == shingles  # the hash function passed in
        expected = [min((int(aj) * _fmix64(x) + int(bj)) & mask for x in shingles) for aj, bj in zip(a, b)]
        assert row == expected
