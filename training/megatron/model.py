"""A Llama-architecture ``GPTModel`` from megatron-core: RMSNorm, SwiGLU, RoPE, no biases, GQA.

:class:`LlamaArch` holds the sizes (from our config or an HF ``LlamaConfig``); :func:`build_model`
builds this rank's pipeline stage of the model on the current parallel state.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from training.megatron import cpu


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


@functools.cache
def sdpa_attention_class():
    """Megatron's ``DotProductAttention`` computed by ``torch.nn.functional.scaled_dot_product_attention``.

    The local spec's ``DotProductAttention`` materialises the [b·heads, s, s] scores (baddbmm, masked
    softmax, bmm) and repeats the K/V heads for GQA: on CPU that is ~20% of a training step, and on a
    GPU without Transformer Engine (not installed: the local spec is what runs there too) it costs
    O(s²) activation memory per layer and unfused softmax kernels where SDPA runs flash attention. For the
    case our model runs (causal mask type, no explicit mask, no packed sequences, vanilla softmax,
    no attention dropout) this computes the same attention with torch's fused kernel (flash
    attention on CPU, GQA without copies); any other case goes to Megatron's own implementation.
    """
    import torch.nn.functional as F
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SdpaDotProductAttention(DotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            mask_type = attn_mask_type or self.attn_mask_type
            if (attention_mask is not None or mask_type != AttnMaskType.causal or attention_bias is not None
                    or packed_seq_params is not None or self.config.softmax_type != "vanilla"
                    or self.config.window_size is not None or self.config.attention_dropout
                    or self.config.apply_query_key_layer_scaling):
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params)
            # [s, b, heads, head_dim] -> [b, heads, s, head_dim]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                     enable_gqa=True)
            sq, b = context.shape[2], context.shape[0]
            return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    return SdpaDotProductAttention


def layer_spec():
    """The local (no Transformer Engine) Llama layer spec with SDPA core attention, on CPU and GPU alike."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = sdpa_attention_class()
    return spec


def build_model(arch: LlamaArch, tp: int = 1, pp: int = 1, dtype: str = "float32"):
    """This rank's stage of the GPTModel (``initialize_model_parallel`` must have run)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if arch.vocab_size % tp:
        raise ValueError(f"vocab_size {arch.vocab_size} is not divisible by TP={tp}; pad it (pad_vocab)")
    return GPTModel(
        config=transformer_config(arch, tp, pp, dtype),
        transformer_layer_spec=layer_spec(),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )
