"""Crash and resume (issue 16): a stage process killed with SIGKILL after a checkpoint, then the same command
again, resumes from that checkpoint (not step 0), and its per-step losses equal an uninterrupted run's on the
same seed, exactly; the accepted output appears only once complete and no temp or resume dir is left.

``pretrain`` (megatron-core under torchrun) is killed when its step-2 checkpoint appears; ``sft`` (the torch
learner, in the stage process) kills itself right after writing its first checkpoint (a deterministic point).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent

KILL_AFTER_FIRST_SAVE = """
import os, runpy, signal, sys
import training.learner as learner
save = learner.save_state
def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
learner.save_state = save_then_die
sys.argv[0] = "stage_process"
runpy.run_module("flows.stage_process", run_name="__main__")
"""


def _config_json(make_config, root: Path, overrides: dict) -> Path:
    config = make_config({**overrides, "run_root": str(root / "runs")})
    path = root / "config.json"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    return path


def _stage_cmd(stage: str, config_json: Path, prefix: list[str] | None = None) -> list[str]:
    return [*(prefix or [sys.executable, "-m", "flows.stage_process"]),
            "--stage", stage, "--run-id", "r", "--config-json", str(config_json)]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, **kw)


def _manifest(root: Path, stage: str) -> dict:
    return json.loads((root / "runs" / "r" / stage / "manifest.json").read_text())


def _assert_clean(runs: Path) -> None:
    assert not list((runs / "r").glob(".tmp-*")), "a temp dir was left behind"
    assert not [p for p in (runs / ".resume").iterdir()], "the resume dir was not removed after success"


# ---- sft: the torch learner ------------------------------------------------------------------------------


SFT = {"sft.steps": 6, "sft.save_every": 2, "sft.batch_size": 2, "sft.max_len": 128, "sft.lr": 1e-3,
       "sft.warmup_steps": 1, "sft.max_eval_examples": 4}


@pytest.fixture(scope="module")
def tiny_sft_model(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from training.data import prepare_tokenizer
    from training.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    prepare_tokenizer(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_sft_killed_after_a_checkpoint_resumes_with_identical_losses(make_config, tiny_sft_model, tmp_path):
    overrides = {**SFT, "sft.model": str(tiny_sft_model)}
    base, crash = tmp_path / "uninterrupted", tmp_path / "crashed"
    base.mkdir(), crash.mkdir()
    done = _run(_stage_cmd("sft", _config_json(make_config, base, overrides)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = _manifest(base, "sft")["tables"]["train_log"]

    cfg = _config_json(make_config, crash, overrides)
    killed = _run(_stage_cmd("sft", cfg, [sys.executable, "-c", KILL_AFTER_FIRST_SAVE]))
    assert killed.returncode == -signal.SIGKILL
    assert not (crash / "runs" / "r" / "sft").exists(), "a killed stage's output was accepted"
    assert [p.name for p in (crash / "runs" / ".resume").glob("sft-*/*")] == ["learner_state.pt"]

    rerun = _run(_stage_cmd("sft", cfg))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumed from step 2" in rerun.stdout
    manifest = _manifest(crash, "sft")
    assert manifest["metrics"]["resumed_from_step"] == 2
    got = manifest["tables"]["train_log"]
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # exact: same ops, same state
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in expected]
    assert manifest["outputs"]["hf"]["hash"] == _manifest(base, "sft")["outputs"]["hf"]["hash"]
    _assert_clean(crash / "runs")


# ---- pretrain: megatron-core under torchrun ---------------------------------------------------------------


PRETRAIN = {"pretrain.steps": 10, "pretrain.save_every": 2, "pretrain.keep_checkpoints": 2,
            "pretrain.warmup_steps": 2, "pretrain.global_batch_size": 8, "pretrain.micro_batch_size": 2,
            "pretrain.seq_length": 64, "pretrain.spike.enabled": False}


def _fake_upstream(runs: Path, stage: str, output: str, src: Path) -> None:
    """A completed ``stage`` in run ``r`` whose one output is a copy of ``src``."""
    import shutil

    from infra.runstore import content_hash, listing, write_json_atomic

    path = runs / "r" / stage / output
    shutil.copytree(src, path)
    write_json_atomic(path.parent / "manifest.json", {
        "run_id": "r", "stage": stage, "outputs": {output: {
            "path": str(path), "uri": path.as_uri(), "hash": content_hash(path), "files": listing(path)}}})


@pytest.fixture(scope="module")
def shards(shared_data, tmp_path_factory):
    from test_training_pretrain import make_corpus

    return make_corpus(shared_data, tmp_path_factory.mktemp("corpus"))


def _losses(root: Path) -> dict[int, float]:
    path = Path(_manifest(root, "pretrain")["outputs"]["metrics"]["path"]) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "event" not in r}


@pytest.mark.slow
def test_pretrain_killed_after_a_checkpoint_resumes_with_identical_losses(make_config, shards, tmp_path):
    roots = {}
    for name in ("uninterrupted", "crashed"):
        root = roots[name] = tmp_path / name
        root.mkdir()
        _fake_upstream(root / "runs", "tokenize", "shards", shards[0])
        _fake_upstream(root / "runs", "tokenizer", "tokenizer", shards[1])
    done = _run(_stage_cmd("pretrain", _config_json(make_config, roots["uninterrupted"], PRETRAIN)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = _losses(roots["uninterrupted"])
    assert sorted(expected) == list(range(1, 11))

    crash = roots["crashed"]
    cfg = _config_json(make_config, crash, PRETRAIN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_stage_cmd("pretrain", cfg), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not list((crash / "runs" / ".resume").glob("pretrain-*/checkpoints/iter_0000002")):
        assert proc.poll() is None, "the stage ended before the checkpoint appeared"
        assert time.time() < deadline, "no checkpoint after 600 s"
        time.sleep(0.02)
    tree = psutil.Process(proc.pid).children(recursive=True)  # torchrun and its rank
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=60)  # they get SIGTERM when the stage process dies
    assert not alive, [p.cmdline()[:4] for p in alive]
    assert not (crash / "runs" / "r" / "pretrain").exists(), "a killed stage's output was accepted"

    rerun = _run(_stage_cmd("pretrain", cfg))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    step = int(rerun.stdout.split("resumed from step ")[1].split()[0])
    assert 2 <= step < 10
    assert json.loads(_manifest(crash, "pretrain")["metrics"]["resumed_from_steps"]) == [step]
    assert _losses(crash) == expected  # exact: every step once, post-resume steps bit-identical
    _assert_clean(crash / "runs")


# ---- Prefect retries ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_prefect_retry_of_a_crashed_sft_resumes_from_its_checkpoint(tiny_sft_model, tmp_path, monkeypatch):
    """pipeline.retries: 1; the first stage process dies by SIGKILL after its step-2 checkpoint, the retry resumes."""
    from prefect.testing.utilities import prefect_test_harness

    from flows import stages

    marker = tmp_path / "first-attempt"
    python = tmp_path / "python"  # the stage task runs `python -m flows.stage_process ...`: crash the first one
    python.write_text(
        f'#!/bin/sh\nif [ ! -e {marker} ]; then touch {marker}; shift 2; exec {sys.executable} -c "$HOOK" "$@"; fi\n'
        f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("HOOK", KILL_AFTER_FIRST_SAVE)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    overrides = {**SFT, "sft.model": str(tiny_sft_model), "run_root": str(tmp_path / "runs"),
                 "pipeline.retries": 1, "pipeline.retry_delay_s": 0}
    with prefect_test_harness(server_startup_timeout=240):
        monkeypatch.setattr(stages.sys, "executable", str(python))  # after the harness started its server
        manifest = stages.STAGE_FLOWS["sft"](run_id="r", overrides=overrides)
    assert marker.exists(), "the first attempt did not run"
    assert manifest["metrics"]["resumed_from_step"] == 2
    assert [r["step"] for r in manifest["tables"]["train_log"]] == [1, 2, 3, 4, 5, 6]
    _assert_clean(tmp_path / "runs")


# ---- the resume state is data, never code -------------------------------------------------------------------


def _tiny_learner():
    import torch

    from training.learner_backends import TorchBackend
    from training.learner_config import LearnerConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    return model, TorchBackend(model, LearnerConfig(steps=4, lr=1e-2))


def _train_step(model, backend) -> float:
    import torch

    return backend.step(model(torch.randn(8, 4)).pow(2).mean())


def test_resume_state_round_trips_and_a_planted_pickle_is_refused(tmp_path):
    """A ``learner_state.pt`` planted under RUN_ROOT/.resume/ that would run ``os.system`` on unpickling is
    refused with a clear error and runs nothing; a state the learner saved resumes exactly."""
    import pickle
    import random

    import torch

    from training.learner_backends import ResumeStateError, load_state, save_state

    model, backend = _tiny_learner()
    _train_step(model, backend)
    path = tmp_path / "learner_state.pt"
    save_state(path, 1, model, backend, [{"step": 1, "loss": 0.5}], {"loss": ([1.0, 2.0], [1.0, 1.0])})
    expected = [_train_step(model, backend) for _ in range(2)], random.random()

    clone, clone_backend = _tiny_learner()
    state = load_state(path, clone, clone_backend)
    assert (state["step"], state["rows"], state["before"]) == (1, [{"step": 1, "loss": 0.5}],
                                                               {"loss": [[1.0, 2.0], [1.0, 1.0]]})
    assert ([_train_step(clone, clone_backend) for _ in range(2)], random.random()) == expected
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(path, "wb") as f:
        pickle.dump({"step": 1, "payload": Exploit()}, f)
    with pytest.raises(ResumeStateError, match=r"refusing resume state .*learner_state.pt: not plain tensors"):
        load_state(path, clone, clone_backend)
    torch.save({"step": 1, "payload": Exploit()}, path)  # the same inside torch's zip format
    with pytest.raises(ResumeStateError, match="delete it to start the stage from step 0"):
        load_state(path, clone, clone_backend)
    assert not marker.exists()
