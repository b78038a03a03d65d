"""What a Prefect UI user meets: deployment forms prefilled with the served config (an untouched form
changes nothing, a partial edit merges), `serve -o`, a stage picker with descriptions, server-service
errors on the console, and the lineage explorer (graph across runs, same-content relation, diff)."""

import json
import os

import pytest

from flows.pipeline import pipeline
from flows.serve import build_deployments
from flows.stages import STAGE_FLOWS, resolve_config
from flows.registry import load_config
from infra.config import DEFAULT_CONFIG
from infra.prefect_server import service_errors


def _submit_untouched(deployment) -> dict:
    """What the UI sends for an untouched form: the deployment's parameters, as JSON, validated by the flow."""
    flow = STAGE_FLOWS[deployment.name.removeprefix("stage-")]
    return flow.validate_parameters(json.loads(json.dumps(deployment.parameters)))


@pytest.mark.parametrize("serve_overrides", [{}, {"run_root": "/tmp/elsewhere", "quality.threshold": 0.35}])
def test_untouched_stage_forms_resolve_to_exactly_the_served_config(serve_overrides):
    served = load_config(DEFAULT_CONFIG, serve_overrides)
    deployments = {d.name: d for d in build_deployments(str(DEFAULT_CONFIG), served, serve_overrides)}
    assert set(deployments) == {"refinery-pipeline", "refinery-sweep", *(f"stage-{s}" for s in STAGE_FLOWS)}
    for name in STAGE_FLOWS:
        deployment = deployments[f"stage-{name}"]
        params = _submit_untouched(deployment)
        resolved = resolve_config(params["config_file"], params["overrides"], (name, params["params"]))
        assert resolved.model_dump(mode="json") == served.model_dump(mode="json"), name
    # the code defaults differ from the file for many stages: the form must not show them
    quality = deployments["stage-quality"].parameters["params"]
    assert quality["threshold"] == (0.35 if serve_overrides else 0.2)
    assert deployments["refinery-sweep"].parameters["overrides"] == serve_overrides
    pipeline_params = deployments["refinery-pipeline"].parameters
    assert pipeline_params["overrides"] == serve_overrides and pipeline_params["stages"] == []


def test_partial_params_edit_merges_into_the_file_section():
    flow = STAGE_FLOWS["heuristics"]
    params = flow.validate_parameters({"params": {"gopher_quality": {"min_doc_words": 100}}})
    resolved = resolve_config(str(DEFAULT_CONFIG), {}, ("heuristics", params["params"]))
    file_config = load_config(DEFAULT_CONFIG)
    assert resolved.heuristics.gopher_quality.min_doc_words == 100
    expected = file_config.model_dump(mode="json")
    expected["heuristics"]["gopher_quality"]["min_doc_words"] = 100
    assert resolved.model_dump(mode="json") == expected  # every other key keeps the file's value


def test_pipeline_form_offers_a_stage_picker_and_describes_every_parameter():
    schema = pipeline.parameters.model_dump()
    props = schema["properties"]
    assert props["stages"]["items"]["enum"] == ["curation", "training", "all", *STAGE_FLOWS]
    for name, prop in props.items():
        assert len(prop.get("description", "")) > 20, name
    stage_props = STAGE_FLOWS["quality"].parameters.model_dump()["properties"]
    for name in ("run_id", "from_run", "overrides", "force", "params"):
        assert stage_props[name].get("description"), name
    assert "anyOf" not in stage_props["run_id"]  # a plain text box, not a "type None" toggle


def test_the_pipeline_form_starts_empty_and_groups_expand_to_their_stages():
    """An untouched pipeline form runs the config's pipeline (nothing preselected to untick); `curation`
    and `training` name the two halves in pipeline order, `all` every stage."""
    from flows.registry import all_stages, expand_stages, stage_groups

    config = load_config(DEFAULT_CONFIG)
    pipeline_deployment = next(d for d in build_deployments(str(DEFAULT_CONFIG), config) if d.name == "refinery-pipeline")
    assert pipeline_deployment.parameters["stages"] == []
    groups = stage_groups()
    assert groups["curation"][0] == "ingest" and groups["curation"][-1] == "tokenize"
    assert groups["training"][0] == "pretrain" and groups["curation"] + groups["training"] == list(all_stages())
    assert expand_stages(["pretrain", "curation", "ingest"]) == ["pretrain", *groups["curation"]]
    names = sorted(d.name for d in build_deployments(str(DEFAULT_CONFIG), config))
    assert names[:2] == ["refinery-pipeline", "refinery-sweep"]  # first in the UI's A-Z list


def test_scheduler_failure_in_the_server_log_reaches_the_console():
    log = """\
21:40:01.120 | INFO    | prefect.server.services.scheduler - Scheduled 0 runs.
21:40:02.500 | ERROR   | prefect.server.services.scheduler - Unexpected error in: Scheduler
Traceback (most recent call last):
  File "prefect/server/services/scheduler.py", line 180, in _insert_scheduled_flow_runs
    await session.execute(stmt)
sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement; please supply a bulk_dml decorated function
21:40:03.000 | INFO    | uvicorn.access - GET /api/health 200
"""
    assert list(service_errors(log.splitlines(keepends=True))) == [
        "21:40:02.500 | ERROR   | prefect.server.services.scheduler - Unexpected error in: Scheduler",
        "  sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement; please supply a bulk_dml "
        "decorated function",
    ]


@pytest.fixture
def three_runs(fake_registry, tmp_path):
    """r1 computes alpha and beta; r2 reuses alpha from the cache and computes beta with another
    suffix; r3 recomputes alpha (same content, its own artifact)."""
    from flows.registry import execute_stage

    src = tmp_path / "input.txt"
    src.write_text("one\ntwo\nthree\n")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"run_root: {tmp_path / 'runs'}\nalpha:\n  source: {src}\n")
    config = load_config(cfg_file)
    execute_stage("alpha", config, "r1")
    execute_stage("beta", config, "r1")
    assert execute_stage("alpha", config, "r2")["cached_from"] == "r1/alpha"
    execute_stage("beta", load_config(cfg_file, ["beta.suffix=x!"]), "r2")
    execute_stage("alpha", config, "r3", force=True)
    return tmp_path / "runs", src


def test_reused_and_recomputed_outputs_are_artifacts_of_their_own_with_a_same_content_relation(three_runs):
    from infra.lineage import LineageCatalog, artifact_path, lineage_graph

    root, src = three_runs
    catalog = LineageCatalog(root)
    [a1], [a2], [a3] = (catalog.resolve(f"{r}/alpha/data") for r in ("r1", "r2", "r3"))
    assert len({a1["uri"], a2["uri"], a3["uri"]}) == 3 and a1["hash"] == a2["hash"] == a3["hash"]
    assert artifact_path(a2) == artifact_path(a1)  # the reused stage's files live where they were computed
    assert (artifact_path(a2) / "lines.txt").is_file()
    # the earlier artifact does not borrow the later runs' upstream (no merge by hash)
    assert {p["via_run"] for p in catalog.parents(a1["uri"])} == {"r1"}
    assert {p["via_run"] for p in catalog.parents(a2["uri"])} == {"r2"}
    assert {a["uri"] for a in catalog.same_content(a1["uri"])} == {a2["uri"], a3["uri"]}
    # r2/beta read r2's (reused) alpha, not r1's
    [beta2] = catalog.resolve("r2/beta/data")
    assert [p["uri"] for p in catalog.parents(beta2["uri"])] == [a2["uri"]]

    graph = lineage_graph(catalog, [("r2", "beta")])
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert set(nodes) == {"r2/beta", "r2/alpha", "r1/alpha", src.as_uri()}
    edges = {(e["src"], e["dst"], e["kind"]) for e in graph["edges"]}
    assert edges == {("r2/alpha", "r2/beta", "data"), ("r1/alpha", "r2/alpha", "reuse"),
                     (src.as_uri(), "r1/alpha", "data"), (src.as_uri(), "r2/alpha", "data")}
    down = lineage_graph(catalog, [("r1", "alpha")])
    assert {"r1/beta", "r2/alpha", "r2/beta"} <= {n["id"] for n in down["nodes"]}


def test_explorer_pages_show_the_cross_run_graph_diff_and_same_content(three_runs):
    from flows.explorer import Explorer

    root, _ = three_runs
    explorer = Explorer(root)
    index = explorer.index()
    assert all(f"/run/{r}" in index for r in ("r1", "r2", "r3"))
    run_page = explorer.run("r2")
    assert run_page.count("class='node node-stage'") == 3 and "edge-reuse" in run_page
    assert "reused from r1/alpha" in run_page
    stage_page = explorer.stage("r3", "alpha")
    assert "r1/alpha/data" in stage_page and "r2/alpha/data" in stage_page  # same content as
    diff = explorer.diff("r1", "r2")
    assert "suffix" in diff and "x!" in diff and "1 stage(s) differ (beta); 1 with the same content" in diff
    assert "reused from r1/alpha" in diff  # provenance, beside the result, not a difference
    forced = explorer.diff("r1", "r3")  # alpha recomputed with equal hashes, beta not run in r3
    assert "no differences: 1 stage(s) run in both have the same content; not run in r3: beta" in forced
    target, _ = explorer.artifact("r2/beta/data")
    assert target == "/stage/r2/beta"
    assert "not in the lineage catalog" in explorer.diff("r1", "nope")


@pytest.fixture
def browser():
    """Headless Debian Chromium driven by selenium (`make test` installs chromium and chromium-driver)."""
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


def test_explorer_renders_the_cross_run_graph_in_chromium(three_runs, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from flows.explorer import start_explorer

    root, _ = three_runs
    server = start_explorer(root, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        browser.get(base)
        browser.find_element(By.LINK_TEXT, "r2").click()  # a user picks a run
        nodes = browser.find_elements(By.CSS_SELECTOR, "svg g.node")
        ids = {n.get_attribute("data-id") for n in nodes}
        assert {"r2/alpha", "r2/beta", "r1/alpha"} <= ids and any(i.startswith("file://") for i in ids)
        assert browser.find_elements(By.CSS_SELECTOR, "path.edge-reuse")
        box = browser.find_element(By.CSS_SELECTOR, "svg").size
        assert box["width"] > 300 and box["height"] > 200  # laid out, not collapsed
        browser.save_screenshot(os.environ.get("REFINERY_SCREENSHOT", str(tmp_path / "explorer_run.png")))
        # click through to a stage and then diff two runs with the form
        browser.find_element(By.CSS_SELECTOR, "g.node[data-id='r1/alpha']").find_element(By.XPATH, "..").click()
        assert "same content as" in browser.page_source and "r3/alpha/data" in browser.page_source
        browser.get(base)
        form = browser.find_element(By.CSS_SELECTOR, "form[action='/diff']")
        selects = form.find_elements(By.TAG_NAME, "select")
        for select, run in zip(selects, ("r1", "r2")):
            select.find_element(By.CSS_SELECTOR, f"option[value='{run}']").click()
        form.find_element(By.TAG_NAME, "button").click()
        WebDriverWait(browser, 30).until(lambda b: "r1 vs r2" in b.page_source)  # the click navigates asynchronously
        assert "suffix" in browser.page_source
    finally:
        server.shutdown()


def test_run_report_renders_funnel_and_lineage_in_chromium(three_runs, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from flows.report import write_report

    root, _ = three_runs
    one = write_report(root, "r2")
    both = write_report(root, "r1", "r2")
    assert one == root / "r2" / "report.html" and both.name == "compare-r1-r2.html"
    browser.get(one.as_uri())
    assert "Run r2" in browser.page_source and "Curation funnel" in browser.page_source
    funnel = browser.find_elements(By.XPATH, "//h3[text()='Curation funnel']/following-sibling::table[1]//tr")
    assert len(funnel) == 2  # header + alpha (3 in, 3 kept)
    assert len(browser.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png']")) >= 2  # effects + funnel charts
    assert browser.find_elements(By.CSS_SELECTOR, "svg g.node")
    effects = browser.find_elements(By.XPATH, "//h3[starts-with(text(), 'Training effects')]/following-sibling::table[1]//tr")
    assert len(effects) == 2 and "capitalised 0 [" in effects[1].text and "improved (n=3)" in effects[1].text
    browser.get(both.as_uri())
    assert "Run r1" in browser.page_source and "Run r2" in browser.page_source
    browser.save_screenshot(str(tmp_path / "report.png"))


def test_explorer_front_page_explains_itself_and_pages_show_shards_and_funnels(tmp_path):
    """Issue 29, point 5: an intro with a link to the Prefect UI, a diff form preset to the two newest runs,
    a tokenize page that lists its shards with trace links, and a funnel metric as a table."""
    import numpy as np

    from curation.megatron_shards import ShardWriter
    from flows.explorer import Explorer
    from infra.lineage import LineageCatalog

    runs = tmp_path / "runs"
    catalog = LineageCatalog(runs)
    for run_id in ("r1", "r2"):
        shards = runs / run_id / "tokenize" / "shards"
        shards.mkdir(parents=True)
        with ShardWriter(shards / "web-train-00000", np.uint16) as writer:
            writer.add_document(np.array([5, 6, 0], np.uint16), f"doc-{run_id}", "https://example.org/a", "a.warc.gz@7")
        catalog.record_stage_run({
            "run_id": run_id, "stage": "tokenize", "cache_key": f"k-{run_id}", "cached_from": None, "config": {},
            "inputs": {}, "code_version": {}, "timings": {"started_at": f"t-{run_id}", "finished_at": "t1"},
            "metrics": {"funnel": [{"step": "records", "documents": 83}, {"step": "kept", "documents": 27}]},
            "outputs": {"shards": {"uri": shards.as_uri(), "path": str(shards), "hash": f"sha256:{run_id}00",
                                   "files": {}, "run_id": run_id, "stage": "tokenize"}}})
    explorer = Explorer(runs, prefect_url="http://127.0.0.1:4200")
    index = explorer.index()
    assert "class='intro'" in index and "href='http://127.0.0.1:4200'" in index
    assert "<select name='a'><option value='r2'>r2</option><option value='r1' selected>" in index
    assert "<select name='b'><option value='r2' selected>" in index
    page = explorer.stage("r2", "tokenize")
    assert "Shards (1)" in page and "/trace?shards=r2%2Ftokenize%2Fshards&shard=web-train-00000&seq=0" in page
    assert "<th>step</th><th>documents</th>" in page and "<td>kept</td><td>27</td>" in page  # labels first
    assert "[{" not in page  # no Python list printed
    trace = explorer.trace("r2/tokenize/shards", "web-train-00000", "0")
    assert "doc-r2" in trace and "byte 7 of a.warc.gz" in trace


def test_a_training_stage_page_lists_its_checkpoints_with_their_origin_and_users(tmp_path):
    """Issue 29, point 6: checkpoint lineage in the explorer — each checkpoint of pretrain (iter_N with the
    loss of its step) and its exported model, what it was trained from, and which stage runs read it."""
    import json as _json

    from flows.explorer import Explorer
    from infra.lineage import LineageCatalog

    runs = tmp_path / "runs"
    pre = runs / "r" / "pretrain"
    for step in (0, 4, 8):
        (pre / "checkpoints" / f"iter_{step:07d}").mkdir(parents=True)
    (pre / "hf").mkdir()
    (pre / "metrics").mkdir()
    (pre / "metrics" / "metrics.jsonl").write_text("\n".join(_json.dumps(r) for r in [
        {"step": 4, "loss": 5.5}, {"event": "spike", "step": 5}, {"step": 4, "loss": 5.25}, {"step": 8, "loss": 4.125}]))

    def out(stage: str, name: str, path) -> dict:
        return {"uri": path.as_uri(), "path": str(path), "hash": f"sha256:{stage}{name}00", "files": {},
                "run_id": "r", "stage": stage}

    def record(stage: str, outputs: dict, inputs: dict, metrics: dict) -> None:
        LineageCatalog(runs).record_stage_run({
            "run_id": "r", "stage": stage, "cache_key": f"k-{stage}", "cached_from": None, "config": {},
            "inputs": inputs, "metrics": metrics, "code_version": {},
            "timings": {"started_at": "t0", "finished_at": "t1"}, "outputs": outputs})

    shards = runs / "r" / "tokenize" / "shards"
    shards.mkdir(parents=True)
    record("tokenize", {"shards": out("tokenize", "shards", shards)}, {}, {})
    record("pretrain", {"checkpoints": out("pretrain", "checkpoints", pre / "checkpoints"),
                        "hf": out("pretrain", "hf", pre / "hf"), "metrics": out("pretrain", "metrics", pre / "metrics")},
           {"tokenize/shards": {**out("tokenize", "shards", shards), "output": "shards"}},
           {"steps": 8, "final_loss": 4.125, "init_from": "random"})
    record("sft", {"hf": out("sft", "hf", runs / "r" / "sft" / "hf")},
           {"pretrain/hf": {**out("pretrain", "hf", pre / "hf"), "output": "hf"},
            "data_0": {"uri": (tmp_path / "sft.jsonl").as_uri(), "hash": "sha256:d0"}}, {"steps": 3, "train_loss_last_10": 1.5})
    explorer = Explorer(runs)
    page = explorer.stage("r", "pretrain")
    assert "<h2>Checkpoints</h2>" in page
    assert "<td>checkpoints/iter_0000004</td><td>4</td><td>5.2500</td>" in page  # the step's last record wins
    assert "<td>checkpoints/iter_0000000</td><td>0</td><td>-</td>" in page
    assert "data: <a href='/stage/r/tokenize'>r/tokenize/shards</a>" in page and "model: random" in page
    assert "<td>hf</td><td>8</td><td>4.1250</td>" in page and "<a href='/stage/r/sft'>r/sft</a>" in page  # used by
    sft = explorer.stage("r", "sft")
    assert "model: <a href='/stage/r/pretrain'>r/pretrain/hf</a><br>data: sft.jsonl" in sft
    assert "<td>hf</td><td>3</td><td>1.5000</td>" in sft
    assert "<h2>Checkpoints</h2>" not in explorer.stage("r", "tokenize")


def test_node_labels_fit_their_boxes_and_keep_the_full_text_as_a_tooltip():
    from flows.explorer import NODE_W, fit_label, render_svg

    long = "sens-quality-3822f0/train_quality_and_more_words"
    assert len(fit_label(long)) * 7.3 <= NODE_W - 16 and fit_label(long).endswith("…")
    assert fit_label("r1/ingest") == "r1/ingest"
    graph = {"nodes": [{"id": f"{long}/x", "kind": "stage", "run_id": long, "stage": "x", "cached_from": None,
                        "outputs": {}}], "edges": []}
    svg = render_svg(graph, set())
    assert f"<title>{long}/x</title>" in svg and fit_label(f"{long}/x") in svg
