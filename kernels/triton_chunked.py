"""Chunked Mamba-3 (MIMO rank R, SISO as R = 1) forward in Triton: the CUDA path of the layer.

Same function and tensor layout as `mamba3_chunked` (see `common`). Two kernels, both parallel over
batch x heads, and over chunks or headdim blocks, so one long sequence still fills the GPU:

1. `_state_scan_kernel`   (B*H, P blocks): walk the chunks, storing the state entering each one, then decaying
   it and adding the chunk's own sum_{s,r} to_end_s (mx_r v_s) kr_{s,r}^T as one matmul accumulate. The
   state stays in registers (fp32); each chunk's own state is never written out.
2. `_chunk_output_kernel` (B*H, chunks): per query rank, the entering state's contribution plus the
   intra-chunk decayed (q.k) v products over all key ranks; D skip, z gate and the rank contraction
   with mimo_o in the epilogue, so only (B, L, H, P) is written.

B/C bias and the data-dependent rotation are applied inside the kernels from the (B, L, R, G, N)
inputs (never materialised per head, which would be H/G times larger). The rotation angles' cos/sin table comes
from `triton_angles`, the other per-token scalars (trapezoid weights, chunk decays) from `triton_scalars`.
The kernel chunk length is the kernel's own (the function does not depend on it).

Gradients: `triton_backward` (kernels in the same style).
"""

from __future__ import annotations

import functools
import os

import torch

from .chunked import entering_state, final_state
from .common import (FMA, Mamba3State, cdiv, check_inputs, check_int32_offsets, grad_needed, halves_layout,
                     heads_from_groups,
                     next_pow2, packed_sequences, pairs_layout, rotate, row_stride, rows_of, varlen_layout)
from .triton_angles import angle_table
from .shared_grad import grad_slot
from .triton_scalars import first_next, token_scalars

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton; triton_available() says so
    triton = None


def triton_available() -> bool:
    """True when triton is importable and there is a GPU (or the interpreter is switched on)."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _rank_pad(rank: int) -> int:
    return next_pow2(rank)


def kernel_chunk(rank: int) -> int:
    """Chunk length C of the kernels: C x R' = 64 rows (R' = R padded to a power of two; 128 for R' = 8) in the
    intra-chunk products. Tensor-core sized, and small enough that the kernels' tiles stay in registers:
    at 128 rows they spill and the forward+backward at b8 x 2048 (R4, H100) is ~40% slower (evals/kernel_report.py).
    Larger chunks would halve the entering states' traffic (~1 GB a pass at R4 b8 x 2048), but at 128 rows every kernel
    lost, 8 warps included (H100, R4 b8 x 2048, ms at 64 rows / 4 warps -> 128 rows / 4 and 8 warps): chunk output
    2.23 -> 12.6 / 2.70, dQ 3.51 -> 15.6 / 7.03, dK/dV 3.91 -> 30.8 / 7.96, the forward scan's run 0.95 -> 1.29."""
    return max(16, 64 // _rank_pad(rank))


if triton is not None:

    @triton.jit
    def _half_columns(HALF: tl.constexpr, BH: tl.constexpr):
        """The rotation pairs state dims (j, j + N/2), j < N/2 (the SISO layout's pairs (2j, 2j+1) are brought
        to this one outside the kernels: read with a stride of 2 inside them, the SISO kernels ran ~5x slower on
        H100). Everything is computed on the two halves, so no lane ever needs another's value."""
        return _pair_block(0, HALF, BH)

    @triton.jit
    def _pair_block(jb, HALF: tl.constexpr, BJ: tl.constexpr):
        """Pairs jb * BJ .. (jb + 1) * BJ - 1 of `_half_columns`: (offs_j, mask, columns of the first half, of the
        second). A pair's two columns only ever meet each other, so the state scans split the pairs across programs."""
        offs_j = jb * BJ + tl.arange(0, BJ)
        return offs_j, offs_j < HALF, offs_j, offs_j + HALF

    @triton.jit
    def _bias_columns(offs_j, HALF: tl.constexpr, BIAS_PAIRS: tl.constexpr):
        """The q/k biases' columns for pair j's two state columns: (j, j + N/2), or (2j, 2j + 1) for biases in the
        pairs layout (SISO: the layer's own parameters, read in place rather than copied to this layout each call)."""
        if BIAS_PAIRS:
            return 2 * offs_j, 2 * offs_j + 1
        else:
            return offs_j, offs_j + HALF

    @triton.jit
    def _repeat(x, C: tl.constexpr, RP: tl.constexpr, BX: tl.constexpr):
        """(C, BX) per-position values -> (C * RP, BX) chunk rows: each position's row for each of its ranks.

        The loaders below take REPEAT: load the broadcast tables (cos/sin and v per position, biases and mimo_x
        per rank) once and repeat them in registers (True), or load them per row (False). In the dQ and dK/dV
        kernels, L1-bound, the per-row loads were about half their L1 load traffic; repeated, R4 b8 x 2048 on
        H100: dK/dV 5.34 -> 4.14 ms, dQ 4.63 -> 3.60 (b1 x 32768: 10.7 -> 8.1, 9.2 -> 7.0; SISO -5%). The state
        scans keep per-row loads: the repeat's layout change sits in their serial chunk loop (forward scan 2.57 ->
        3.80 ms), and the chunk output kernel gained nothing (2.18 -> 2.25)."""
        return tl.reshape(tl.broadcast_to(tl.expand_dims(x, 1), (C, RP, BX)), (C * RP, BX))

    @triton.jit
    def _tile(x, C: tl.constexpr, RP: tl.constexpr, BX: tl.constexpr):
        """(RP, BX) per-rank values -> (C * RP, BX) chunk rows: the ranks' rows once for each position."""
        return tl.reshape(tl.broadcast_to(tl.expand_dims(x, 0), (C, RP, BX)), (C * RP, BX))

    @triton.jit
    def _rank_table(ptr, stride, R, RP: tl.constexpr, CR: tl.constexpr, cols, cmask):
        """(CR, cols) chunk rows of a per-rank table (R rows, stride apart, at ptr): each row its rank's entry
        (zero for the padding ranks >= R), loaded once per rank and repeated in registers."""
        offs_r = tl.arange(0, RP)
        x = tl.load(ptr + offs_r[:, None] * stride + cols[None, :], mask=(offs_r < R)[:, None] & cmask[None, :],
                    other=0.0)
        return _tile(x, CR // RP, RP, cols.shape[0])

    @triton.jit
    def _rotation_tables(cs_ptr, b, h, c, L, H, K, offs_l, lmask, offs_j, CR: tl.constexpr, RP: tl.constexpr,
                         REPEAT: tl.constexpr):
        """cos/sin (fp32) of each row's angle for pair j (the identity for the pairs j >= K), from the (B, L, H, 2, K)
        table `triton_angles.angle_table` made once per call (cheaper to load than to recompute in every kernel)."""
        if REPEAT:
            offs_t, tmask = _chunk_positions(c, L, CR, RP)
            m = tmask[:, None] & (offs_j < K)[None, :]
            ptr = cs_ptr + ((b * L + offs_t[:, None]) * H + h) * 2 * K + offs_j[None, :]
            BX: tl.constexpr = offs_j.shape[0]
            return (_repeat(tl.load(ptr, mask=m, other=1.0).to(tl.float32), CR // RP, RP, BX),
                    _repeat(tl.load(ptr + K, mask=m, other=0.0).to(tl.float32), CR // RP, RP, BX))
        else:
            m = lmask[:, None] & (offs_j < K)[None, :]
            ptr = cs_ptr + ((b * L + offs_l[:, None]) * H + h) * 2 * K + offs_j[None, :]
            return (tl.load(ptr, mask=m, other=1.0).to(tl.float32),
                    tl.load(ptr + K, mask=m, other=0.0).to(tl.float32))

    @triton.jit
    def _load_rotated(base, row_off, lmask, ia, ib, jm, bias_head, ba, bb, r_i, N, R, cos, sin,
                      RP: tl.constexpr, CR: tl.constexpr, REPEAT: tl.constexpr):
        """Bias-added, rotated q or k rows as two (rows, BH) fp32 halves; zero outside the sequence.
        row_off: element offset of each row; bias_head: the head's (R, N) bias, ba / bb its columns for ia / ib
        (`_bias_columns`); r_i: each row's rank."""
        m = lmask[:, None] & jm[None, :]
        xa = tl.load(base + row_off[:, None] + ia[None, :], mask=m, other=0.0).to(tl.float32)
        xb = tl.load(base + row_off[:, None] + ib[None, :], mask=m, other=0.0).to(tl.float32)
        if RP == 1:  # one rank: one bias row for all rows
            xa += tl.load(bias_head + ba, mask=jm, other=0.0)[None, :]
            xb += tl.load(bias_head + bb, mask=jm, other=0.0)[None, :]
        elif REPEAT:
            xa += _rank_table(bias_head, N, R, RP, CR, ba, jm)
            xb += _rank_table(bias_head, N, R, RP, CR, bb, jm)
        else:
            xa += tl.load(bias_head + r_i[:, None] * N + ba[None, :], mask=m, other=0.0)
            xb += tl.load(bias_head + r_i[:, None] * N + bb[None, :], mask=m, other=0.0)
        return tl.where(m, xa * cos - xb * sin, 0.0), tl.where(m, xa * sin + xb * cos, 0.0)

    @triton.jit
    def _chunk_bias_rows(bias_head, N, R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, ba, bb, jm):
        """The head's q or k bias for every row of a chunk, as two (CR, BJ) halves (columns ba / bb). A row's rank
        is the same in every chunk, so the state scans load these once, ahead of their chunk loop."""
        if RP == 1:  # one rank: a (1, BJ) row, broadcast where it is added
            a = tl.load(bias_head + ba, mask=jm, other=0.0)[None, :]
            b = tl.load(bias_head + bb, mask=jm, other=0.0)[None, :]
        else:
            r0 = tl.arange(0, CR) % RP
            m = (r0 < R)[:, None] & jm[None, :]
            a = tl.load(bias_head + r0[:, None] * N + ba[None, :], mask=m, other=0.0)
            b = tl.load(bias_head + r0[:, None] * N + bb[None, :], mask=m, other=0.0)
        return a, b

    @triton.jit
    def _rank_rows(c, L, R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr):
        """The chunk's rows: row i is (position c*C + i // RP, rank i % RP), RP = R rounded up to a power of
        two (rows of ranks >= R are masked off). Inputs laid out (B, L, R, ...) are then one strided tile,
        and each intra-chunk product is a single C*RP-sized matmul."""
        offs_i = tl.arange(0, CR)
        offs_l = c * (CR // RP) + offs_i // RP
        r_i = offs_i % RP
        return r_i, offs_l, (offs_l < L) & (r_i < R)

    @triton.jit
    def _chunk_tile(L, H, G, P, R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, BP: tl.constexpr):
        """What every per-chunk program starts from: its (batch x head) index and chunk (grid (B*H, chunks)),
        b, h and h's group g, the chunk's rows (`_rank_rows`), the headdim lanes, and the rows x lanes mask."""
        pid_bh, c = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        r_i, offs_l, lmask = _rank_rows(c, L, R, RP, CR)
        offs_p = tl.arange(0, BP)
        pmask = offs_p < P
        return pid_bh, c, b, h, h // (H // G), r_i, offs_l, lmask, offs_p, pmask, lmask[:, None] & pmask[None, :]

    @triton.jit
    def _chunk_positions(c, L, CR: tl.constexpr, RP: tl.constexpr):
        """The chunk's positions (one per RP rows) and their mask, for per-position outputs."""
        offs_t = c * (CR // RP) + tl.arange(0, CR // RP)
        return offs_t, offs_t < L

    @triton.jit
    def _rows_v(v_ptr, c, L, offs_l, lmask, HP, offs_p, pmask, mx_head, r_i, R, P,
                RP: tl.constexpr, CR: tl.constexpr, REPEAT: tl.constexpr):
        """(rows, BP) tile of mx_r * v_t (the rank-r input of each row), fp32. v_ptr: (b, h)'s first position,
        rows HP apart; mx_head: the head's (R, P) mimo_x."""
        if REPEAT:
            offs_t, tmask = _chunk_positions(c, L, CR, RP)
            v = tl.load(v_ptr + offs_t[:, None] * HP + offs_p[None, :], mask=tmask[:, None] & pmask[None, :],
                        other=0.0).to(tl.float32)
            return _repeat(v, CR // RP, RP, offs_p.shape[0]) * _rank_table(mx_head, P, R, RP, CR, offs_p, pmask)
        else:
            m = lmask[:, None] & pmask[None, :]
            v = tl.load(v_ptr + offs_l[:, None] * HP + offs_p[None, :], mask=m, other=0.0).to(tl.float32)
            return v * tl.load(mx_head + r_i[:, None] * P + offs_p[None, :], mask=m, other=0.0)

    @triton.jit
    def _seq_flags(seq_ptr, b, c, L, offs_l, lmask, CR: tl.constexpr, RP: tl.constexpr):
        """Packed sequences (`common.sequence_index`: (B, L) int32, one more at each sequence's first token), for
        chunk c (which may be one past either end) and its rows' positions offs_l: each row's index (-1 where
        masked), whether the row continues the sequence of the state entering the chunk (enter: that of the position
        before the chunk, or of the row's first position for chunk 0), whether it belongs to that of the chunk's
        last position (end: it reaches the state the chunk hands on), and whether the entering state is handed on
        through the chunk (carry)."""
        base = seq_ptr + b * L
        sq = tl.load(base + offs_l, mask=lmask, other=-1)
        c0 = c * (CR // RP)
        prev = tl.load(base + tl.minimum(tl.maximum(c0 - 1, 0), L - 1))
        last = tl.load(base + tl.minimum(tl.maximum(c0 + CR // RP - 1, 0), L - 1))
        return sq, sq == prev, sq == last, last == prev

    @triton.jit
    def _decay_mask(acs_ptr, gam_ptr, w_ptr, seq_ptr, b, h, c, L, H, offs_l, lmask, CR: tl.constexpr,
                    RP: tl.constexpr, HAS_SEQ: tl.constexpr):
        """The chunk's per-row scalars acs, gamma, w; its decay mask over rows (t, r) x (s, r'):
        exp(acs_t - acs_s) w_s for t > s, gamma_t for t == s (all rank pairs), 0 for t < s; where it is strictly
        lower (t > s, with packed sequences (HAS_SEQ) t and s in one sequence, as is the mask); and exp(acs), the
        decay of the entering state at each row (0 where a sequence started since, with HAS_SEQ)."""
        acs = tl.load(acs_ptr + (b * L + offs_l) * H + h, mask=lmask, other=0.0)
        gam = tl.load(gam_ptr + (b * L + offs_l) * H + h, mask=lmask, other=0.0)
        w = tl.load(w_ptr + (b * L + offs_l) * H + h, mask=lmask, other=0.0)
        ts = offs_l[:, None] - offs_l[None, :]
        lower = ts > 0
        eacs = tl.exp(acs)
        if HAS_SEQ:
            sq, enter, end, carry = _seq_flags(seq_ptr, b, c, L, offs_l, lmask, CR, RP)
            lower = lower & (sq[:, None] == sq[None, :])
            eacs = tl.where(enter, eacs, 0.0)
        diff = tl.minimum(acs[:, None] - acs[None, :], 0.0)
        mask = tl.where(lower, tl.exp(diff) * w[None, :], tl.where(ts == 0, gam[:, None], 0.0))
        return acs, gam, w, mask, lower, eacs

    @triton.jit
    def _scan_chunk_loads(xbase, cs_ptr, acs_ptr, atot_ptr, seq_ptr, pid_bh, b, h, c, L, H, G, K, N, nc, offs_j, jm,
                          ia, ib, R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, HAS_SEQ: tl.constexpr,
                          REVERSE: tl.constexpr):
        """What both state scans read for chunk c, which may be one past either end (c = -1 or nc: rows all masked,
        atot clamped), as they load a chunk ahead: the rows (`_rank_rows`, the mask also false before position 0),
        their acs, the chunk's atot and decay exp(atot), the rotation table, and the raw halves of the keys or queries
        at xbase. Packed sequences (HAS_SEQ) cut the scan where one starts: the decay is 0 where the entering state
        is not handed on, and acs is made +inf for the forward scan's rows outside the sequence of the chunk's last
        position (their weight in the state handed on, exp(atot - acs) w, is 0), -inf for the reverse scan's rows
        outside that of the entering state (exp(acs) is 0): neither scan reads acs otherwise."""
        r_i, offs_l, lmask = _rank_rows(c, L, R, RP, CR)
        lmask = lmask & (offs_l >= 0)
        acs = tl.load(acs_ptr + (b * L + offs_l) * H + h, mask=lmask, other=0.0)
        atot = tl.load(atot_ptr + pid_bh * nc + tl.minimum(tl.maximum(c, 0), nc - 1))
        decay = tl.exp(atot)
        if HAS_SEQ:
            sq, enter, end, carry = _seq_flags(seq_ptr, b, c, L, offs_l, lmask, CR, RP)
            decay = tl.where(carry, decay, 0.0)
            if REVERSE:
                acs = tl.where(enter, acs, -float("inf"))
            else:
                acs = tl.where(end, acs, float("inf"))
        cos, sin = _rotation_tables(cs_ptr, b, h, c, L, H, K, offs_l, lmask, offs_j, CR, RP, False)
        rows = xbase + ((offs_l * R + r_i) * G * N)[:, None]
        xm = lmask[:, None] & jm[None, :]
        xa = tl.load(rows + ia[None, :], mask=xm, other=0.0)
        xb = tl.load(rows + ib[None, :], mask=xm, other=0.0)
        return r_i, offs_l, lmask, acs, atot, decay, cos, sin, xa, xb

    @triton.jit
    def _scan_loads(kbase, vbase, cs_ptr, acs_ptr, w_ptr, atot_ptr, seq_ptr, pid_bh, b, h, c, L, H, G, K, N, nc, VS,
                    offs_j, jm, ia, ib, offs_p, pmask, R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr,
                    HAS_SEQ: tl.constexpr):
        """The forward scan's loads for chunk c: `_scan_chunk_loads` (keys), the rows' w and the inputs v."""
        r_i, offs_l, lmask, acs, atot, decay, cos, sin, xa, xb = _scan_chunk_loads(
            kbase, cs_ptr, acs_ptr, atot_ptr, seq_ptr, pid_bh, b, h, c, L, H, G, K, N, nc, offs_j, jm, ia, ib, R, RP,
            CR, HAS_SEQ, False)
        w = tl.load(w_ptr + (b * L + offs_l) * H + h, mask=lmask, other=0.0)
        v = tl.load(vbase + offs_l[:, None] * VS + offs_p[None, :], mask=lmask[:, None] & pmask[None, :], other=0.0)
        return acs, w, atot, decay, cos, sin, xa, xb, v

    @triton.jit
    def _state_scan_kernel(k_ptr, kb_ptr, cs_ptr, v_ptr, mx_ptr, acs_ptr, w_ptr, atot_ptr, seq_ptr, s0_ptr,
                           enter_ptr, final_ptr, ckpt_ptr, L, H, G, K, N, P, nc, VS, nseg,
                           R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
                           HALF: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, BPB: tl.constexpr,
                           BJ: tl.constexpr, HAS_S0: tl.constexpr, BIAS_PAIRS: tl.constexpr, SEG: tl.constexpr,
                           FROM_CKPT: tl.constexpr, HAS_SEQ: tl.constexpr):
        """Grid (B*H, P / BPB * N / (2 BJ)): a (BPB rows, BJ pairs) block of the state, in fp32 registers, carried
        through the chunks: E_c+1 = exp(atot_c) E_c + (to_end o mx v)^T kr over the chunk's rows, stored (operand
        dtype) on entry to each chunk. No chunk-parallel first pass: a per-chunk own-state buffer in fp32 cost more
        in traffic (write + read ~4 GB at R4 b8 x 2048) than the serial walk, even at b1 x 32768.
        SEG > 0: segments of SEG chunks (`CKPT_POSITIONS`). The walk also keeps the fp32 state entering each segment
        in ckpt (B*H, nseg, P, N); with FROM_CKPT (the backward's recompute), the grid has a third axis, the segment,
        and each program walks its segment only, from its checkpoint, storing nothing else."""
        pid_bh = tl.program_id(0)
        b, h = pid_bh // H, pid_bh % H
        g = h // (H // G)
        NJ: tl.constexpr = (HALF + BJ - 1) // BJ
        offs_p = tl.program_id(1) // NJ * BPB + tl.arange(0, BPB)
        pmask = offs_p < P
        offs_j, jm, ia, ib = _pair_block(tl.program_id(1) % NJ, HALF, BJ)
        ba, bb = _bias_columns(offs_j, HALF, BIAS_PAIRS)
        m = pmask[:, None] & jm[None, :]
        row = (pid_bh * P + offs_p[:, None]) * N
        c0, c1 = 0, nc
        if FROM_CKPT:
            c0 = tl.program_id(2) * SEG
            c1 = tl.minimum(c0 + SEG, nc)
            seg = ckpt_ptr + ((pid_bh * nseg + tl.program_id(2)) * P + offs_p[:, None]) * N
            run_a = tl.load(seg + ia[None, :], mask=m, other=0.0)
            run_b = tl.load(seg + ib[None, :], mask=m, other=0.0)
        elif HAS_S0:
            run_a = tl.load(s0_ptr + row + ia[None, :], mask=m, other=0.0)
            run_b = tl.load(s0_ptr + row + ib[None, :], mask=m, other=0.0)
        else:  # a zero start needs no buffer (nor its fill launch)
            run_a = tl.zeros([BPB, BJ], dtype=tl.float32)
            run_b = tl.zeros([BPB, BJ], dtype=tl.float32)
        # The chunk rows' ranks are the same in every chunk, so are their bias and mimo_x rows: loaded once, ahead of
        # the chunk loop (R4 H100, a call at full width: b8 x 2048 1.29 -> 1.26 ms, b1 x 32768 4.20 -> 3.83)
        kba, kbb = _chunk_bias_rows(kb_ptr + h * R * N, N, R, RP, CR, ba, bb, jm)
        r0 = tl.arange(0, CR) % RP
        mxr = tl.load(mx_ptr + h * R * P + r0[:, None] * P + offs_p[None, :], mask=(r0 < R)[:, None] & pmask[None, :],
                      other=0.0)
        # Each chunk's loads do not depend on the state: issued one chunk ahead, so their latency overlaps the
        # previous chunk's matmul and state stores instead of stalling the serial chain.
        kbase = k_ptr + b * L * R * G * N + g * N
        vbase = v_ptr + b * L * VS + h * P
        acs_n, w_n, atot_n, dec_n, cos_n, sin_n, xa_n, xb_n, v_n = _scan_loads(
            kbase, vbase, cs_ptr, acs_ptr, w_ptr, atot_ptr, seq_ptr, pid_bh, b, h, c0, L, H, G, K, N, nc, VS, offs_j,
            jm, ia, ib, offs_p, pmask, R, RP, CR, HAS_SEQ)
        for c in range(c0, c1):
            out = enter_ptr + ((pid_bh * nc + c) * P + offs_p[:, None]) * N
            tl.store(out + ia[None, :], run_a.to(enter_ptr.dtype.element_ty), mask=m)
            tl.store(out + ib[None, :], run_b.to(enter_ptr.dtype.element_ty), mask=m)
            if SEG > 0 and not FROM_CKPT:
                if c % SEG == 0:
                    seg = ckpt_ptr + ((pid_bh * nseg + c // SEG) * P + offs_p[:, None]) * N
                    tl.store(seg + ia[None, :], run_a, mask=m)
                    tl.store(seg + ib[None, :], run_b, mask=m)
            acs, w, atot, decay, cos, sin, xa, xb, v = acs_n, w_n, atot_n, dec_n, cos_n, sin_n, xa_n, xb_n, v_n
            acs_n, w_n, atot_n, dec_n, cos_n, sin_n, xa_n, xb_n, v_n = _scan_loads(
                kbase, vbase, cs_ptr, acs_ptr, w_ptr, atot_ptr, seq_ptr, pid_bh, b, h, c + 1, L, H, G, K, N, nc, VS,
                offs_j, jm, ia, ib, offs_p, pmask, R, RP, CR, HAS_SEQ)
            xa = xa.to(tl.float32) + kba  # rows past the sequence get the bias too, but their v is 0
            xb = xb.to(tl.float32) + kbb
            ka = (xa * cos - xb * sin).to(DOT)
            kb = (xa * sin + xb * cos).to(DOT)
            vt = tl.trans(v.to(tl.float32) * mxr * (tl.exp(atot - acs) * w)[:, None]).to(DOT)
            run_a = tl.dot(vt, ka, run_a * decay, input_precision=PREC)
            run_b = tl.dot(vt, kb, run_b * decay, input_precision=PREC)
        if not FROM_CKPT:
            tl.store(final_ptr + row + ia[None, :], run_a, mask=m)
            tl.store(final_ptr + row + ib[None, :], run_b, mask=m)

    @triton.jit
    def _chunk_output_kernel(q_ptr, k_ptr, qb_ptr, kb_ptr, cs_ptr, v_ptr, mx_ptr, mz_ptr, mo_ptr, d_ptr, z_ptr,
                             acs_ptr, gam_ptr, w_ptr, seq_ptr, states_ptr, out_ptr, opre_ptr,
                             L, H, G, K, N, P, nc, VS, ZS,
                             R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
                             HALF: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                             CONTRACT: tl.constexpr, SAVE_O: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                             BIAS_PAIRS: tl.constexpr, HAS_SEQ: tl.constexpr):
        """Grid (B*H, chunks): chunk c's output from the state entering it (stored by the state scan).

        Tried in place of scan + this kernel (H200, inference forward, kernel ms): a program per (batch, head), or
        per segment of chunks starting from the scan's state every few chunks, walking its chunks with the whole
        state in fp32 registers, writing each chunk's output and then updating the state, so no per-chunk state is
        written or read. R4 b8 x 2048 3.15 -> 3.08 (512 programs, no scan); but R4 b1 x 32768 7.83 -> 9.67 at
        best (17 segments a head), SISO b8 x 2048 0.78 -> 0.90, SISO b1 x 32768 1.90 -> 2.31. Each chunk step
        is latency bound (255 registers, 84-160 spilled at 4 warps; 8 warps spill less and ran slower), and
        walking programs are too few to hide it. Since the scan prefetches, the walk loses at R4 b8 x 2048 too
        (2.94 -> 3.03 ms); pipelined by Triton it is slower still (num_stages 2: 6.96 ms; 3 needs 330 KB of shared
        memory at R4). Also slower: the entering state's halves copied by TMA (a tensor descriptor over the states, its
        blocks one chunk's half) straight into the shared memory the matmul reads them from, instead of loaded to
        registers and staged there by Triton (H200, inference forward, this kernel R4 b8 x 2048 2.10 -> 2.42 ms, b1 x
        32768 4.17 -> 4.81, SISO 0.47 -> 0.57, 0.93 -> 1.12): outside a pipelined loop Triton waits on each copy right
        after issuing it (TTGIR), so its latency is exposed rather than overlapped with the q/k loads and rotations."""
        pid_bh, c, b, h, g, r_i, offs_l, lmask, offs_p, pmask, lp = _chunk_tile(L, H, G, P, R, RP, CR, BP)
        offs_j, jm, ia, ib = _half_columns(HALF, BH)
        ba, bb = _bias_columns(offs_j, HALF, BIAS_PAIRS)

        acs, gam, w, mask, lower, eacs = _decay_mask(acs_ptr, gam_ptr, w_ptr, seq_ptr, b, h, c, L, H, offs_l, lmask,
                                                     CR, RP, HAS_SEQ)
        cos, sin = _rotation_tables(cs_ptr, b, h, c, L, H, K, offs_l, lmask, offs_j, CR, RP, False)
        row_off = (offs_l * R + r_i) * G * N
        qa, qb = _load_rotated(q_ptr + b * L * R * G * N + g * N, row_off, lmask, ia, ib, jm,
                               qb_ptr + h * R * N, ba, bb, r_i, N, R, cos, sin, RP, CR, False)
        ka, kb = _load_rotated(k_ptr + b * L * R * G * N + g * N, row_off, lmask, ia, ib, jm,
                               kb_ptr + h * R * N, ba, bb, r_i, N, R, cos, sin, RP, CR, False)
        qa, qb, ka, kb = qa.to(DOT), qb.to(DOT), ka.to(DOT), kb.to(DOT)
        vr = _rows_v(v_ptr + b * L * VS + h * P, c, L, offs_l, lmask, VS, offs_p, pmask, mx_ptr + h * R * P,
                     r_i, R, P, RP, CR, False)
        st = states_ptr + ((pid_bh * nc + c) * P + offs_p[:, None]) * N
        m = pmask[:, None] & jm[None, :]
        ea = tl.load(st + ia[None, :], mask=m, other=0.0)
        eb = tl.load(st + ib[None, :], mask=m, other=0.0)
        o = tl.dot(qa, tl.trans(ea), input_precision=PREC)
        o = tl.dot(qb, tl.trans(eb), o, input_precision=PREC) * eacs[:, None]
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        s = tl.dot(qb, tl.trans(kb), s, input_precision=PREC) * mask
        o = tl.dot(s.to(DOT), vr.to(DOT), o, input_precision=PREC)
        if HAS_D:
            o += tl.load(d_ptr + h).to(tl.float32) * vr
        if SAVE_O:  # the pre-gate output per row, for the backward (cheaper to keep than to recompute)
            tl.store(opre_ptr + ((b * L + offs_l[:, None]) * R + r_i[:, None]) * H * P + h * P + offs_p[None, :],
                     o.to(opre_ptr.dtype.element_ty), mask=lp)
        if HAS_Z:
            zz = tl.load(z_ptr + (b * L + offs_l[:, None]) * ZS + h * P + offs_p[None, :], mask=lp,
                         other=0.0).to(tl.float32)
            zz = zz * tl.load(mz_ptr + (h * R + r_i[:, None]) * P + offs_p[None, :], mask=lp, other=0.0)
            o = o * zz * tl.sigmoid(zz)
        if CONTRACT:  # y_t = sum_r mo_r o_(t, r): rows of one position are R consecutive rows
            o = o * tl.load(mo_ptr + (h * R + r_i[:, None]) * P + offs_p[None, :], mask=lp, other=0.0)
            y = tl.sum(tl.reshape(o, (CR // RP, RP, BP)), axis=1)
            offs_t, tmask = _chunk_positions(c, L, CR, RP)
            tl.store(out_ptr + (b * L + offs_t[:, None]) * H * P + h * P + offs_p[None, :], y,
                     mask=tmask[:, None] & pmask[None, :])
        else:
            tl.store(out_ptr + ((b * L + offs_l[:, None]) * R + r_i[:, None]) * H * P + h * P + offs_p[None, :], o,
                     mask=lp)


# The 16-bit kernels' cos/sin table in fp16 (16), else fp32 (32; evals/kernel_report.py --set for an A/B). fp16's
# rounding (< 2.5e-4) is ~16x below that of the bf16 operands the rotated rows become. The table holds a cos and a
# sin per (position, head, angle) and five kernels read it: at b8 x 2048, 64 heads, K 32 it is 268 MB in fp32,
# against 34 MB for q and k together at R4.
TABLE_BITS = 16


def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


def _initial_state(st: "_Setup", nxt0: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """The state entering the first chunk (B, H, P, N) from the initial state `st.init` (not None), `first_next`
    and mx (H, R, P). Torch, on small tensors (differentiable: the backward takes it back to nxt0 and mx under
    autograd)."""
    return entering_state(st.init, nxt0[:, None], mx.transpose(0, 1), None, None, None)


class _Setup:
    """Everything both directions need: shapes, fp32 views of the small tensors, launch meta-parameters."""

    def __init__(self, q, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, init, lengths,
                 C: int, bias_pairs: bool, seq: torch.Tensor | None = None):
        self.B, self.L, self.R, self.G, self.N = q.shape
        self.H, self.P = v.shape[2:]
        self.K = angles.shape[-1]
        self.C, self.nc = C, max(1, -(-self.L // C))
        dev, f32 = q.device, torch.float32
        # ones stand in for absent projections (and D)
        absent = any(t is None for t in (mimo_x, mimo_z, mimo_o, D))
        ones = _ones(self.H, self.R, self.P, dev) if absent else None
        self.mx = mimo_x.to(f32).contiguous() if mimo_x is not None else ones
        self.mz = mimo_z.to(f32).contiguous() if mimo_z is not None else ones
        self.mo = mimo_o.to(f32).contiguous() if mimo_o is not None else ones
        # biases in the pairs layout (bias_pairs: SISO) are read so by the kernels (`_bias_columns`)
        self.qb, self.kb = q_bias.to(f32).contiguous(), k_bias.to(f32).contiguous()
        self.D = D.to(f32).contiguous() if D is not None else ones
        self.has_d, self.has_z, self.contract = D is not None, z is not None, mimo_o is not None
        self.init, self.lengths, self.seq = init, lengths, seq
        low = q.dtype in (torch.bfloat16, torch.float16)
        dot = (tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16) if low else tl.float32
        self.operand_dtype = q.dtype if low else torch.float32
        rp = _rank_pad(self.R)
        # The pair lanes (BH) and headdim lanes (BP) are at least 64 for 16-bit operands on CUDA. At BH 32 (d_state
        # 64) Triton 3.6 compiled the bf16 dQ kernel into out-of-range shared/local memory accesses (compute-sanitizer
        # memcheck, H200, SISO and MIMO alike: an illegal-address fault or wrong gradients, depending on what lies
        # there); others report the same sm_90 fault for kernels with several tl.dot whose dims are 16 or 32, so
        # headdim 32 gets the same floor. The fp32 kernels are clean at 32 (memcheck, and gradients within 3e-6 of
        # the chunked op), and at 64 ptxas takes minutes on them. Padding lanes are masked like any j >= N/2, p >= P
        # (the interpreter tests pass with both floors forced on).
        floor = 64 if q.is_cuda and low else 1
        bh, bp = max(_pow2(self.N // 2), floor), max(_pow2(self.P), floor)
        self.meta = dict(R=self.R, RP=rp, CR=C * rp, BH=bh, BP=bp, HALF=self.N // 2,
                         BIAS_PAIRS=bias_pairs, DOT=dot, PREC="tf32" if low else "ieee", HAS_SEQ=seq is not None,
                         # 4 warps: the tiles take ~255 registers a thread either way (a few spill at 4), and
                         # 4 warps let 2 programs share an SM, hiding each other's load latency: R4 b8 x 2048
                         # fwd+bwd kernels on H100 36.0 -> 29.3 ms against 8 warps (evals/kernel_report.py)
                         num_warps=4)

    def seq_or(self, placeholder: torch.Tensor) -> torch.Tensor:
        """The packed rows' `common.sequence_index` for a launch, or without packed rows (HAS_SEQ False: never read) a
        tensor the launch takes anyway."""
        return self.seq if self.seq is not None else placeholder

    def rotation_table(self, angles, dt, final: bool = False):
        """The kernels' (B, L, H, 2, K) cos | sin table from the raw angles (a `rows_of` view) and dt, and with
        `final` the angle at each row's last position (else None). The 16-bit kernels get it in fp16
        (`TABLE_BITS`); fp32 inputs, the tests' exact path, in fp32."""
        low = TABLE_BITS == 16 and self.operand_dtype != torch.float32
        return angle_table(angles, dt, None if self.init is None else self.init.angle,
                           torch.float16 if low else torch.float32, self.lengths, final)


@functools.lru_cache(maxsize=16)
def _ones(H: int, R: int, P: int, device: torch.device) -> torch.Tensor:
    """A (H, R, P) fp32 ones tensor standing in for absent mimo projections and D, made once per shape and device
    (the kernels only read it): a fill launch less per call each way, ~0.1 ms of the GPU machine's host time."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when first made under inference mode
        return torch.ones(H, R, P, device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device, looked up once per device (the decode step runs once per token); 1 off
    CUDA (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def state_scan_block(N: int, R: int, heads: int, sms: int) -> tuple[int, int]:
    """(headdim rows, rotation pairs) of the state block each program of a state scan (the forward one and the
    backward's reverse one) carries through the chunks, for `heads` (batch x heads) programs' worth of state on `sms`
    multiprocessors. 64 rows x all pairs (8 warps, `scan_meta`) wherever a block per head gives every other SM a
    program: each program walks all chunks in turn, and narrower blocks repeat the per-chunk loads and rotations.
    Below that (b1 x 32768: 64 heads on 132 SMs) the walk sets the time and narrower blocks, more programs, win:
    32 x 32 for MIMO, 64 x 32 for SISO (measured below; 4 warps each). evals/kernel_report.py --state-blocks
    overrides this function to compare blocks.
    Measured with kernel_report, ms per fwd+bwd for the forward scan (run twice: the forward, and the backward's
    recompute) / the reverse scan, at rows x pairs (64x64 and 64x32 are 8 and 4 warps). H200:
      R4 b8 x 2048:     64x64 1.75 / 0.93,  64x32 2.06 / -
      R4 b2 x 8192:     64x64 1.76 / 0.92,  64x32 1.92 / -,  32x32 2.58 / 1.44,  32x64 3.89 / 1.39,  16x64 3.94 / 1.65
      R4 b1 x 32768:    64x64 5.78 / 3.09,  64x32 6.67 / -,  32x32 5.25 / 2.98,  32x64 12.8 / 3.97,  16x64 7.56 / 3.26
      SISO b8 x 2048:   64x64 0.52 / 0.25,  64x32 0.56 / -
      SISO b2 x 8192:   64x64 0.51 / 0.25,  64x32 0.49 / -,  32x32 0.86 / 0.41,  32x64 0.98 / 0.40,  16x64 1.14 / 0.56
      SISO b1 x 32768:  64x64 1.78 / 0.82,  64x32 1.51 / -,  32x32 1.72 / 0.83,  32x64 3.04 / 1.22,  16x64 2.21 / 1.05
    H100, both scans at the block (op fwd+bwd kernel sum in brackets):
      R4 b1 x 32768:    64x64 5.80 / 3.25 (31.5),  64x32 5.58 / 2.90 (30.9),  32x32 5.20 / 2.92 (30.6)
      SISO b1 x 32768:  64x64 1.94 / 0.90 (9.89),  64x32 1.62 / 0.79 (9.51),  32x32 1.79 / 0.90 (9.80)
    (Before the prefetch: the forward scan 64x32, the reverse 16-64 rows by head count for 2 programs per SM at
    4 warps; H200 R4 2.14 / 0.95, 2.22 / 2.59, 7.49 / 5.04 ms, SISO 0.64 / 0.33, 0.64 / 1.00, 1.96 / 1.85.)
    Tried and dropped: cutting the sequence into S segments walked in parallel (a first pass keeps each segment's
    end state, a second starts each segment from the states folded before it): twice the walking for S times the
    programs. H100, b1 x 32768 at 64x64: R4 S = 2 / 4 / 8 6.00 / 3.00, 5.99 / 3.00, 6.01 / 3.01 against 5.81 / 3.25
    (no gain); SISO at best (S = 4) 1.71 / 0.84 against 1.94 / 0.90, what 64x32 blocks give with one walk; at b8 x
    2048 and b2 x 8192 every S lost (R4 b2 x 8192, S = 2: 2.51 / 1.26 against 1.92 / 1.02)."""
    if 2 * heads <= sms:
        return (32, 32) if R > 1 else (64, 32)
    return 64, N // 2


def scan_block(st: _Setup, walks: int | None = None) -> tuple[int, int]:
    """`state_scan_block` within the kernels' tile sizes: (BPB, BJ) of a state scan walking `walks` (default batch x
    heads) sequences of chunks side by side."""
    bp, bj = state_scan_block(st.N, st.R, st.B * st.H if walks is None else walks, _sm_count(st.mx.device))
    return min(st.meta["BP"], bp), min(st.meta["BH"], _pow2(bj))


def scan_grid(st: _Setup, heads: int, bp: int, bj: int) -> tuple[int, int]:
    """Launch grid of a state scan: (batch x heads, blocks of rows x blocks of pairs)."""
    return heads, cdiv(st.P, bp) * cdiv(st.N // 2, bj)


def scan_meta(st: _Setup, bp: int, bj: int) -> dict:
    """Launch options of both state scans for a (bp rows, bj pairs) block. num_stages 1: Triton's software
    pipelining of the chunk loop's loads made them slower at every size measured (the scans prefetch the next chunk's
    loads themselves). 8 warps for a 64 x 64-pair block: at 4 its tiles spill (reverse scan, R4 b8 x 2048, H200,
    prefetching: 1.42 -> 0.93 ms). Smaller blocks (tests, other shapes) 4 warps."""
    return {**st.meta, "num_stages": 1, "num_warps": 8 if bp * bj >= 64 * 64 else st.meta["num_warps"]}


# Where the heads are few for the GPU (`ckpt_segments`), a training forward keeps the fp32 state entering every
# CKPT_POSITIONS-th position (a whole number of chunks) for the backward, whose recompute of the states in between
# then runs one program per segment and head instead of walking the whole sequence again: at b1 x 32768 a head's walk
# is 2048 chunks long, and the forward's 64 heads fill the GPU only with narrow state blocks. H100, b1 x 32768, the
# forward scan's two runs (forward, recompute) at no checkpoints / every 1024 / 2048 / 4096 positions: R4 5.47 /
# 4.75 / 4.69 / 4.69 ms (the layer's fwd+bwd kernels 37.84 / 37.25 / 36.84 / 37.09), SISO 1.66 / 1.47 / 1.45 / 1.43;
# at 256 and 512 positions R4 4.90 and 4.80. The cost is memory kept from the forward to the backward: P N fp32 per
# head every CKPT_POSITIONS positions, 1 KiB a token at d_model 2048 (64 heads), beside the 32 KiB a token of R4
# pre-gate output the forward keeps anyway. 0: no checkpoints (the recompute walks from the start).
CKPT_POSITIONS = 2048


def ckpt_segments(st: _Setup) -> tuple[int, int]:
    """(chunks per checkpointed segment, segments) of `CKPT_POSITIONS`; (0, 1), no checkpoints, where the forward's
    walks alone fill the GPU (`state_scan_block` gives them whole heads): there, more and shorter walks gained
    nothing (R4 b8 x 2048, H100: the two scans' runs 1.88 ms with checkpoints every 1024 positions, 1.87 without)
    and SISO lost (0.58 -> 0.61)."""
    if CKPT_POSITIONS <= 0 or 2 * st.B * st.H > _sm_count(st.mx.device):
        return 0, 1
    seg = max(1, CKPT_POSITIONS // st.C)
    return seg, cdiv(st.nc, seg)


def _entering_states(st: _Setup, k, v, cs, acs, w, atot, s0, keep_ckpt: bool = False,
                     ckpt: torch.Tensor | None = None):
    """States entering each chunk, (B, H, nc, P, N) in the matmuls' operand dtype (they are only ever matmul
    operands: storing them narrow halves their traffic), the final state (B, H, P, N) in fp32 (the scan
    itself runs in fp32), and with keep_ckpt the checkpoints (B, H, segments, P, N) fp32 (`CKPT_POSITIONS`; None
    without). Given a forward's checkpoints (`ckpt`), the states are recomputed from them, all segments at once,
    and the final state is None (s0 is then not read: the first checkpoint holds it)."""
    B, H, P, N, nc = st.B, st.H, st.P, st.N, st.nc
    enter = torch.empty(B, H, nc, P, N, device=k.device, dtype=st.operand_dtype)
    from_ckpt = ckpt is not None
    seg, nseg = ckpt_segments(st) if keep_ckpt or from_ckpt else (0, 1)
    if from_ckpt and (not seg or ckpt.shape[2] != nseg):  # CKPT_POSITIONS changed between forward and backward
        raise ValueError(f"checkpoints for {ckpt.shape[2]} segments, the scan has {nseg if seg else 'none'}")
    bp, bj = scan_block(st, B * H * (nseg if from_ckpt else 1))
    grid = scan_grid(st, B * H, bp, bj) + ((nseg,) if from_ckpt else ())
    final = None if from_ckpt else torch.empty(B, H, P, N, device=k.device, dtype=torch.float32)
    if seg and not from_ckpt:
        ckpt = torch.empty(B, H, nseg, P, N, device=k.device, dtype=torch.float32)
    _state_scan_kernel[grid](k, st.kb, cs, v, st.mx, acs, w, atot, st.seq_or(acs), s0 if s0 is not None else enter,
                             enter,
                             final if final is not None else enter, ckpt if ckpt is not None else enter, st.L, H,
                             st.G, st.K, N, P, nc, row_stride(v), nseg, BPB=bp, BJ=bj, HAS_S0=s0 is not None,
                             SEG=seg, FROM_CKPT=from_ckpt, **scan_meta(st, bp, bj), **FMA)
    return enter, final, ckpt


def _forward_batched(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, initial_state,
                     lengths, seq, bias_pairs: bool, save_o: bool = False, need_final: bool = True):
    """Batched (B, L) forward with fp32 state (seq: packed rows' `common.sequence_index`, or None); returns (y in v's
    dtype, final Mamba3State in fp32 (None without need_final: a training forward skips its ~15 gathers and small
    ops), and with save_o (a training forward) what the backward takes from it: the pre-gate output per row
    (B, L, R, H, P) in v's dtype and the state checkpoints (`_entering_states`), else None, None)."""
    f32 = torch.float32
    init = initial_state.to(f32) if initial_state is not None else None
    st = _Setup(q, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, init, lengths,
                kernel_chunk(q.shape[2]), bias_pairs, seq)
    gam, w, acs, atot = token_scalars(adt, dt, trap, lengths, st.C)
    s0 = None if init is None else _initial_state(st, first_next(dt, trap), st.mx)
    q, k, v, z = q.contiguous(), k.contiguous(), rows_of(v), rows_of(z)
    cs, theta_last = st.rotation_table(rows_of(angles), dt, need_final)
    states, final_ssm, ckpt = _entering_states(st, k, v, cs, acs, w, atot, s0, keep_ckpt=save_o)
    B, L, H, P = st.B, st.L, st.H, st.P
    out = torch.empty((B, L, H, P) if st.contract else (B, L, st.R, H, P), device=q.device, dtype=v.dtype)
    opre = torch.empty(B, L, st.R, H, P, device=q.device, dtype=v.dtype) if save_o else None
    _chunk_output_kernel[(B * H, st.nc)](q, k, st.qb, st.kb, cs, v, st.mx, st.mz, st.mo, st.D,
                                         z if z is not None else v, acs, gam, w, st.seq_or(acs), states, out,
                                         opre if save_o else out, L, H, st.G, st.K, st.N, P, st.nc, row_stride(v),
                                         row_stride(z if z is not None else v), HAS_D=st.has_d,
                                         HAS_Z=st.has_z, CONTRACT=st.contract, SAVE_O=save_o, **st.meta, **FMA)

    def angle_last(rows, last):  # the table kernel took it at each row's last position already
        return theta_last

    def kr_last(rows, last):
        kb = halves_layout(st.kb) if bias_pairs else st.kb
        kh = heads_from_groups(k[rows, last].to(f32), H, 2) + kb.transpose(0, 1)
        return rotate(kh, theta_last[:, None], False)

    return out, (final_state(angle_last, final_ssm, kr_last, v, lengths, f32) if need_final else None), opre, ckpt


_SPLIT_PIECES = {"v": 2, "trap": 5, "angles": 8, "z": 13}  # positions in the op's 14 tensor inputs


def elements_per_row(L: int, R: int, G: int, N: int, H: int, P: int, K: int) -> int:
    """The most elements any tensor of the op (inputs, the buffers it makes, their gradients) holds per batch row of L
    positions: q and k and their gradients (L R G N), the pre-gate output and its gradient (L R H P), the chunks'
    entering states and their gradients (chunks x H P N), the rotation table (L H 2 K). Batch rows x this must stay
    below `common.INT32_LIMIT`."""
    nc = cdiv(max(L, 1), kernel_chunk(R))
    return max(L * R * G * N, L * R * H * P, nc * H * P * N, L * H * 2 * K)


class _Mamba3Triton(torch.autograd.Function):
    """Batched (B, L) scan; packed sequences arrive already padded (differentiable gathers outside)."""

    @staticmethod
    def forward(ctx, initial_state, lengths, seq, need_final, bias_pairs, *tensors):
        with torch.no_grad():
            y, fin, opre, ckpt = _forward_batched(*tensors, initial_state, lengths, seq, bias_pairs,
                                                  save_o=any(ctx.needs_input_grad[5:]), need_final=need_final)
        ctx.initial_state, ctx.lengths, ctx.seq, ctx.bias_pairs = initial_state, lengths, seq, bias_pairs
        # the inputs that are pieces of the layer's in_proj split: their gradients go into its buffer (`shared_grad`)
        ctx.slots = {name: grad_slot(tensors[i]) for name, i in _SPLIT_PIECES.items()}
        ctx.save_for_backward(opre, ckpt, *tensors)
        if fin is None:
            return (y,)
        ctx.mark_non_differentiable(*fin)
        return (y, *fin)

    @staticmethod
    def backward(ctx, dy, *_):
        from .triton_backward import chunked_backward  # imports this module's kernels

        opre, ckpt, *tensors = ctx.saved_tensors
        grads = chunked_backward(dy, opre, *tensors, ctx.initial_state, ctx.lengths, ctx.bias_pairs, ctx.slots,
                                 ckpt, ctx.seq)
        return (None,) * 5 + tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[5:]))


def mamba3_chunked_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor, trap: torch.Tensor,
    q_bias: torch.Tensor, k_bias: torch.Tensor, angles: torch.Tensor, *,
    mimo_x: torch.Tensor | None = None, mimo_z: torch.Tensor | None = None, mimo_o: torch.Tensor | None = None,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, rope_pairwise: bool = False,
    chunk_size: int | None = None, initial_state: Mamba3State | None = None, return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None, qk_halves: bool = False, seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Mamba3State | None]:
    """Triton Mamba-3 scan, same contract as `mamba3_chunked` (chunk_size is accepted and ignored: the
    kernels pick their own). Inputs in bf16/fp16/fp32; state and accumulation in fp32; the final state
    is fp32. fp32 inputs use exact fp32 matmuls (for tests); 16-bit inputs use tensor cores.

    qk_halves (with rope_pairwise): q and k, and only they, come already in the kernels' layout, each pair
    (2j, 2j+1) at (j, j + N/2) (the layer's fused B/C norm writes them so), which saves a copy of each both ways.
    Their gradients come back in that layout too; the biases and states keep the pairs layout."""
    check_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, rope_pairwise,
                 per_token=False)
    if triton is None:
        raise RuntimeError("mamba3_chunked_triton needs the triton package (pip install 'hybrid-mamba3[gpu]')")
    if q.dtype == torch.float64:
        raise TypeError("the Triton op computes in fp32; use mamba3_chunked / mamba3_reference for float64")
    if q.shape[-1] % 2:
        raise ValueError(f"d_state must be even for the rotation, got {q.shape[-1]}")
    cu_seqlens, seq = packed_sequences(cu_seqlens, seq_idx, q, initial_state, return_final_state)
    if initial_state is not None and cu_seqlens is None and initial_state.ssm.shape[0] != q.shape[0]:
        raise ValueError(f"initial_state has batch {initial_state.ssm.shape[0]}, inputs have {q.shape[0]}")
    bias_pairs = rope_pairwise
    if rope_pairwise:  # the kernels pair dims (j, j + N/2): bring the pairs (2j, 2j+1) there and back (the biases
        # excepted: the kernels read them in place)
        if initial_state is not None:
            initial_state = initial_state._replace(ssm=halves_layout(initial_state.ssm),
                                                   k=halves_layout(initial_state.k))
        if not qk_halves:
            q, k = halves_layout(q), halves_layout(k)
    lengths, valid = None, None
    if cu_seqlens is not None:  # packed sequences -> a padded batch, and back below
        lengths, valid, pad = varlen_layout(cu_seqlens, q, initial_state)
        q, k, v, adt, dt, trap, angles, z = (pad(t) for t in (q, k, v, adt, dt, trap, angles, z))
    (B, L, R, G, N), (H, P) = q.shape, v.shape[2:]
    check_int32_offsets("mamba3_chunked_triton", B, elements_per_row(L, R, G, N, H, P, angles.shape[-1]),
                        "split the batch (the Mamba3 layer does), or shorten the sequences")
    tensors = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z)
    if grad_needed(*tensors):
        y, *fin = _Mamba3Triton.apply(initial_state, lengths, seq, return_final_state, bias_pairs, *tensors)
    else:  # inference: the forward without autograd's bookkeeping
        with torch.no_grad():
            y, fin, _, _ = _forward_batched(*tensors, initial_state, lengths, seq, bias_pairs,
                                            need_final=return_final_state)
    if valid is not None:
        y = y[valid][None]
    if not return_final_state:
        return y, None
    fin = Mamba3State(*fin)  # (the autograd path returns its tensors as a list)
    return y, (fin._replace(ssm=pairs_layout(fin.ssm), k=pairs_layout(fin.k)) if rope_pairwise else fin)
