"""``train_layers: N``: train only the top N decoder blocks of a Llama-style backbone.

Everything below the top N blocks is frozen (embeddings — and the LM head tied to them — included);
the top blocks, the final norm and a task head that is not tied to the embeddings (the reward
model's ``score``) stay trainable. The frozen bottom's output for a sequence never changes, so the
reward and dpo tasks compute it once per sequence in ``setup`` (``bottom_states``) and every step
and evaluation runs only the top N blocks on the cached states (``top_hidden``): the same values
and gradients as the full forward, at about N/L of its cost.
"""

from __future__ import annotations


def freeze_bottom(model, train_layers: int) -> None:
    """Freeze all but the top ``train_layers`` blocks, the final norm and a head not tied to the embeddings."""
    base = model.base_model
    layers = base.layers
    if not 0 < train_layers <= len(layers):
        raise ValueError(f"train_layers {train_layers} must be in 1..{len(layers)} (the model's decoder blocks)")
    backbone = {id(p) for p in base.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in backbone)
    for p in [*layers[-train_layers:].parameters(), *base.norm.parameters()]:
        p.requires_grad_(True)


def bottom_states(base, input_ids, attention_mask, train_layers: int) -> list:
    """Input of the first trainable block for each right-padded row, trimmed to its real tokens."""
    import torch

    with torch.no_grad():
        out = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    states = out.hidden_states[len(base.layers) - train_layers]
    return [states[i, :n].clone() for i, n in enumerate(attention_mask.sum(-1).tolist())]


def top_hidden(base, states: list, train_layers: int):
    """Final (normed) hidden states of the top blocks for cached bottom states, right-padded: (B, T, H).

    Causal attention alone is exact for right padding: a real token never attends to a later pad.
    """
    import torch

    width, device = max(len(s) for s in states), states[0].device
    hidden = torch.zeros(len(states), width, states[0].shape[-1], dtype=states[0].dtype, device=device)
    for i, s in enumerate(states):
        hidden[i, : len(s)] = s
    positions = torch.arange(width, device=device).unsqueeze(0)
    rope = base.rotary_emb(hidden, position_ids=positions)
    causal = torch.full((width, width), float("-inf"), dtype=hidden.dtype, device=device).triu(1)[None, None]
    for layer in base.layers[-train_layers:]:
        hidden = layer(hidden, attention_mask=causal, position_ids=positions, position_embeddings=rope)
    return base.norm(hidden)


def cache_bottom_states(model, sequences: list, pad_id: int, train_layers: int, batch_size: int) -> dict:
    """{id(Encoded): bottom state} for every sequence, computed in length-sorted batches."""
    from tqdm import tqdm

    from training.data import collate_padded
    from training.devices import model_device, to_device

    base = getattr(model, "module", model).base_model
    device = model_device(model)
    todo = sorted(sequences, key=lambda e: len(e.input_ids))
    cache = {}
    for i in tqdm(range(0, len(todo), batch_size), desc="frozen-layer states", mininterval=10):
        chunk = todo[i:i + batch_size]
        batch = to_device(collate_padded(chunk, pad_id), device)
        for enc, state in zip(chunk, bottom_states(base, batch["input_ids"], batch["attention_mask"], train_layers)):
            cache[id(enc)] = state
    return cache


def pair_sequences(pairs) -> list:
    """The chosen then the rejected sequence of each pair: the row order of ``collate_pairs``."""
    return [p.chosen for p in pairs] + [p.rejected for p in pairs]


def cache_pair_states(model, pairs, pad_id: int, train_layers: int, batch_size: int) -> dict:
    """:func:`cache_bottom_states` of both sequences of every pair."""
    return cache_bottom_states(model, pair_sequences(pairs), pad_id, train_layers, batch_size)


def pair_top_hidden(model, cache: dict, pairs, train_layers: int):
    """:func:`top_hidden` for the rows of ``collate_pairs(pairs)`` from their cached bottom states."""
    base = getattr(model, "module", model).base_model  # the DeepSpeed engine wraps the HF model
    return top_hidden(base, [cache[id(e)] for e in pair_sequences(pairs)], train_layers)
