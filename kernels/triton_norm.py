"""The layer's RMSNorm of B and C (`norms.GatedRMSNorm` without groups or gate) in one Triton kernel each way.

The torch norm is `x.float()`, `F.rms_norm` and a cast back: 3 launches in the forward and ~5 in the backward,
each a few microseconds of GPU work but tens of host microseconds, paid before the layer's first heavy kernel can
start (host time is what makes the layer's wall time exceed its GPU time). Here: one launch forward; one backward
plus a torch `.sum` of the kernel's per-program weight-gradient partials (deterministic: no atomics).

B and C are strided views of the in_proj output, (B, L, R, G, N) with each position W elements apart: they are read
in place (`_rows_layout`), and the outputs are new contiguous tensors, for SISO (halves=True) already in the Triton
scan's rotation layout (the permuted copy of q and k each way it saves would be two more launches and a pass over
them). Their gradients are written back in the inputs' layout, into the layer's shared in_proj gradient where it
has one (`shared_grad`). Everything is computed in fp32; float64 inputs are left to the torch norm, which computes
in fp64.
"""

from __future__ import annotations

import math

import torch

from .common import FMA, cdiv, grad_needed, next_pow2, row_stride, rows_of
from .shared_grad import grad_output, grad_slot

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU install without triton: rms_norm_triton says so when called
    triton = None

_INT32_LIMIT = 2**31  # offsets that can reach it make the kernels index in int64 (a module constant: tests lower it)
_TILE = 4096  # elements of a program's (rows, BLOCK_N) tile: 32 fp32 per thread and tensor at 4 warps
_MAX_ROWS = 64  # rows per program at most
_MAX_N = 8192  # widest row handled (one row per program, 8 warps); wider rows would spill registers

if triton is not None:

    @triton.jit
    def _row_tile(n_rows, inner, TS, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
        """This program's row block: (program id, row ids, offsets of the rows in x (row i of token t at
        t * TS + i * N), columns, column mask, tile mask); int64 ids where offsets can pass int32 (WIDE)."""
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        xoff = (rows // inner) * TS + (rows % inner) * N
        return pid, rows, xoff, cols, cmask, (rows < n_rows)[:, None] & cmask[None, :]

    @triton.jit
    def _out_columns(cols, N, HALVES: tl.constexpr):
        """Where column c of a row goes in the output (and comes from in its gradient): c, or with HALVES, pair
        (2j, 2j+1) at (j, j + N/2) (the Triton scan's rotation layout)."""
        if HALVES:
            return cols // 2 + (cols % 2) * (N // 2)
        return cols

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, n_rows, inner, TS, N, eps, BLOCK_R: tl.constexpr,
                             BLOCK_N: tl.constexpr, WIDE: tl.constexpr, HALVES: tl.constexpr):
        """Grid (rows / BLOCK_R,); x [tokens, inner, N] (rows of N, tokens TS apart: `_rows_layout`), w [N] -> y
        [tokens, inner, N] contiguous in y's dtype (HALVES: each row's pairs (2j, 2j+1) stored at (j, j + N/2)).

        y = x rsqrt(mean(x^2) + eps) w per row, fp32 inside."""
        pid, rows, xoff, cols, cmask, m = _row_tile(n_rows, inner, TS, N, BLOCK_R, BLOCK_N, WIDE)
        x = tl.load(x_ptr + xoff[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)  # masked columns load 0: the mean is over N
        y = x * rstd[:, None] * w[None, :]
        tl.store(y_ptr + rows[:, None] * N + _out_columns(cols, N, HALVES)[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m)

    @triton.jit
    def _rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_ptr, n_rows, inner, TS, DTS, N, eps,
                             BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
                             HAS_DW: tl.constexpr, HALVES: tl.constexpr):
        """Grid (rows / BLOCK_R,); x [tokens, inner, N] (tokens TS apart), w [N], dy contiguous -> dx (tokens DTS
        apart), dw [programs, N] partial sums (HAS_DW).

        Per row, with r = rsqrt(mean(x^2) + eps), xhat = x r, g = dy w: dx = r (g - xhat mean(g xhat)); with
        HAS_DW, this program's partial sum over its rows of dy xhat (the weight's gradient), fp32, row pid of dw.
        rstd is recomputed from x (nothing else is saved by the forward). dx is laid out as x, tokens DTS apart."""
        pid, rows, xoff, cols, cmask, m = _row_tile(n_rows, inner, TS, N, BLOCK_R, BLOCK_N, WIDE)
        x = tl.load(x_ptr + xoff[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * N + _out_columns(cols, N, HALVES)[None, :], mask=m,
                     other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / N
        dx = rstd[:, None] * (g - xhat * c[:, None])
        tl.store(dx_ptr + ((rows // inner) * DTS + (rows % inner) * N)[:, None] + cols[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_DW:  # masked rows load x = dy = 0 and add nothing
            tl.store(dw_ptr + pid * N + cols, tl.sum(dy * xhat, axis=0), mask=cmask)


def _rows_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(x, or a contiguous copy where x is not laid out so, rows per token `inner`, elements between tokens `TS`):
    tokens are x's first dim (2-D x) or its first two flattened (`common.rows_of`), each holding `inner` rows of N
    contiguous elements, row i of token t at t * TS + i * N. The layer's B and C, views of its in_proj output, are
    read in place."""
    lead = 1 if x.dim() == 2 else 2
    x = rows_of(x, lead)
    return x, math.prod(x.shape[lead:-1]), row_stride(x, lead)


def _launch(n_rows: int, inner: int, ts: int, N: int) -> tuple[tuple[int], dict]:
    """Grid (row blocks,) and the kernels' block sizes and options."""
    bn = next_pow2(N)
    br = max(1, min(_MAX_ROWS, _TILE // bn, next_pow2(n_rows)))
    grid = (cdiv(n_rows, br),)
    padded = grid[0] * br  # masked rows' offsets are computed too
    reach = max(((padded - 1) // inner) * ts + inner * N, padded * N, grid[0] * N)
    return grid, dict(BLOCK_R=br, BLOCK_N=bn, WIDE=reach >= _INT32_LIMIT, num_warps=4 if bn * br <= _TILE else 8)


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, halves: bool):
    """(y, x as the kernel read it)."""
    x, inner, ts = _rows_layout(x)
    N = x.shape[-1]
    n_rows = x.numel() // N if N else 0
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if n_rows and N:
        grid, meta = _launch(n_rows, inner, ts, N)
        _rms_norm_fwd_kernel[grid](x, weight, y, n_rows, inner, ts, N, eps, HALVES=halves, **meta, **FMA)
    return y, x


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, halves):
        ctx.slot = grad_slot(x)  # the layer's in_proj split (`shared_grad`)
        y, x = _rms_norm_forward(x, weight, eps, halves)
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.halves = eps, halves
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        lead = 1 if x.dim() == 2 else 2
        _, inner, ts = _rows_layout(x)  # x is the tensor the forward read: laid out so
        N = x.shape[-1]
        n_rows = x.numel() // N if N else 0
        if not (n_rows and N):  # nothing to launch: empty gradients, and a zero one for the weight
            return (x.new_zeros(x.shape) if need_dx else None, torch.zeros_like(weight) if need_dw else None, None,
                    None)
        # computed even when only the weight needs it; in x's layout (tokens dts apart)
        dx = grad_output(ctx.slot, x.shape, x.dtype, x.device, lead)
        dts = row_stride(dx, lead)
        grid, meta = _launch(n_rows, inner, max(ts, dts), N)
        partial = torch.empty(grid[0], N, device=x.device, dtype=torch.float32) if need_dw else dx
        _rms_norm_bwd_kernel[grid](x, weight, dy.contiguous(), dx, partial, n_rows, inner, ts, dts, N, ctx.eps,
                                   HAS_DW=need_dw, HALVES=ctx.halves, **meta, **FMA)
        return dx if need_dx else None, partial.sum(0).to(weight.dtype) if need_dw else None, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, halves: bool = False) -> torch.Tensor:
    """`GatedRMSNorm(N, eps)(x)` (no groups, no gate) in one Triton kernel, differentiable in x and weight:
    (x_f32 * rsqrt(mean(x_f32^2, -1) + eps) * weight_f32).to(x.dtype), a new contiguous tensor of x's shape.

    x: (..., N), at least 2-D, bf16/fp16/fp32; strided views such as the layer's B and C (slices of its in_proj
    output) are read in place (`_rows_layout`), other layouts through a contiguous copy. weight: (N,), any float
    dtype (fp32 in the layer); its gradient comes back in its dtype, x's in x's dtype. halves: the output's last
    dim is permuted, pair (2j, 2j+1) stored at (j, j + N/2), the layout the Triton scan rotates in
    (`mamba3_chunked_triton(..., qk_halves=True)`); its gradient is read back in that layout."""
    if triton is None:
        raise RuntimeError("rms_norm_triton needs triton; without it use hybrid_mamba3.norms.GatedRMSNorm")
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("rms_norm_triton takes tensors x (..., N) and weight (N,)")
    if x.dtype == torch.float64:
        raise TypeError("rms_norm_triton computes in fp32: for float64 inputs use the torch norm "
                        "(hybrid_mamba3.norms.GatedRMSNorm), which computes in fp64")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got {weight.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (rows, N), got shape {tuple(x.shape)}: add a leading dim")
    N = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != N:
        raise ValueError(f"weight must have shape ({N},) to match x's last dim, got {tuple(weight.shape)}")
    if N > _MAX_N:
        raise ValueError(f"rows of {N} elements are wider than this kernel's {_MAX_N}: use GatedRMSNorm")
    if weight.device != x.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}: move weight")
    if x.numel() // max(N, 1) >= 2**31:
        raise ValueError(f"{x.numel() // N} rows are more than the kernels' int32 row ids hold: split x")
    if halves and N % 2:
        raise ValueError(f"halves pairs dims (2j, 2j+1): the last dim must be even, got {N}")
    if not grad_needed(x, weight):
        return _rms_norm_forward(x, weight.contiguous(), float(eps), bool(halves))[0]
    return _RMSNorm.apply(x, weight.contiguous(), float(eps), bool(halves))
