"""Backward of the Triton Mamba-3 scan (see `triton_chunked` for the forward and the row layout).

Per chunk c, rows i = (position t, rank r), rotated q_i, k_i (N), inputs v_i = mx_r v_t (P), the state E_c
entering the chunk (P x N) and the decay mask M (see `_decay_mask`):

    o_i   = exp(acs_t) q_i E_c^T + sum_j M_ij (q_i . k_j) v_j          (pre-gate output)
    E_c+1 = exp(atot_c) E_c + sum_i to_end_i v_i k_i^T,   to_end_i = exp(atot_c - acs_t) w_t

Three passes, after the entering states are recomputed with the forward kernels (cheaper in memory than
saving them):

1. `_bwd_dout_kernel` (B*H, chunks): recompute o, take the epilogue back (z gate, D skip, mimo_o
   contraction) to dO, write dO and dE_c = (exp(acs) dO)^T Q; gradients of z, mimo_z, mimo_o, D and the
   inter-chunk part of d acs.
2. `_state_pass_bwd_kernel` (B*H, P*N blocks): walk the chunks backwards, d run_c = dE_c + exp(atot_c)
   d run_c+1, leaving in place the gradient of each chunk's own state (d run_c+1), plus d atot_c.
3. `_bwd_main_kernel` (B*H, chunks): dQ = exp(acs) dO E + (dA o M) K with dA = dO V^T; dK = (dA o M)^T Q
   + to_end (V dOwn); dV = (S o M)^T dO + to_end (K dOwn^T) + D dO; d acs, d w, d gamma, d atot from
   dA o S and the to_end weights; the rotation taken back (d theta and the unrotated dq, dk per head).

Then torch finishes: per-head dq/dk summed over each group's heads and the biases, and the per-token
scalars (theta, gamma, w, acs, atot, s0) replayed under autograd, which carries their gradients to adt,
dt, trap, angles and mimo_x exactly as the forward defined them.
"""

from __future__ import annotations

import torch

from .triton_chunked import (_decay_mask, _entering_states, _half_columns, _load_rotated, _rank_rows, _rotation_tables,
                             _rows_v, _Setup, kernel_chunk, tl, triton)

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
    def _bwd_dout_kernel(q_ptr, k_ptr, qb_ptr, kb_ptr, theta_ptr, v_ptr, mx_ptr, mz_ptr, mo_ptr, d_ptr, z_ptr,
                         acs_ptr, gam_ptr, w_ptr, states_ptr, dy_ptr,
                         do_ptr, de_ptr, dacs_ptr, dz_ptr, dmz_ptr, dmo_ptr, dd_ptr,
                         L, H, G, K, N, P, nc,
                         R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
                         HALF: tl.constexpr, PAIRWISE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                         CONTRACT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
        pid_bh, c = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        g = h // (H // G)
        r_i, offs_l, lmask = _rank_rows(c, L, R, RP, CR)
        offs_j, jm, ia, ib = _half_columns(HALF, BH, PAIRWISE)
        offs_p = tl.arange(0, BP)
        pmask = offs_p < P
        lp = lmask[:, None] & pmask[None, :]
        offs_t = c * (CR // RP) + tl.arange(0, CR // RP)
        tmask = offs_t < L

        acs, gam, w, mask = _decay_mask(acs_ptr, gam_ptr, w_ptr, b, h, L, H, offs_l, lmask)
        cos, sin = _rotation_tables(theta_ptr + b * L * H * K + h * K, offs_l, lmask, H * K, offs_j, K)
        row_off = (offs_l * R + r_i) * G * N
        qa, qb = _load_rotated(q_ptr + b * L * R * G * N + g * N, row_off, lmask, ia, ib, jm,
                               qb_ptr + (h * R + r_i) * N, cos, sin)
        ka, kb = _load_rotated(k_ptr + b * L * R * G * N + g * N, row_off, lmask, ia, ib, jm,
                               kb_ptr + (h * R + r_i) * N, cos, sin)
        qa, qb, ka, kb = qa.to(DOT), qb.to(DOT), ka.to(DOT), kb.to(DOT)
        vr = _rows_v(v_ptr + b * L * H * P + h * P, offs_l, lmask, H * P, offs_p, pmask, mx_ptr + (h * R + r_i) * P)
        st = states_ptr + ((pid_bh * nc + c) * P + offs_p[:, None]) * N
        m = pmask[:, None] & jm[None, :]
        ea = tl.load(st + ia[None, :], mask=m, other=0.0).to(DOT)
        eb = tl.load(st + ib[None, :], mask=m, other=0.0).to(DOT)
        eacs = tl.exp(acs)
        oi = tl.dot(qa, tl.trans(ea), input_precision=PREC)
        oi = tl.dot(qb, tl.trans(eb), oi, input_precision=PREC) * eacs[:, None]
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        s = tl.dot(qb, tl.trans(kb), s, input_precision=PREC) * mask
        o = tl.dot(s.to(DOT), vr.to(DOT), oi, input_precision=PREC)
        if HAS_D:
            o += tl.load(d_ptr + h) * vr

        pos_off = (b * L + offs_l[:, None]) * H * P + h * P + offs_p[None, :]  # (B, L, H, P) tensors, per row
        prm = (h * R + r_i[:, None]) * P + offs_p[None, :]  # (H, R, P) parameters, per row
        offs_r = tl.arange(0, RP)
        part = ((pid_bh * nc + c) * RP + offs_r[:, None]) * P + offs_p[None, :]  # per-chunk partial sums
        part_m = (offs_r < R)[:, None] & pmask[None, :]
        if CONTRACT:
            dy = tl.load(dy_ptr + pos_off, mask=lp, other=0.0).to(tl.float32)
            dg = dy * tl.load(mo_ptr + prm, mask=lp, other=0.0)
        else:
            dy = tl.load(dy_ptr + ((b * L + offs_l[:, None]) * R + r_i[:, None]) * H * P + h * P + offs_p[None, :],
                         mask=lp, other=0.0).to(tl.float32)
            dg = dy
        if HAS_Z:
            zt = tl.load(z_ptr + pos_off, mask=lp, other=0.0).to(tl.float32)
            mz = tl.load(mz_ptr + prm, mask=lp, other=0.0)
            zz = zt * mz
            sg = tl.sigmoid(zz)
            gate = zz * sg
            dzz = dg * o * sg * (1.0 + zz * (1.0 - sg))  # d silu(x)/dx = sigmoid(x) (1 + x (1 - sigmoid(x)))
            dzt = _rank_sum(dzz * mz, CR, RP, BP)
            tl.store(dz_ptr + (b * L + offs_t[:, None]) * H * P + h * P + offs_p[None, :], dzt,
                     mask=tmask[:, None] & pmask[None, :])
            tl.store(dmz_ptr + part, _position_sum(dzz * zt, CR, RP, BP), mask=part_m)
            o = o * gate
            do = dg * gate
        else:
            do = dg
        if CONTRACT:
            tl.store(dmo_ptr + part, _position_sum(dy * o, CR, RP, BP), mask=part_m)
        if HAS_D:
            tl.store(dd_ptr + pid_bh * nc + c, tl.sum(tl.sum(do * vr, axis=1), axis=0))
        tl.store(dacs_ptr + (b * L + offs_t) * H + h, _rank_sum_1d(tl.sum(do * oi, axis=1), CR, RP), mask=tmask)
        tl.store(do_ptr + ((b * L + offs_l[:, None]) * R + r_i[:, None]) * H * P + h * P + offs_p[None, :],
                 do.to(do_ptr.dtype.element_ty), mask=lp)
        doe = tl.trans((do * eacs[:, None]).to(DOT))
        out = de_ptr + ((pid_bh * nc + c) * P + offs_p[:, None]) * N
        tl.store(out + ia[None, :], tl.dot(doe, qa, input_precision=PREC), mask=m)
        tl.store(out + ib[None, :], tl.dot(doe, qb, input_precision=PREC), mask=m)

    @triton.jit
    def _state_pass_bwd_kernel(dstates_ptr, states_ptr, atot_ptr, ds0_ptr, datot_ptr, nc, PN, NBLK,
                               BLOCK: tl.constexpr):
        pid_bh, blk = tl.program_id(0), tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        m = offs < PN
        dbase = dstates_ptr + pid_bh * nc * PN + offs
        sbase = states_ptr + pid_bh * nc * PN + offs
        drun = tl.zeros([BLOCK], dtype=tl.float32)  # the final state carries no gradient
        for i in range(nc):
            c = nc - 1 - i
            de = tl.load(dbase + c * PN, mask=m, other=0.0)
            run = tl.load(sbase + c * PN, mask=m, other=0.0)
            decay = tl.exp(tl.load(atot_ptr + pid_bh * nc + c))
            tl.store(dbase + c * PN, drun, mask=m)  # d own_c = d run_c+1
            tl.store(datot_ptr + (pid_bh * NBLK + blk) * nc + c, tl.sum(drun * run, axis=0) * decay)
            drun = de + drun * decay
        tl.store(ds0_ptr + pid_bh * PN + offs, drun, mask=m)

    @triton.jit
    def _bwd_main_kernel(q_ptr, k_ptr, qb_ptr, kb_ptr, theta_ptr, v_ptr, mx_ptr, d_ptr,
                         acs_ptr, gam_ptr, w_ptr, atot_ptr, states_ptr, down_ptr, do_ptr,
                         dq_ptr, dk_ptr, dv_ptr, dmx_ptr, dtheta_ptr, dacs_ptr, dw_ptr, dgam_ptr, datot_ptr,
                         L, H, G, K, N, P, nc,
                         R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
                         HALF: tl.constexpr, PAIRWISE: tl.constexpr, HAS_D: tl.constexpr,
                         DOT: tl.constexpr, PREC: tl.constexpr):
        pid_bh, c = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        g = h // (H // G)
        r_i, offs_l, lmask = _rank_rows(c, L, R, RP, CR)
        offs_j, jm, ia, ib = _half_columns(HALF, BH, PAIRWISE)
        offs_p = tl.arange(0, BP)
        pmask = offs_p < P
        lp = lmask[:, None] & pmask[None, :]
        offs_t = c * (CR // RP) + tl.arange(0, CR // RP)
        tmask = offs_t < L

        acs, gam, w, mask = _decay_mask(acs_ptr, gam_ptr, w_ptr, b, h, L, H, offs_l, lmask)
        cos, sin = _rotation_tables(theta_ptr + b * L * H * K + h * K, offs_l, lmask, H * K, offs_j, K)
        row_off = (offs_l * R + r_i) * G * N
        qa, qb = _load_rotated(q_ptr + b * L * R * G * N + g * N, row_off, lmask, ia, ib, jm,
                               qb_ptr + (h * R + r_i) * N, cos, sin)
        ka, kb = _load_rotated(k_ptr + b * L * R * G * N + g * N, row_off, lmask, ia, ib, jm,
                               kb_ptr + (h * R + r_i) * N, cos, sin)
        qa16, qb16, ka16, kb16 = qa.to(DOT), qb.to(DOT), ka.to(DOT), kb.to(DOT)
        vr = _rows_v(v_ptr + b * L * H * P + h * P, offs_l, lmask, H * P, offs_p, pmask, mx_ptr + (h * R + r_i) * P)
        vr16 = vr.to(DOT)
        row_p = ((b * L + offs_l[:, None]) * R + r_i[:, None]) * H * P + h * P + offs_p[None, :]
        do = tl.load(do_ptr + row_p, mask=lp, other=0.0)
        do16 = do.to(DOT)
        m = pmask[:, None] & jm[None, :]
        st = ((pid_bh * nc + c) * P + offs_p[:, None]) * N
        ea = tl.load(states_ptr + st + ia[None, :], mask=m, other=0.0).to(DOT)
        eb = tl.load(states_ptr + st + ib[None, :], mask=m, other=0.0).to(DOT)
        fa = tl.load(down_ptr + st + ia[None, :], mask=m, other=0.0).to(DOT)
        fb = tl.load(down_ptr + st + ib[None, :], mask=m, other=0.0).to(DOT)

        # Inter-chunk and intra-chunk terms of dQ, dK, dV.
        eacs = tl.exp(acs)
        dqa = tl.dot(do16, ea, input_precision=PREC) * eacs[:, None]
        dqb = tl.dot(do16, eb, input_precision=PREC) * eacs[:, None]
        s = tl.dot(qa16, tl.trans(ka16), input_precision=PREC)
        s = tl.dot(qb16, tl.trans(kb16), s, input_precision=PREC)
        da = tl.dot(do16, tl.trans(vr16), input_precision=PREC)
        ds16 = (da * mask).to(DOT)
        dqa = tl.dot(ds16, ka16, dqa, input_precision=PREC)
        dqb = tl.dot(ds16, kb16, dqb, input_precision=PREC)
        dka = tl.dot(tl.trans(ds16), qa16, input_precision=PREC)
        dkb = tl.dot(tl.trans(ds16), qb16, input_precision=PREC)
        dv = tl.dot(tl.trans((s * mask).to(DOT)), do16, input_precision=PREC)

        # The chunk's own state sum_i to_end_i v_i k_i^T, with gradient dOwn = (fa | fb).
        atot = tl.load(atot_ptr + pid_bh * nc + c)
        back = tl.exp(atot - acs)
        to_end = back * w
        kf = tl.dot(ka16, tl.trans(fa), input_precision=PREC)
        kf = tl.dot(kb16, tl.trans(fb), kf, input_precision=PREC)
        dv += to_end[:, None] * kf
        dka += to_end[:, None] * tl.dot(vr16, fa, input_precision=PREC)
        dkb += to_end[:, None] * tl.dot(vr16, fb, input_precision=PREC)
        dto = tl.sum(vr * kf, axis=1)
        if HAS_D:
            dv += tl.load(d_ptr + h) * do.to(tl.float32)

        # Per-token scalars: the mask's entries and the to_end weights.
        dm = da * s
        ts = offs_l[:, None] - offs_l[None, :]
        lower = ts > 0
        dmm = tl.where(lower, dm * mask, 0.0)
        dacs = tl.sum(dmm, axis=1) - tl.sum(dmm, axis=0) - to_end * dto
        diff = tl.minimum(acs[:, None] - acs[None, :], 0.0)
        dw = tl.sum(tl.where(lower, dm * tl.exp(diff), 0.0), axis=0) + back * dto
        dgam = tl.sum(tl.where(ts == 0, dm, 0.0), axis=1)
        tok = (b * L + offs_t) * H + h
        tl.store(dacs_ptr + tok, _rank_sum_1d(dacs, CR, RP), mask=tmask)
        tl.store(dw_ptr + tok, _rank_sum_1d(dw, CR, RP), mask=tmask)
        tl.store(dgam_ptr + tok, _rank_sum_1d(dgam, CR, RP), mask=tmask)
        tl.store(datot_ptr + pid_bh * nc + c, tl.sum(to_end * dto, axis=0))

        # The rotation taken back: (ra, rb) = R(theta) (xa, xb), so d theta = drb ra - dra rb and
        # (dxa, dxb) = R(-theta) (dra, drb).
        dth = _rank_sum(dqb * qa - dqa * qb + dkb * ka - dka * kb, CR, RP, BH)
        tl.store(dtheta_ptr + (b * L + offs_t[:, None]) * H * K + h * K + offs_j[None, :], dth,
                 mask=tmask[:, None] & (offs_j < K)[None, :])
        head = ((b * L + offs_l[:, None]) * R + r_i[:, None]) * H * N + h * N
        hm = lmask[:, None] & jm[None, :]
        tl.store(dq_ptr + head + ia[None, :], dqa * cos + dqb * sin, mask=hm)
        tl.store(dq_ptr + head + ib[None, :], dqb * cos - dqa * sin, mask=hm)
        tl.store(dk_ptr + head + ia[None, :], dka * cos + dkb * sin, mask=hm)
        tl.store(dk_ptr + head + ib[None, :], dkb * cos - dka * sin, mask=hm)

        # v_i = mx_r v_t: back to v (summed over ranks) and to mx (summed over positions).
        mx = tl.load(mx_ptr + (h * R + r_i[:, None]) * P + offs_p[None, :], mask=lp, other=0.0)
        tl.store(dv_ptr + (b * L + offs_t[:, None]) * H * P + h * P + offs_p[None, :], _rank_sum(dv * mx, CR, RP, BP),
                 mask=tmask[:, None] & pmask[None, :])
        vt = tl.load(v_ptr + (b * L + offs_l[:, None]) * H * P + h * P + offs_p[None, :], mask=lp,
                     other=0.0).to(tl.float32)
        offs_r = tl.arange(0, RP)
        tl.store(dmx_ptr + ((pid_bh * nc + c) * RP + offs_r[:, None]) * P + offs_p[None, :],
                 _position_sum(dv * vt, CR, RP, BP), mask=(offs_r < R)[:, None] & pmask[None, :])


def backward_chunk(rank: int) -> int:
    """Chunk length of the backward kernels (free: the backward recomputes the states it needs)."""
    return kernel_chunk(rank)


def _partial_sum(part: torch.Tensor, B: int, H: int, R: int) -> torch.Tensor:
    """(B*H, nc, RP, P) per-chunk partial sums -> (H, R, P)."""
    return part.view(B, H, -1, part.shape[-2], part.shape[-1])[:, :, :, :R].sum((0, 2))


def chunked_backward(dy, q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                     rope_pairwise: bool, initial_state, lengths) -> list[torch.Tensor | None]:
    """Gradients of the batched Triton scan's output with respect to its 14 tensor inputs (None for absent ones)."""
    f32 = torch.float32
    init = initial_state.to(f32) if initial_state is not None else None
    st = _Setup(q, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, rope_pairwise, init,
                lengths, backward_chunk(q.shape[2]))
    B, L, R, G, N, H, P, K, nc = st.B, st.L, st.R, st.G, st.N, st.H, st.P, st.K, st.nc
    dev = q.device
    with torch.enable_grad():
        leaves = [t.detach().to(f32).requires_grad_() for t in (adt, dt, trap, angles)]
        mx_leaf = st.mx.detach().requires_grad_()
        theta, gam, w, s0, acs, atot = st.scalars(*leaves, mx_leaf)
    q, k, v, dy = q.contiguous(), k.contiguous(), v.contiguous(), dy.contiguous()
    zc = z.contiguous() if z is not None else v
    meta = st.meta
    RP = meta["RP"]
    with torch.no_grad():
        th, ac, ww, at, gm = theta.detach(), acs.detach(), w.detach(), atot.detach(), gam.detach()
        states, _ = _entering_states(st, k, v, th, ac, ww, at, None if s0 is None else s0.detach())
        do = torch.empty(B, L, R, H, P, device=dev, dtype=v.dtype)
        dstates = torch.empty_like(states)
        dacs_a = torch.empty(B, L, H, device=dev, dtype=f32)
        dz = torch.empty(B, L, H, P, device=dev, dtype=f32) if st.has_z else dacs_a
        dmz = torch.empty(B * H, nc, RP, P, device=dev, dtype=f32)
        dmo = torch.empty(B * H, nc, RP, P, device=dev, dtype=f32)
        dD = torch.empty(B * H, nc, device=dev, dtype=f32)
        _bwd_dout_kernel[(B * H, nc)](q, k, st.qb, st.kb, th, v, st.mx, st.mz, st.mo, st.D, zc, ac, gm, ww, states,
                                      dy, do, dstates, dacs_a, dz, dmz, dmo, dD, L, H, G, K, N, P, nc,
                                      HAS_D=st.has_d, HAS_Z=st.has_z, CONTRACT=st.contract, **meta)
        block = min(256, triton.next_power_of_2(P * N))
        nblk = triton.cdiv(P * N, block)
        ds0 = torch.empty(B, H, P, N, device=dev, dtype=f32)
        datot_pass = torch.empty(B * H, nblk, nc, device=dev, dtype=f32)
        _state_pass_bwd_kernel[(B * H, nblk)](dstates, states, at, ds0, datot_pass, nc, P * N, nblk, BLOCK=block)
        dqh = torch.empty(B, L, R, H, N, device=dev, dtype=f32)
        dkh = torch.empty_like(dqh)
        dv = torch.empty(B, L, H, P, device=dev, dtype=f32)
        dmx = torch.empty(B * H, nc, RP, P, device=dev, dtype=f32)
        dtheta = torch.empty(B, L, H, K, device=dev, dtype=f32)
        dacs_b, dw, dgam = (torch.empty(B, L, H, device=dev, dtype=f32) for _ in range(3))
        datot = torch.empty(B * H, nc, device=dev, dtype=f32)
        _bwd_main_kernel[(B * H, nc)](q, k, st.qb, st.kb, th, v, st.mx, st.D, ac, gm, ww, at, states, dstates, do,
                                      dqh, dkh, dv, dmx, dtheta, dacs_b, dw, dgam, datot, L, H, G, K, N, P, nc,
                                      HAS_D=st.has_d, **meta)
        datot = (datot + datot_pass.sum(1)).view(B, H, nc)

    outs, grads = [theta, gam, w, acs, atot], [dtheta, dgam, dw, dacs_a + dacs_b, datot]
    if s0 is not None:
        outs.append(s0)
        grads.append(ds0)
    torch.autograd.backward(outs, grads)
    d_adt, d_dt, d_trap, d_angles = (t.grad for t in leaves)
    dmx_total = _partial_sum(dmx, B, H, R)
    if mx_leaf.grad is not None:
        dmx_total = dmx_total + mx_leaf.grad

    def group_sum(dh):  # heads of group g are g*H/G .. (g+1)*H/G - 1
        return dh.view(B, L, R, G, H // G, N).sum(4)

    def cast(fn, like):  # gradients only for the inputs that exist, in their dtypes
        return None if like is None else fn().to(like.dtype)

    return [cast(lambda: group_sum(dqh), q), cast(lambda: group_sum(dkh), k), cast(lambda: dv, v),
            cast(lambda: d_adt, adt), cast(lambda: d_dt, dt), cast(lambda: d_trap, trap),
            cast(lambda: dqh.sum((0, 1)).transpose(0, 1), q_bias), cast(lambda: dkh.sum((0, 1)).transpose(0, 1), k_bias),
            cast(lambda: d_angles, angles), cast(lambda: dmx_total, mimo_x),
            cast(lambda: _partial_sum(dmz, B, H, R), mimo_z), cast(lambda: _partial_sum(dmo, B, H, R), mimo_o),
            cast(lambda: dD.view(B, H, nc).sum((0, 2)), D), cast(lambda: dz, z)]
