"""Process group + megatron-core parallel state: gloo and the CPU compat layer without CUDA, NCCL with it."""

from __future__ import annotations

import os
import tempfile

from training.megatron import cpu


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """Init torch.distributed (from torchrun's env, or a 1-process group) and Megatron's TP×PP×DP groups."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    on_cpu = cpu.enable() or not torch.cuda.is_available()
    if not dist.is_initialized():
        backend = "gloo" if on_cpu else "nccl"
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:  # launched by torchrun
            dist.init_process_group(backend)
        else:  # a single process (export, tests): a file store, no TCP port that another process could take
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            store = dist.FileStore(tempfile.mktemp(prefix="refinery-pg-"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by TP×PP = {tp}×{pp}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def teardown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def layout() -> dict:
    """This rank's coordinates and the group sizes."""
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(), "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
    }
