"""LoRA target presets for hybrids: which linear layers PEFT adapts, by part of the model.

- `lora_targets(model, "mamba" | "attention" | "mlp" | "all")` gives the full module names of the linear layers of
  those parts (for Mamba-3 mixers: in_proj and out_proj), for `LoraConfig(target_modules=...)`. Full names, not
  suffixes: PEFT matches a name that is the module's name or its dotted tail, so exact names adapt exactly these
  modules and nothing that happens to share a suffix.
- PEFT raises only when no target matches at all; a name that matches nothing is skipped in silence. So
  `lora_targets` refuses a part that has no linear layer in this model, and `check_lora_targets` checks afterwards
  that every requested module was adapted.
- The parts come from the registry (each decoder layer's mixer says whether it is attention), so user-registered
  mixers count as "mamba" (recurrent) or "attention" by their cache kind; plain Llama-style models work too.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
from torch import nn

PARTS = ("mamba", "attention", "mlp")


def _parts(which: str | Iterable[str]) -> list[str]:
    names = [which] if isinstance(which, str) else list(which)
    names = [p for n in names for p in n.split("+")]
    out = []
    for name in names:
        if name == "all":
            out += list(PARTS)
        elif name in PARTS:
            out.append(name)
        else:
            raise ValueError(f"unknown LoRA target part {name!r}: use mamba, attention, mlp or all (or several, "
                             "e.g. 'mamba+mlp' or ['mamba', 'mlp'])")
    return list(dict.fromkeys(out))


def _model(model) -> nn.Module:
    """The causal LM: itself, a PEFT model's base, or built on the meta device from a directory's config."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model)
        with torch.device("meta"):  # the module tree only: no memory, no weights read
            return AutoModelForCausalLM.from_config(config)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linears(prefix: str, module: nn.Module) -> list[str]:
    """Names of the linear layers under module (a LoRA-wrapped one counts as its base layer, not its pieces)."""
    out = []

    def walk(name: str, m: nn.Module):
        if isinstance(m, nn.Linear) or hasattr(m, "base_layer"):
            out.append(name)
            return
        for child_name, child in m.named_children():
            walk(f"{name}.{child_name}", child)

    walk(prefix, module)
    return out


def _by_part(model: nn.Module) -> dict[str, list[str]]:
    found = {p: [] for p in PARTS}
    for name, module in model.named_modules():
        spec = getattr(module, "spec", None)
        mixer_attr = spec.attr if spec is not None else "self_attn" if hasattr(module, "self_attn") else None
        if mixer_attr is None or not hasattr(module, "mlp"):
            continue  # not a decoder layer
        kind = "attention" if spec is None or spec.is_attention else "mamba"
        found[kind] += _linears(f"{name}.{mixer_attr}", getattr(module, mixer_attr))
        found["mlp"] += _linears(f"{name}.mlp", module.mlp)
    return found


def lora_targets(model, parts: str | Iterable[str] = "all") -> list[str]:
    """Full names of the linear layers in `parts` of `model`, for `peft.LoraConfig(target_modules=...)`.

    model: a hybrid (or Llama-style) causal LM, a PEFT model of one, or a model directory (its config is read and the
    module tree built on the meta device). parts: "mamba" (the Mamba-3 mixers' in_proj / out_proj), "attention"
    (the kept attention layers' q/k/v/o projections), "mlp" (every layer's MLP), "all", or several ("mamba+mlp",
    ["mamba", "mlp"]). Raises where a requested part has no linear layer in this model (PEFT would skip it silently).
    """
    wanted = _parts(parts)
    found = _by_part(_model(model))
    missing = [p for p in wanted if not found[p]]
    if missing:
        have = [p for p in PARTS if found[p]]
        raise ValueError(f"this model has no {' / '.join(missing)} layers to adapt (it has: "
                         f"{', '.join(have) or 'none'}); choose LoRA targets among those")
    return sorted(n for p in wanted for n in found[p])


def adapted_modules(model) -> list[str]:
    """Names (as in the base model) of the modules a PEFT model has LoRA adapters on."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sorted(n for n, m in base.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


def check_lora_targets(model, targets: Iterable[str]) -> None:
    """Raises unless every name in `targets` (as `lora_targets` gives them) has a LoRA adapter in the PEFT `model`
    (e.g. `SFTTrainer(...).model`): PEFT skips target names that match no module without a word."""
    adapted = set(adapted_modules(model))
    missing = sorted(set(targets) - adapted)
    if missing:
        raise ValueError(f"{len(missing)} LoRA target(s) have no adapter, e.g. {missing[:3]}: the names must be the "
                         "model's own (take them from hybrid_mamba3.lora_targets on this model)")
