"""Glue between the Mamba-3 decode state and transformers' cache.

A Mamba-3 layer's slot in a `DynamicCache(config=...)` is transformers' own `LinearAttentionLayer`
(config.layer_types says "linear_attention"; config.number_of_conv_states = 4). Its four recurrent
states hold (angle, ssm, last k, last v) in that order.

transformers 5.24 renamed the cache keyword and output field `past_key_values` -> `cache` (the old name is
deprecated until 5.40). The model takes either name and hands the cache on under the installed version's
(`CACHE_KWARG`): its attention layers, `create_causal_mask` and gradient checkpointing's cache drop read that one.
"""

from __future__ import annotations

import inspect

from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention

from .kernels import Mamba3State

CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache passed under either keyword (`cache`, or the older `past_key_values`)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("got both `cache` and `past_key_values`: pass the cache once, as `cache` (transformers "
                         ">= 5.24) or `past_key_values` (older)")
    return cache if cache is not None else past_key_values

NUM_STATES = len(Mamba3State._fields)


def _layer(cache, layer_idx: int):
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or not isinstance(layers[layer_idx], LinearAttentionCacheLayerMixin):
        kind = type(layers[layer_idx]).__name__ if layers is not None and layer_idx < len(layers) else "nothing"
        raise ValueError(
            f"cache slot {layer_idx} is {kind}, not a linear-attention layer: build the cache with "
            "DynamicCache(config=model.config) (generate() does this) so Mamba-3 layers get recurrent slots")
    if layers[layer_idx].number_of_states < NUM_STATES:
        raise ValueError(f"cache slot {layer_idx} holds {layers[layer_idx].number_of_states} states, Mamba-3 needs "
                         f"{NUM_STATES}: the config must set number_of_conv_states = {NUM_STATES}")
    return layers[layer_idx]


def read_mamba_state(cache, layer_idx: int) -> Mamba3State | None:
    """The layer's state, or None before its first forward."""
    layer = _layer(cache, layer_idx)
    if not all(layer.is_recurrent_states_initialized[i] for i in range(NUM_STATES)):
        return None
    return Mamba3State(*(layer.recurrent_states[i] for i in range(NUM_STATES)))


def write_mamba_state(cache, layer_idx: int, state: Mamba3State) -> None:
    layer = _layer(cache, layer_idx)
    for i, t in enumerate(state):
        t = t.detach()
        current = layer.recurrent_states[i]
        if current is not None and current.shape != t.shape:  # batch size changed: start the slot anew
            layer.is_recurrent_states_initialized[i] = False
        layer.update_recurrent_state(t, state_idx=i)
        layer.has_previous_state[i] = True
