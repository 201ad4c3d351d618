"""The mixer registry: name -> module builder, cache kind, and attribute name in the decoder layer.

The cache kind is in transformers' cache vocabulary ("full_attention" for key/value caches,
"linear_attention" for recurrent states), so `config.layer_types` derives from the mixer list and
`DynamicCache(config=...)` builds the right slots. Register your own mixer with `register_mixer`:
its builder takes (config, layer_idx) and returns a module whose forward takes the normed hidden
states plus keyword arguments (position_embeddings, attention_mask, the cache under transformers' keyword for
it: `cache` from transformers 5.24, `past_key_values` before, `hybrid_mamba3.cache.CACHE_KWARG`) and returns
the mixer output (or a tuple whose first item is the output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

CACHE_KINDS = ("full_attention", "linear_attention")


@dataclass(frozen=True)
class MixerSpec:
    name: str
    build: Callable[..., nn.Module]
    cache_kind: str
    attr: str

    @property
    def is_attention(self) -> bool:
        return self.cache_kind == "full_attention"


_REGISTRY: dict[str, MixerSpec] = {}


def register_mixer(name: str, build: Callable[..., nn.Module], cache_kind: str, attr: str | None = None,
                   overwrite: bool = False) -> MixerSpec:
    """Make `name` usable in `HybridMamba3Config.mixers`.

    cache_kind "full_attention": the mixer gets the 4D causal mask and Llama's rotary embeddings and
    uses the cache's key/value slot; "linear_attention": it gets the 2D padding mask and a recurrent slot.
    attr: the attribute (and state-dict prefix) in the decoder layer, default `name`.
    """
    if cache_kind not in CACHE_KINDS:
        raise ValueError(f"cache_kind must be one of {CACHE_KINDS}, got {cache_kind!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"mixer {name!r} is already registered; pass overwrite=True to replace it")
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"mixer names are identifiers, got {name!r}")
    spec = MixerSpec(name, build, cache_kind, attr or name)
    _REGISTRY[name] = spec
    return spec


def get_mixer(name: str) -> MixerSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; registered: {sorted(_REGISTRY)}. Register custom mixers with "
                         "hybrid_mamba3.register_mixer before building or loading the model") from None


def mixer_names() -> list[str]:
    return sorted(_REGISTRY)


def _build_attention(config, layer_idx: int) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaAttention
    return LlamaAttention(config, layer_idx)


def _build_mamba3(config, layer_idx: int) -> nn.Module:
    from .mamba3 import Mamba3
    return Mamba3(d_model=config.hidden_size, layer_idx=layer_idx, n_layer=config.num_hidden_layers,
                  **config.mamba3_kwargs())


register_mixer("attention", _build_attention, "full_attention", attr="self_attn")
register_mixer("mamba3", _build_mamba3, "linear_attention", attr="mamba")
