"""Norms of the Mamba-3 layer and the rule that keeps sensitive parameters in fp32."""

from __future__ import annotations

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
