"""The Triton scan's rotation angles: theta = init + cumsum_t(tanh(angles) dt pi) as the kernels' cos/sin table,
and the gradient taken back to angles and dt, in Triton. The raw angles are read in place (a strided view of the
layer's in_proj output, any float dtype) and tanh is taken in the kernels: in torch, the upcast, tanh, the scale by
pi and the backward's (1 - tanh^2) pi were six more launches, all issued before the first heavy kernel.

theta is [B, L, H, K], the largest per-token tensor of the scan. In torch, its cumsum, offsets, cos, sin and stack,
and their autograd replay in the backward, cost more than the whole forward state pass (kernels/NOTES.md "Rotation
angles"). Here the forward writes only the [B, L, H, 2, K] table the kernels read (fp16 for the 16-bit kernels:
`triton_setup.TABLE_BITS`) and, for a final state, theta at each row's last position; the backward reads d theta
once.

The same numerics as `chunked._cumulative_angles`: an fp32 cumsum within blocks of BLOCK positions on the blocks'
offsets, which are summed in float64 (from each block's sum, itself float64) and reduced mod 2 pi, so theta's error
does not grow with the length. The gradient is the exact one of the unreduced cumsum (the reduction only drops whole
turns): d inc_s = sum_{t >= s} d theta_t, summed in fp32 within blocks.

Launches: tanh(angles) pi once for all heads (forward only: the gradient kernel loops over the heads itself), the
blocks' sums, a scan over them (`_block_offsets_kernel`, one program per head walking its blocks; in torch that
scan and its casts and reduction were five more launches, each costing the host more than the GPU), and the table
(or the gradient).
"""

from __future__ import annotations

import torch

from .common import FMA, cdiv, next_pow2, row_stride

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU install without triton: triton_chunked reports it before anything here is called
    triton = None

# Positions per program, and the span of theta's fp32 sums. Longer blocks run faster (fewer, larger programs; the
# offsets scan walks fewer blocks). At 128 the fp32 partial sums' rounding grows, so theta lost what it had to lose
# elsewhere: pi is applied in float64 (fp32 pi, 2.8e-8 relative and the same sign at every step, was the largest error
# at long lengths) and each block's sum is float64 (an fp32 sum's error accumulated over the blocks). Timings, errors
# and the variants dropped: kernels/NOTES.md "Rotation angles".
BLOCK = 128
OFFSET_TILE = 2048  # fp64 elements (angles x blocks) per step of the offsets scan: 16 a thread at 4 warps
# A 16-bit table on CUDA takes cos and sin from the hardware's approximations (`_cos_sin`); 0: libdevice's exact
# ones everywhere (evals/kernel_dev/kernel_report.py --set triton_angles.FAST_SINCOS=0,1 compares them).
FAST_SINCOS = 1


def _fp32(dt: torch.Tensor) -> torch.Tensor:
    """dt as the kernels read it: fp32 contiguous (the layer's already is: no copy)."""
    return dt.to(torch.float32).contiguous()


if triton is not None:

    @triton.jit
    def _block(L, K, BL: tl.constexpr, BK: tl.constexpr):
        """This program's positions (block program_id(1)) and angle lanes, with their masks."""
        offs_l = tl.program_id(1) * BL + tl.arange(0, BL)
        offs_k = tl.arange(0, BK)
        lmask, kmask = offs_l < L, offs_k < K
        return offs_l, lmask, offs_k, kmask, lmask[:, None] & kmask[None, :]

    @triton.jit
    def _tanh(x):
        """tanh in fp32 to a few ulp, relative error included near 0 (where the 1 - 2/(e^2x + 1) form loses it):
        an odd Taylor polynomial below |x| = 0.3 (first omitted term < 5e-8 relative there), the exponential form
        above (its cancellation costs < 3e-7 there)."""
        ax = tl.abs(x)
        x2 = x * x
        poly = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
        e = tl.exp(-2.0 * ax)
        big = (1.0 - e) / (1.0 + e)
        return tl.where(ax < 0.3, poly, tl.where(x < 0, -big, big))

    @triton.jit
    def _cos_sin(theta, FAST: tl.constexpr):
        """cos and sin of fp32 theta. FAST: theta reduced to [-pi, pi] (k = rint(theta / 2 pi), 2 pi split in two
        fp32 constants, so the reduction's rounding stays below theta's own fp32 rounding), then the hardware's
        sin.approx / cos.approx (absolute error ~1e-6 on [-pi, pi]): for a 16-bit table, whose rounding (2.4e-4)
        is ~200x that. Else libdevice's sinf / cosf, exact to an ulp at any argument but with a slow path for huge
        ones (fp64, local memory) in every program's code."""
        if FAST:
            k = libdevice.rint(theta * 0.15915494309189535)
            r = (theta - k * 6.2831854820251465) + k * 1.7484555314695172e-07
            return libdevice.fast_cosf(r), libdevice.fast_sinf(r)
        else:
            return tl.cos(theta), tl.sin(theta)

    @triton.jit
    def _tanh_pi(a_ptr, AS, b, L, offs_l, offs_k, m):
        """(BL, BK) tanh(angles) pi and tanh(angles) from the raw angles (rows AS elements apart)."""
        t = _tanh(tl.load(a_ptr + (b * L + offs_l[:, None]) * AS + offs_k[None, :], mask=m, other=0.0).to(tl.float32))
        return t * 3.141592653589793, t

    @triton.jit
    def _tanh_pi_kernel(a_ptr, tp_ptr, L, K, AS, BL: tl.constexpr, BK: tl.constexpr):
        """Grid (B, blocks); raw angles rows [B, L, K] (any float dtype) -> tanh(angles) pi [B, L, K] fp32 contiguous.

        Once for all heads (the table kernels, one program per head, would each recompute it: kernels/NOTES.md).
        The factor pi in float64, rounded once: fp32 pi's own rounding (2.8e-8 relative, the same sign at every step)
        was theta's largest error at long lengths."""
        b = tl.program_id(0)
        offs_l, lmask, offs_k, kmask, m = _block(L, K, BL, BK)
        _, t = _tanh_pi(a_ptr, AS, b, L, offs_l, offs_k, m)
        pi = tl.full(t.shape, 3.141592653589793, tl.float64)  # fp64 (a Python float literal would be fp32)
        tl.store(tp_ptr + (b * L + offs_l[:, None]) * K + offs_k[None, :], (t.to(tl.float64) * pi).to(tl.float32),
                 mask=m)

    @triton.jit
    def _increment_factors(tp_ptr, dt_ptr, b, h, L, H, K, offs_l, lmask, offs_k, m):
        """The factors of head h's angle increments tanh(angles_t) pi dt_t: tanh(angles) pi (BL, BK) and dt (BL,);
        zero outside the sequence."""
        tp = tl.load(tp_ptr + (b * L + offs_l[:, None]) * K + offs_k[None, :], mask=m, other=0.0)
        return tp, tl.load(dt_ptr + (b * L + offs_l) * H + h, mask=lmask, other=0.0)

    @triton.jit
    def _mod_two_pi(x):
        """float64 x reduced to [0, 2 pi) (as torch.remainder; 2 pi as an fp64 constant: a Python float literal
        would be rounded to fp32)."""
        two_pi = tl.full(x.shape, 6.283185307179586, tl.float64)
        return x - two_pi * tl.floor(x * (1.0 / two_pi))

    @triton.jit
    def _block_sums_kernel(src_ptr, dt_ptr, tot_ptr, L, H, K, nb,
                           INC: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr):
        """Grid (B*H, blocks); x [B, L, H, K] -> sums [B, H, K, blocks] fp32, or with INC tanh(angles) pi [B, L, K]
        and dt [B, L, H] -> the increments' sums [2, B, H, K, blocks].

        Each block's sum over its positions, of x or of the increments (INC), these summed in float64 and stored as
        two fp32 planes, the sum's rounding and what it left (a float64 pointer in the block offsets scan failed
        Triton 3.6's TritonGPUOptimizeThreadLocality pass). Blocks last, so `_block_offsets_kernel` scans them along
        contiguous memory."""
        pid_bh = tl.program_id(0)
        b, h = pid_bh // H, pid_bh % H
        offs_l, lmask, offs_k, kmask, m = _block(L, K, BL, BK)
        out = tot_ptr + (pid_bh * K + offs_k) * nb + tl.program_id(1)
        if INC:
            tp, dt = _increment_factors(src_ptr, dt_ptr, b, h, L, H, K, offs_l, lmask, offs_k, m)
            x = tl.sum(tp.to(tl.float64) * dt.to(tl.float64)[:, None], axis=0)
            hi = x.to(tl.float32)
            tl.store(out, hi, mask=kmask)
            tl.store(out + tl.num_programs(0) * K * nb, (x - hi.to(tl.float64)).to(tl.float32), mask=kmask)
        else:
            x = tl.load(src_ptr + ((b * L + offs_l[:, None]) * H + h) * K + offs_k[None, :], mask=m, other=0.0)
            tl.store(out, tl.sum(x, axis=0), mask=kmask)

    @triton.jit
    def _angle_table_kernel(tp_ptr, dt_ptr, off_ptr, cs_ptr, len_ptr, last_ptr, L, H, K, nb,
                            BL: tl.constexpr, BK: tl.constexpr, LAST: tl.constexpr, HAS_LEN: tl.constexpr,
                            FAST: tl.constexpr):
        """Grid (B*H, blocks); tanh(angles) pi [B, L, K], dt [B, L, H], block offsets [B, H, K, blocks] -> cos | sin
        [B, L, H, 2, K] in the table's dtype, and with LAST theta [B, H, K] fp32 at each row's last position.

        theta = the block's offset + the cumsum within it; the last position is L - 1, or the row's length - 1, at
        least 0."""
        pid_bh = tl.program_id(0)
        b, h = pid_bh // H, pid_bh % H
        offs_l, lmask, offs_k, kmask, m = _block(L, K, BL, BK)
        off = tl.load(off_ptr + (pid_bh * K + offs_k) * nb + tl.program_id(1), mask=kmask, other=0.0)
        tp, dt = _increment_factors(tp_ptr, dt_ptr, b, h, L, H, K, offs_l, lmask, offs_k, m)
        theta = tl.cumsum(tp * dt[:, None], axis=0) + off[None, :]
        out = cs_ptr + ((b * L + offs_l[:, None]) * H + h) * 2 * K + offs_k[None, :]
        cos, sin = _cos_sin(theta, FAST)
        tl.store(out, cos.to(cs_ptr.dtype.element_ty), mask=m)
        tl.store(out + K, sin.to(cs_ptr.dtype.element_ty), mask=m)
        if LAST:
            last = L - 1
            if HAS_LEN:
                last = tl.maximum(tl.load(len_ptr + b).to(tl.int32) - 1, 0)
            tl.store(last_ptr + pid_bh * K + offs_k[None, :] + 0 * offs_l[:, None], theta,
                     mask=m & (offs_l == last)[:, None])

    @triton.jit
    def _angle_grad_kernel(dth_ptr, suf_ptr, a_ptr, dt_ptr, da_ptr, ddt_ptr, L, H, K, nb, AS, DAS,
                           BL: tl.constexpr, BK: tl.constexpr):
        """Grid (B, blocks); d theta [B, L, H, K], suffix sums [B, H, K, blocks], angles rows [B, L, K], dt [B, L, H]
        -> d angles [B, L, K] (positions DAS apart), d dt [B, L, H].

        All heads in one program (the angles' gradient sums over them, so no atomics):
        g_s = sum_{t >= s} d theta_t (the later blocks' part precomputed in `suf`), then
        d dt_s = sum_k g_s tanh(angles_s) pi and d angles_s = sum_h g_s dt_s (1 - tanh(angles_s)^2) pi, stored
        (B, L, K) in da's dtype, its positions DAS elements apart."""
        b = tl.program_id(0)
        offs_l, lmask, offs_k, kmask, m = _block(L, K, BL, BK)
        tp, t = _tanh_pi(a_ptr, AS, b, L, offs_l, offs_k, m)
        acc = tl.zeros([BL, BK], dtype=tl.float32)
        for h in range(H):
            dth = tl.load(dth_ptr + ((b * L + offs_l[:, None]) * H + h) * K + offs_k[None, :], mask=m, other=0.0)
            suf = tl.load(suf_ptr + ((b * H + h) * K + offs_k) * nb + tl.program_id(1), mask=kmask, other=0.0)
            g = tl.cumsum(dth, axis=0, reverse=True) + suf[None, :]
            tl.store(ddt_ptr + (b * L + offs_l) * H + h, tl.sum(g * tp, axis=1), mask=lmask)
            acc += g * tl.load(dt_ptr + (b * L + offs_l) * H + h, mask=lmask, other=0.0)[:, None]
        da = acc * (1.0 - t * t) * 3.141592653589793
        tl.store(da_ptr + (b * L + offs_l[:, None]) * DAS + offs_k[None, :], da.to(da_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _block_offsets_kernel(tot_ptr, init_ptr, off_ptr, K, nb, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
                              LO: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr):
        """Grid (B*H,); block sums tot [B, H, K, nb] (LO: [2, B, H, K, nb], the second plane the sums' rounding)
        -> off [B, H, K, nb] fp32.

        Each block's offset from the block sums, summed in float64 over the blocks before it (REVERSE: after it).
        Forward: plus the initial angle, reduced mod 2 pi."""
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
            if LO:
                x += tl.load(tot_ptr + tl.num_programs(0) * K * nb + ptrs, mask=m, other=0.0).to(tl.float64)
            off = carry[:, None] + (tl.cumsum(x, axis=1) - x)
            carry += tl.sum(x, axis=1)
            if not REVERSE:
                off = _mod_two_pi(off)
            tl.store(off_ptr + ptrs, off.to(tl.float32), mask=m)


def _block_offsets(tot: torch.Tensor, init_angle: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """Each block's offset (B, H, K, nb) fp32 from the block sums (`_block_sums`): the earlier blocks' sum plus the
    initial angle, mod 2 pi (forward), or the later blocks' sum (reverse, for the gradient's suffix sums)."""
    B, H, K, nb = tot.shape[-4:]
    off = torch.empty(B, H, K, nb, device=tot.device, dtype=torch.float32)
    bk = next_pow2(K)
    _block_offsets_kernel[(B * H,)](tot, init_angle if init_angle is not None else tot, off, K, nb,
                                    HAS_INIT=init_angle is not None, REVERSE=reverse, LO=tot.dim() == 5, BK=bk,
                                    BB=max(16, OFFSET_TILE // bk), **FMA)
    return off


def _block_sums(src: torch.Tensor, increments: bool, dt: torch.Tensor, K: int) -> torch.Tensor:
    """Block sums (B, H, K, blocks) fp32 of src (B, L, H, K), or with increments (2, B, H, K, blocks) of the angle
    increments tanh(angles) pi dt from src = tanh(angles) pi (B, L, K): their float64 sums as fp32 rounding + rest."""
    B, L, H = dt.shape
    nb = cdiv(L, BLOCK)
    tot = torch.empty(*(2,) if increments else (), B, H, K, nb, device=dt.device, dtype=torch.float32)
    _block_sums_kernel[(B * H, nb)](src, dt, tot, L, H, K, nb, INC=increments, BL=BLOCK, BK=next_pow2(K), **FMA)
    return tot


def angle_table(angles: torch.Tensor, dt: torch.Tensor, init_angle: torch.Tensor | None,
                dtype: torch.dtype = torch.float32, lengths: torch.Tensor | None = None,
                final: bool = False, fast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernels' rotation table (B, L, H, 2, K) in `dtype`, cos | sin of theta, from the raw angles (B, L, K) (any
    float dtype; a `rows_of` view), dt (B, L, H), and the initial angle (B, H, K) or None; with `final`, also theta
    (fp32, B, H, K) at each row's last position (L - 1, or lengths - 1): the final state's angle, exact whatever
    the table's dtype. theta is computed in fp32 either way; a 16-bit table rounds only its cos and sin. fast: cos and
    sin from the hardware's approximations (`_cos_sin`); None: for a 16-bit table on CUDA (`FAST_SINCOS`)."""
    dt = _fp32(dt)
    B, L, H = dt.shape
    K, nb = angles.shape[-1], cdiv(L, BLOCK)
    tp = torch.empty(B, L, K, device=dt.device, dtype=torch.float32)
    _tanh_pi_kernel[(B, nb)](angles, tp, L, K, row_stride(angles), BL=BLOCK, BK=next_pow2(K), **FMA)
    off = _block_offsets(_block_sums(tp, True, dt, K),
                         None if init_angle is None else init_angle.float().contiguous(), reverse=False)
    cs = torch.empty(B, L, H, 2, K, device=dt.device, dtype=dtype)
    last = torch.empty(B, H, K, device=dt.device, dtype=torch.float32) if final else None
    _angle_table_kernel[(B * H, nb)](tp, dt, off, cs, lengths if lengths is not None else dt,
                                     last if final else off, L, H, K, nb, BL=BLOCK, BK=next_pow2(K), LAST=final,
                                     HAS_LEN=lengths is not None,
                                     FAST=(bool(FAST_SINCOS) and cs.is_cuda and dtype != torch.float32)
                                     if fast is None else fast, **FMA)
    return cs, last


def angle_table_backward(dtheta: torch.Tensor, angles: torch.Tensor, dt: torch.Tensor,
                         da: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d angles (B, L, K) in angles' dtype, d dt (B, L, H) fp32) of theta from d theta (B, L, H, K) fp32
    contiguous; angles and dt as `angle_table` takes them. da: where to write d angles (a `common.rows_of` view),
    else a new contiguous tensor."""
    dt = _fp32(dt)
    B, L, H = dt.shape
    K = angles.shape[-1]
    suf = _block_offsets(_block_sums(dtheta, False, dt, K), None, reverse=True)  # the later blocks' part of each sum
    da = torch.empty(B, L, K, device=dt.device, dtype=angles.dtype) if da is None else da
    ddt = torch.empty(B, L, H, device=dt.device, dtype=torch.float32)
    _angle_grad_kernel[(B, suf.shape[-1])](dtheta, suf, angles, dt, da, ddt, L, H, K, suf.shape[-1],
                                          row_stride(angles), row_stride(da), BL=BLOCK, BK=next_pow2(K), **FMA)
    return da, ddt
