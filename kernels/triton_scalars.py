"""The Triton scan's per-token scalars other than the angles, forward and backward, each in one kernel.

From adt, dt and trap (B, L, H): the trapezoid weights gamma_s = lambda_s dt_s and w_s = gamma_s + nxt_(s+1) with
lambda = sigmoid(trap) and nxt = (1 - lambda) dt (no next term at a sequence's last position), the decay summed
within each chunk of C positions, acs (B, L, H), and each chunk's total, atot (B, H, nc).

In torch these are ~10 small ops in the forward, and the backward replayed them under autograd: ~30 launches per
call, each a few microseconds of GPU work but tens of host microseconds, which the host pays before the first heavy
kernel can start (the SISO layer's wall time). `token_scalars_reference` is the torch formula, for the tests.

`token_activations_triton` does the same for the layer's own per-token activations before the op (dt and adt from
its in_proj output; `common.token_activations` is the torch version). Its device functions are also the decode
step kernel's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunked import trapezoid_weights
from .common import A_ACTIVATIONS, FMA, cdiv, check_int32_offsets, grad_needed, next_pow2, row_stride, rows_of
from .shared_grad import grad_output, grad_slot

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU install without triton: triton_chunked reports it before anything here is called
    triton = None


def token_scalars_reference(adt: torch.Tensor, dt: torch.Tensor, trap: torch.Tensor, lengths: torch.Tensor | None,
                            C: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gamma, w, acs, atot) in torch (differentiable), in the inputs' promoted dtype."""
    B, L, H = dt.shape
    nc = max(1, -(-L // C))
    gam, _, w = trapezoid_weights(dt, trap, lengths)
    acs = F.pad(adt, (0, 0, 0, nc * C - L)).view(B, nc, C, H).cumsum(2)
    return gam, w, acs.view(B, nc * C, H)[:, :L], acs[:, :, -1].permute(0, 2, 1)


def first_next(dt: torch.Tensor, trap: torch.Tensor) -> torch.Tensor:
    """nxt at each row's first position, (1 - sigmoid(trap_0)) dt_0, (B, H) fp32: the previous-input term an
    initial state takes in."""
    return (1 - torch.sigmoid(trap[:, 0].float())) * dt[:, 0].float()


if triton is not None:

    @triton.jit
    def _softplus(x):
        """torch's softplus (threshold 20), with log1p(e) = log(u) e / (u - 1), u = 1 + e, exact for small e."""
        e = tl.exp(tl.minimum(x, 20.0))
        u = 1.0 + e
        return tl.where(x > 20.0, x, tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0)))

    @triton.jit
    def _activations(dd_dt, dd_a, dt_bias, a_floor, HEAVY_TAIL: tl.constexpr):
        """(dt, A), fp32: dt = softplus(dd_dt + dt_bias), A = min(-act(dd_A), -a_floor) (`token_activations`)."""
        # a float argument is fp32 in a plain launch but fp64 where torch.compile (inductor) launches the kernel;
        # fp64 would spread through A into the step's tl.dot (which refuses mixed dtypes)
        a_floor = tl.cast(a_floor, tl.float32)
        if HEAVY_TAIL:
            act = tl.where(dd_a >= 0, 1.0 + dd_a, 1.0 / (1.0 - tl.minimum(dd_a, 0.0)))
        else:
            act = _softplus(dd_a)
        return _softplus(dd_dt + dt_bias), tl.minimum(-act, -a_floor)

    @triton.jit
    def _rows_tile(n, H, BL: tl.constexpr, BHD: tl.constexpr):
        """Grid (row blocks, head blocks) over n = B * L rows: this program's rows, heads and mask."""
        offs_r = tl.program_id(0) * BL + tl.arange(0, BL)
        offs_h = tl.program_id(1) * BHD + tl.arange(0, BHD)
        hmask = offs_h < H
        return offs_r, offs_h, hmask, (offs_r < n)[:, None] & hmask[None, :]

    @triton.jit
    def _activations_kernel(ddt_ptr, dda_ptr, dtb_ptr, dt_ptr, adt_ptr, n, H, DS, AS, a_floor,
                            BL: tl.constexpr, BHD: tl.constexpr, HEAVY_TAIL: tl.constexpr):
        """Grid (B*L / BL, H / BHD); dd_dt, dd_A rows [B, L, H] (strides DS, AS), dt_bias [H] -> dt, adt [B, L, H]
        fp32: dt = softplus(dd_dt + dt_bias), adt = A dt with A = min(-act(dd_A), -a_floor) (`_activations`)."""
        offs_r, offs_h, hmask, m = _rows_tile(n, H, BL, BHD)
        dd_dt = tl.load(ddt_ptr + offs_r[:, None] * DS + offs_h[None, :], mask=m, other=0.0).to(tl.float32)
        dd_a = tl.load(dda_ptr + offs_r[:, None] * AS + offs_h[None, :], mask=m, other=0.0).to(tl.float32)
        dt, A = _activations(dd_dt, dd_a, tl.load(dtb_ptr + offs_h, mask=hmask, other=0.0)[None, :], a_floor,
                             HEAVY_TAIL)
        out = offs_r[:, None] * H + offs_h[None, :]
        tl.store(dt_ptr + out, dt, mask=m)
        tl.store(adt_ptr + out, A * dt, mask=m)

    @triton.jit
    def _activations_bwd_kernel(ddt_ptr, dda_ptr, dtb_ptr, gdt_ptr, gadt_ptr, d_ddt_ptr, d_dda_ptr, dbias_ptr,
                                n, H, DS, AS, DDS, DAS, a_floor, BL: tl.constexpr, BHD: tl.constexpr,
                                HEAVY_TAIL: tl.constexpr):
        """Grid (B*L / BL, H / BHD); dd_dt, dd_A rows [B, L, H], g_dt, g_adt [B, L, H] fp32 -> d dd_dt, d dd_A rows
        [B, L, H], dbias [B*L / BL, H] (per-program partial sums of dt_bias's gradient).

        With x = dd_dt + dt_bias: d x = (g_dt + g_adt A) sigmoid(x); d dd_A = -g_adt dt act'(dd_A) where the
        clamp passes (-act <= -a_floor, as torch's clamp passes ties)."""
        offs_r, offs_h, hmask, m = _rows_tile(n, H, BL, BHD)
        dd_dt = tl.load(ddt_ptr + offs_r[:, None] * DS + offs_h[None, :], mask=m, other=0.0).to(tl.float32)
        dd_a = tl.load(dda_ptr + offs_r[:, None] * AS + offs_h[None, :], mask=m, other=0.0).to(tl.float32)
        bias = tl.load(dtb_ptr + offs_h, mask=hmask, other=0.0)[None, :]
        x = dd_dt + bias
        dt, A = _activations(dd_dt, dd_a, bias, a_floor, HEAVY_TAIL)
        out = offs_r[:, None] * H + offs_h[None, :]
        gadt = tl.load(gadt_ptr + out, mask=m, other=0.0)
        dx = (tl.load(gdt_ptr + out, mask=m, other=0.0) + gadt * A) * tl.sigmoid(x)
        if HEAVY_TAIL:
            inv = 1.0 / (1.0 - tl.minimum(dd_a, 0.0))
            act, dact = tl.where(dd_a >= 0, 1.0 + dd_a, inv), tl.where(dd_a >= 0, 1.0, inv * inv)
        else:
            act, dact = _softplus(dd_a), tl.sigmoid(dd_a)
        da = tl.where(-act <= -a_floor, -gadt * dt * dact, 0.0)
        tl.store(d_ddt_ptr + offs_r[:, None] * DDS + offs_h[None, :], dx.to(d_ddt_ptr.dtype.element_ty), mask=m)
        tl.store(d_dda_ptr + offs_r[:, None] * DAS + offs_h[None, :], da.to(d_dda_ptr.dtype.element_ty), mask=m)
        tl.store(dbias_ptr + tl.program_id(0) * H + offs_h, tl.sum(tl.where(m, dx, 0.0), axis=0), mask=hmask)

    @triton.jit
    def _tile(L, H, nc, C: tl.constexpr, BHD: tl.constexpr):
        """This program's batch row, chunk, positions and heads (grid (B * nc, head blocks))."""
        b, c = tl.program_id(0) // nc, tl.program_id(0) % nc
        offs_l = c * C + tl.arange(0, C)
        offs_h = tl.program_id(1) * BHD + tl.arange(0, BHD)
        return b, c, offs_l, offs_h, offs_h < H

    @triton.jit
    def _last(len_ptr, b, L, HAS_LEN: tl.constexpr):
        """Row b's last real position (L - 1, or its length - 1 in a padded varlen batch)."""
        last = L - 1
        if HAS_LEN:  # int32 either way: Triton wants one type out of both branches
            last = tl.minimum(tl.load(len_ptr + b).to(tl.int32), L) - 1
        return last

    @triton.jit
    def _load(ptr, b, L, S, offs_l, offs_h, mask):
        """(C, BHD) fp32 tile of a (B, L, H) tensor whose positions are S elements apart, heads contiguous."""
        return tl.load(ptr + (b * L + offs_l[:, None]) * S + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _token_scalars_kernel(adt_ptr, dt_ptr, trap_ptr, len_ptr, gam_ptr, w_ptr, acs_ptr, atot_ptr, L, H, nc,
                              AS, DS, TS, C: tl.constexpr, BHD: tl.constexpr, HAS_LEN: tl.constexpr):
        """Grid (B * chunks, H / BHD); adt, dt, trap rows [B, L, H] (strides AS, DS, TS), lengths [B] -> gamma, w,
        acs [B, L, H] and atot [B, H, nc], fp32: one chunk of C positions per program (see the module docstring)."""
        b, c, offs_l, offs_h, hmask = _tile(L, H, nc, C, BHD)
        m = (offs_l < L)[:, None] & hmask[None, :]
        adt = _load(adt_ptr, b, L, AS, offs_l, offs_h, m)
        out = (b * L + offs_l[:, None]) * H + offs_h[None, :]
        tl.store(acs_ptr + out, tl.cumsum(adt, axis=0), mask=m)
        tl.store(atot_ptr + (b * H + offs_h) * nc + c, tl.sum(adt, axis=0), mask=hmask)
        gam = tl.sigmoid(_load(trap_ptr, b, L, TS, offs_l, offs_h, m)) * _load(dt_ptr, b, L, DS, offs_l, offs_h, m)
        nm = (offs_l < _last(len_ptr, b, L, HAS_LEN))[:, None] & hmask[None, :]  # a next position exists
        # where none does, dt loads as 0 and so does nxt
        nxt = (1 - tl.sigmoid(_load(trap_ptr, b, L, TS, offs_l + 1, offs_h, nm))) * \
            _load(dt_ptr, b, L, DS, offs_l + 1, offs_h, nm)
        tl.store(gam_ptr + out, gam, mask=m)
        tl.store(w_ptr + out, gam + nxt, mask=m)

    @triton.jit
    def _token_scalars_bwd_kernel(dt_ptr, trap_ptr, len_ptr, dgam_ptr, dw_ptr, dw2_ptr, dacs_ptr, dacs2_ptr,
                                  datot_ptr, datot2_ptr, ddt2_ptr, dn0_ptr, dadt_ptr, ddt_ptr, dtrap_ptr,
                                  L, H, nc, DS, TS, DTS, C: tl.constexpr, BHD: tl.constexpr, HAS_LEN: tl.constexpr,
                                  HAS_N0: tl.constexpr):
        """Grid (B * chunks, H / BHD); d gamma, d w x2, d acs x2, ddt2 [B, L, H], d atot x2 [B, H, nc], dn0 [B, H]
        -> d adt, d dt, d trap [B, L, H] (d trap rows of stride DTS).

        The gradient parts arrive in pairs (the dq and dk/dv kernels each write one) and are summed here:
        d adt_s = sum_(s' >= s in its chunk) d acs_s' + d atot_c; with g = d gamma + d w and n_s = d w_(s-1)
        (the gradient of nxt_s, where w_(s-1) took it in; plus dn0 at s = 0 when an initial state took it),
        d dt = lambda g + (1 - lambda) n (+ ddt2, the angles' part) and d trap = dt (g - n) lambda (1 - lambda)."""
        b, c, offs_l, offs_h, hmask = _tile(L, H, nc, C, BHD)
        m = (offs_l < L)[:, None] & hmask[None, :]
        out = (b * L + offs_l[:, None]) * H + offs_h[None, :]
        dacs = tl.load(dacs_ptr + out, mask=m, other=0.0) + tl.load(dacs2_ptr + out, mask=m, other=0.0)
        datot = tl.load(datot_ptr + (b * H + offs_h) * nc + c, mask=hmask, other=0.0) + \
            tl.load(datot2_ptr + (b * H + offs_h) * nc + c, mask=hmask, other=0.0)
        dadt = tl.cumsum(dacs, axis=0, reverse=True) + datot[None, :]
        tl.store(dadt_ptr + out, dadt.to(dadt_ptr.dtype.element_ty), mask=m)
        g = tl.load(dgam_ptr + out, mask=m, other=0.0) + tl.load(dw_ptr + out, mask=m, other=0.0) + \
            tl.load(dw2_ptr + out, mask=m, other=0.0)
        pm = ((offs_l >= 1) & (offs_l <= _last(len_ptr, b, L, HAS_LEN)))[:, None] & hmask[None, :]
        prev = out - H
        n = tl.load(dw_ptr + prev, mask=pm, other=0.0) + tl.load(dw2_ptr + prev, mask=pm, other=0.0)
        if HAS_N0:
            n += tl.where((offs_l == 0)[:, None],
                          tl.load(dn0_ptr + b * H + offs_h, mask=hmask, other=0.0)[None, :], 0.0)
        lam = tl.sigmoid(_load(trap_ptr, b, L, TS, offs_l, offs_h, m))
        dt = _load(dt_ptr, b, L, DS, offs_l, offs_h, m)
        ddt = lam * g + (1 - lam) * n + tl.load(ddt2_ptr + out, mask=m, other=0.0)
        tl.store(ddt_ptr + out, ddt.to(ddt_ptr.dtype.element_ty), mask=m)
        tl.store(dtrap_ptr + (b * L + offs_l[:, None]) * DTS + offs_h[None, :],
                 (dt * (g - n) * lam * (1 - lam)).to(dtrap_ptr.dtype.element_ty), mask=m)


def _launch(dt: torch.Tensor, C: int) -> tuple[tuple[int, int], int, int]:
    """Grid, chunks and heads per program."""
    B, L, H = dt.shape
    nc = max(1, cdiv(L, C))
    bhd = min(next_pow2(H), max(16, 4096 // C))  # tiles of at most 4096 elements
    return (B * nc, cdiv(H, bhd)), nc, bhd


def token_scalars(adt: torch.Tensor, dt: torch.Tensor, trap: torch.Tensor, lengths: torch.Tensor | None,
                  C: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gamma, w, acs) (B, L, H) and atot (B, H, nc), fp32 contiguous, from adt, dt, trap (B, L, H), any float
    dtype, each laid out as `rows_of` keeps it (the layer's trap is a view of its in_proj output: read in place),
    and the rows' lengths (B,) of a padded varlen batch or None."""
    B, L, H = dt.shape
    adt, dt, trap = rows_of(adt), rows_of(dt), rows_of(trap)
    grid, nc, bhd = _launch(dt, C)
    gam, w, acs = (torch.empty(B, L, H, device=dt.device, dtype=torch.float32) for _ in range(3))
    atot = torch.empty(B, H, nc, device=dt.device, dtype=torch.float32)
    _token_scalars_kernel[grid](adt, dt, trap, lengths if lengths is not None else dt, gam, w, acs, atot, L, H, nc,
                                row_stride(adt), row_stride(dt), row_stride(trap), C=C, BHD=bhd,
                                HAS_LEN=lengths is not None, **FMA)
    return gam, w, acs, atot


def token_scalars_backward(dt: torch.Tensor, trap: torch.Tensor, lengths: torch.Tensor | None, C: int,
                           dgam: torch.Tensor, dw: tuple[torch.Tensor, torch.Tensor],
                           dacs: tuple[torch.Tensor, torch.Tensor], datot: tuple[torch.Tensor, torch.Tensor],
                           ddt_angles: torch.Tensor, dn0: torch.Tensor | None,
                           dtypes: tuple[torch.dtype, torch.dtype, torch.dtype], dtrap: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d adt, d dt, d trap), (B, L, H) in `dtypes`, from those of `token_scalars`' outputs, each of
    w, acs and atot in two parts (summed here), all fp32 contiguous; ddt_angles: dt's gradient through the
    angles (added); dn0 (B, H): the gradient of `first_next` when an initial state took it in, else None; dtrap:
    where to write d trap (a `common.rows_of` view of dtypes[2]), else a new tensor."""
    B, L, H = dt.shape
    dt, trap = rows_of(dt), rows_of(trap)
    grid, nc, bhd = _launch(dt, C)
    dadt, ddt = (torch.empty(B, L, H, device=dt.device, dtype=d) for d in dtypes[:2])
    dtrap = torch.empty(B, L, H, device=dt.device, dtype=dtypes[2]) if dtrap is None else dtrap
    _token_scalars_bwd_kernel[grid](dt, trap, lengths if lengths is not None else dt, dgam, *dw, *dacs, *datot,
                                    ddt_angles, dn0 if dn0 is not None else dgam, dadt, ddt, dtrap, L, H, nc,
                                    row_stride(dt), row_stride(trap), row_stride(dtrap), C=C, BHD=bhd,
                                    HAS_LEN=lengths is not None, HAS_N0=dn0 is not None, **FMA)
    return dadt, ddt, dtrap


ACT_ROWS = 64  # rows (tokens) per program of the activation kernels


def _activations_forward(dd_dt, dd_A, dt_bias, a_activation, a_floor):
    """(dt, adt, the inputs as the kernel read them, launch meta)."""
    B, L, H = dd_dt.shape
    dd_dt, dd_A = rows_of(dd_dt), rows_of(dd_A)
    bhd = min(next_pow2(H), 64)
    grid = (cdiv(B * L, ACT_ROWS), cdiv(H, bhd))
    dt, adt = (torch.empty(B, L, H, device=dd_dt.device, dtype=torch.float32) for _ in range(2))
    heavy = a_activation == "heavy_tail"
    _activations_kernel[grid](dd_dt, dd_A, dt_bias, dt, adt, B * L, H, row_stride(dd_dt), row_stride(dd_A),
                              float(a_floor), BL=ACT_ROWS, BHD=bhd, HEAVY_TAIL=heavy, **FMA)
    return dt, adt, (dd_dt, dd_A), (grid, bhd, heavy, float(a_floor))


class _TokenActivations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dd_dt, dd_A, dt_bias, a_activation, a_floor):
        ctx.slots = grad_slot(dd_dt), grad_slot(dd_A)  # the layer's in_proj split (`shared_grad`)
        dt, adt, (dd_dt, dd_A), ctx.meta = _activations_forward(dd_dt, dd_A, dt_bias, a_activation, a_floor)
        ctx.save_for_backward(dd_dt, dd_A, dt_bias)
        return dt, adt

    @staticmethod
    def backward(ctx, g_dt, g_adt):
        dd_dt, dd_A, dt_bias = ctx.saved_tensors
        grid, bhd, heavy, a_floor = ctx.meta
        B, L, H = dd_dt.shape
        d_ddt, d_dda = (grad_output(slot, x.shape, x.dtype, x.device) for slot, x in zip(ctx.slots, (dd_dt, dd_A)))
        dbias = torch.empty(grid[0], H, device=dd_dt.device, dtype=torch.float32)
        _activations_bwd_kernel[grid](dd_dt, dd_A, dt_bias, g_dt.contiguous(), g_adt.contiguous(), d_ddt, d_dda,
                                      dbias, B * L, H, row_stride(dd_dt), row_stride(dd_A), row_stride(d_ddt),
                                      row_stride(d_dda), a_floor, BL=ACT_ROWS,
                                      BHD=bhd, HEAVY_TAIL=heavy, **FMA)
        return d_ddt, d_dda, dbias.sum(0).to(dt_bias.dtype), None, None


def token_activations_triton(dd_dt: torch.Tensor, dd_A: torch.Tensor, dt_bias: torch.Tensor, a_activation: str,
                             a_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`common.token_activations` in one Triton kernel each way: (dt, adt) (B, L, H) fp32 from the in_proj's
    dd_dt and dd_A (B, L, H) (views of it are read in place) and dt_bias (H,) (the layer keeps it fp32)."""
    if a_activation not in A_ACTIVATIONS:
        raise ValueError(f"a_activation must be one of {A_ACTIVATIONS}, got {a_activation!r}")
    B, L, H = dd_dt.shape
    check_int32_offsets("token_activations_triton", B * L, H, "split the batch (the Mamba3 layer does)")
    if not grad_needed(dd_dt, dd_A, dt_bias):
        return _activations_forward(dd_dt, dd_A, dt_bias.contiguous(), a_activation, a_floor)[:2]
    return _TokenActivations.apply(dd_dt, dd_A, dt_bias.contiguous(), a_activation, a_floor)
