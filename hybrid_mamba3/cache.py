"""Glue between the Mamba-3 decode state and transformers' cache.

A Mamba-3 layer's slot in a `DynamicCache(config=...)` is transformers' own `LinearAttentionLayer`
(config.layer_types says "linear_attention"; config.number_of_conv_states = 4). Its four recurrent
states hold (angle, ssm, last k, last v) in that order. The same class fills those slots in a `StaticCache` (what
`generate(cache_implementation="static")` builds). On its first use by a Mamba-3 layer the slot becomes a
`Mamba3CacheLayer`, a subclass that adds the hooks transformers' generation calls on a cache layer and that the base
class lacks or gets wrong for a layer with recurrent states only (config.layer_types must name one of transformers'
own kinds, so the slot cannot be built as ours):

- the states are allocated on the first write and updated in place after, so their addresses stay fixed (what
  CUDA-graph capture needs); `reorder_cache` (beam search) and `crop` keep them in place too;
- `crop(-k)` rolls back the last k tokens (assisted generation, prompt lookup): once
  `cache.activate_past_recording(...)` is on, a call on several tokens hands the slot the states after each of its
  last positions (`states_to_record`, `write_mamba_state` with a list), on every transformers release (5.17's base
  class keeps no history; 5.25's keeps one list for all four states and cannot roll back a call's first token);
- `batch_repeat_interleave` / `batch_select_indices` (fan a prompt's cache out to several continuations);
- `reset()` zeroes the states and marks them empty: the next call starts a new sequence.

transformers 5.24 renamed the cache keyword and output field `past_key_values` -> `cache` (the old name is
deprecated until 5.40). The model takes either name and hands the cache on under the installed version's
(`CACHE_KWARG`): its attention layers, `create_causal_mask` and gradient checkpointing's cache drop read that one.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin, LinearAttentionLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention

from .kernels import Mamba3State

CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def kv_bytes_per_token(config, itemsize: int) -> int:
    """Bytes of keys and values one token adds to the cache of a model with `config` (a hybrid's attention layers
    only; every layer of a Llama), stored at `itemsize` bytes an element."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = getattr(config, "mixers", ["attention"] * config.num_hidden_layers).count("attention")
    return 2 * layers * config.num_key_value_heads * head_dim * itemsize


def one_cache(cache: Cache | None, past_key_values: Cache | None, cache_params: Cache | None = None) -> Cache | None:
    """The cache passed under any of its keywords: `cache`, the older `past_key_values`, or `cache_params` (where
    generate() up to some release after 5.17 puts the cache of a model whose class name holds "mamba")."""
    given = {id(c): c for c in (cache, past_key_values, cache_params) if c is not None}
    if len(given) > 1:
        raise ValueError("got different caches under `cache`, `past_key_values` and `cache_params`: pass the cache "
                         "once, as `cache` (transformers >= 5.24) or `past_key_values` (older)")
    return next(iter(given.values()), None)

NUM_STATES = len(Mamba3State._fields)
# Positions whose states the first recorded call keeps when the cache was not told how many (transformers 5.17's
# activate_past_recording takes no count): more than its assistants draft by default (20 tokens; prompt lookup 10).
DEFAULT_STATES_TO_KEEP = 32


class Mamba3CacheLayer(LinearAttentionLayer):
    """A Mamba-3 layer's slot: transformers' `LinearAttentionLayer` plus in-place reordering, rollback and batch
    expansion of its recurrent states (see the module docstring). Holds no state of its own beyond the base class's
    but the rollback history, so an existing slot can take this class in place (`_layer`)."""

    def _history(self, state_idx: int) -> list:
        if getattr(self, "_past", None) is None:
            self._past = {i: [] for i in range(self.number_of_states)}
        return self._past[state_idx]

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        self.record_past = True
        self.recurrent_states_to_keep = recurrent_states_to_keep
        self._past = None

    def update_recurrent_state(self, recurrent_states: torch.Tensor | list[torch.Tensor], state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        """Copy the last state into the slot (allocated on the first call). A list holds the states after each of the
        call's last positions; while recording, the slot's state before the call and all but the last join the
        history that `crop` rolls back to."""
        states = list(recurrent_states) if isinstance(recurrent_states, (list, tuple)) else [recurrent_states]
        if not self.is_recurrent_states_initialized[state_idx]:
            self.lazy_initialization(recurrent_states=states[-1], state_idx=state_idx)
        if self.record_past:
            self._history(state_idx).extend([self.recurrent_states[state_idx].clone(), *states[:-1]])
        self.recurrent_states[state_idx].copy_(states[-1])
        return self.recurrent_states[state_idx]

    @property
    def is_croppable(self) -> bool:
        return True

    def crop(self, tokens_to_remove: int) -> None:
        """Roll the states back by -tokens_to_remove tokens (transformers passes a count <= 0), in place, and drop the
        history (a recurrent slot keeps nothing per token otherwise)."""
        if tokens_to_remove > 0:
            raise RuntimeError("a recurrent cache layer can only be cropped by a negative count (tokens to remove)")
        back = -tokens_to_remove
        if back and not self.record_past:
            raise RuntimeError("crop() on a Mamba-3 slot that records no past: call cache.activate_past_recording() "
                               "before the calls to roll back")
        if back:
            for i in range(self.number_of_states):
                history = self._history(i)
                if back > len(history):
                    raise RuntimeError(f"cannot roll a Mamba-3 state back by {back} tokens: {len(history)} recorded "
                                       "(activate_past_recording(recurrent_states_to_keep=...) with a larger count)")
                self.recurrent_states[i].copy_(history[-back])
        self._past = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes row beam_idx[i]'s states, in place."""
        for i in range(self.number_of_states):
            if self.is_recurrent_states_initialized[i]:
                t = self.recurrent_states[i]
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated `repeats` times in a row (several continuations of one prompt)."""
        self._reshape_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reshape_rows(lambda t: t[indices.to(t.device)])

    def _reshape_rows(self, fn) -> None:
        # a new batch size needs new tensors (their addresses change, as the attention slots' do)
        for i in range(self.number_of_states):
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = fn(self.recurrent_states[i]).contiguous()
        self._past = None

    def reset(self) -> None:
        super().reset()
        self._past = None


def _layer(cache, layer_idx: int) -> Mamba3CacheLayer:
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or not isinstance(layers[layer_idx], LinearAttentionCacheLayerMixin):
        kind = type(layers[layer_idx]).__name__ if layers is not None and layer_idx < len(layers) else "nothing"
        raise ValueError(
            f"cache slot {layer_idx} is {kind}, not a linear-attention layer: build the cache with "
            "DynamicCache(config=model.config) or StaticCache(config=model.config, max_cache_len=...) (generate() "
            "does this) so Mamba-3 layers get recurrent slots")
    layer = layers[layer_idx]
    if layer.number_of_states < NUM_STATES:
        raise ValueError(f"cache slot {layer_idx} holds {layer.number_of_states} states, Mamba-3 needs "
                         f"{NUM_STATES}: the config must set number_of_conv_states = {NUM_STATES}")
    if type(layer) is LinearAttentionLayer:
        # transformers built the slot from config.layer_types; the subclass only adds methods, so the object (and
        # whatever generate() already set on it, such as past recording) stays as it is
        layer.__class__ = Mamba3CacheLayer
    elif not isinstance(layer, Mamba3CacheLayer):
        raise ValueError(f"cache slot {layer_idx} is a {type(layer).__name__}: a Mamba-3 layer needs transformers' "
                         "LinearAttentionLayer (config.layer_types 'linear_attention') or a Mamba3CacheLayer")
    return layer


def read_mamba_state(cache, layer_idx: int) -> Mamba3State | None:
    """The layer's state, or None before its first forward or after `cache.reset()` (which zeroes the slots and marks
    them empty: the next call starts a new sequence)."""
    layer = _layer(cache, layer_idx)
    if not all(layer.has_previous_state[i] for i in range(NUM_STATES)):
        return None
    return Mamba3State(*(layer.recurrent_states[i] for i in range(NUM_STATES)))


def states_to_record(cache, layer_idx: int, length: int, continues: bool) -> int:
    """How many of a call's last positions must hand their states to the cache so that `crop` can roll them back: 0
    unless the cache records the past (assisted generation turns it on). A call that continues a sequence (a draft's
    verification) records every position, since a rollback can reach back that far; the first call (the prompt, with
    the first draft behind it) records one more than `recurrent_states_to_keep` (the draft's length: rolling all of it
    back needs the state before it), and no more (a state per prompt token would not fit)."""
    layer = _layer(cache, layer_idx)
    if not layer.record_past:
        return 0
    if continues:
        return length
    return min(length, (getattr(layer, "recurrent_states_to_keep", None) or DEFAULT_STATES_TO_KEEP) + 1)


def write_mamba_state(cache, layer_idx: int, state: Mamba3State | list[Mamba3State]) -> None:
    """Store the layer's state after a call, copied into the slots (in place once they exist). A list holds the
    states after each of the call's last positions, the final one last (see `states_to_record`)."""
    layer = _layer(cache, layer_idx)
    states = state if isinstance(state, list) else [state]
    for i in range(NUM_STATES):
        ts = [s[i].detach() for s in states]
        current = layer.recurrent_states[i]
        if current is not None and current.shape != ts[-1].shape:  # batch size changed: start the slot anew
            layer.is_recurrent_states_initialized[i] = False
        layer.update_recurrent_state(ts, state_idx=i)
        layer.has_previous_state[i] = True
