"""`HybridMamba3Config`: a LlamaConfig plus which mixer each layer uses and the Mamba-3 hyperparameters."""

from __future__ import annotations

from typing import Sequence

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .registry import get_mixer

PLACEMENTS = ("even", "first", "last")
_MAMBA_FIELDS = ("d_state", "expand", "headdim", "ngroups", "rope_fraction", "is_mimo", "mimo_rank", "chunk_size",
                 "is_outproj_norm", "dt_min", "dt_max", "dt_init_floor", "A_floor", "a_activation", "backend")


def resolve_positions(layers: Sequence[int] | float | str, num_layers: int, placement: str = "even") -> list[int]:
    """Which layer indices get the new mixer.

    layers: a list of indices (negative ones count from the end); a fraction in [0, 1] placed by
    `placement` ("even": spread evenly, "first", "last"); or a pattern string of 'A' (attention) and
    'M' (Mamba) characters, either one per layer or a unit repeated to fill the depth ("AAM").
    """
    if isinstance(layers, str):
        pat = layers.strip().upper()
        if not pat or set(pat) - {"A", "M"}:
            raise ValueError(f"pattern {layers!r} must use only 'A' (attention) and 'M' (Mamba-3)")
        if num_layers % len(pat):
            raise ValueError(f"pattern {layers!r} has length {len(pat)}, which does not divide {num_layers} layers")
        pat = pat * (num_layers // len(pat))
        return [i for i, c in enumerate(pat) if c == "M"]
    if isinstance(layers, float):
        if not 0.0 <= layers <= 1.0:
            raise ValueError(f"a fraction of layers must be in [0, 1], got {layers}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        count = round(layers * num_layers)
        if placement == "first":
            return list(range(count))
        if placement == "last":
            return list(range(num_layers - count, num_layers))
        return sorted({int((i + 0.5) * num_layers / count) for i in range(count)}) if count else []
    if isinstance(layers, int):
        raise ValueError(f"got the integer {layers}: pass a list of indices ([{layers}]) or a fraction (0.25)")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layer indices must be integers, got {i!r}")
        if not -num_layers <= i < num_layers:
            raise ValueError(f"layer index {i} is out of range for a model with {num_layers} layers "
                             f"(valid: 0..{num_layers - 1}, or negative from the end)")
        out.append(i % num_layers)
    if len(set(out)) != len(out):
        raise ValueError(f"layer indices repeat: {list(layers)}")
    return sorted(out)


def check_mamba3_options(hidden_size: int, options: dict) -> None:
    """Raise the layer's own ValueError for bad Mamba-3 options (built on the meta device: no memory)."""
    from .mamba3 import Mamba3
    Mamba3(d_model=hidden_size, device="meta", **options)


@strict
class HybridMamba3Config(LlamaConfig):
    r"""Llama configuration plus a per-layer mixer list (registry names) and Mamba-3 hyperparameters.

    `mixers[i]` names layer i's mixer ("attention" keeps Llama attention, "mamba3" is the Mamba-3
    mixer); `layer_types` is derived from it through the registry. The `mamba_*` fields are the
    official Mamba3 constructor's arguments (see `hybrid_mamba3.Mamba3`).
    """

    model_type = "hybrid_mamba3"

    mixers: list[str] | None = None
    mamba_d_state: int = 128
    mamba_expand: int = 2
    mamba_headdim: int = 64
    mamba_ngroups: int = 1
    mamba_rope_fraction: float = 0.5
    mamba_is_mimo: bool = True
    mamba_mimo_rank: int = 4
    mamba_chunk_size: int = 16
    mamba_is_outproj_norm: bool = False
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba_A_floor: float = 1e-4
    mamba_a_activation: str = "softplus"
    mamba_backend: str = "auto"

    def __post_init__(self, **kwargs):
        kwargs.pop("layer_types", None)  # derived, never stored twice
        kwargs.pop("number_of_conv_states", None)
        if self.mixers is None:
            self.mixers = ["attention"] * self.num_hidden_layers
        self.mixers = list(self.mixers)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        if len(self.mixers) != self.num_hidden_layers:
            raise ValueError(f"mixers lists {len(self.mixers)} layers but num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        for name in self.mixers:
            get_mixer(name)
        if self.mamba_layers:
            check_mamba3_options(self.hidden_size, self.mamba3_kwargs())

    @property
    def layer_types(self) -> list[str]:
        return [get_mixer(m).cache_kind for m in self.mixers]

    @property
    def number_of_conv_states(self) -> int:
        return 4  # Mamba-3 decode state: angle, ssm, last k, last v

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == "linear_attention"]

    def mamba3_kwargs(self) -> dict:
        return {f: getattr(self, f"mamba_{f}") for f in _MAMBA_FIELDS}

    @classmethod
    def from_llama(cls, llama_config: LlamaConfig, mamba_layers: Sequence[int] | float | str = (),
                   placement: str = "even", mixer: str = "mamba3", **mamba_kwargs) -> "HybridMamba3Config":
        """A hybrid config from any Llama-style config, with `mixer` at the chosen positions.

        mamba_kwargs are Mamba-3 hyperparameters without the prefix (d_state=64, mimo_rank=2, ...).
        """
        n = llama_config.num_hidden_layers
        positions = set(resolve_positions(mamba_layers, n, placement))
        get_mixer(mixer)
        unknown = set(mamba_kwargs) - set(_MAMBA_FIELDS)
        if unknown:
            raise ValueError(f"unknown Mamba-3 options {sorted(unknown)}; known: {list(_MAMBA_FIELDS)}")
        base = llama_config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map", "layer_types"):
            base.pop(key, None)
        base.update({f"mamba_{k}": v for k, v in mamba_kwargs.items()})
        if positions and get_mixer(mixer).name == "mamba3":
            check_mamba3_options(base["hidden_size"], {f: base.get(f"mamba_{f}", getattr(cls, f"mamba_{f}"))
                                                       for f in _MAMBA_FIELDS})
        base["mixers"] = [mixer if i in positions else "attention" for i in range(n)]
        return cls(**base)
