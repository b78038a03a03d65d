"""Run diffs compare content: equal output hashes are the same however produced (computed or reused),
reuse is provenance, a stage run on one side only is "not run", never a difference. One function
(:func:`infra.lineage.compare_runs`) answers for the CLI, the explorer and the sweep report."""

import pytest

from infra.lineage import LineageCatalog, compare_runs, diff_runs

CHAIN = ("ingest", "extract", "langid", "heuristics")


def _record(catalog, run_id, stage, *, out="h", cached_from=None, config=None, metrics=None, inputs=None, t="t1"):
    """A stage run as the executor records it (a reused one points its URIs at its own run)."""
    catalog.record_stage_run({
        "run_id": run_id, "stage": stage, "cache_key": f"key-{stage}-{out}", "cached_from": cached_from,
        "config": config or {"x": 1}, "code_version": {},
        "inputs": inputs or {"source": {"uri": "file:///warcs", "hash": "sha256:warcs"}},
        "metrics": metrics or {"kept": 10}, "timings": {"started_at": t, "finished_at": t},
        "outputs": {"data": {"uri": f"file:///runs/{run_id}/{stage}/data", "hash": f"sha256:{stage}-{out}",
                             "files": {"a": 1}, "run_id": run_id, "stage": stage}},
    })


@pytest.fixture
def catalog(tmp_path):
    """A: the chain computed. B: heuristics rerun untouched (reused from A). arm1/arm2: heuristics reused
    from A by two sweep arms. C: heuristics edited (another threshold, other outputs). D: heuristics
    recomputed with another config that filters nothing more (equal outputs)."""
    cat = LineageCatalog(tmp_path)
    heur_metrics = {"kept": 10, "signals_cache": "miss", "signals_cache_dir": "/c/1", "funnel": [1, 2]}
    for i, stage in enumerate(CHAIN):
        _record(cat, "A", stage, metrics=heur_metrics if stage == "heuristics" else None, t=f"t{i}")
    for run in ("B", "arm1", "arm2"):
        _record(cat, run, "heuristics", cached_from="A/heuristics", metrics={"kept": 10, "funnel": [1, 2]})
    _record(cat, "C", "heuristics", out="edited", config={"x": 2},
            metrics={"kept": 7, "signals_cache": "hit", "signals_cache_dir": "/c/1", "funnel": [1, 2], "seconds": 3})
    _record(cat, "D", "heuristics", config={"x": 3}, metrics={**heur_metrics, "signals_cache": "hit"})
    return cat


EXEC = {"heuristics": ("signals_cache", "signals_cache_dir")}


def test_an_untouched_rerun_has_no_differences_and_says_it_reused(catalog):
    c = compare_runs(catalog, "A", "B", EXEC)
    assert c["differ"] == [] and c["same"] == ["heuristics"]
    assert c["not_run_in_b"] == ["ingest", "extract", "langid"] and c["not_run_in_a"] == []
    [heur] = [e for e in c["stages"] if e["stage"] == "heuristics"]
    assert (heur["a"], heur["b"], heur["rows"]) == ("computed", "reused from A/heuristics", [])
    lines = diff_runs(catalog, "A", "B", EXEC)
    assert lines == [
        "A vs B: no differences (reused): 1 stage(s) run in both have the same content; "
        "not run in B: ingest, extract, langid",
        "heuristics: same content (A: computed, B: reused from A/heuristics)",
        "not run in B: ingest, extract, langid",
    ]
    assert not any("changed" in line or "cache:" in line or "only in" in line for line in lines)
    # the other way round: the stages B never ran are "not run in B" still, and not counted
    assert compare_runs(catalog, "B", "A", EXEC)["summary"].startswith("no differences (reused)")


def test_two_arms_reusing_one_run_are_the_same(catalog):
    c = compare_runs(catalog, "arm1", "arm2", EXEC)
    assert c["differ"] == [] and c["same"] == ["heuristics"] and c["stages"][0]["rows"] == []
    assert diff_runs(catalog, "arm1", "arm2", EXEC) == [
        "arm1 vs arm2: no differences (reused): 1 stage(s) run in both have the same content",
        "heuristics: same content (both reused from A/heuristics)",
    ]


def test_an_edited_rerun_differs_with_the_right_rows(catalog):
    c = compare_runs(catalog, "A", "C", EXEC)
    assert c["differ"] == ["heuristics"] and c["not_run_in_b"] == ["ingest", "extract", "langid"]
    [heur] = [e for e in c["stages"] if e["stage"] == "heuristics"]
    # config and output differ, and the kept count; equal inputs and equal metrics are not rows, nor are
    # metrics that describe how each run computed (the signal cache, the wall time)
    assert [(r["kind"], r["key"], r["a"], r["b"]) for r in heur["rows"]] == [
        ("config", "x", 1, 2), ("output", "data", "sha256:heuristics-h", "sha256:heuristics-edited"),
        ("metric", "kept", 10, 7)]
    assert all(r["a"] != r["b"] for e in c["stages"] for r in e["rows"])
    lines = diff_runs(catalog, "A", "C", EXEC)
    assert lines[0] == "A vs C: 1 stage(s) differ (heuristics); not run in C: ingest, extract, langid"
    assert lines[1:5] == ["heuristics: differs (both computed)", "  config heuristics.x: 1 -> 2",
                          "  output data: sha256:heuristics-h -> sha256:heuristics-e", "  metric kept: 10 -> 7"]
    # without the execution-metric names, the cache hit/miss shows as a metric row of a differing stage
    assert ("signals_cache", "miss", "hit") in [(r["key"], r["a"], r["b"]) for r in compare_runs(
        catalog, "A", "C")["stages"][-1]["rows"]]


def test_equal_outputs_from_another_config_are_the_same_with_the_config_as_a_note(catalog):
    c = compare_runs(catalog, "A", "D", EXEC)
    assert c["differ"] == [] and c["same"] == ["heuristics"]
    assert c["summary"].startswith("no differences: 1 stage(s)")  # both computed: nothing was reused
    assert "  config heuristics.x: 1 -> 3 (outputs unchanged)" in diff_runs(catalog, "A", "D", EXEC)


def test_stages_run_on_one_side_only_are_listed_not_counted(catalog):
    c = compare_runs(catalog, "C", "A", EXEC)
    assert c["not_run_in_a"] == ["ingest", "extract", "langid"] and c["differ"] == ["heuristics"]
    assert "1 stage(s) differ" in c["summary"] and "not run in C: ingest, extract, langid" in c["summary"]
    with pytest.raises(KeyError, match="not in the lineage catalog"):
        compare_runs(catalog, "A", "nope")


def test_explorer_diff_page_uses_the_same_answer(catalog):
    from flows.explorer import Explorer

    explorer = Explorer(catalog.path.parent)
    page = explorer.diff("A", "B")
    assert "no differences (reused)" in page and "stage(s) differ" not in page
    assert "reused from A/heuristics" in page and "not run in B" in page and "What differs" not in page
    edited = explorer.diff("A", "C")
    assert "1 stage(s) differ (heuristics)" in edited and "What differs" in edited and "kept" in edited
    assert "signals_cache" not in edited  # the registry's heuristics stage declares it an execution metric


def test_a_funnel_that_differs_prints_as_a_table_not_a_python_list(tmp_path):
    cat = LineageCatalog(tmp_path)
    funnel = [{"step": "records", "documents": 100}, {"step": "after gopher", "documents": 80}]
    _record(cat, "A", "heuristics", metrics={"funnel": funnel})
    _record(cat, "C", "heuristics", out="edited", metrics={"funnel": [funnel[0], {"step": "after gopher", "documents": 60}]})
    lines = diff_runs(cat, "A", "C")
    assert lines[lines.index("  metric funnel:"):] == [
        "  metric funnel:",
        "    | step | documents (A) | documents (C) |",
        "    |---|---|---|",
        "    | records | 100 | 100 |",
        "    | after gopher | 80 | 60 |",
    ]
    assert not any("[{" in line for line in lines)
