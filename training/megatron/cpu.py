"""CPU compat layer: lets megatron-core 0.16.1 train on CPU over gloo, active only without CUDA.

Megatron assumes a CUDA device in a handful of places. Measured with megatron-core 0.16.1 and
torch 2.13 CPU, these shims are enough for ``GPTModel`` with TP, PP and DP (Megatron DDP +
``get_megatron_optimizer``) and for ``dist_checkpointing`` resharding:

1. ``torch.cuda.current_device()`` returns ``"cpu"`` (``GlobalMemoryBuffer``, RoPE, p2p shapes
   allocate on it); ``synchronize``/``current_stream``/``default_stream``/``empty_cache`` are no-ops.
2. The CUDA RNG (``torch.cuda.get_rng_state``/``set_rng_state``/``manual_seed`` and Megatron's
   ``tensor_parallel.random._get/_set_cuda_rng_state`` used by its RNG tracker) maps onto the CPU
   generator, so the tracker forks and restores states as it does on a GPU.
3. A ``TorchFunctionMode`` rewrites ``device="cuda"`` in factory calls (``torch.zeros(...,
   device="cuda")`` in the schedules, optimizer and grad-norm code) to CPU and makes
   ``Tensor.cuda()`` the identity.
4. ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor``; the optimizer gets the
   same clipping (scale every grad by ``max_norm / (total_norm + 1e-6)`` when that is < 1) without
   the assertion.

The distributed optimizer (``use_distributed_optimizer=True``) still rejects CPU parameters; it
is a GPU-only option (:func:`check_optimizer_options`). On a machine with CUDA :func:`enable`
does nothing, so GPU behaviour is never changed.
"""

from __future__ import annotations

from typing import Any

_ACTIVE = False
_MODE = None
_SAVED: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) for disable()


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


def _make_mode():
    import torch
    from torch.overrides import TorchFunctionMode

    class CudaToCpu(TorchFunctionMode):
        """Rewrites ``device="cuda..."`` (kwarg or ``.to`` argument) to CPU; ``Tensor.cuda`` is identity."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.cuda:
                return args[0]
            device = kwargs.get("device")
            if device is not None and _is_cuda_device(device):
                kwargs = {**kwargs, "device": "cpu"}
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
            return func(*args, **kwargs)

    return CudaToCpu()


def clip_grad_by_total_norm_cpu(parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False):
    """Megatron's ``clip_grad_by_total_norm_fp32`` without its CUDA tensor-type assertion."""
    import torch

    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _patch(owner: Any, name: str, value: Any) -> None:
    _SAVED.append((owner, name, getattr(owner, name)))
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


def enable() -> bool:
    """Install the shims once per process if CUDA is absent; returns whether they are active."""
    global _ACTIVE, _MODE
    if _ACTIVE:
        return True
    if cuda_available():
        return False
    _patch_torch_cuda()
    _patch_megatron()
    _MODE = _make_mode()
    _MODE.__enter__()  # process-wide: every later torch call sees it
    _ACTIVE = True
    return True


def disable() -> None:
    """Undo :func:`enable` (for tests sharing a process with code that expects plain torch)."""
    global _ACTIVE, _MODE
    if not _ACTIVE:
        return
    _MODE.__exit__(None, None, None)
    while _SAVED:
        owner, name, original = _SAVED.pop()
        setattr(owner, name, original)
    _ACTIVE, _MODE = False, None


def is_active() -> bool:
    return _ACTIVE


def check_optimizer_options(use_distributed_optimizer: bool) -> None:
    """Reject options the CPU path cannot run, with a clear message."""
    if _ACTIVE and use_distributed_optimizer:
        raise ValueError(
            "use_distributed_optimizer=True needs CUDA (megatron-core rejects CPU parameters); "
            "set pretrain.use_distributed_optimizer=false on CPU"
        )
