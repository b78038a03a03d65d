"""CPU compat layer: lets megatron-core 0.16.1 train on CPU over gloo, active only without CUDA.

Megatron assumes a CUDA device in a handful of places. Measured with megatron-core 0.16.1 and
torch 2.13 CPU, these shims are enough for ``GPTModel`` with TP, PP and DP (Megatron DDP +
``get_megatron_optimizer``) and for ``dist_checkpointing`` resharding:

1. ``torch.cuda.current_device()`` returns ``"cpu"`` (``GlobalMemoryBuffer``, RoPE, p2p shapes
   allocate on it); ``synchronize``/``current_stream``/``default_stream``/``empty_cache`` are no-ops.
2. The CUDA RNG (``torch.cuda.get_rng_state``/``set_rng_state``/``manual_seed`` and Megatron's
   ``tensor_parallel.random._get/_set_cuda_rng_state`` used by its RNG tracker) maps onto the CPU
   generator, so the tracker forks and restores states as it does on a GPU.
3. The Megatron modules that allocate on the literal ``"cuda"`` device (``torch.zeros(...,
   device="cuda")`` in the schedules, optimizer, grad scaler, grad-norm and checkpoint code; see
   :data:`CUDA_FACTORY_MODULES`) get a proxy for their module-level ``torch`` name whose factory
   functions put those tensors on the CPU, and ``Tensor.cuda()`` is the identity (it can only raise
   on a CPU build). Every other torch call runs untouched: no process-wide ``TorchFunctionMode``,
   so the model's own ops pay no Python interception. A ``"cuda"`` factory in a module not on the
   list fails loudly ("Torch not compiled with CUDA enabled"), never silently.
4. ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor``; the optimizer gets the
   same clipping (scale every grad by ``max_norm / (total_norm + 1e-6)`` when that is < 1) without
   the assertion.

The distributed optimizer (``use_distributed_optimizer=True``) and the bf16 optimizer
(``dtype=bfloat16``) still reject CPU parameters; they are GPU-only options (:func:`check_optimizer_options`). On a machine with CUDA :func:`enable`
does nothing, so GPU behaviour is never changed.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

_ACTIVE = False
_SAVED: list[tuple[Any, str, Any]] = []  # (owner, attribute, original or _INHERITED) for disable()
_INHERITED = object()  # the attribute came from a base class: disable() deletes the override


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_cuda_device(device: Any) -> bool:
    import torch

    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


# Megatron modules whose code names the "cuda" device in a factory call (megatron-core 0.16.1).
CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.transformer.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)
_FACTORIES = frozenset({"tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
                        "zeros_like", "ones_like", "empty_like", "full_like"})


def _on_cpu(factory):
    def call(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return call


class _TorchOnCpu(types.ModuleType):
    """Stands in for ``torch`` inside one Megatron module: factories get ``device="cuda"`` → CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name: str):
        import torch

        value = getattr(torch, name)
        return _on_cpu(value) if name in _FACTORIES else value


def clip_grad_by_total_norm_cpu(parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False):
    """Megatron's ``clip_grad_by_total_norm_fp32`` without its CUDA tensor-type assertion."""
    import torch

    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _patch(owner: Any, name: str, value: Any) -> None:
    own = vars(owner)
    _SAVED.append((owner, name, own[name] if name in own else _INHERITED))
    setattr(owner, name, value)


def _patch_torch_cuda() -> None:
    import torch

    cuda = torch.cuda
    _patch(cuda, "current_device", lambda: "cpu")
    _patch(cuda, "synchronize", lambda device=None: None)
    _patch(cuda, "empty_cache", lambda: None)
    _patch(cuda, "current_stream", lambda device=None: None)
    _patch(cuda, "default_stream", lambda device=None: None)
    _patch(cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _patch(cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    # the CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all
    _patch(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _patch(cuda, "manual_seed_all", lambda seed: None)
    _patch(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


def _patch_megatron() -> None:
    import torch
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.tensor_parallel import random as megatron_random

    _patch(megatron_random, "_get_cuda_rng_state", lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    ))
    _patch(megatron_random, "_set_cuda_rng_state",
           lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    _patch(megatron_optimizer, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_cpu)
    for name in CUDA_FACTORY_MODULES:
        _patch(importlib.import_module(name), "torch", _TorchOnCpu())


def enable() -> bool:
    """Install the shims once per process if CUDA is absent; returns whether they are active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if cuda_available():
        return False
    _patch_torch_cuda()
    _patch_megatron()
    _ACTIVE = True
    return True


def disable() -> None:
    """Undo :func:`enable` (for tests sharing a process with code that expects plain torch)."""
    global _ACTIVE
    if not _ACTIVE:
        return
    while _SAVED:
        owner, name, original = _SAVED.pop()
        if original is _INHERITED:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _ACTIVE = False


def is_active() -> bool:
    return _ACTIVE


def check_optimizer_options(use_distributed_optimizer: bool, dtype: str = "float32") -> None:
    """Reject options the CPU path cannot run, with a clear message."""
    if _ACTIVE and use_distributed_optimizer:
        raise ValueError(
            "use_distributed_optimizer=True needs CUDA (megatron-core rejects CPU parameters); "
            "set pretrain.use_distributed_optimizer=false on CPU"
        )
    if _ACTIVE and dtype != "float32":
        raise ValueError(
            f"dtype {dtype} needs CUDA (megatron-core's Float16OptimizerWithFloat16Params accepts only CUDA "
            "parameters); set pretrain.precision=fp32 on CPU"
        )
