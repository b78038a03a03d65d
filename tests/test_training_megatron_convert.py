"""HF Llama ⇄ Megatron GPTModel conversion: logits match (fp32, max abs diff <= 1e-3) on real text, both ways;
the CPU model's SDPA core attention computes what Megatron's own ``DotProductAttention`` does."""

from __future__ import annotations

import gzip

import pytest


@pytest.fixture
def megatron_1proc():
    """A 1-process gloo group with TP=PP=1 and the CPU compat layer, undone afterwards."""
    from training.megatron import cpu
    from training.megatron.parallel import initialize, teardown

    initialize(1, 1, seed=0)
    yield
    teardown()
    cpu.disable()


def text_ids(shared_data, tokenizer, n_tokens: int = 64):
    import torch

    text = gzip.open(shared_data / "wikitext2_valid_test" / "valid.txt.gz", "rt").read()[:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return torch.cat([ids, ids.flip(1)])  # batch of 2


def megatron_logits(model, ids):
    import torch

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, None)


def check_both_directions(hf_model, ids, seq_length: int, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from training.megatron.convert import hf_to_megatron, load_into_model, megatron_to_hf, shard_for_rank, write_hf
    from training.megatron.model import LlamaArch, build_model

    arch = LlamaArch.from_hf(hf_model.config, seq_length)
    hf_state = {k: v for k, v in hf_model.state_dict().items() if not (arch.tie_embeddings and k == "lm_head.weight")}
    model = build_model(arch).eval()
    load_into_model(model, shard_for_rank(hf_to_megatron(hf_state, arch), arch, tp=1, tp_rank=0))
    with torch.no_grad():
        ref = hf_model(ids).logits
    assert (megatron_logits(model, ids) - ref).abs().max().item() <= 1e-3  # HF -> Megatron

    # Megatron -> HF: perturb the Megatron weights so the check is not just the identity round trip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    full = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    back = AutoModelForCausalLM.from_pretrained(write_hf(tmp_path / "hf", arch, megatron_to_hf(full, arch))).eval()
    with torch.no_grad():
        diff = (back(ids).logits - megatron_logits(model, ids)).abs().max().item()
    assert diff <= 1e-3


@pytest.mark.parametrize("tied", [True, False])
def test_random_llama_logits_match_both_directions(shared_data, megatron_1proc, tmp_path, tied):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = gzip.open(shared_data / "wikitext2_valid_test" / "valid.txt.gz", "rt").read()[:100_000].splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = text_ids(shared_data, PreTrainedTokenizerFast(tokenizer_object=tok))
    torch.manual_seed(1)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, rope_theta=50000.0)).eval()
    check_both_directions(hf, ids, 128, tmp_path)


def test_sdpa_core_attention_matches_megatron_dot_product_attention(megatron_1proc, monkeypatch):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from training.megatron.model import LlamaArch, layer_spec, sdpa_attention_class, transformer_config

    assert layer_spec().submodules.self_attention.submodules.core_attention is sdpa_attention_class()  # CPU and GPU

    config = transformer_config(LlamaArch(hidden_size=64, num_attention_heads=4, num_query_groups=2))
    modules = [cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
               for cls in (DotProductAttention, sdpa_attention_class())]
    g = torch.Generator().manual_seed(0)
    s, b = 24, 3  # [seq, batch, heads, head_dim]; K/V have 2 query groups for 4 heads (GQA)
    q, k, v = (torch.randn(s, b, h, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    grad_out = torch.randn(s, b, 64, generator=g)
    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: sdpa_calls.append(1) or sdpa(*a, **kw))
    results = []
    for module in modules:
        out = module(q, k, v, None)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results.append((out, *grads))
    assert results[0][0].shape == (s, b, 64) and len(sdpa_calls) == 1  # the fused path ran, once
    for ref, got in zip(*results):
        assert (ref - got).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_smollm2_logits_match_both_directions(shared_data, megatron_1proc, tmp_path):
    from training.models import load_causal_lm

    hf, tokenizer = load_causal_lm("smollm2")
    assert hf.config.num_key_value_heads == 3 and hf.config.tie_word_embeddings
    check_both_directions(hf, text_ids(shared_data, tokenizer), 128, tmp_path)


def test_tp_shards_reassemble_to_the_full_weights():
    import torch

    from training.megatron.convert import shard_for_rank
    from training.megatron.model import LlamaArch

    arch = LlamaArch(num_layers=2, hidden_size=8, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=6,
                     vocab_size=16, tie_embeddings=False)
    g = torch.Generator().manual_seed(0)
    full = {
        "embedding.word_embeddings.weight": torch.randn(16, 8, generator=g),
        "output_layer.weight": torch.randn(16, 8, generator=g),
        "decoder.final_layernorm.weight": torch.randn(8, generator=g),
        **{f"decoder.layers.{i}.{n}": torch.randn(*s, generator=g) for i in range(2) for n, s in {
            "self_attention.linear_qkv.weight": (16, 8), "self_attention.linear_proj.weight": (8, 8),
            "mlp.linear_fc1.weight": (12, 8), "mlp.linear_fc2.weight": (8, 6),
            "input_layernorm.weight": (8,), "pre_mlp_layernorm.weight": (8,)}.items()},
    }
    r0, r1 = (shard_for_rank(full, arch, tp=2, tp_rank=r, pp=2, pp_rank=1) for r in (0, 1))
    assert set(r0) == {k.replace("layers.1.", "layers.0.") for k in full if "layers.0." not in k and "embedding" not in k}
    src = "decoder.layers.1."
    assert torch.equal(torch.cat([r0["decoder.layers.0.self_attention.linear_qkv.weight"],
                                  r1["decoder.layers.0.self_attention.linear_qkv.weight"]]), full[src + "self_attention.linear_qkv.weight"])
    assert torch.equal(torch.cat([r0["decoder.layers.0.self_attention.linear_proj.weight"],
                                  r1["decoder.layers.0.self_attention.linear_proj.weight"]], 1), full[src + "self_attention.linear_proj.weight"])
    gate, up = full[src + "mlp.linear_fc1.weight"].chunk(2)
    assert torch.equal(r1["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[3:], up[3:]]))
    with pytest.raises(ValueError, match="TP=4 must divide num_query_groups"):
        shard_for_rank(full, arch, tp=4, tp_rank=0)
