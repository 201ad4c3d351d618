"""The Triton scan's rotation angles: theta = init + cumsum_t(tanh(angles) dt pi) as the kernels' cos/sin table,
and the gradient taken back to tanh(angles) and dt, in Triton.

theta is (B, L, H, K), the largest per-token tensor of the scan. In torch, its cumsum, offsets, cos, sin and stack,
and their autograd replay in the backward, cost ~2.9 ms of a b8 x 2048 forward+backward (R4 op 25.6 -> 22.7 ms on
H100 when they moved here: more than the whole forward state pass). Here the forward writes only the
(B, L, H, 2, K) table the kernels read, and the backward reads d theta once.

The same numerics as `chunked._cumulative_angles`: an fp32 cumsum within blocks of BLOCK positions, and the
blocks' offsets summed in float64 and reduced mod 2 pi, so theta stays accurate at any length. The gradient is the
exact one of the unreduced cumsum (the reduction only drops whole turns): d inc_s = sum_{t >= s} d theta_t.

Three launches each way: the blocks' sums, a scan over them (`_block_offsets_kernel`, one program per head walking
its blocks; in torch that scan and its casts and reduction were five more launches, each costing the host more
than the GPU), and the table (or the gradient).
"""

from __future__ import annotations

import torch

from .common import TWO_PI

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU install without triton: triton_chunked reports it before anything here is called
    triton = None

BLOCK = 32  # positions per program; the fp32 part of each angle's sum spans at most this many steps
OFFSET_TILE = 2048  # fp64 elements (angles x blocks) per step of the offsets scan: 16 a thread at 4 warps


def _bk(k: int) -> int:
    return triton.next_power_of_2(k)


if triton is not None:

    @triton.jit
    def _block(L, K, BL: tl.constexpr, BK: tl.constexpr):
        """This program's positions (block program_id(1)) and angle lanes, with their masks."""
        offs_l = tl.program_id(1) * BL + tl.arange(0, BL)
        offs_k = tl.arange(0, BK)
        lmask, kmask = offs_l < L, offs_k < K
        return offs_l, lmask, offs_k, kmask, lmask[:, None] & kmask[None, :]

    @triton.jit
    def _increments(tp_ptr, dt_ptr, b, h, L, H, K, offs_l, lmask, offs_k, m):
        """(BL, BK) angle increments tanh(angles_t) pi dt_t of head h; zero outside the sequence."""
        tp = tl.load(tp_ptr + (b * L + offs_l[:, None]) * K + offs_k[None, :], mask=m, other=0.0)
        dt = tl.load(dt_ptr + (b * L + offs_l) * H + h, mask=lmask, other=0.0)
        return tp * dt[:, None]

    @triton.jit
    def _block_sums_kernel(x_ptr, tp_ptr, dt_ptr, tot_ptr, L, H, K, nb,
                           INC: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr):
        """Grid (B*H, blocks): each block's sum over its positions, (B, H, K, blocks), of the increments (INC)
        or of x (B, L, H, K). Blocks last, so `_block_offsets_kernel` scans them along contiguous memory."""
        pid_bh = tl.program_id(0)
        b, h = pid_bh // H, pid_bh % H
        offs_l, lmask, offs_k, kmask, m = _block(L, K, BL, BK)
        if INC:
            x = _increments(tp_ptr, dt_ptr, b, h, L, H, K, offs_l, lmask, offs_k, m)
        else:
            x = tl.load(x_ptr + ((b * L + offs_l[:, None]) * H + h) * K + offs_k[None, :], mask=m, other=0.0)
        tl.store(tot_ptr + (pid_bh * K + offs_k) * nb + tl.program_id(1), tl.sum(x, axis=0), mask=kmask)

    @triton.jit
    def _angle_table_kernel(tp_ptr, dt_ptr, off_ptr, cs_ptr, L, H, K, nb, BL: tl.constexpr, BK: tl.constexpr):
        """Grid (B*H, blocks): theta = the block's offset + the cumsum within it, stored as cos | sin
        (B, L, H, 2, K)."""
        pid_bh = tl.program_id(0)
        b, h = pid_bh // H, pid_bh % H
        offs_l, lmask, offs_k, kmask, m = _block(L, K, BL, BK)
        off = tl.load(off_ptr + (pid_bh * K + offs_k) * nb + tl.program_id(1), mask=kmask, other=0.0)
        theta = tl.cumsum(_increments(tp_ptr, dt_ptr, b, h, L, H, K, offs_l, lmask, offs_k, m), axis=0) + off[None, :]
        out = cs_ptr + ((b * L + offs_l[:, None]) * H + h) * 2 * K + offs_k[None, :]
        tl.store(out, tl.cos(theta), mask=m)
        tl.store(out + K, tl.sin(theta), mask=m)

    @triton.jit
    def _angle_grad_kernel(dth_ptr, suf_ptr, tp_ptr, dt_ptr, dtp_ptr, ddt_ptr, L, H, K, nb,
                           BL: tl.constexpr, BK: tl.constexpr):
        """Grid (B, blocks), all heads in one program (the tanh(angles) gradient sums over them, so no atomics):
        g_s = sum_{t >= s} d theta_t (the later blocks' part precomputed in `suf`), then
        d dt_s = sum_k g_s tanh(angles_s) pi and d (tanh(angles) pi)_s = sum_h g_s dt_s."""
        b = tl.program_id(0)
        offs_l, lmask, offs_k, kmask, m = _block(L, K, BL, BK)
        tp = tl.load(tp_ptr + (b * L + offs_l[:, None]) * K + offs_k[None, :], mask=m, other=0.0)
        acc = tl.zeros([BL, BK], dtype=tl.float32)
        for h in range(H):
            dth = tl.load(dth_ptr + ((b * L + offs_l[:, None]) * H + h) * K + offs_k[None, :], mask=m, other=0.0)
            suf = tl.load(suf_ptr + ((b * H + h) * K + offs_k) * nb + tl.program_id(1), mask=kmask, other=0.0)
            g = tl.cumsum(dth, axis=0, reverse=True) + suf[None, :]
            tl.store(ddt_ptr + (b * L + offs_l) * H + h, tl.sum(g * tp, axis=1), mask=lmask)
            acc += g * tl.load(dt_ptr + (b * L + offs_l) * H + h, mask=lmask, other=0.0)[:, None]
        tl.store(dtp_ptr + (b * L + offs_l[:, None]) * K + offs_k[None, :], acc, mask=m)

    @triton.jit
    def _block_offsets_kernel(tot_ptr, init_ptr, off_ptr, K, nb, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
                              BK: tl.constexpr, BB: tl.constexpr):
        """Grid (B*H,): each block's offset from the block sums tot (B, H, K, nb), summed in float64 over the
        blocks before it (REVERSE: after it), written fp32 to off (same shape). Forward: plus the initial angle,
        reduced mod 2 pi (as torch.remainder)."""
        pid = tl.program_id(0)
        offs_k = tl.arange(0, BK)
        kmask = offs_k < K
        carry = tl.zeros([BK], dtype=tl.float64)
        if HAS_INIT:
            carry += tl.load(init_ptr + pid * K + offs_k, mask=kmask, other=0.0).to(tl.float64)
        for start in range(0, nb, BB):
            offs_b = start + tl.arange(0, BB)
            if REVERSE:
                offs_b = nb - 1 - offs_b
            m = kmask[:, None] & ((offs_b >= 0) & (offs_b < nb))[None, :]
            ptrs = (pid * K + offs_k[:, None]) * nb + offs_b[None, :]
            x = tl.load(tot_ptr + ptrs, mask=m, other=0.0).to(tl.float64)
            off = carry[:, None] + (tl.cumsum(x, axis=1) - x)
            carry += tl.sum(x, axis=1)
            if not REVERSE:  # 2 pi as an fp64 constant (a Python float literal would be rounded to fp32)
                two_pi = tl.full((BK, BB), 6.283185307179586, tl.float64)
                off = off - two_pi * tl.floor(off / two_pi)
            tl.store(off_ptr + ptrs, off.to(tl.float32), mask=m)


def _block_offsets(tot: torch.Tensor, init_angle: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """Each block's offset (B, H, K, nb) fp32 from the block sums: the earlier blocks' sum plus the initial angle,
    mod 2 pi (forward), or the later blocks' sum (reverse, for the gradient's suffix sums)."""
    B, H, K, nb = tot.shape
    off = torch.empty_like(tot)
    bk = _bk(K)
    _block_offsets_kernel[(B * H,)](tot, init_angle if init_angle is not None else tot, off, K, nb,
                                    HAS_INIT=init_angle is not None, REVERSE=reverse, BK=bk,
                                    BB=max(16, OFFSET_TILE // bk))
    return off


def _block_sums(x: torch.Tensor | None, tp: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    B, L, H = dt.shape
    K, nb = tp.shape[-1], triton.cdiv(L, BLOCK)
    tot = torch.empty(B, H, K, nb, device=dt.device, dtype=torch.float32)
    _block_sums_kernel[(B * H, nb)](tp if x is None else x, tp, dt, tot, L, H, K, nb, INC=x is None, BL=BLOCK,
                                    BK=_bk(K))
    return tot


def angle_table(tp: torch.Tensor, dt: torch.Tensor, init_angle: torch.Tensor | None) -> torch.Tensor:
    """The kernels' rotation table (B, L, H, 2, K), cos | sin of theta, from tp = tanh(angles) pi (B, L, K) and
    dt (B, L, H), fp32 contiguous, and the initial angle (B, H, K) or None."""
    B, L, H = dt.shape
    K = tp.shape[-1]
    off = _block_offsets(_block_sums(None, tp, dt), None if init_angle is None else init_angle.float().contiguous(),
                         reverse=False)
    cs = torch.empty(B, L, H, 2, K, device=dt.device, dtype=torch.float32)
    _angle_table_kernel[(B * H, off.shape[-1])](tp, dt, off, cs, L, H, K, off.shape[-1], BL=BLOCK, BK=_bk(K))
    return cs


def angle_table_backward(dtheta: torch.Tensor, tp: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d tp (B, L, K), d dt (B, L, H)) of theta from d theta (B, L, H, K), all fp32 contiguous."""
    B, L, H = dt.shape
    K = tp.shape[-1]
    suf = _block_offsets(_block_sums(dtheta, tp, dt), None, reverse=True)  # the later blocks' part of each suffix sum
    dtp = torch.empty(B, L, K, device=dt.device, dtype=torch.float32)
    ddt = torch.empty(B, L, H, device=dt.device, dtype=torch.float32)
    _angle_grad_kernel[(B, suf.shape[-1])](dtheta, suf, tp, dt, dtp, ddt, L, H, K, suf.shape[-1], BL=BLOCK,
                                          BK=_bk(K))
    return dtp, ddt


def angle_from_table(cs: torch.Tensor) -> torch.Tensor:
    """theta mod 2 pi back from cos | sin rows (..., 2, K): the final state's angle (fp32 ulp-accurate)."""
    return torch.remainder(torch.atan2(cs[..., 1, :], cs[..., 0, :]), TWO_PI)
