"""Sweeps: arm expansion (grid / zip / seeds), bad axes failing before anything runs, cache reuse across
arms, resume after a kill, one new arm for one added value, and the report."""

import json
import shutil

import pytest

from flows.sweep import Axis, expand_arms, parse_axis, plan_sweep, run_sweep
from flows.registry import load_config
from infra.config import DEFAULT_CONFIG, ConfigError
from flows.registry import execute_stage


def test_grid_zip_and_seeds_expand_as_documented():
    a, b = Axis("x.a", (1, 2, 3)), Axis("x.b", ("p", "q", "r"))
    grid = expand_arms([a, b], "grid")
    assert len(grid) == 9 and grid[1].values == {"x.a": 1, "x.b": "q"}
    zipped = expand_arms([a, b], "zip", seeds=2)
    assert [(arm.values["x.a"], arm.values["x.b"], arm.seed) for arm in zipped] == [
        (1, "p", 1), (1, "p", 2), (2, "q", 1), (2, "q", 2), (3, "r", 1), (3, "r", 2)]
    assert zipped[1].overrides == {"x.a": 1, "x.b": "p", "pretrain.seed": 2}
    with pytest.raises(ConfigError, match="equal length"):
        expand_arms([a, Axis("x.c", (1,))], "zip")
    assert parse_axis("dedup.threshold=[0.7, 0.8]") == Axis("dedup.threshold", (0.7, 0.8))
    assert parse_axis("dedup.url=false") == Axis("dedup.url", (False,))


@pytest.mark.parametrize("axis, message", [
    ("heuristics.gopher_quality.min_words=[50,100]", "is not a config key"),
    ("heuristics.gopher_quality.min_doc_words=[50,lots]", "min_doc_words: Input should be a valid integer"),
    ("nonsense=[1]", "is not a config key"),
])
def test_a_bad_axis_fails_with_one_line_before_anything_runs(axis, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        plan_sweep(str(DEFAULT_CONFIG), {"run_root": str(tmp_path)}, [parse_axis(axis)], stages=["ingest", "heuristics"])
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing ran
    with pytest.raises(ConfigError, match="pretrain is not among the stages"):
        plan_sweep(str(DEFAULT_CONFIG), {}, [parse_axis("dedup.threshold=[0.7]")], seeds=2, stages=["dedup"])


@pytest.fixture
def fake_sweep(fake_registry, tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("one\ntwo\nthree\n")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"run_root: {tmp_path / 'runs'}\nalpha:\n  source: {src}\n")
    calls: list[tuple[str, str, str]] = []

    def run_pipeline(stages, run_id, config_file, overrides):
        """The pipeline without Prefect: each stage through the executor, statuses as the flow reports them."""
        config = load_config(config_file, overrides)
        result = {"run_id": run_id, "stages": {}}
        for stage in stages:
            m = execute_stage(stage, config, run_id)
            status = "skipped" if m.get("skipped") else "reused" if m.get("cached_from") else "completed"
            calls.append((run_id, stage, status))
            result["stages"][stage] = {"status": status, "dir": str(m["manifest_path"]).rsplit("/", 1)[0]}
        return result

    return cfg_file, tmp_path / "runs", run_pipeline, calls


def test_arms_reuse_upstream_stages_resume_after_a_kill_and_grow_by_one_arm(fake_sweep):
    cfg_file, root, run_pipeline, calls = fake_sweep
    axes = [parse_axis("beta.suffix=[x, y, z]")]
    plan = plan_sweep(str(cfg_file), {}, axes)
    assert plan.first_varying_stage == "beta" and len({a.run_id for a in plan.arms}) == 3
    summary = run_sweep(plan, run_pipeline, root, parallel=2, log=lambda _: None)
    # alpha computed once (base run), reused by the 3 arms; beta computed per arm
    assert summary["stage_executions"] == {"computed": 4, "reused": 3, "skipped": 0}
    assert [c for c in calls if c[1] == "alpha" and c[2] == "completed"] == [(f"{plan.sweep_id}-base", "alpha", "completed")]
    assert all(a["status"] == "completed" for a in summary["arms"])
    assert (root / "sweeps" / plan.sweep_id / "report.html").is_file()
    assert json.loads((root / "sweeps" / plan.sweep_id / "sweep.json").read_text())["arms"][0]["run_id"] == plan.arms[0].run_id

    # a killed sweep: one arm's beta never finished -> the same command finishes only that
    shutil.rmtree(root / plan.arms[1].run_id / "beta")
    calls.clear()
    again = run_sweep(plan_sweep(str(cfg_file), {}, axes), run_pipeline, root, log=lambda _: None)
    assert [c for c in calls if c[2] == "completed"] == [(plan.arms[1].run_id, "beta", "completed")]
    assert again["sweep_id"] == plan.sweep_id

    # one more value: one new arm computes, the others are already done
    calls.clear()
    grown = plan_sweep(str(cfg_file), {}, [parse_axis("beta.suffix=[x, y, z, w]")])
    assert grown.sweep_id == plan.sweep_id and [a.run_id for a in grown.arms[:3]] == [a.run_id for a in plan.arms]
    run_sweep(grown, run_pipeline, root, log=lambda _: None)
    assert [c for c in calls if c[2] == "completed"] == [(grown.arms[3].run_id, "beta", "completed")]


def test_report_compares_arms_with_seed_spread(fake_sweep):
    from flows.sweep import sweep_report
    from infra.lineage import LineageCatalog

    cfg_file, root, run_pipeline, _ = fake_sweep
    summary = run_sweep(plan_sweep(str(cfg_file), {}, [parse_axis("alpha.min_len=[0, 4]")]), run_pipeline, root,
                        log=lambda _: None)
    report = sweep_report(summary, LineageCatalog(root))
    kept = {r["arm"]: r["alpha/kept"] for r in report["rows"]}
    assert kept == {"alpha.min_len=0": "3", "alpha.min_len=4": "1"}  # "one", "two", "three": only "three" >= 4
    assert "alpha.min_len" in report["html"] and "what differs from the first arm" in report["html"]
    assert "What this sweep can resolve" in report["html"]
    assert "2 stage(s) differ (alpha, beta)" in report["html"]
    # arms that change only beta: alpha reused from the first arm is the same content, not a difference
    summary = run_sweep(plan_sweep(str(cfg_file), {}, [parse_axis("beta.suffix=[x, y]")]), run_pipeline, root,
                        log=lambda _: None)
    html_doc = sweep_report(summary, LineageCatalog(root))["html"]
    assert "1 stage(s) differ (beta); 1 with the same content" in html_doc and "cache:" not in html_doc


def test_the_sweep_artifact_shows_per_arm_documents_what_differs_and_says_when_arms_are_identical(fake_sweep):
    """Issue 29, point 2: the Prefect artifact (markdown) itself shows each arm's kept documents and the
    outputs that differ, and says plainly when every arm produced the same content."""
    from flows.sweep import sweep_markdown

    cfg_file, root, run_pipeline, _ = fake_sweep
    differing = sweep_markdown(run_sweep(plan_sweep(str(cfg_file), {}, [parse_axis("alpha.min_len=[0, 4]")]),
                                         run_pipeline, root, log=lambda _: None))
    assert "## Per arm" in differing and "| alpha.min_len=4 |" in differing and "alpha/data" in differing
    assert "identical in content" not in differing
    # min_len 0 and 1 keep the same lines ("one", "two", "three" are all longer than 1): identical outputs
    same = sweep_markdown(run_sweep(plan_sweep(str(cfg_file), {}, [parse_axis("alpha.min_len=[0, 1]")]),
                                    run_pipeline, root, log=lambda _: None))
    assert "**Every arm's outputs are identical in content to the first arm's**" in same


def test_a_failed_arm_is_recorded_and_the_others_finish(fake_sweep):
    cfg_file, root, run_pipeline, _ = fake_sweep
    plan = plan_sweep(str(cfg_file), {}, [parse_axis("alpha.fail=[false, true]")])
    summary = run_sweep(plan, run_pipeline, root, log=lambda _: None)
    assert [a["status"] for a in summary["arms"]] == ["completed", "failed"]
    assert "injected failure" in summary["arms"][1]["error"]


@pytest.mark.slow
def test_refinery_sweep_runs_arms_through_prefect_and_reuses_the_cache(tmp_path):
    """The CLI end to end on real Spark stages: ingest runs once (base), each arm reuses it and runs extract."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "sweep", "-a", "extract.timeout_s=[5, 10]", "--stages", "ingest,extract",
           "--parallel", "2", "-o", f"run_root={tmp_path / 'runs'}", "-o", "spark.master=local[1]", "--name", "sw"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "sweeps" / "sw" / "sweep.json").read_text())
    assert summary["stage_executions"] == {"computed": 3, "reused": 2, "skipped": 0}
    assert "2 reused from the cache" in done.stdout
    for arm in summary["arms"]:
        manifest = json.loads((tmp_path / "runs" / arm["run_id"] / "extract" / "manifest.json").read_text())
        assert manifest["config"]["timeout_s"] == arm["values"]["extract.timeout_s"]
    # the same command again: everything already done
    again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "0 computed" in again.stdout, again.stdout[-2000:]


def test_the_default_stage_set_is_curation_the_proxy_model_and_its_eval_never_post_training():
    from flows.registry import all_stages
    from flows.sweep import default_sweep_stages

    order = list(all_stages())
    assert default_sweep_stages(order) == ["ingest", "extract", "langid", "heuristics", "train_quality", "quality",
                                           "dedup", "tokenizer", "tokenize", "pretrain", "eval_pretrain"]
    assert default_sweep_stages(["ingest", "extract", "sft", "grpo"]) == ["ingest", "extract"]


def _pooled_sd_reference(groups):
    """Written from the formula: sqrt(sum over groups of sum((x - mean_g)^2) / (N - number of groups))."""
    import numpy as np

    squares = sum(float(((np.asarray(g, dtype=np.float64) - np.mean(g)) ** 2).sum()) for g in groups)
    return (squares / (sum(len(g) for g in groups) - len(groups))) ** 0.5


def test_resolution_verdicts_in_three_classes_with_uneven_seed_counts():
    from flows.sweep import compare_arms

    arms = {"on": [1.512, 1.498, 1.530], "off": [1.571, 1.566]}  # 3 and 2 seeds
    sd = _pooled_sd_reference(arms.values())
    found = compare_arms(arms, reference=0.2)
    assert found["pooled_sd"] == pytest.approx(sd, rel=1e-12) and found["resolution"] == pytest.approx(2 * sd)
    assert (found["high"], found["low"], found["seeds"]) == ("off", "on", 2)
    assert found["gap"] == pytest.approx(1.5685 - 1.5133333333333334)
    assert found["verdict"] == "detected" and "2 seeds per arm" in found["line"]
    close = {"on": [1.512, 1.498, 1.530], "off": [1.52, 1.50, 1.515]}
    assert compare_arms(close, reference=0.5)["verdict"] == "not detected, above resolution"
    assert "likely does not matter" in compare_arms(close, reference=0.5)["line"]
    assert compare_arms(close, reference=0.001)["verdict"] == "not detected, below resolution"
    assert compare_arms(close)["verdict"] == "not detected, below resolution"
    single = compare_arms({"a": [1.0], "b": [2.0, 2.1]})
    assert single["verdict"] == "no seed spread" and single["resolution"] is None
    tied = compare_arms({"a": [1.0, 1.2], "b": [1.2, 1.0]})
    assert tied["gap"] == 0 and tied["high"] != tied["low"]


@pytest.mark.parametrize("n_arms", [2, 3])
def test_verdict_is_detected_exactly_when_the_gap_exceeds_twice_the_pooled_sd(n_arms):
    from hypothesis import given, settings, strategies as st

    from flows.sweep import compare_arms

    seeds = st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=5)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(seeds, min_size=n_arms, max_size=n_arms), st.floats(-100, 100))
    def check(groups, shift):
        arms = {f"arm{i}": g for i, g in enumerate(groups)}
        found = compare_arms(arms)
        means = sorted(sum(g) / len(g) for g in groups)
        gap, sd = means[-1] - means[0], _pooled_sd_reference(groups)
        assert found["gap"] == pytest.approx(gap, abs=1e-9) and found["pooled_sd"] == pytest.approx(sd, abs=1e-9)
        if abs(gap - 2 * sd) > 1e-9:  # away from the boundary, the verdict follows the rule
            assert (found["verdict"] == "detected") == (gap > 2 * sd)
        moved = compare_arms({k: [x + shift for x in v] for k, v in arms.items()})  # a constant shift changes nothing
        assert moved["gap"] == pytest.approx(gap, abs=1e-6) and moved["pooled_sd"] == pytest.approx(sd, abs=1e-6)

    check()


def test_report_charts_list_and_null_valued_zipped_axes_once(monkeypatch):
    """Axes like langid.languages=[[en], []] and a threshold switched off (null), zipped: one chart per
    metric (the two axes split the arms the same way), a detected verdict, no crash on unhashable values."""
    import flows.sweep as sweep_module

    metric = "eval_pretrain:web_perplexity/bits_per_byte"
    bpb = {("en",): [3.05, 3.07, 3.06], (): [3.19, 3.21, 3.16]}
    arms = [{"run_id": f"r{i}{seed}", "values": {"langid.languages": list(langs), "quality.threshold": t},
             "seed": seed, "status": "completed", "error": None}
            for i, (langs, t) in enumerate([(("en",), 0.2), ((), None)]) for seed in (1, 2, 3)]
    values = {a["run_id"]: bpb[tuple(a["values"]["langid.languages"])][a["seed"] - 1] for a in arms}
    monkeypatch.setattr(sweep_module, "arm_metrics", lambda catalog, run_id: {metric: values[run_id]})
    monkeypatch.setattr(sweep_module, "compare_runs", lambda *a: {"stages": [], "summary": "differs"})
    summary = {"sweep_id": "s", "stages": ["langid", "eval_pretrain"], "arms": arms, "first_varying_stage": "langid",
               "shared_overrides": {}, "stage_executions": {"computed": 6, "reused": 0, "skipped": 0},
               "reference_effects": {metric: 0.07}}
    report = sweep_module.sweep_report(summary, catalog=None)
    assert report["html"].count("<img alt=") == 1
    assert report["resolution"][0]["verdict"] == "detected" and "languages=[]" in report["lines"][0]


def test_an_arm_label_of_many_zipped_keys_stays_short():
    import json

    from flows.sweep import _arm_label

    assert _arm_label(json.dumps({"a.x": 1, "b.y": None})) == "x=1, y=None"
    assert _arm_label(json.dumps({f"h.rule{i}": None for i in range(31)})) == "rule0=None, rule1=None (+29 more keys)"
