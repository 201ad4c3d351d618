"""Backward of the Triton Mamba-3 scan (the forward: `triton_forward`; the autograd Function: `triton_chunked`).

Per chunk c, rows i = (position t, rank r) (`triton_tiles`), rotated q_i, k_i (N), inputs v_i = mx_r v_t (P), the
state E_c entering the chunk (P x N) and the decay mask M (see `triton_tiles._decay_mask`):

    o_i   = exp(acs_t) q_i E_c^T + sum_j M_ij (q_i . k_j) v_j          (pre-gate output)
    E_c+1 = exp(atot_c) E_c + sum_i to_end_i v_i k_i^T,   to_end_i = exp(atot_c - acs_t) w_t

Four kernels, after the entering states are recomputed with the forward's state scan (`triton_scan`; cheaper in
memory than saving them, and from the forward's checkpoints where it kept some); the forward keeps only the pre-gate
output o per row, [B, L, R, H, P].

1. `_bwd_dout_kernel` (B*H, position blocks): the epilogue (z gate, D skip, mimo_o contraction) taken back to dO,
   written for the next kernels; gradients of z, mimo_z, mimo_o, D. Elementwise only.
2. `_state_scan_bwd_kernel` (B*H, state blocks): the state scan backwards, d run_c = dE_c + exp(atot_c) d run_c+1
   with dE_c = (exp(acs) dO)^T Q made in registers, leaving the gradient of each chunk's own state (d run_c+1).
3. `_bwd_dq_kernel` (B*H, chunks): dQ = exp(acs) dO E + (dA o M) K with dA = dO V^T; d acs, d w, d gamma
   from dA o S (the mask's entries), the inter-chunk part of d acs, and the chunk decay's part of d atot.
4. `_bwd_dkdv_kernel` (B*H, chunks): dK = (dA o M)^T Q + to_end (V dOwn); dV = (S o M)^T dO + to_end
   (K dOwn^T) + D dO; d acs, d w, d atot from the to_end weights.
dQ and dK are split (as in flash attention's backward) so each kernel's tiles fit in registers. Both are L1-bound
(shared memory traffic of the matmul operands and layout conversions, and register spills; not the tensor cores nor
the atomics), so both load their broadcast tables once per position or rank and repeat them in registers
(`triton_tiles._repeat`). Both take the rotation back (d theta, and dq / dk unrotated, added atomically into the
group's rows and, summed over the chunk, into each (batch, head)'s bias gradient). What was measured for these
choices, and the variants tried and dropped: kernels/NOTES.md "Backward".

Then d theta goes back to angles and dt through `triton_angles`, the gradients of gamma, w, acs and atot back to
adt, dt and trap through `triton_scalars`, the initial state's entering term (small) through torch autograd, and
torch sums the per-(batch, head) and per-block parts of the parameters' gradients.
"""

from __future__ import annotations

import torch

from . import triton_scan as scan  # scan.* looked up per call (evals/kernel_dev/kernel_report.py overrides its policy)
from .common import FMA, cdiv, pairs_layout, row_stride, rows_of
from .shared_grad import grad_output
from .triton_angles import angle_table_backward
from .triton_scalars import first_next, token_scalars, token_scalars_backward
from .triton_setup import _initial_state, _Setup, kernel_chunk
from .triton_tiles import (_bias_columns, _chunk_bias_rows, _chunk_positions, _chunk_tile, _decay_mask, _half_columns,
                           _load_rotated, _pair_block, _rank_table, _repeat, _rotation_tables, _rows_v,
                           _scan_chunk_loads, _seq_flags)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU install without triton: triton_chunked reports it before anything here is called
    triton = None

if triton is not None:

    @triton.jit
    def _rank_sum(x, CR: tl.constexpr, RP: tl.constexpr, BX: tl.constexpr):
        """(rows, BX) -> (positions, BX): the R rows of each position summed."""
        return tl.sum(tl.reshape(x, (CR // RP, RP, BX)), axis=1)

    @triton.jit
    def _position_sum(x, CR: tl.constexpr, RP: tl.constexpr, BX: tl.constexpr):
        """(rows, BX) -> (RP, BX): each rank's rows summed over the chunk's positions."""
        return tl.sum(tl.reshape(x, (CR // RP, RP, BX)), axis=0)

    @triton.jit
    def _rank_sum_1d(x, CR: tl.constexpr, RP: tl.constexpr):
        return tl.sum(tl.reshape(x, (CR // RP, RP)), axis=1)

    @triton.jit
    def _rotated16(base, row_off, lmask, ia, ib, jm, bias_head, ba, bb, r_i, N, R, cos, sin, RP: tl.constexpr,
                   CR: tl.constexpr, REPEAT: tl.constexpr, DOT: tl.constexpr):
        """Rotated rows as 16-bit halves: the values the matmuls see. The rotation's gradient is taken with the
        same values, so its terms cancel exactly where the function is rotation invariant (scores depend on
        theta_t - theta_s only), which keeps d theta, and through it d dt and d angles, accurate."""
        xa, xb = _load_rotated(base, row_off, lmask, ia, ib, jm, bias_head, ba, bb, r_i, N, R, cos, sin, RP, CR,
                               REPEAT)
        return xa.to(DOT), xb.to(DOT)

    @triton.jit
    def _store_unrotated(dst_ptr, part_ptr, rows, head_off, hm, ia, ib, dxa, dxb, cos, sin,
                         CR: tl.constexpr, RP: tl.constexpr, BH: tl.constexpr, offs_r, rm, jm):
        """(dra, drb) in the rotated frame -> (dxa, dxb) = R(-theta) (dra, drb): added (atomically: all heads of
        a group share the q/k rows) into the group's gradient, and each rank's sum over the chunk added into
        this (batch, head)'s bias gradient (part_ptr + head_off: (RP, 2 BH), summed over the batch by torch).
        The programs running at once are mostly of different (batch, head)s, so those adds rarely collide; per-chunk
        partials instead would be hundreds of MB, and a reduce over them. The adds are relaxed (no ordering is
        needed, only the sum): the default acq_rel atomics cost the dq and dk/dv kernels a third of their time, and
        relaxed ones cost nothing measurable (kernels/NOTES.md "Backward: atomics")."""
        ua = dxa * cos + dxb * sin
        ub = dxb * cos - dxa * sin
        tl.atomic_add(dst_ptr + rows[:, None] + ia[None, :], ua, mask=hm, sem="relaxed")
        tl.atomic_add(dst_ptr + rows[:, None] + ib[None, :], ub, mask=hm, sem="relaxed")
        pm = rm[:, None] & jm[None, :]
        tl.atomic_add(part_ptr + head_off + offs_r[:, None] * 2 * BH + ia[None, :], _position_sum(ua, CR, RP, BH),
                      mask=pm, sem="relaxed")
        tl.atomic_add(part_ptr + head_off + offs_r[:, None] * 2 * BH + ib[None, :], _position_sum(ub, CR, RP, BH),
                      mask=pm, sem="relaxed")

    @triton.jit
    def _bwd_dout_kernel(v_ptr, mx_ptr, mz_ptr, mo_ptr, d_ptr, z_ptr, opre_ptr, dy_ptr,
                         do_ptr, dz_ptr, dmz_ptr, dmo_ptr, dd_ptr, L, H, P, nblk, VS, ZS, DZS,
                         R: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, CONTRACT: tl.constexpr, DOT: tl.constexpr):
        """Grid (B*H, position blocks of BT); opre / dO [B, L, R, H, P], dy [B, L, H, P] (CONTRACT; else like opre),
        v / z / dz rows [B, L, H, P] -> dO, dz, and partial sums dmz / dmo [B*H, blocks, R, P], dD [B*H, blocks].

        The epilogue (z gate, D skip, mimo_o contraction) taken back from dy to dO, the pre-gate output's gradient.
        Elementwise work only, one (BT, P) tile per rank in turn, so the sums over ranks and positions are plain
        accumulations (no row reshapes, which cost registers). At R4 it spills a little yet beats every spill-free
        and more-warps variant tried, and beats making dO inside the reverse state scan (kernels/NOTES.md
        "Backward: dO kernel")."""
        pid_bh, blk = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        offs_t = blk * BT + tl.arange(0, BT)
        offs_p = tl.arange(0, BP)
        pmask = offs_p < P
        tp = (offs_t < L)[:, None] & pmask[None, :]
        pos = (b * L + offs_t[:, None]) * H * P + h * P + offs_p[None, :]  # (B, L, H, P) contiguous: dy
        col = h * P + offs_p[None, :]  # v, z and dz: rows of their own strides (`rows_of`)
        part = (pid_bh * nblk + blk) * R * P + offs_p  # (B*H, blocks, R, P) partial sums, rank 0
        if HAS_Z:
            zt = tl.load(z_ptr + (b * L + offs_t[:, None]) * ZS + col, mask=tp, other=0.0).to(tl.float32)
            dz = tl.zeros([BT, BP], dtype=tl.float32)
        if CONTRACT:
            dy = tl.load(dy_ptr + pos, mask=tp, other=0.0).to(tl.float32)
        if HAS_D:
            vt = tl.load(v_ptr + (b * L + offs_t[:, None]) * VS + col, mask=tp, other=0.0).to(tl.float32)
            dd = tl.zeros([BP], dtype=tl.float32)
        for r in tl.static_range(R):
            row = ((b * L + offs_t[:, None]) * R + r) * H * P + h * P + offs_p[None, :]  # (B, L, R, H, P)
            prm = (h * R + r) * P + offs_p  # (H, R, P) parameters
            o = tl.load(opre_ptr + row, mask=tp, other=0.0).to(tl.float32)
            if CONTRACT:
                dg = dy * tl.load(mo_ptr + prm, mask=pmask, other=0.0)[None, :]
            else:
                dy = tl.load(dy_ptr + row, mask=tp, other=0.0).to(tl.float32)
                dg = dy
            if HAS_Z:
                mz = tl.load(mz_ptr + prm, mask=pmask, other=0.0)[None, :]
                zz = zt * mz
                sg = tl.sigmoid(zz)
                gate = zz * sg
                dzz = dg * o * sg * (1.0 + zz * (1.0 - sg))  # d silu(x)/dx = sigmoid(x) (1 + x (1 - sigmoid(x)))
                dz += dzz * mz
                tl.store(dmz_ptr + part + r * P, tl.sum(dzz * zt, axis=0), mask=pmask)
                o = o * gate
                do = dg * gate
            else:
                do = dg
            if CONTRACT:
                tl.store(dmo_ptr + part + r * P, tl.sum(dy * o, axis=0), mask=pmask)
            if HAS_D:
                dd += tl.sum(do * vt, axis=0) * tl.load(mx_ptr + prm, mask=pmask, other=0.0)
            tl.store(do_ptr + row, do.to(DOT).to(do_ptr.dtype.element_ty), mask=tp)
        if HAS_Z:
            tl.store(dz_ptr + (b * L + offs_t[:, None]) * DZS + col, dz.to(dz_ptr.dtype.element_ty), mask=tp)
        if HAS_D:
            tl.store(dd_ptr + pid_bh * nblk + blk, tl.sum(dd, axis=0))

    @triton.jit
    def _rscan_loads(qbase, cs_ptr, do_ptr, acs_ptr, atot_ptr, seq_ptr, pid_bh, b, h, c, L, H, G, K, N, P, nc,
                     offs_j, jm, ia, ib, offs_p, pmask, R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr,
                     HAS_SEQ: tl.constexpr):
        """The reverse scan's loads for chunk c: `_scan_chunk_loads` (queries) and dO."""
        r_i, offs_l, lmask, acs, atot, decay, cos, sin, xa, xb = _scan_chunk_loads(
            qbase, cs_ptr, acs_ptr, atot_ptr, seq_ptr, pid_bh, b, h, c, L, H, G, K, N, nc, offs_j, jm, ia, ib, R, RP,
            CR, HAS_SEQ, True)
        do = tl.load(do_ptr + ((b * L + offs_l[:, None]) * R + r_i[:, None]) * H * P + h * P + offs_p[None, :],
                     mask=lmask[:, None] & pmask[None, :], other=0.0)
        return acs, decay, cos, sin, xa, xb, do

    @triton.jit
    def _state_scan_bwd_kernel(q_ptr, qb_ptr, cs_ptr, do_ptr, acs_ptr, atot_ptr, seq_ptr, down_ptr, ds0_ptr,
                               L, H, G, K, N, P, nc,
                               R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, BH: tl.constexpr,
                               BP: tl.constexpr, HALF: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                               BPB: tl.constexpr, BJ: tl.constexpr, BIAS_PAIRS: tl.constexpr, HAS_SEQ: tl.constexpr):
        """Grid (B*H, P / BPB * N / (2 BJ)); q [B, L, R, G, N], dO [B, L, R, H, P], cs [B, L, H, 2, K], acs [B, L, H],
        atot [B*H, nc] -> down [B*H, nc, P, N] (operand dtype), ds0 [B*H, P, N] fp32.

        The forward's state scan run backwards: a (BPB rows, BJ pairs) block of d run (the gradient of the state
        entering the next chunk) in fp32 registers, carried from the last chunk to the first:
        d run_c = dE_c + exp(atot_c) d run_c+1, with the chunk's own term dE_c = (exp(acs) dO)^T qr made here
        (one matmul accumulate), so no per-chunk dE is ever written and read back. Stores d run_c+1, the
        gradient of chunk c's own state (an operand of the dQ and dK/dV kernels); the state entering the first
        chunk gets d run_0. The decay's gradient exp(atot_c) <d run_c+1, E_c> is taken in the dQ kernel, which
        has E_c at hand: here, its reduction over the whole tile would put a barrier in the serial chain
        (kernels/NOTES.md "Backward: reverse state scan")."""
        pid_bh = tl.program_id(0)
        b, h = pid_bh // H, pid_bh % H
        g = h // (H // G)
        NJ: tl.constexpr = (HALF + BJ - 1) // BJ
        offs_p = tl.program_id(1) // NJ * BPB + tl.arange(0, BPB)
        pmask = offs_p < P
        offs_j, jm, ia, ib = _pair_block(tl.program_id(1) % NJ, HALF, BJ)
        ba, bb = _bias_columns(offs_j, HALF, BIAS_PAIRS)
        m = pmask[:, None] & jm[None, :]
        run_a = tl.zeros([BPB, BJ], dtype=tl.float32)  # the final state carries no gradient
        run_b = tl.zeros([BPB, BJ], dtype=tl.float32)
        qba, qbb = _chunk_bias_rows(qb_ptr + h * R * N, N, R, RP, CR, ba, bb, jm)
        qbase = q_ptr + b * L * R * G * N + g * N
        acs_n, dec_n, cos_n, sin_n, xa_n, xb_n, do_n = _rscan_loads(
            qbase, cs_ptr, do_ptr, acs_ptr, atot_ptr, seq_ptr, pid_bh, b, h, nc - 1, L, H, G, K, N, P, nc, offs_j, jm,
            ia, ib, offs_p, pmask, R, RP, CR, HAS_SEQ)
        for i in range(nc):
            c = nc - 1 - i
            row = ((pid_bh * nc + c) * P + offs_p[:, None]) * N
            tl.store(down_ptr + row + ia[None, :], run_a.to(down_ptr.dtype.element_ty), mask=m)
            tl.store(down_ptr + row + ib[None, :], run_b.to(down_ptr.dtype.element_ty), mask=m)
            acs, decay, cos, sin, xa, xb, do = acs_n, dec_n, cos_n, sin_n, xa_n, xb_n, do_n
            # as in the forward scan: the next (earlier) chunk's loads issued a chunk ahead
            acs_n, dec_n, cos_n, sin_n, xa_n, xb_n, do_n = _rscan_loads(
                qbase, cs_ptr, do_ptr, acs_ptr, atot_ptr, seq_ptr, pid_bh, b, h, c - 1, L, H, G, K, N, P, nc, offs_j,
                jm, ia, ib, offs_p, pmask, R, RP, CR, HAS_SEQ)
            xa = xa.to(tl.float32) + qba  # rows past the sequence get the bias too, but their dO is 0
            xb = xb.to(tl.float32) + qbb
            qa = (xa * cos - xb * sin).to(DOT)
            qb = (xa * sin + xb * cos).to(DOT)
            doe = tl.trans((do.to(tl.float32) * tl.exp(acs)[:, None]).to(DOT))
            run_a = tl.dot(doe, qa, run_a * decay, input_precision=PREC)
            run_b = tl.dot(doe, qb, run_b * decay, input_precision=PREC)
        row = (pid_bh * P + offs_p[:, None]) * N
        tl.store(ds0_ptr + row + ia[None, :], run_a, mask=m)
        tl.store(ds0_ptr + row + ib[None, :], run_b, mask=m)

    @triton.jit
    def _bwd_dq_kernel(q_ptr, k_ptr, qb_ptr, kb_ptr, cs_ptr, v_ptr, mx_ptr, acs_ptr, gam_ptr, w_ptr, atot_ptr,
                       seq_ptr, states_ptr, down_ptr, do_ptr, dq_ptr, dqb_ptr, dtheta_ptr, dacs_ptr, dw_ptr, dgam_ptr,
                       datot_ptr, L, H, G, K, N, P, nc, VS,
                       R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
                       HALF: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, BIAS_PAIRS: tl.constexpr,
                       HAS_SEQ: tl.constexpr):
        """Grid (B*H, chunks); q, k [B, L, R, G, N], v rows [B, L, H, P], dO [B, L, R, H, P], states / down
        [B*H, nc, P, N] -> dq [B, L, R, G, N] (atomic adds), dqb [B*H, 1, RP, 2 BH], dtheta [B, L, H, K], d acs / d w /
        d gamma [B, L, H], d atot [B*H, nc].

        dQ = exp(acs) dO E + (dA o M) K, dA = dO V^T; the rotation's part of d theta from the q side; the
        gradients of the mask's entries M_ts = exp(acs_t - acs_s) w_s (t > s), gamma_t (t == s) from dA o S
        (here rather than in the dK/dV kernel, whose tiles are the tighter fit); the entering state's part of
        d acs, sum(exp(acs) dO E o Q) (the inter-chunk dQ times Q); the chunk decay's part of d atot,
        exp(atot) <dOwn, E> (dOwn = d run_c+1 from the reverse scan, `_state_scan_bwd_kernel`)."""
        pid_bh, c, b, h, g, r_i, offs_l, lmask, offs_p, pmask, lp = _chunk_tile(L, H, G, P, R, RP, CR, BP)
        offs_j, jm, ia, ib = _half_columns(HALF, BH)
        ba, bb = _bias_columns(offs_j, HALF, BIAS_PAIRS)
        offs_t, tmask = _chunk_positions(c, L, CR, RP)

        do16 = tl.load(do_ptr + ((b * L + offs_l[:, None]) * R + r_i[:, None]) * H * P + h * P + offs_p[None, :],
                       mask=lp, other=0.0).to(DOT)
        vr16 = _rows_v(v_ptr + b * L * VS + h * P, c, L, offs_l, lmask, VS, offs_p, pmask, mx_ptr + h * R * P,
                       r_i, R, P, RP, CR, True).to(DOT)
        acs, gam, w, mask, lower, eacs = _decay_mask(acs_ptr, gam_ptr, w_ptr, seq_ptr, b, h, c, L, H, offs_l, lmask,
                                                     CR, RP, HAS_SEQ)
        da = tl.dot(do16, tl.trans(vr16), input_precision=PREC)
        cos, sin = _rotation_tables(cs_ptr, b, h, c, L, H, K, offs_l, lmask, offs_j, CR, RP, True)
        row_off = (offs_l * R + r_i) * G * N
        ka, kb = _rotated16(k_ptr + b * L * R * G * N + g * N, row_off, lmask, ia, ib, jm,
                            kb_ptr + h * R * N, ba, bb, r_i, N, R, cos, sin, RP, CR, True, DOT)
        qa, qb = _rotated16(q_ptr + b * L * R * G * N + g * N, row_off, lmask, ia, ib, jm,
                            qb_ptr + h * R * N, ba, bb, r_i, N, R, cos, sin, RP, CR, True, DOT)
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        dm = da * tl.dot(qb, tl.trans(kb), s, input_precision=PREC)
        ts = offs_l[:, None] - offs_l[None, :]
        dmm = tl.where(lower, dm * mask, 0.0)
        tok = (b * L + offs_t) * H + h
        dacs = tl.sum(dmm, axis=1) - tl.sum(dmm, axis=0)
        dw = tl.sum(tl.where(lower, dm * tl.exp(tl.minimum(acs[:, None] - acs[None, :], 0.0)), 0.0), axis=0)
        tl.store(dw_ptr + tok, _rank_sum_1d(dw, CR, RP), mask=tmask)
        tl.store(dgam_ptr + tok, _rank_sum_1d(tl.sum(tl.where(ts == 0, dm, 0.0), axis=1), CR, RP), mask=tmask)
        ds16 = (da * mask).to(DOT)
        st = states_ptr + ((pid_bh * nc + c) * P + offs_p[:, None]) * N
        m = pmask[:, None] & jm[None, :]
        eacs = eacs[:, None]
        ea = tl.load(st + ia[None, :], mask=m, other=0.0)
        eb = tl.load(st + ib[None, :], mask=m, other=0.0)
        dn = down_ptr + ((pid_bh * nc + c) * P + offs_p[:, None]) * N
        de = (tl.sum(ea.to(tl.float32) * tl.load(dn + ia[None, :], mask=m, other=0.0).to(tl.float32), axis=1)
              + tl.sum(eb.to(tl.float32) * tl.load(dn + ib[None, :], mask=m, other=0.0).to(tl.float32), axis=1))
        decay = tl.exp(tl.load(atot_ptr + pid_bh * nc + c))
        if HAS_SEQ:  # the entering state is handed on only if no sequence starts in the chunk
            _sq, _enter, _end, carry = _seq_flags(seq_ptr, b, c, L, offs_l, lmask, CR, RP)
            decay = tl.where(carry, decay, 0.0)
        tl.store(datot_ptr + pid_bh * nc + c, tl.sum(de, axis=0) * decay)
        dqa = tl.dot(do16, ea, input_precision=PREC) * eacs
        dqb = tl.dot(do16, eb, input_precision=PREC) * eacs
        dacs += tl.sum(dqa * qa.to(tl.float32) + dqb * qb.to(tl.float32), axis=1)
        tl.store(dacs_ptr + tok, _rank_sum_1d(dacs, CR, RP), mask=tmask)
        dqa = tl.dot(ds16, ka, dqa, input_precision=PREC)
        dqb = tl.dot(ds16, kb, dqb, input_precision=PREC)
        # (ra, rb) = R(theta) (xa, xb): d theta = drb ra - dra rb; the k side adds its part in _bwd_dkdv_kernel.
        dth = _rank_sum(dqb * qa.to(tl.float32) - dqa * qb.to(tl.float32), CR, RP, BH)
        tl.store(dtheta_ptr + (b * L + offs_t[:, None]) * H * K + h * K + offs_j[None, :], dth,
                 mask=tmask[:, None] & (offs_j < K)[None, :])
        offs_r = tl.arange(0, RP)
        # reloaded (L2-hot) rather than held since the start: at 255 registers, holding them spills more
        # (kernels/NOTES.md "Backward: dQ and dK/dV")
        cos, sin = _rotation_tables(cs_ptr, b, h, c, L, H, K, offs_l, lmask, offs_j, CR, RP, True)
        _store_unrotated(dq_ptr + b * L * R * G * N + g * N, dqb_ptr, row_off, pid_bh * RP * 2 * BH,
                         lmask[:, None] & jm[None, :], ia, ib, dqa, dqb, cos, sin, CR, RP, BH, offs_r, offs_r < R, jm)

    @triton.jit
    def _bwd_dkdv_kernel(q_ptr, k_ptr, qb_ptr, kb_ptr, cs_ptr, v_ptr, mx_ptr, d_ptr,
                         acs_ptr, gam_ptr, w_ptr, atot_ptr, seq_ptr, down_ptr, do_ptr,
                         dk_ptr, dkb_ptr, dv_ptr, dmx_ptr, dtheta_ptr, dacs_ptr, dw_ptr, datot_ptr,
                         L, H, G, K, N, P, nc, VS, DVS,
                         R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
                         HALF: tl.constexpr, HAS_D: tl.constexpr,
                         DOT: tl.constexpr, PREC: tl.constexpr, BIAS_PAIRS: tl.constexpr, HAS_SEQ: tl.constexpr):
        """Grid (B*H, chunks); q, k [B, L, R, G, N], v rows [B, L, H, P], dO [B, L, R, H, P], down [B*H, nc, P, N]
        -> dk [B, L, R, G, N] (atomic adds), dkb [B*H, 1, RP, 2 BH], dv rows [B, L, H, P], dmx [B*H, 1, RP, P],
        dtheta [B, L, H, K] (adds the k side to the dQ kernel's), d acs / d w [B, L, H], d atot [B*H, nc].

        dK = (dA o M)^T Q + to_end (V dOwn); dV = (S o M)^T dO + to_end (K dOwn^T) + D dO; the gradients of
        the to_end weights (parts of d acs, d w, and d atot); the k side of d theta."""
        pid_bh, c, b, h, g, r_i, offs_l, lmask, offs_p, pmask, lp = _chunk_tile(L, H, G, P, R, RP, CR, BP)
        offs_j, jm, ia, ib = _half_columns(HALF, BH)
        ba, bb = _bias_columns(offs_j, HALF, BIAS_PAIRS)
        offs_t, tmask = _chunk_positions(c, L, CR, RP)

        cos, sin = _rotation_tables(cs_ptr, b, h, c, L, H, K, offs_l, lmask, offs_j, CR, RP, True)
        row_off = (offs_l * R + r_i) * G * N
        qa, qb = _rotated16(q_ptr + b * L * R * G * N + g * N, row_off, lmask, ia, ib, jm,
                            qb_ptr + h * R * N, ba, bb, r_i, N, R, cos, sin, RP, CR, True, DOT)
        ka, kb = _rotated16(k_ptr + b * L * R * G * N + g * N, row_off, lmask, ia, ib, jm,
                            kb_ptr + h * R * N, ba, bb, r_i, N, R, cos, sin, RP, CR, True, DOT)
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        s = tl.dot(qb, tl.trans(kb), s, input_precision=PREC)
        do16 = tl.load(do_ptr + ((b * L + offs_l[:, None]) * R + r_i[:, None]) * H * P + h * P + offs_p[None, :],
                       mask=lp, other=0.0).to(DOT)
        vr16 = _rows_v(v_ptr + b * L * VS + h * P, c, L, offs_l, lmask, VS, offs_p, pmask, mx_ptr + h * R * P,
                       r_i, R, P, RP, CR, True).to(DOT)
        da = tl.dot(do16, tl.trans(vr16), input_precision=PREC)

        acs, gam, w, mask, lower, eacs = _decay_mask(acs_ptr, gam_ptr, w_ptr, seq_ptr, b, h, c, L, H, offs_l, lmask,
                                                     CR, RP, HAS_SEQ)
        ds16 = (da * mask).to(DOT)
        dv = tl.dot(tl.trans((s * mask).to(DOT)), do16, input_precision=PREC)
        dka = tl.dot(tl.trans(ds16), qa, input_precision=PREC)
        dkb = tl.dot(tl.trans(ds16), qb, input_precision=PREC)

        # The chunk's own state sum_i to_end_i v_i k_i^T, with gradient dOwn = (fa | fb).
        m = pmask[:, None] & jm[None, :]
        st = down_ptr + ((pid_bh * nc + c) * P + offs_p[:, None]) * N
        fa = tl.load(st + ia[None, :], mask=m, other=0.0)
        fb = tl.load(st + ib[None, :], mask=m, other=0.0)
        back = tl.exp(tl.load(atot_ptr + pid_bh * nc + c) - acs)
        if HAS_SEQ:  # only rows of the chunk's last sequence reach the state it hands on
            _sq, _enter, end, _carry = _seq_flags(seq_ptr, b, c, L, offs_l, lmask, CR, RP)
            back = tl.where(end, back, 0.0)
        to_end = back * w
        kf = tl.dot(ka, tl.trans(fa), input_precision=PREC)
        kf = tl.dot(kb, tl.trans(fb), kf, input_precision=PREC)
        dv += to_end[:, None] * kf
        dka += to_end[:, None] * tl.dot(vr16, fa, input_precision=PREC)
        dkb += to_end[:, None] * tl.dot(vr16, fb, input_precision=PREC)
        dto = tl.sum(vr16.to(tl.float32) * kf, axis=1)
        if HAS_D:
            dv += tl.load(d_ptr + h) * do16.to(tl.float32)
        tok = (b * L + offs_t) * H + h
        tl.store(dacs_ptr + tok, _rank_sum_1d(-to_end * dto, CR, RP), mask=tmask)
        tl.store(dw_ptr + tok, _rank_sum_1d(back * dto, CR, RP), mask=tmask)
        tl.store(datot_ptr + pid_bh * nc + c, tl.sum(to_end * dto, axis=0))

        th_ptr = dtheta_ptr + (b * L + offs_t[:, None]) * H * K + h * K + offs_j[None, :]
        thm = tmask[:, None] & (offs_j < K)[None, :]
        dth = _rank_sum(dkb * ka.to(tl.float32) - dka * kb.to(tl.float32), CR, RP, BH)
        tl.store(th_ptr, tl.load(th_ptr, mask=thm, other=0.0) + dth, mask=thm)
        offs_r = tl.arange(0, RP)
        # reloaded, as in the dq kernel (kernels/NOTES.md "Backward: dQ and dK/dV")
        cos, sin = _rotation_tables(cs_ptr, b, h, c, L, H, K, offs_l, lmask, offs_j, CR, RP, True)
        _store_unrotated(dk_ptr + b * L * R * G * N + g * N, dkb_ptr, row_off, pid_bh * RP * 2 * BH,
                         lmask[:, None] & jm[None, :], ia, ib, dka, dkb, cos, sin, CR, RP, BH, offs_r, offs_r < R, jm)

        # v_i = mx_r v_t: back to v (summed over ranks) and to mx (summed over positions, added into the
        # (batch, head)'s sum as the bias gradients are).
        mx = _rank_table(mx_ptr + h * R * P, P, R, RP, CR, offs_p, pmask)
        tl.store(dv_ptr + (b * L + offs_t[:, None]) * DVS + h * P + offs_p[None, :],
                 _rank_sum(dv * mx, CR, RP, BP).to(dv_ptr.dtype.element_ty), mask=tmask[:, None] & pmask[None, :])
        vt = _repeat(tl.load(v_ptr + (b * L + offs_t[:, None]) * VS + h * P + offs_p[None, :],
                             mask=tmask[:, None] & pmask[None, :], other=0.0).to(tl.float32), CR // RP, RP, BP)
        tl.atomic_add(dmx_ptr + (pid_bh * RP + offs_r[:, None]) * P + offs_p[None, :],
                      _position_sum(dv * vt, CR, RP, BP), mask=(offs_r < R)[:, None] & pmask[None, :], sem="relaxed")


DOUT_BLOCK = 64  # positions per program of the elementwise dO kernel (its own blocking, not the chunks')


def backward_chunk(rank: int) -> int:
    """Chunk length of the backward kernels (free to differ from the forward's: the backward recomputes the
    states it needs); the same 64-row tiles as the forward."""
    return kernel_chunk(rank)


def _partial_sum(part: torch.Tensor, B: int, H: int, R: int, n: int) -> torch.Tensor:
    """(B*H, blocks, RP, >= n) partial sums (per block of positions, or one block: the whole row) -> (H, R, n)."""
    return part.view(B, H, -1, part.shape[-2], part.shape[-1])[:, :, :, :R, :n].sum((0, 2))


def _dkdv_regs(st: _Setup, device: torch.device) -> dict:
    """The dK/dV kernel's register cap: 168 for MIMO on CUDA (it spills a little more and runs faster), none for SISO
    (slower at any cap tried). Measurements: kernels/NOTES.md "Backward: dQ and dK/dV"."""
    return {"maxnreg": 168} if st.R > 1 and device.type == "cuda" else {}


def chunked_backward(dy, opre, q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                     initial_state, lengths, bias_pairs: bool, slots: dict | None = None,
                     ckpt: torch.Tensor | None = None, seq: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """Gradients of the batched Triton scan's output with respect to its 14 tensor inputs (None for absent ones).
    opre: the forward's pre-gate output per row (B, L, R, H, P). slots: the `shared_grad` slots of v, z, trap and
    angles (by name) where the layer's split gave them one: their gradients are written there. ckpt: the forward's
    state checkpoints (`triton_scan.CKPT_POSITIONS`), or None to recompute the states from the start. seq: packed
    rows' `common.sequence_index`, or None."""
    f32 = torch.float32
    init = initial_state.to(f32) if initial_state is not None else None
    st = _Setup(q, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, init, lengths,
                backward_chunk(q.shape[2]), bias_pairs, seq)
    B, L, R, G, N, H, P, K, nc = st.B, st.L, st.R, st.G, st.N, st.H, st.P, st.K, st.nc
    dev = q.device
    slots = slots or {}

    def grad_out(name, like):  # where the kernels write the gradient of a split piece (`shared_grad`)
        return grad_output(slots.get(name), like.shape, like.dtype, dev)

    gam, w, acs, atot = token_scalars(adt, dt, trap, lengths, st.C)
    s0 = None
    if init is not None:  # the initial state's part: small tensors, through autograd
        with torch.enable_grad():
            nxt0, mx_leaf = first_next(dt, trap).requires_grad_(), st.mx.detach().requires_grad_()
            s0 = _initial_state(st, nxt0, mx_leaf)
    angles = rows_of(angles)
    q, k, v, z, dy = q.contiguous(), k.contiguous(), rows_of(v), rows_of(z), dy.contiguous()
    zc = z if z is not None else v
    vs, zs = row_stride(v), row_stride(zc)
    meta = st.meta
    RP, BH = meta["RP"], meta["BH"]
    empty = lambda *shape: torch.empty(*shape, device=dev, dtype=f32)  # noqa: E731
    with torch.no_grad():
        cs, _ = st.rotation_table(angles, dt)
        states, _, _ = scan.entering_states(st, k, v, cs, acs, w, atot, None if s0 is None else s0.detach(), ckpt=ckpt)
        do = torch.empty(B, L, R, H, P, device=dev, dtype=v.dtype)
        # dz and dv are written once per element, straight in their inputs' dtypes (no fp32 copy to cast)
        dz = grad_out("z", z) if st.has_z else do
        nblk = cdiv(L, DOUT_BLOCK)
        dmz, dmo = empty(B * H, nblk, R, P), empty(B * H, nblk, R, P)
        dD = empty(B * H, nblk)
        _bwd_dout_kernel[(B * H, nblk)](v, st.mx, st.mz, st.mo, st.D, zc, opre, dy, do, dz, dmz, dmo, dD, L, H, P,
                                        nblk, vs, zs, row_stride(dz), BT=DOUT_BLOCK, HAS_D=st.has_d,
                                        HAS_Z=st.has_z, CONTRACT=st.contract,
                                        **{name: meta[name] for name in ("R", "BP", "DOT", "num_warps")}, **FMA)
        # the kernels add into these (one zero fill each: dq | dk, and the bias gradients' (batch, head) sums)
        dq, dk = torch.zeros(2, B, L, R, G, N, device=dev, dtype=f32).unbind(0)
        dqb, dkb = torch.zeros(2, B * H, 1, RP, 2 * BH, device=dev, dtype=f32).unbind(0)
        dtheta = empty(B, L, H, K)
        dacs_c, dw_c, dgam = empty(B, L, H), empty(B, L, H), empty(B, L, H)
        bp, bj = scan.scan_block(st)
        ds0 = empty(B, H, P, N)
        down = torch.empty_like(states)  # d own state per chunk: a matmul operand, like the states
        _state_scan_bwd_kernel[scan.scan_grid(st, B * H, bp, bj)](q, st.qb, cs, do, acs, atot, st.seq_or(acs), down,
                                                                ds0,
                                                                L, H, G, K, N, P, nc, BPB=bp, BJ=bj,
                                                                **scan.scan_meta(st, bp, bj), **FMA)
        datot_dq = empty(B * H, nc)
        _bwd_dq_kernel[(B * H, nc)](q, k, st.qb, st.kb, cs, v, st.mx, acs, gam, w, atot, st.seq_or(acs), states, down,
                                    do, dq, dqb,
                                    dtheta, dacs_c, dw_c, dgam, datot_dq, L, H, G, K, N, P, nc, vs, **meta, **FMA)
        del states
        dv = grad_out("v", v)
        dmx = torch.zeros(B * H, 1, RP, P, device=dev, dtype=f32)
        dacs_b, dw = empty(B, L, H), empty(B, L, H)
        datot = empty(B * H, nc)
        _bwd_dkdv_kernel[(B * H, nc)](q, k, st.qb, st.kb, cs, v, st.mx, st.D, acs, gam, w, atot, st.seq_or(acs),
                                      down, do,
                                      dk, dkb, dv, dmx, dtheta, dacs_b, dw, datot, L, H, G, K, N, P, nc, vs,
                                      row_stride(dv),
                                      HAS_D=st.has_d, **meta, **_dkdv_regs(st, dev), **FMA)
        d_angles, d_dt_angles = angle_table_backward(dtheta, angles, dt, grad_out("angles", angles))
    dmx_total = _partial_sum(dmx, B, H, R, P)
    dnxt0 = None
    if s0 is not None:
        dnxt0, dmx_s0 = torch.autograd.grad(s0, (nxt0, mx_leaf), ds0)
        dmx_total = dmx_total + dmx_s0
    d_adt, d_dt, d_trap = token_scalars_backward(dt, trap, lengths, st.C, dgam, (dw, dw_c), (dacs_b, dacs_c),
                                                 (datot, datot_dq), d_dt_angles, dnxt0,
                                                 (adt.dtype, dt.dtype, trap.dtype), dtrap=grad_out("trap", trap))

    def bias_grad(part):  # the partials are in the kernels' halves layout
        g = _partial_sum(part, B, H, R, N)
        return pairs_layout(g) if bias_pairs else g

    def cast(fn, like):  # gradients only for the inputs that exist, in their dtypes
        return None if like is None else fn().to(like.dtype)

    return [cast(lambda: dq, q), cast(lambda: dk, k), cast(lambda: dv, v),
            cast(lambda: d_adt, adt), cast(lambda: d_dt, dt), cast(lambda: d_trap, trap),
            cast(lambda: bias_grad(dqb), q_bias), cast(lambda: bias_grad(dkb), k_bias),
            cast(lambda: d_angles, angles), cast(lambda: dmx_total, mimo_x),
            # mimo_z only scales the gate: without z it is unused, and the dO kernel leaves dmz unwritten
            cast(lambda: _partial_sum(dmz, B, H, R, P), mimo_z if st.has_z else None),
            cast(lambda: _partial_sum(dmo, B, H, R, P), mimo_o),
            cast(lambda: dD.view(B, H, -1).sum((0, 2)), D), cast(lambda: dz, z)]
