"""Validated megatron-core ``dist_checkpointing`` checkpoints: save, validate, find the newest good one, load.

Layout: ``SAVE_DIR/iter_0000010/`` holds the torch_dist files plus ``refinery.json`` (step, arch,
parallel layout, and size + sha256 of every file), written last by rank 0 after all ranks
finished; the directory is renamed into place only then. A checkpoint without ``refinery.json``
or with a file whose size or hash differs is rejected with a :class:`CheckpointError` naming the
file, and :func:`latest_valid` falls back to the previous good one; so is one whose pickled parts
(torch_dist's ``.metadata``, byte items, ``common.pt``) hold anything but data (a planted file).

The saved state: model and optimizer as sharded tensors (so a checkpoint loads at another
TP/PP), per-rank RNG states as a sharded object (restored when the layout matches), and the
training state (step, sampler position, LR scheduler, spike guard, skip ledger) as common state.
Calls that save or load must be made from every rank; scripts need an ``if __name__ ==
"__main__"`` guard because dist_checkpointing starts a multiprocessing Manager.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

from training.megatron.parallel import layout

META = "refinery.json"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards
PREFIX = "iter_"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or corrupt."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_records(ckpt_dir: Path) -> dict[str, dict]:
    """Size and sha256 of every file under a checkpoint dir (except the metadata itself)."""
    return {
        str(p.relative_to(ckpt_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(ckpt_dir.rglob("*"))
        if p.is_file() and p.name != META
    }


def read_metadata(ckpt_dir: str | Path) -> dict:
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {META}: the save did not complete")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META} is not valid JSON ({exc})") from None


def validate(ckpt_dir: str | Path) -> dict:
    """The checkpoint's metadata if every recorded file is present with its size and hash; else CheckpointError."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_metadata(ckpt_dir)
    if not meta.get("files"):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META} lists no files")
    for name, rec in meta["files"].items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {name} is missing")
        size = path.stat().st_size
        if size != rec["size"]:
            raise CheckpointError(
                f"checkpoint {ckpt_dir}: file {name} has {size} bytes, {rec['size']} recorded (truncated?)"
            )
        if _sha256(path) != rec["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {name} fails its sha256 check (corrupt)")
    _check_data_only(ckpt_dir)
    return meta


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's ``.metadata``: its data classes, torch sizes and dtypes; nothing else."""

    def find_class(self, module: str, name: str):
        import torch

        dcp = module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
        named = (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                                   ("torch.serialization", "_get_layout"), ("torch", "Size")}
        found = super().find_class(module, name) if dcp or named or module == "torch" else None
        if not (named or dcp and isinstance(found, type) or isinstance(found, torch.dtype)):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return found


def _check_data_only(ckpt_dir: Path) -> None:
    """Refuse a checkpoint whose pickled parts hold more than data: torch.distributed.checkpoint unpickles its
    ``.metadata`` and loads byte items with ``weights_only=False``, so both are read here first, as data only."""
    import megatron.core  # noqa: F401 (registers the classes its common state may hold as safe globals)
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        if (ckpt_dir / "common.pt").is_file():
            torch.load(ckpt_dir / "common.pt", map_location="cpu", weights_only=True)
        with open(ckpt_dir / DCP_METADATA, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        for index, info in metadata.storage_data.items():
            if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
                if getattr(info, "transform_descriptors", None):
                    raise pickle.UnpicklingError(f"item {index.fqn} is transformed")
                with open(ckpt_dir / info.relative_path, "rb") as fh:
                    fh.seek(info.offset)
                    torch.load(io.BytesIO(fh.read(info.length)), weights_only=True)
    except (pickle.UnpicklingError, AttributeError, EOFError, OSError, RuntimeError, TypeError) as exc:
        why = next((line.strip() for line in str(exc).splitlines() if "nsupported" in line), str(exc).split("\n")[0])
        raise CheckpointError(f"checkpoint {ckpt_dir}: refused, its pickled parts are not data only ({why})") from None


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """Checkpoint dirs under save_dir, newest step first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def latest_valid(save_dir: str | Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """(newest checkpoint that validates or None, [(rejected dir, reason), ...])."""
    rejected = []
    for ckpt in list_checkpoints(save_dir):
        try:
            validate(ckpt)
            return ckpt, rejected
        except CheckpointError as exc:
            rejected.append((str(ckpt), str(exc)))
    return None, rejected


def _rng_object(ranks: dict, state=None):
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if state is None:
        state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["tracker"] = get_cuda_rng_tracker().get_states()
    return ShardedObject(
        "rng_state", state, (ranks["pp"], ranks["tp"], ranks["dp"]),
        (ranks["pp_rank"], ranks["tp_rank"], ranks["dp_rank"]), replica_id=0,
    )


def _set_rng(state: dict) -> None:
    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def drop_storage_meta(ckpt: Path) -> None:
    """torch.distributed.checkpoint writes the save's absolute directory and a random save id into
    ``.metadata`` (``storage_meta``: informational, a load sets its own); drop it, so equal weights and
    state give byte-equal checkpoints on any path."""
    path = ckpt / DCP_METADATA
    metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    metadata.storage_meta = None
    path.write_bytes(pickle.dumps(metadata))


def save(save_dir: str | Path, step: int, model, optimizer, train_state: dict, arch: dict, keep_last: int = 2) -> Path:
    """Save on every rank; returns the final checkpoint dir (renamed into place once complete)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(step)
    tmp = save_dir / f".{final.name}.tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    here = layout()
    model_sd = model.sharded_state_dict(prefix="")
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd),
        "rng": _rng_object(here),
        "train_state": train_state,
    }
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank0:
        drop_storage_meta(tmp)
        meta = {
            "step": step, "arch": arch, "layout": {k: here[k] for k in ("tp", "pp", "dp")},
            "skip_ledger": train_state.get("skip_ledger", []), "files": file_records(tmp),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(save_dir)[max(keep_last, 1):]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(ckpt_dir: str | Path, model, optimizer=None) -> dict:
    """Load model (+ optimizer, + RNG when the layout matches) on every rank; returns the train state."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    meta = validate(ckpt_dir)
    here = layout()
    model_sd = model.sharded_state_dict(prefix="")
    request = {"model": model_sd}
    # a step-0 checkpoint (the first rollback target) is saved before the first update: Adam has no moments yet
    optimizer_saved = optimizer is not None and meta["step"] > 0
    if optimizer_saved:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    same_layout = meta["layout"] == {k: here[k] for k in ("tp", "pp", "dp")}
    if same_layout:
        request["rng"] = _rng_object(here, state={})
    loaded = dist_checkpointing.load(request, str(ckpt_dir))
    model.load_state_dict(loaded["model"])
    if optimizer_saved:
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        reset_optimizer(optimizer)
    if same_layout:
        _set_rng(loaded["rng"])
    state = loaded.get("train_state")
    if state is None:
        state = dist_checkpointing.load_common_state_dict(str(ckpt_dir))["train_state"]
    return state


def reset_optimizer(optimizer) -> None:
    """The optimizer as before its first update: no moments, main (fp32) params copied from the model."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        part.optimizer.state.clear()
        part.reload_model_params()


def load_model_only(ckpt_dir: str | Path, model) -> dict:
    """Load only the model weights (e.g. for export at TP=PP=1); returns the metadata."""
    from megatron.core import dist_checkpointing

    meta = validate(ckpt_dir)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict(prefix="")}, str(ckpt_dir))
    model.load_state_dict(loaded["model"])
    return meta
