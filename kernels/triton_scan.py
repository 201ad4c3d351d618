"""The Triton scan's state scan: the state entering each chunk, walked chunk by chunk on the GPU.

`_state_scan_kernel` runs in the forward (the states the chunk output kernel reads, the final state, and the
checkpoints a training forward keeps) and again in the backward, which recomputes the states rather than keeping
them. Its launch policy lives here too and is shared with the backward's reverse scan: the state block each program
carries (`state_scan_block`, `scan_block`, `scan_grid`, `scan_meta`) and the checkpoint spacing (`CKPT_POSITIONS`,
`ckpt_segments`).

Shapes: k [B, L, R, G, N], v [B, L, H, P] (rows of their own stride), the states [B, H, nc, P, N] in the matmuls'
operand dtype, final state and checkpoints fp32.
"""

from __future__ import annotations

import torch

from .common import FMA, cdiv, row_stride
from .triton_setup import _pow2, _Setup, _sm_count
from .triton_tiles import _bias_columns, _chunk_bias_rows, _pair_block, _scan_chunk_loads

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU install without triton: triton_chunked reports it before anything here is called
    triton = None

if triton is not None:

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
        """Grid (B*H, P / BPB * N / (2 BJ)) [x segments with FROM_CKPT]; k [B, L, R, G, N], v rows [B, L, H, P],
        cs [B, L, H, 2, K], acs / w [B, L, H], atot [B*H, nc] -> enter [B*H, nc, P, N] (operand dtype), final and
        s0 [B*H, P, N] fp32, ckpt [B*H, nseg, P, N] fp32.

        A (BPB rows, BJ pairs) block of the state, in fp32 registers, carried through the chunks:
        E_c+1 = exp(atot_c) E_c + (to_end o mx v)^T kr over the chunk's rows, stored (operand dtype) on entry to each
        chunk. No chunk-parallel first pass: a per-chunk own-state buffer in fp32 costs more in traffic than the
        serial walk (kernels/NOTES.md "State scan").
        SEG > 0: segments of SEG chunks (`CKPT_POSITIONS`). The walk also keeps the fp32 state entering each segment
        in ckpt; with FROM_CKPT (the backward's recompute), the grid has a third axis, the segment, and each program
        walks its segment only, from its checkpoint, storing nothing else."""
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
        # the chunk loop (kernels/NOTES.md "State scan")
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


def state_scan_block(N: int, R: int, heads: int, sms: int) -> tuple[int, int]:
    """(headdim rows, rotation pairs) of the state block each program of a state scan (the forward one and the
    backward's reverse one) carries through the chunks, for `heads` (batch x heads) programs' worth of state on `sms`
    multiprocessors. 64 rows x all pairs (8 warps, `scan_meta`) wherever a block per head gives every other SM a
    program: each program walks all chunks in turn, and narrower blocks repeat the per-chunk loads and rotations.
    Below that (b1 x 32768: 64 heads on 132 SMs) the walk sets the time and narrower blocks, more programs, win:
    32 x 32 for MIMO, 64 x 32 for SISO (4 warps each). Measured blocks, and the segmented walks tried and dropped:
    kernels/NOTES.md "State scan blocks"; evals/kernel_dev/kernel_report.py --state-blocks overrides this function
    (`triton_scan.state_scan_block`, the name `scan_block` looks up) to compare blocks."""
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
    loads themselves). 8 warps for a 64 x 64-pair block: at 4 its tiles spill. Smaller blocks (tests, other shapes)
    4 warps. Measurements: kernels/NOTES.md "State scan blocks"."""
    return {**st.meta, "num_stages": 1, "num_warps": 8 if bp * bj >= 64 * 64 else st.meta["num_warps"]}


# Where the heads are few for the GPU (`ckpt_segments`), a training forward keeps the fp32 state entering every
# CKPT_POSITIONS-th position (a whole number of chunks) for the backward, whose recompute of the states in between
# then runs one program per segment and head instead of walking the whole sequence again: at b1 x 32768 a head's walk
# is 2048 chunks long, and the forward's 64 heads fill the GPU only with narrow state blocks. The cost is memory kept
# from the forward to the backward: P N fp32 per head every CKPT_POSITIONS positions, 1 KiB a token at d_model 2048
# (64 heads), beside the 32 KiB a token of R4 pre-gate output the forward keeps anyway. 0: no checkpoints (the
# recompute walks from the start). The spacing's measurements: kernels/NOTES.md "State checkpoints".
CKPT_POSITIONS = 2048


def ckpt_segments(st: _Setup) -> tuple[int, int]:
    """(chunks per checkpointed segment, segments) of `CKPT_POSITIONS`; (0, 1), no checkpoints, where the forward's
    walks alone fill the GPU (`state_scan_block` gives them whole heads): there, more and shorter walks gained
    nothing for MIMO and SISO lost (kernels/NOTES.md "State checkpoints")."""
    if CKPT_POSITIONS <= 0 or 2 * st.B * st.H > _sm_count(st.mx.device):
        return 0, 1
    seg = max(1, CKPT_POSITIONS // st.C)
    return seg, cdiv(st.nc, seg)


def entering_states(st: _Setup, k, v, cs, acs, w, atot, s0, keep_ckpt: bool = False,
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
