"""Forward of the Triton Mamba-3 scan (MIMO rank R, SISO as R = 1): the state scan, then every chunk's output.

Same function and tensor layout as `mamba3_chunked` (see `common`); the autograd Function and the public function
are in `triton_chunked`. Two kernels, both parallel over batch x heads, and over chunks or state blocks, so one long
sequence still fills the GPU:

1. `triton_scan._state_scan_kernel` (B*H, state blocks): walk the chunks, storing the state entering each one, then
   decaying it and adding the chunk's own sum_{s,r} to_end_s (mx_r v_s) kr_{s,r}^T as one matmul accumulate. The
   state stays in registers (fp32); each chunk's own state is never written out.
2. `_chunk_output_kernel` (B*H, chunks): per query rank, the entering state's contribution plus the intra-chunk
   decayed (q.k) v products over all key ranks; D skip, z gate and the rank contraction with mimo_o in the epilogue,
   so only [B, L, H, P] is written.

B/C bias and the data-dependent rotation are applied inside the kernels from the [B, L, R, G, N] inputs (never
materialised per head, which would be H/G times larger). The rotation angles' cos/sin table comes from
`triton_angles`, the other per-token scalars (trapezoid weights, chunk decays) from `triton_scalars`. The kernel
chunk length is the kernels' own (`triton_setup.kernel_chunk`; the function does not depend on it).
"""

from __future__ import annotations

import torch

from . import triton_scan as scan  # scan.* looked up per call: a patch of triton_scan reaches every caller
from .chunked import final_state
from .common import FMA, halves_layout, heads_from_groups, rotate, row_stride, rows_of
from .triton_scalars import first_next, token_scalars
from .triton_setup import _initial_state, _Setup, kernel_chunk
from .triton_tiles import (_bias_columns, _chunk_positions, _chunk_tile, _decay_mask, _half_columns, _load_rotated,
                           _rotation_tables, _rows_v)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU install without triton: triton_chunked reports it before anything here is called
    triton = None

if triton is not None:

    @triton.jit
    def _chunk_output_kernel(q_ptr, k_ptr, qb_ptr, kb_ptr, cs_ptr, v_ptr, mx_ptr, mz_ptr, mo_ptr, d_ptr, z_ptr,
                             acs_ptr, gam_ptr, w_ptr, seq_ptr, states_ptr, out_ptr, opre_ptr,
                             L, H, G, K, N, P, nc, VS, ZS,
                             R: tl.constexpr, RP: tl.constexpr, CR: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
                             HALF: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                             CONTRACT: tl.constexpr, SAVE_O: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                             BIAS_PAIRS: tl.constexpr, HAS_SEQ: tl.constexpr):
        """Grid (B*H, chunks); q, k [B, L, R, G, N], v / z rows [B, L, H, P], cs [B, L, H, 2, K], acs / gam / w
        [B, L, H], states [B*H, nc, P, N] -> out [B, L, H, P] (CONTRACT; else [B, L, R, H, P]), opre [B, L, R, H, P].

        Chunk c's output from the state entering it (stored by the state scan): per row, the entering state's
        contribution plus the intra-chunk decayed (q.k) v products over all rows, then D skip, z gate and the rank
        contraction with mimo_o in the epilogue. A separate scan + this kernel beat a single walk that keeps the
        state in registers and writes outputs as it goes (too few walking programs to hide each chunk step's
        latency), and loading the entering state through TMA exposed its latency: kernels/NOTES.md "Chunk output"."""
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


def forward_batched(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, initial_state,
                     lengths, seq, bias_pairs: bool, save_o: bool = False, need_final: bool = True):
    """Batched (B, L) forward with fp32 state (seq: packed rows' `common.sequence_index`, or None); returns (y in v's
    dtype, final Mamba3State in fp32 (None without need_final: a training forward skips its ~15 gathers and small
    ops), and with save_o (a training forward) what the backward takes from it: the pre-gate output per row
    (B, L, R, H, P) in v's dtype and the state checkpoints (`triton_scan.entering_states`), else None, None)."""
    f32 = torch.float32
    init = initial_state.to(f32) if initial_state is not None else None
    st = _Setup(q, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, init, lengths,
                kernel_chunk(q.shape[2]), bias_pairs, seq)
    gam, w, acs, atot = token_scalars(adt, dt, trap, lengths, st.C)
    s0 = None if init is None else _initial_state(st, first_next(dt, trap), st.mx)
    q, k, v, z = q.contiguous(), k.contiguous(), rows_of(v), rows_of(z)
    cs, theta_last = st.rotation_table(rows_of(angles), dt, need_final)
    states, final_ssm, ckpt = scan.entering_states(st, k, v, cs, acs, w, atot, s0, keep_ckpt=save_o)
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
