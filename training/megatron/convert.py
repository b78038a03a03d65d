"""HF Llama ⇄ Megatron ``GPTModel`` state dicts (Llama-style local layer spec).

Name map per layer ``i`` (HF ``model.layers.i.`` → Megatron ``decoder.layers.i.``):

- ``self_attn.{q,k,v}_proj`` → ``self_attention.linear_qkv``, interleaved per query group:
  ``[q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]`` (rows of ``head_dim``);
- ``self_attn.o_proj`` → ``self_attention.linear_proj``;
- ``mlp.{gate,up}_proj`` → ``mlp.linear_fc1`` = ``cat(gate, up)`` (SwiGLU), ``mlp.down_proj`` → ``linear_fc2``;
- ``input_layernorm`` / ``post_attention_layernorm`` → ``input_layernorm`` / ``pre_mlp_layernorm``;
- ``model.embed_tokens`` / ``model.norm`` / ``lm_head`` → ``embedding.word_embeddings`` /
  ``decoder.final_layernorm`` / ``output_layer`` (absent with tied embeddings).

Both layouts here are *full* (TP=1, PP=1). :func:`shard_for_rank` cuts the full Megatron dict
into one rank's piece: column-parallel weights (QKV by whole query groups, embedding, output
layer) split along rows, row-parallel weights along columns, ``linear_fc1`` as
``cat(gate_r, up_r)``, and pipeline stages take their slice of layers renumbered from 0.
RoPE uses the same rotate-half convention on both sides, so Q/K rows are not permuted.

``python -m training.megatron.convert export --checkpoint DIR --out HF_DIR [--tokenizer DIR]``
exports a dist checkpoint (any TP/PP) to an HF Llama safetensors directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from training.megatron import checkpoint as ckpt
from training.megatron.model import LlamaArch
from training.megatron.parallel import initialize, teardown

COLUMN_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight", "linear_qkv.weight")
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def _qkv_interleave(q, k, v, arch: LlamaArch):
    hd, groups = arch.head_dim, arch.num_query_groups
    per_group = arch.num_attention_heads // groups
    h = q.shape[-1]
    import torch

    return torch.cat(
        [q.reshape(groups, per_group * hd, h), k.reshape(groups, hd, h), v.reshape(groups, hd, h)], dim=1
    ).reshape(-1, h)


def _qkv_split(qkv, arch: LlamaArch):
    hd, groups = arch.head_dim, arch.num_query_groups
    per_group = arch.num_attention_heads // groups
    h = qkv.shape[-1]
    grouped = qkv.reshape(groups, (per_group + 2) * hd, h)
    q = grouped[:, : per_group * hd].reshape(-1, h)
    k = grouped[:, per_group * hd : (per_group + 1) * hd].reshape(-1, h)
    v = grouped[:, (per_group + 1) * hd :].reshape(-1, h)
    return q, k, v


def hf_to_megatron(hf: dict, arch: LlamaArch) -> dict:
    """Full HF Llama state dict → full Megatron state dict (TP=1, PP=1)."""
    import torch

    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not arch.tie_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(arch.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        out[dst + "self_attention.linear_qkv.weight"] = _qkv_interleave(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], arch,
        )
        out[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0
        )
        out[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
    return out


def megatron_to_hf(meg: dict, arch: LlamaArch) -> dict:
    """Full Megatron state dict (TP=1, PP=1) → full HF Llama state dict."""
    out = {
        "model.embed_tokens.weight": meg["embedding.word_embeddings.weight"],
        "model.norm.weight": meg["decoder.final_layernorm.weight"],
    }
    out["lm_head.weight"] = meg["embedding.word_embeddings.weight" if arch.tie_embeddings else "output_layer.weight"]
    for i in range(arch.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = meg[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = meg[src + "pre_mlp_layernorm.weight"]
        q, k, v = _qkv_split(meg[src + "self_attention.linear_qkv.weight"], arch)
        out[dst + "self_attn.q_proj.weight"], out[dst + "self_attn.k_proj.weight"] = q, k
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.o_proj.weight"] = meg[src + "self_attention.linear_proj.weight"]
        gate, up = meg[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = meg[src + "mlp.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _layers_of_stage(arch: LlamaArch, pp: int, pp_rank: int) -> range:
    if arch.num_layers % pp:
        raise ValueError(f"num_layers {arch.num_layers} is not divisible by PP={pp}")
    per = arch.num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def shard_for_rank(full: dict, arch: LlamaArch, tp: int, tp_rank: int, pp: int = 1, pp_rank: int = 0) -> dict:
    """One (TP, PP) rank's local Megatron state dict cut from the full one."""
    import torch

    if arch.num_query_groups % tp or arch.num_attention_heads % tp:
        raise ValueError(
            f"TP={tp} must divide num_query_groups={arch.num_query_groups} and heads={arch.num_attention_heads}"
        )
    layers = _layers_of_stage(arch, pp, pp_rank)
    first, last = pp_rank == 0, pp_rank == pp - 1
    out = {}
    for name, tensor in full.items():
        if name.startswith("decoder.layers."):
            idx = int(name.split(".")[2])
            if idx not in layers:
                continue
            name = name.replace(f"decoder.layers.{idx}.", f"decoder.layers.{idx - layers.start}.", 1)
        elif name.startswith("embedding."):
            if not first:
                continue
        elif name.startswith(("decoder.final_layernorm", "output_layer")):
            if not last:
                continue
        if name.endswith("linear_fc1.weight"):
            gate, up = tensor.chunk(2, dim=0)
            tensor = torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
        elif name.endswith(COLUMN_PARALLEL):
            tensor = tensor.chunk(tp, dim=0)[tp_rank]
        elif name.endswith(ROW_PARALLEL):
            tensor = tensor.chunk(tp, dim=1)[tp_rank]
        out[name] = tensor.clone()
    if last and pp > 1 and arch.tie_embeddings:  # the last stage holds its own copy of the tied embedding
        out["output_layer.weight"] = full["embedding.word_embeddings.weight"].chunk(tp, dim=0)[tp_rank].clone()
    return out


def load_into_model(model, local: dict) -> None:
    """Copy a local Megatron state dict into a model; every parameter must be covered."""
    result = model.load_state_dict(local, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {result.unexpected_keys}")


# ---- HF directories --------------------------------------------------------------------------


def read_hf(hf_dir: str | Path, seq_length: int) -> tuple[LlamaArch, dict]:
    """(arch, full fp32 state dict) of an HF Llama directory."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    hf_dir = Path(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    if config.model_type != "llama":
        raise ValueError(f"{hf_dir}: model_type {config.model_type!r} is not llama")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{hf_dir}: no *.safetensors weights")
    state = {}
    for f in files:
        state.update({k: v.to(torch.float32) for k, v in load_file(f).items()})
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return LlamaArch.from_hf(config, seq_length), state


def hf_config(arch: LlamaArch, bos_id: int | None = None, eos_id: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups, head_dim=arch.head_dim,
        max_position_embeddings=arch.seq_length, rms_norm_eps=arch.norm_eps, rope_theta=arch.rope_theta,
        tie_word_embeddings=arch.tie_embeddings, initializer_range=arch.init_std,
        attention_bias=False, mlp_bias=False, bos_token_id=bos_id, eos_token_id=eos_id,
        torch_dtype="float32",
    )


def write_hf(out_dir: str | Path, arch: LlamaArch, hf_state: dict, tokenizer_dir: str | Path | None = None) -> Path:
    """Save an HF Llama directory (config + model.safetensors [+ tokenizer]) atomically."""

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    eos = bos = None
    if tokenizer_dir:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        eos, bos = tok.eos_token_id, tok.bos_token_id
    hf_config(arch, bos, eos).save_pretrained(tmp)
    state = dict(hf_state)
    if arch.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """A dist checkpoint (any TP/PP) → HF Llama directory; call from a single process."""
    meta = ckpt.read_metadata(checkpoint)
    arch = LlamaArch(**meta["arch"])
    initialize(tp=1, pp=1, seed=0)
    try:
        from training.megatron.model import build_model

        model = build_model(arch, 1, 1)
        ckpt.load_model_only(checkpoint, model)
        full = {k: v.detach().float() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    finally:
        teardown()
    return write_hf(out_dir, arch, megatron_to_hf(full, arch), tokenizer_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a Megatron dist checkpoint to an HF Llama directory.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--tokenizer")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out, args.tokenizer)
    print(json.dumps({"exported": str(out)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
