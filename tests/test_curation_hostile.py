"""A hostile crawl (tests/hostile_corpus.py) mixed with real pages: every input file is in the ledger,
every response record ends in data/ or in rejected/ with the expected reason, no phantom records
appear, and the real pages' texts equal those of a clean run."""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.extract import ExtractConfig, extract_record
from curation.ingest import find_archives, read_archive
from hostile_corpus import WARC_DIR, write_corpus


def core_run(folder: Path) -> tuple[list[dict], list[dict]]:
    """Ingest rows and extract rows (kept ingest rows plus extract's columns) of the pure cores."""
    ingest = [r for f in find_archives([str(folder)]) for r in read_archive(str(f))]
    cfg = ExtractConfig()
    extract = [{**r, **extract_record(r, cfg)} for r in ingest if r["drop_reason"] is None]
    return ingest, extract


def stage_run(make_config, folder: Path, run_id: str) -> tuple[list[dict], list[dict]]:
    """The same through the ingest and extract stages on Spark (data/ + rejected/ of each)."""
    from flows.registry import execute_stage

    config = make_config({"ingest.input_paths": [str(folder)]})
    tables = []
    for stage in ("ingest", "extract"):
        m = execute_stage(stage, config, run_id)
        tables.append([row for out in ("data", "rejected") for row in pq.read_table(m["outputs"][out]["path"]).to_pylist()])
    return tables[0], tables[1]


def fates(ingest: list[dict], extract: list[dict]) -> dict[str, list[dict]]:
    """File name → its ledger rows with the record's final fate: a drop reason, or "kept" with its text."""
    after = {r["doc_id"]: r for r in extract}
    by_file = defaultdict(list)
    for r in ingest:
        fate, text = r["drop_reason"], None
        if fate is None:
            fate, text = after[r["doc_id"]]["drop_reason"] or "kept", after[r["doc_id"]]["text"]
        by_file[Path(r["warc_file"]).name].append({**r, "fate": fate, "text": text})
    return by_file


def kept_texts(rows: list[dict]) -> dict[str, str]:
    return {r["doc_id"]: r["text"] for r in rows if r["fate"] == "kept"}


def check_accounting(hostile: dict[str, list[dict]], clean: dict[str, list[dict]], corpus: dict, files: list[Path]) -> None:
    assert set(hostile) == {f.name for f in files}  # every input file is in the ledger
    for name, reason in corpus["file_level"].items():
        assert [(r["fate"], r["warc_offset"], r["doc_id"]) for r in hostile[name]] == [(reason, 0, None)]

    # synthetic records: each has its expected fate; none is lost, none invented
    synthetic = [r for name in ("hostile.warc.gz", "lying-length.warc") for r in hostile[name]]
    records = [r for r in synthetic if r["url"]]
    assert len({r["url"] for r in records}) == len(records)
    got = {r["url"]: r["fate"] for r in records}
    reachable = {url: fate for url, fate in corpus["expected"].items() if fate != "unreachable"}
    assert got == reachable
    for url, text in corpus["must_contain"].items():
        assert text in next(r["text"] for r in records if r["url"] == url), url
    # the records behind a broken frame are covered by one file-level read error, at or before their place
    errors = [r for r in hostile["lying-length.warc"] if r["fate"].startswith("warc_read_error")]
    assert len(errors) == 1 and errors[0]["warc_offset"] > 0

    # real pages: the same records and the same texts as a clean run
    for name in corpus["real"]:
        assert [(r["doc_id"], r["fate"]) for r in hostile[name]] == [(r["doc_id"], r["fate"]) for r in clean[name]]
        assert kept_texts(hostile[name]) == kept_texts(clean[name]) and kept_texts(clean[name])
    cut_name, original, _ = corpus["truncated"]
    cut_rows, full_rows = hostile[cut_name], clean[original]
    assert [r["fate"] for r in cut_rows].count("truncated_record") == 1 and cut_rows[-1]["fate"] == "truncated_record"
    before_cut = [r for r in full_rows if r["warc_offset"] < cut_rows[-1]["warc_offset"]]
    assert [r["doc_id"] for r in cut_rows[:-1]] == [r["doc_id"] for r in before_cut] and len(before_cut) >= 5
    assert kept_texts(cut_rows) == kept_texts(before_cut)
    for rows in hostile.values():  # every dropped row says why
        assert all(r["fate"] for r in rows)


@pytest.fixture
def corpora(tmp_path):
    corpus = write_corpus(tmp_path / "hostile")
    clean = tmp_path / "clean"
    clean.mkdir()
    for name in (*corpus["real"], corpus["truncated"][1]):
        shutil.copy(WARC_DIR / name, clean / name)
    return corpus, tmp_path / "hostile", clean


def test_corpus_is_reproducible(tmp_path):
    a, b = write_corpus(tmp_path / "a"), write_corpus(tmp_path / "b")
    assert a["expected"] == b["expected"]
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    assert Counter(a["expected"].values())["kept"] == 10 and len(a["expected"]) == 24


def test_full_accounting_of_the_cores(corpora):
    corpus, hostile, clean = corpora
    check_accounting(fates(*core_run(hostile)), fates(*core_run(clean)), corpus, find_archives([str(hostile)]))


@pytest.mark.slow
def test_full_accounting_of_the_spark_stages(spark, make_config, corpora):
    corpus, hostile, clean = corpora
    hostile_rows = fates(*stage_run(make_config, hostile, "hostile"))
    clean_rows = fates(*stage_run(make_config, clean, "clean"))
    for rows in (*hostile_rows.values(), *clean_rows.values()):  # Spark may write the rows in any order
        rows.sort(key=lambda r: r["warc_offset"])
    check_accounting(hostile_rows, clean_rows, corpus, find_archives([str(hostile)]))
