"""The one resolver for a stage's model setting: ``upstream`` (the upstream stage's ``hf/``) or an
external model (a local HF directory; ``smollm2`` is covered by the stage tests that use it)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from training.models import ModelSourceError, model_input, stage_model_dir


def hf_dir(path: Path, tokenizer: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def context(stage: str, upstream: dict[str, Path] | None = None, external: dict[str, Path] | None = None):
    """The part of a StageContext the resolver reads: stage name, inputs by stage, external inputs."""
    upstream = upstream or {}
    outputs = {name: SimpleNamespace(path=lambda key, root=root: root / key) for name, root in upstream.items()}
    return SimpleNamespace(stage=stage, inputs=outputs, input=outputs.__getitem__, external_inputs=external or {})


def test_upstream_is_the_upstream_stages_hf_dir(tmp_path):
    hf = hf_dir(tmp_path / "run" / "sft" / "hf")
    assert stage_model_dir(context("grpo", {"sft": hf.parent}), "model", "upstream", "sft") == hf


def test_upstream_missing_names_the_setting_the_stage_and_the_fix():
    with pytest.raises(ModelSourceError, match=r"grpo\.reward_model is 'upstream' but no 'reward' output.*"
                                               r"run reward first, or set grpo\.reward_model: a reward dir"):
        stage_model_dir(context("grpo"), "reward_model", "upstream", "reward", hint="a reward dir")


def test_external_model_comes_from_the_hashed_external_input(tmp_path):
    recorded = hf_dir(tmp_path / "recorded")
    ctx = context("sft", external={"model": recorded})
    # the executor resolved and hashed the setting; the stage uses that path, not the raw setting
    assert stage_model_dir(ctx, "model", "some/alias", "pretrain") == recorded
    # a setting not among the external inputs (pretrain's init_from: smollm2) resolves itself
    own = hf_dir(tmp_path / "own")
    assert stage_model_dir(context("pretrain"), "init_from", str(own)) == own


def test_a_directory_that_is_not_an_hf_checkpoint_is_a_clear_error(tmp_path):
    no_tok = hf_dir(tmp_path / "m", tokenizer=False)
    with pytest.raises(ModelSourceError, match="no tokenizer"):
        stage_model_dir(context("sft", external={"model": no_tok}), "model", str(no_tok), "pretrain")
    with pytest.raises(ModelSourceError, match="neither 'smollm2' nor an existing directory"):
        model_input("model", str(tmp_path / "missing"))


def test_model_input_only_for_external_models(tmp_path):
    d = hf_dir(tmp_path / "m")
    assert model_input("model", "upstream") == {} and model_input("init_from", None) == {}
    assert model_input("model", str(d)) == {"model": str(d)}
