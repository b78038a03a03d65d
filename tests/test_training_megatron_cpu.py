"""The CPU compat layer: what it patches behaves as megatron-core expects, and it undoes cleanly."""

from __future__ import annotations

import pytest


@pytest.fixture
def compat():
    from training.megatron import cpu

    if cpu.cuda_available():
        pytest.skip("the compat layer is inactive on a CUDA machine")
    assert cpu.enable() and cpu.enable()  # idempotent
    yield cpu
    cpu.disable()


def test_cuda_factory_calls_in_megatron_and_current_device_land_on_cpu(compat):
    import torch
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.utils import get_default_causal_mask

    assert torch.cuda.current_device() == "cpu"
    assert schedules.torch.zeros(3, device="cuda").device.type == "cpu"
    assert schedules.torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor and schedules.torch.float32 is torch.float32
    assert get_default_causal_mask(4).device.type == "cpu"
    t = torch.ones(2)
    assert t.cuda() is t
    torch.cuda.synchronize()


def test_torch_itself_is_not_intercepted(compat):
    import torch
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_megatron_rng_tracker_forks_and_restores_the_cpu_generator(compat):
    import torch
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 42)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with tracker.fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with tracker.fork():
        again = torch.rand(4)
    assert not torch.equal(inside, again)  # the tracked stream advanced
    torch.cuda.manual_seed(42)
    assert torch.equal(torch.rand(4), inside)  # the tracker seeded the CPU generator with 42


def test_grad_clipping_scales_to_the_max_norm(compat):
    import torch
    from megatron.core.optimizer import optimizer as megatron_optimizer

    assert megatron_optimizer.clip_grad_by_total_norm_fp32 is compat.clip_grad_by_total_norm_cpu
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    ref = [p.grad.clone() for p in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref])).item()
    compat.clip_grad_by_total_norm_cpu(params, 1.0, total)
    clipped_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()
    assert clipped_norm == pytest.approx(1.0, rel=1e-5)
    compat.clip_grad_by_total_norm_cpu(params, 10.0, clipped_norm)  # below the limit: untouched
    assert torch.linalg.vector_norm(params[0].grad).item() == pytest.approx(
        torch.linalg.vector_norm(ref[0]).item() / total, rel=1e-5)


def test_distributed_optimizer_is_rejected_clearly_on_cpu(compat):
    with pytest.raises(ValueError, match="needs CUDA"):
        compat.check_optimizer_options(use_distributed_optimizer=True)
    compat.check_optimizer_options(use_distributed_optimizer=False)


def test_bf16_optimizer_is_rejected_clearly_on_cpu(compat):
    with pytest.raises(ValueError, match="dtype bfloat16 needs CUDA"):
        compat.check_optimizer_options(use_distributed_optimizer=False, dtype="bfloat16")
    compat.check_optimizer_options(use_distributed_optimizer=False, dtype="float32")


def test_disable_restores_plain_torch(compat):
    import torch

    from megatron.core.pipeline_parallel import schedules

    compat.disable()
    assert not compat.is_active()
    assert schedules.torch is torch and "cuda" not in vars(torch.Tensor)
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()
    compat.enable()
