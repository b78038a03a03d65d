"""A Llama-architecture ``GPTModel`` from megatron-core: RMSNorm, SwiGLU, RoPE, no biases, GQA.

:class:`LlamaArch` holds the sizes (from our config or an HF ``LlamaConfig``); :func:`build_model`
builds this rank's pipeline stage of the model on the current parallel state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LlamaArch:
    """Model sizes; ``vocab_size`` is the padded size the embedding is built with."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 172
    vocab_size: int = 512
    seq_length: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf_config, seq_length: int) -> "LlamaArch":
        """Sizes of an HF ``LlamaConfig`` (RoPE scaling and attention biases are not supported)."""
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise ValueError("HF Llama models with attention/MLP biases are not supported")
        rope = getattr(hf_config, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"RoPE scaling {rope} is not supported")
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
            raise ValueError("head_dim * num_attention_heads must equal hidden_size")
        rope_theta = getattr(hf_config, "rope_theta", None)
        if rope_theta is None:  # transformers 5 keeps it in rope_parameters
            rope_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return cls(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads,
            num_query_groups=hf_config.num_key_value_heads,
            ffn_hidden_size=hf_config.intermediate_size,
            vocab_size=hf_config.vocab_size,
            seq_length=seq_length,
            rope_theta=float(rope_theta),
            norm_eps=hf_config.rms_norm_eps,
            tie_embeddings=bool(hf_config.tie_word_embeddings),
            init_std=hf_config.initializer_range,
        )


def pad_vocab(vocab_size: int, multiple: int = 128) -> int:
    """Vocab padded up to a multiple (it must divide evenly across TP ranks)."""
    return -(-vocab_size // multiple) * multiple


def transformer_config(arch: LlamaArch, tp: int = 1, pp: int = 1, dtype: str = "float32"):
    """megatron-core ``TransformerConfig`` for the architecture, with fusions that need CUDA off."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from training.megatron import cpu

    on_cpu = not cpu.cuda_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_std,
        params_dtype=getattr(torch, dtype),
        bf16=dtype == "bfloat16",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=on_cpu,
        pipeline_dtype=getattr(torch, dtype),
    )


def build_model(arch: LlamaArch, tp: int = 1, pp: int = 1, dtype: str = "float32"):
    """This rank's stage of the GPTModel (``initialize_model_parallel`` must have run)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if arch.vocab_size % tp:
        raise ValueError(f"vocab_size {arch.vocab_size} is not divisible by TP={tp}; pad it (pad_vocab)")
    return GPTModel(
        config=transformer_config(arch, tp, pp, dtype),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )
