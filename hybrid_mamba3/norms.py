"""Norms of the Mamba-3 layer and the rule that keeps sensitive parameters in fp32; the layer's Triton RMSNorm put
under a model's Llama-style RMSNorms for training (`fuse_rms_norms`)."""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels.common import halves_layout

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class KeepFP32Mixin:
    """Parameters named in `_fp32_params` stay fp32 when the module is cast to fp16/bf16.

    `model.to(torch.bfloat16)` / `.half()` would otherwise round decay biases, norms and MIMO weights
    to 8 bits of mantissa. The original fp32 values are kept (not re-upcast from bf16).
    """

    _fp32_params: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {n: p.data for n, p in self._parameters.items()
                 if n in self._fp32_params and p is not None and p.dtype == torch.float32}
        out = super()._apply(fn, recurse)
        for name, data in saved.items():
            p = self._parameters[name]
            if p.dtype in _LOW_PRECISION:
                p.data = data.to(device=p.device)
        return out


class GatedRMSNorm(KeepFP32Mixin, nn.Module):
    """RMSNorm over the last dim (optionally in groups), optionally gated: norm(x) * silu(z).

    Same parameter (`weight`) and function as the official layer's gated RMSNorm; computed in fp32.
    """

    _fp32_params = ("weight",)

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None, fused: bool = False,
                halves: bool = False) -> torch.Tensor:
        """fused: the Triton kernel (`kernels.triton_norm`; no groups, no gate, 16/32-bit x): one launch each way
        instead of ~3 and ~5, and with halves the output in the Triton scan's rotation layout (see
        `rms_norm_triton`). Called through the module all the same, so its hooks (ZeRO-3's parameter gathering,
        say) still run."""
        if (fused or halves) and (self.group_size is not None or z is not None):
            raise ValueError("fused / halves are for the ungated norm without groups: call with fused=False")
        if fused and x.dtype != torch.float64:  # float64 stays in torch (the kernel computes in fp32)
            from .kernels.triton_norm import rms_norm_triton
            return rms_norm_triton(x, self.weight, self.eps, halves)
        if halves:
            return halves_layout(self(x))
        dtype = x.dtype
        cdt = torch.promote_types(dtype, torch.float32)  # fp32 for 16-bit inputs, fp64 stays fp64
        x = x.to(cdt)
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.to(cdt))
        if self.group_size is None:  # one fused op where torch has it (CUDA): fewer launches than the formula
            out = F.rms_norm(x, (x.shape[-1],), self.weight.to(cdt), self.eps)
        else:
            g = x.unflatten(-1, (-1, self.group_size))
            out = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.to(cdt)
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.to(cdt))
        return out.to(dtype)


FUSED_NORM_DEVICES = ("cuda",)  # where `fuse_rms_norms`' kernel runs (tests add "cpu" under Triton's interpreter)


def fuse_rms_norms(model: nn.Module) -> int:
    """Every Llama-style RMSNorm of `model` (a module named *RMSNorm with a (N,) `weight` and `variance_epsilon`, as
    transformers' LlamaRMSNorm) runs the Mamba-3 layer's Triton RMSNorm (`kernels.triton_norm`) on CUDA inputs: one
    launch forward and one backward, weight gradient included, where the torch formula takes ~7 and ~10 elementwise
    kernels over the hidden states, on both models of a distillation step (~120 norms for SmolLM2). The same idea
    as transformers' `kernelize` with a hub RMSNorm, offline. Values: the torch formula rounds the normalised
    states to the input dtype before the weight multiplies them, the kernel once at the end (fp32 inputs: the same
    to summation order; 16-bit: within one rounding). Other inputs (CPU, float64, rows wider than the kernel's) keep
    the module's own forward. Returns how many norms were switched (each once)."""
    switched = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
                and isinstance(weight, torch.Tensor) and weight.dim() == 1 and "forward" not in module.__dict__):
            module.forward = types.MethodType(_fused_rms_norm_forward, module)
            switched += 1
    return switched


def _fused_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from .kernels.triton_norm import _MAX_N, rms_norm_triton, triton

    x, weight = hidden_states, self.weight
    if (triton is None or x.device.type not in FUSED_NORM_DEVICES or x.dtype not in (*_LOW_PRECISION, torch.float32)
            or x.dim() < 2 or x.shape[-1] != weight.shape[0] or x.shape[-1] > _MAX_N):
        return type(self).forward(self, hidden_states)
    # the torch formula's output dtype: the weight times the normalised states in the input's dtype
    return rms_norm_triton(x, weight, self.variance_epsilon).to(torch.promote_types(x.dtype, weight.dtype))
