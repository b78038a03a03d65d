"""Hostile input (issue 31): names that would leave the run root or split a header, token traces outside the
run root, and the lineage explorer's redirects. Each test tries the attack and checks it fails safely."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from flows.explorer import Explorer, start_explorer
from infra.lineage import LineageCatalog
from infra.runstore import RunStoreError


def _manifest(runs: Path, run_id: str, stage: str, output: str) -> dict:
    path = runs / run_id / stage / output
    return {"run_id": run_id, "stage": stage, "cache_key": f"k-{run_id}-{stage}", "cached_from": None, "config": {},
            "inputs": {}, "metrics": {}, "code_version": {}, "timings": {"started_at": "t0", "finished_at": "t1"},
            "outputs": {output: {"uri": path.as_uri(), "path": str(path), "hash": f"sha256:{run_id}{stage}0000",
                                 "files": {}, "run_id": run_id, "stage": stage}}}


def _shard(prefix: Path, url: str) -> None:
    from curation.megatron_shards import ShardWriter

    prefix.parent.mkdir(parents=True, exist_ok=True)
    with ShardWriter(prefix, np.uint16) as writer:
        writer.add_document(np.array([5, 6, 0], np.uint16), f"doc-{prefix.name}", url, "w.warc.gz@7")


@pytest.fixture
def traced_runs(tmp_path):
    """A run root whose catalog holds r/ingest/data and r/tokenize/shards (one shard), a shard-shaped secret
    outside it, and a config file pointing at it."""
    runs = tmp_path / "runs"
    _shard(runs / "r" / "tokenize" / "shards" / "web-train-00000", "https://example.org/page")
    _shard(tmp_path / "outside" / "secret", "https://secret.example/token=hunter2")
    (runs / "r" / "ingest" / "data").mkdir(parents=True)
    catalog = LineageCatalog(runs)
    for stage, output in (("ingest", "data"), ("tokenize", "shards")):
        catalog.record_stage_run(_manifest(runs, "r", stage, output))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run_root: {runs}\n")
    return runs, cfg


def test_token_trace_reads_only_listed_shards_of_a_tokenize_artifact(traced_runs, capsys):
    runs, cfg = traced_runs
    for argv, message in [
        (["r/ingest/data", "../../../../outside/secret", "0"], "this run root has r/tokenize/shards"),
        (["r/tokenize/shards", "../../../../outside/secret", "0"], "has no shard '../../../../outside/secret'"),
        (["r/tokenize/shards", str(runs.parent / "outside" / "secret"), "0"], "has no shard"),
        (["r/tokenize/shards", "web-train-00000", "9"], "sequence 9 out of range"),
    ]:
        assert main(["lineage", "trace", *argv, "-c", str(cfg)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and message in captured.err, captured.err
        assert captured.err.count("\n") == 1 and "secret.example" not in captured.out + captured.err
    assert main(["lineage", "trace", "r/tokenize/shards", "web-train-00000", "0", "-c", str(cfg)]) == 0
    assert "https://example.org/page" in capsys.readouterr().out

    explorer = Explorer(runs)
    page = explorer.trace("r/tokenize/shards", "../../../../outside/secret", "0")
    assert "has no shard" in page and "secret.example" not in page
    assert "secret.example" not in explorer.trace("r/ingest/data", "../../../../outside/secret", "0")
    assert "https://example.org/page" in explorer.trace("r/tokenize/shards", "web-train-00000", "0")


def test_a_catalog_entry_pointing_outside_the_run_root_is_not_traced(traced_runs, capsys):
    runs, cfg = traced_runs
    manifest = _manifest(runs, "evil", "tokenize", "shards")
    manifest["outputs"]["shards"]["path"] = str(runs.parent / "outside")  # a planted catalog row
    LineageCatalog(runs).record_stage_run(manifest)
    assert main(["lineage", "trace", "evil/tokenize/shards", "secret", "0", "-c", str(cfg)]) == 2
    assert "outside the run root" in capsys.readouterr().err


def test_explorer_redirects_and_trace_urls_over_http(traced_runs):
    """``/trace?shard=..%2F..`` reads nothing outside the run root; a run id with a line feed (from a shared
    catalog) is URL-quoted in the Location header, so no header can be injected."""
    runs, _ = traced_runs
    LineageCatalog(runs).record_stage_run(_manifest(runs, "x\r\nSet-Cookie: a=b", "alpha", "data"))
    server = start_explorer(runs, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        page = urllib.request.urlopen(f"{base}/trace?shards=r/tokenize/shards&shard=..%2F..%2F..%2F..%2Foutside%2Fsecret"
                                      "&seq=0", timeout=30).read().decode()
        assert "has no shard" in page and "secret.example" not in page

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.build_opener(NoRedirect).open(f"{base}/artifact?ref=x%0D%0ASet-Cookie%3A%20a%3Db/alpha",
                                                         timeout=30)
        assert info.value.code == 302 and info.value.headers.get("Set-Cookie") is None
        assert info.value.headers["Location"] == "/stage/x%0D%0ASet-Cookie%3A%20a%3Db/alpha"
    finally:
        server.shutdown()


@pytest.mark.parametrize("name", ["../../../../X", "/tmp/refinery-sweep-escape", "nl\n", "a/b"])
def test_a_sweep_name_cannot_leave_the_run_root(fake_registry, tmp_path, name, capsys):
    from flows.sweep import parse_axis, plan_sweep

    src = tmp_path / "input.txt"
    src.write_text("one\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run_root: {tmp_path / 'runs'}\nalpha:\n  source: {src}\n")
    with pytest.raises(RunStoreError, match="invalid sweep name"):
        plan_sweep(str(cfg), {}, [parse_axis("beta.suffix=[x]")], name=name)  # the flow's (UI's) path too
    assert main(["sweep", "-c", str(cfg), "-a", "beta.suffix=[x]", "--name", name]) == 1
    assert capsys.readouterr().err.startswith("error: invalid sweep name")
    assert not (tmp_path / "runs").exists() and not Path("/tmp/refinery-sweep-escape").exists()


@pytest.mark.parametrize("ref", ["..", "../x", "r/..", "nl\n"])
def test_from_refuses_names_that_are_not_plain(ref, tmp_path, capsys):
    assert main(["run", "--stages", "ingest", "--from", ref, "-o", f"run_root={tmp_path / 'runs'}"]) == 1
    assert capsys.readouterr().err.startswith("error: invalid ")


def test_report_refuses_a_run_id_that_is_not_plain(traced_runs, capsys):
    runs, cfg = traced_runs
    for run_id in ("../../elsewhere", "r\n"):
        assert main(["report", run_id, "-c", str(cfg)]) == 1
        assert capsys.readouterr().err.startswith("error: invalid run id")
    assert not (runs.parent.parent / "elsewhere").exists()


def _get(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_credential_is_generated_once_private_and_the_environment_wins(tmp_path, monkeypatch):
    from infra.access import CREDENTIAL_FILE, AccessError, credential

    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    assert credential(tmp_path / "home", create=False) == (None, False)
    value, created = credential(tmp_path / "home")
    path = tmp_path / "home" / CREDENTIAL_FILE
    assert created and value.startswith("refinery:") and len(value) > 30
    assert path.stat().st_mode & 0o777 == 0o600
    assert credential(tmp_path / "home") == (value, False)  # the same on every start
    assert credential(tmp_path / "other")[0] != value
    path.chmod(0o644)
    with pytest.raises(AccessError, match="chmod 600"):
        credential(tmp_path / "home")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "ops:from-env")
    assert credential(tmp_path / "home") == ("ops:from-env", False)


def test_requests_need_a_known_host_and_beyond_loopback_the_credential():
    import base64

    from infra.access import allowed_hosts, check_exposure, refusal, AccessError

    hosts = allowed_hosts("127.0.0.1", ["ui.example.org"])
    good = "Basic " + base64.b64encode(b"refinery:s3cret").decode()
    assert refusal("127.0.0.1:4200", None, hosts, None) is None
    assert refusal("UI.example.org", None, hosts, None) is None
    for host in ("evil.example:4200", "", None, "127.0.0.1.evil.example"):
        assert refusal(host, good, hosts, "refinery:s3cret")[0] == 400
    for auth in (None, "Basic !!!", "Bearer refinery:s3cret", "Basic " + base64.b64encode(b"refinery:s3cre").decode()):
        assert refusal("localhost:4200", auth, hosts, "refinery:s3cret")[0] == 401
    assert refusal("localhost:4200", good, hosts, "refinery:s3cret") is None
    assert "0.0.0.0" not in allowed_hosts("0.0.0.0")
    check_exposure("127.0.0.1", auth=False)
    check_exposure("0.0.0.0", auth=True)
    with pytest.raises(AccessError, match="without authentication"):
        check_exposure("0.0.0.0", auth=False)


def test_serve_beyond_loopback_without_auth_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    assert main(["serve", "--host", "0.0.0.0", "--no-auth", "-o", f"run_root={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to serve on '0.0.0.0' without authentication") and err.count("\n") == 1


def test_an_explorer_beyond_loopback_asks_for_the_credential(traced_runs):
    import base64

    from infra.access import AccessError

    runs, _ = traced_runs
    with pytest.raises(AccessError):
        start_explorer(runs, "0.0.0.0", 0)
    server = start_explorer(runs, "0.0.0.0", 0, auth="refinery:s3cret")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _get(f"{base}/") == 401
        good = {"Authorization": "Basic " + base64.b64encode(b"refinery:s3cret").decode()}
        assert _get(f"{base}/", good) == 200
        assert _get(f"{base}/", {**good, "Host": "rebound.example"}) == 400
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_spark_jvm_out_of_memory_ends_instead_of_living_on(tmp_path):
    """Finding 10: a stage whose JVM ran out of memory hung. Refinery's Spark sessions start the JVM with
    -XX:+ExitOnOutOfMemoryError: a driver with a 128 MB heap that collects ~2 GB ends within seconds, and
    the Python side gets an error (which fails the stage) rather than waiting."""
    import subprocess
    import sys

    script = tmp_path / "oom.py"
    script.write_text(
        "from infra.config import SparkConfig\nfrom infra.spark import get_spark\n"
        "spark = get_spark(SparkConfig(master='local[1]', driver_memory='128m', "
        "conf={'spark.testing.memory': '2147483648'}))\n"
        "assert '-XX:+ExitOnOutOfMemoryError' in spark.sparkContext.getConf().get('spark.driver.extraJavaOptions')\n"
        "try:\n    spark.range(0, 30_000_000).selectExpr('id', \"repeat('x', 50) as s\").collect()\n"
        "except Exception as exc:\n    print('python side:', type(exc).__name__)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parent.parent)
    assert "Terminating due to java.lang.OutOfMemoryError" in done.stdout + done.stderr
    assert "python side:" in done.stdout


def test_reports_are_served_by_name_and_linked_from_the_artifacts(traced_runs, monkeypatch):
    """Issue 29, point 2: the explorer serves run and sweep reports, the artifacts link to them (not to a
    server-local path); a name that is not plain is refused before any file is opened."""
    from flows.pipeline import run_summary_markdown
    from flows.stages import EXPLORER_URL_ENV
    from flows.sweep import sweep_markdown

    runs, _ = traced_runs
    (runs / "r" / "report.html").write_text("<html>run report r</html>")
    (runs / "sweeps" / "s1").mkdir(parents=True)
    (runs / "sweeps" / "s1" / "report.html").write_text("<html>sweep report s1</html>")
    server = start_explorer(runs, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert urllib.request.urlopen(f"{base}/report/r", timeout=30).read() == b"<html>run report r</html>"
        assert urllib.request.urlopen(f"{base}/sweep/s1", timeout=30).read() == b"<html>sweep report s1</html>"
        assert "report (charts)" in urllib.request.urlopen(f"{base}/run/r", timeout=30).read().decode()
        assert _get(f"{base}/report/nope") == 404 and _get(f"{base}/sweep/nope") == 404
        for bad in ("..%2F..%2Fetc", "%2Fetc%2Fpasswd", ".."):
            assert _get(f"{base}/report/{bad}") == 400
    finally:
        server.shutdown()
    monkeypatch.setenv(EXPLORER_URL_ENV, "http://127.0.0.1:4201")
    md = run_summary_markdown("r", {}, {}, runs / "r" / "report.html")
    assert "[report (charts)](http://127.0.0.1:4201/report/r)" in md and str(runs) not in md
    summary = {"sweep_id": "s1", "report": str(runs / "sweeps" / "s1" / "report.html"), "lines": [], "arms": [],
               "stage_executions": {"computed": 0, "reused": 0, "skipped": 0}}
    assert "[Report (charts)](http://127.0.0.1:4201/sweep/s1)" in sweep_markdown(summary)
    monkeypatch.delenv(EXPLORER_URL_ENV)
    assert str(runs / "sweeps" / "s1" / "report.html") in sweep_markdown(summary)  # no explorer: the path
