"""The `refinery` CLI: help that explains, one-line config errors, lineage show/diff on real runs."""

import pytest

from flows import registry
from flows.cli import build_parser, main
from flows.registry import execute_stage


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "demo", "serve", "lineage", "stages"):
        assert f"refinery {command}" in out
    for argv in (["run", "--help"], ["lineage", "show", "--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        assert "usage: refinery" in capsys.readouterr().out


def test_config_errors_exit_2_with_one_line(capsys):
    assert main(["run", "-o", "ingest.nonsense=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: config error: unknown key 'ingest.nonsense'"
    assert main(["run", "--stages", "ingest,nope"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_rerun_from_missing_run_is_a_clear_error(capsys, tmp_path):
    assert main(["run", "--stages", "ingest", "--from", "no-such-run", "-o", f"run_root={tmp_path}"]) == 2
    assert "run 'no-such-run' does not exist" in capsys.readouterr().err


@pytest.fixture
def fake_runs(fake_registry, tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("one\ntwo\n")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"run_root: {tmp_path / 'runs'}\nalpha:\n  source: {src}\n")
    config = registry.load_config(cfg_file)
    execute_stage("alpha", config, "r1")
    execute_stage("beta", config, "r1")
    execute_stage("beta", registry.load_config(cfg_file, ["beta.suffix=x"]), "r2", from_ref="r1")
    yield cfg_file


def test_lineage_show_and_diff(fake_runs, capsys):
    assert main(["lineage", "show", "r2/beta/data", "-c", str(fake_runs)]) == 0
    out = capsys.readouterr().out
    assert "r2/beta/data" in out and "<- r1/alpha/data" in out and "input.txt" in out
    assert main(["lineage", "show", "r1/alpha", "-c", str(fake_runs)]) == 0
    out = capsys.readouterr().out
    assert "-> r1/beta/data" in out and "-> r2/beta/data" in out
    assert main(["lineage", "show", "r1", "-c", str(fake_runs)]) == 0
    assert "r1/alpha" in capsys.readouterr().out
    assert main(["lineage", "diff", "r1", "r2", "-c", str(fake_runs)]) == 0
    assert "config beta.suffix: '' -> 'x'" in capsys.readouterr().out
    assert main(["lineage", "show", "nothing/here", "-c", str(fake_runs)]) == 2
    assert main(["lineage", "diff", "r1", "zzz", "-c", str(fake_runs)]) == 2
