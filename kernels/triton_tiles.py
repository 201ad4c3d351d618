"""Device functions shared by the Triton scan's forward and backward kernels: the chunk's row layout and its loads.

- A chunk of C positions is C * RP rows, row i = (position c*C + i // RP, rank i % RP), RP = R padded to a power of
  two (`_rank_rows`): inputs laid out [B, L, R, G, N] are one strided tile, and each intra-chunk product is a single
  (C*RP)-row matmul.
- The rotation pairs state dims (j, j + N/2) (`_half_columns`): every rotated q / k / state is carried as two
  [rows, N/2] halves, so no lane needs another's value.
- The broadcast tables (cos/sin and v per position, biases and mimo_x per rank) are either loaded per row or loaded
  once and repeated in registers (REPEAT, `_repeat`): which one pays is a per-kernel choice (kernels/NOTES.md).

Only `@triton.jit` functions live here; the kernels that call them are in `triton_scan`, `triton_forward` and
`triton_backward`, the host-side launch setup in `triton_setup`.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU install without triton: triton_chunked reports it before anything here is called
    triton = None

if triton is not None:

    @triton.jit
    def _half_columns(HALF: tl.constexpr, BH: tl.constexpr):
        """The rotation pairs state dims (j, j + N/2), j < N/2 (the SISO layout's pairs (2j, 2j+1) are brought
        to this one outside the kernels: read with a stride of 2 inside them, the SISO kernels ran several times
        slower, kernels/NOTES.md "Row layout"). Everything is computed on the two halves, so no lane ever needs
        another's value."""
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
        per rank) once and repeat them in registers (True), or load them per row (False). The dQ and dK/dV kernels,
        L1-bound, repeat (the per-row loads were about half their L1 load traffic); the state scans keep per-row
        loads (the repeat's layout change would sit in their serial chunk loop), and so does the chunk output kernel
        (no gain). Measurements: kernels/NOTES.md "Repeated broadcast tables"."""
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
