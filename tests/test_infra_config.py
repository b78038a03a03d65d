"""Config: one YAML for all stages, dotted overrides, one clear error naming the bad key."""

from pathlib import Path

import pytest

from flows.registry import load_config
from infra.config import ConfigError, apply_overrides, parse_override


def test_demo_config_validates_and_has_every_stage_section():
    from flows.registry import all_stages

    config = load_config()
    for name in all_stages():
        assert hasattr(config, name), name
    assert config.spark.master.startswith("local")


def test_override_parses_yaml_values():
    assert parse_override("ingest.max_record_bytes=1000") == (["ingest", "max_record_bytes"], 1000)
    assert parse_override("spark.conf={a: b}") == (["spark", "conf"], {"a": "b"})
    config = load_config(overrides=["ingest.keep_non_html=true", "spark.master=local[1]"])
    assert config.ingest.keep_non_html is True and config.spark.master == "local[1]"


def test_unknown_key_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"unknown key 'ingest.bogus'"):
        load_config(overrides=["ingest.bogus=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'nosuchstage'"):
        load_config(overrides={"nosuchstage.x": 1})


def test_bad_value_names_the_key_and_value():
    with pytest.raises(ConfigError, match=r"ingest.max_record_bytes: .*'abc'"):
        load_config(overrides=["ingest.max_record_bytes=abc"])
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("no-equals-sign")


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_cannot_descend_into_a_scalar():
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"run_root": "x"}, ["run_root.sub=1"])


def test_unknown_pipeline_stage_is_rejected():
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(overrides={"pipeline.stages": ["ingest", "nope"]})


def test_demo_profile_extends_tiny_and_chains_smollm2_training():
    from infra.config import REPO_ROOT

    tiny, demo = load_config(REPO_ROOT / "configs" / "tiny.yaml"), load_config()  # demo.yaml is the default
    assert tiny.pretrain.init_from is None and demo.pretrain.init_from == "smollm2"
    assert demo.tokenizer.pretrained == "smollm2"  # the shards must be in SmolLM2's vocabulary
    assert demo.sft.model == demo.reward.model == demo.dpo.model == demo.grpo.model == "upstream"  # one chain
    assert demo.ingest == tiny.ingest and demo.dedup == tiny.dedup and demo.pipeline.stages == tiny.pipeline.stages


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("old, new", [("pretrain.train_steps", "steps"), ("pretrain.clip_grad", "grad_clip"),
                                      ("pretrain.dtype", "precision"), ("sft.max_steps", "steps"),
                                      ("eval_sft.dtype", "precision")])
def test_a_renamed_setting_names_its_new_key(old, new):
    """One name per setting across stages (steps, grad_clip, precision, log_every, save_every): a config
    written with an old name fails with the new one in the message."""
    with pytest.raises(ConfigError, match=f"'{old.split('.')[1]}' was renamed to '{new}'"):
        load_config("configs/tiny.yaml", {old: 3})


def test_training_stages_share_setting_names():
    cfg = load_config("configs/tiny.yaml")
    for stage in ("pretrain", "sft", "reward", "dpo", "grpo", "ppo"):
        fields = type(getattr(cfg, stage)).model_fields
        assert {"steps", "grad_clip"} <= set(fields), stage
        assert not {"max_steps", "train_steps", "clip_grad", "dtype", "log_interval", "save_interval"} & set(fields), stage


def test_production_defaults_do_not_point_into_tests_or_shared_data():
    """Data paths live in configs/*.yaml; a stage config built from code defaults names none of them."""
    import json

    from flows.registry import all_stages

    for name, stage in all_stages().items():
        dumped = json.dumps(stage.config_model().model_dump(mode="json"))
        assert "tests/data" not in dumped and "shared/data" not in dumped, name


def test_a_listed_eval_task_needs_its_file():
    with pytest.raises(ConfigError, match=r"gsm8k.train_path not set"):
        load_config("configs/tiny.yaml", {"eval_sft.gsm8k.train_path": "", "eval_sft.gsm8k.num_fewshot": 2})
    with pytest.raises(ConfigError, match=r"web_perplexity.path not set"):
        load_config("configs/tiny.yaml", {"eval_sft.tasks": ["web_perplexity"]})


# ---- hostile config input (issue 31): bounded parsing, one line, no file content in the message -----------------

BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))  # 9^9 values


@pytest.mark.parametrize("content, message", [
    (BOMB, "with its aliases expanded it has more than 100000 values"),
    ("a: " + "[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels at line 1, column 67"),
    (bytes(range(256)) * 4, "is not UTF-8 text"),
    ("run_root: x\x00", "control character at position 11"),
    ("n: " + "9" * 5000, "a value cannot be converted"),
    ("x: !!python/object/apply:os.system [touch pwned]", "could not determine a constructor"),
    ("database_password: hunter2: 'hunter3'\n", "mapping values are not allowed here at line 1, column 27"),
    ("database_password: hunter2\n", "unknown key 'database_password'"),
])
def test_a_hostile_config_file_is_one_line_without_its_content(content, message, tmp_path, capsys):
    from flows.cli import main

    path = tmp_path / "config.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["run", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config error: ") and message in err and err.count("\n") == 1, err
    assert "hunter" not in err and "lol" not in err
    assert not (tmp_path / "pwned").exists()


def test_a_directory_or_device_as_config_file_is_one_line(tmp_path, capsys):
    from flows.cli import main

    for path, message in [(tmp_path, "is not a file"), (Path("/dev/zero"), "is not a file"),
                          (tmp_path / "nope.yaml", "does not exist")]:
        assert main(["run", "-c", str(path)]) == 2
        assert capsys.readouterr().err == f"error: config error: config file {str(path)!r} {message}\n"


def test_override_values_are_bounded_like_files():
    with pytest.raises(ConfigError, match="override 'spark.conf' is not valid YAML: with its aliases expanded"):
        parse_override("spark.conf={" + ", ".join(f"k{i}: &v{i} [{', '.join([f'*v{i - 1}'] * 9)}]" if i else
                                                  "k0: &v0 [1, 1, 1, 1, 1, 1, 1, 1, 1]" for i in range(9)) + "}")
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        parse_override("spark.conf=" + "[" * 10_000)
    assert parse_override("x=[&a 1, *a]") == (["x"], [1, 1])  # a few aliases stay fine (configs/tiny.yaml uses them)
