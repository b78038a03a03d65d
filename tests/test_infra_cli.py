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


def _documented_overrides() -> list[tuple[str, str]]:
    """Every `-o key=value` (and sweep axis `-a key=[...]`) shown in the README, docs/, the configs' comments
    and every `--help` text."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    texts = {str(p.relative_to(repo)): p.read_text()
             for p in [repo / "README.md", *sorted((repo / "docs").glob("*.md")), *sorted((repo / "configs").glob("*.yaml"))]}
    parser = build_parser()
    stack = [("refinery", parser)]
    while stack:  # every subcommand's help, recursively
        name, p = stack.pop()
        texts[f"{name} --help"] = p.format_help()
        for action in p._actions:
            if getattr(action, "choices", None) and isinstance(action.choices, dict):
                stack += [(f"{name} {sub}", sp) for sub, sp in action.choices.items()]
    found = []
    for where, text in texts.items():
        for m in re.finditer(r"-[oa]\s+'?([a-z_]+(?:\.[a-z_0-9]+)+)=(\[[^\]]*\]|[^\s`'\")]*)", text):
            found.append((where, f"{m.group(1)}={m.group(2)}"))
    return found


def test_every_documented_override_names_a_real_config_key():
    """Copying an example from the README, a config comment or --help must not fail on the key."""
    from infra.config import ConfigError

    found = _documented_overrides()
    assert len(found) >= 15
    bad = []
    for where, text in found:
        if text.startswith("section.key="):  # the README's placeholder
            continue
        try:
            registry.load_config(None, [text])
        except ConfigError as exc:  # a placeholder value may not validate; the key must exist
            if "unknown key" in str(exc) or "is not a section" in str(exc):
                bad.append(f"{where}: -o {text}  ->  {exc}")
    assert not bad, "\n".join(bad)
