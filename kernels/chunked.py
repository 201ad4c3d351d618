"""Chunked Mamba-3 in plain torch: the CPU path and the readable statement of the chunked algorithm.

The trapezoid's previous-input term is folded forward: a (k_s, v_s) pair enters the state with weight
w_s = gamma_s + (1 - lambda_{s+1}) dt_{s+1} (the second term is beta_{s+1} without its alpha, which the
decay supplies), while the output at s itself sees only gamma_s. The scan is then SSD-shaped:
inside a chunk a masked (C*R) x (C*R) product with decay exp(segsum(A dt)) (Kronecker with an R x R block
of ones), between chunks the states passed with each chunk's total decay, all as batched matmuls.
Autograd provides gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import (TWO_PI, Mamba3State, check_inputs, compute_dtype, heads_from_groups, mimo_or_ones,
                     packed_sequences, rotate, varlen_layout)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum_{j < t <= i} x[..., t] for j <= i, -inf above the diagonal.

    Built from masked cumulative sums rather than a difference of prefix sums, so long, strongly
    decaying stretches do not cancel catastrophically.
    """
    n = x.shape[-1]
    xx = x[..., None].expand(*x.shape, n)
    below = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = xx.masked_fill(~below, 0)
    seg = torch.cumsum(xx, dim=-2)
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
    return seg.masked_fill(~keep, -math.inf)


def _cumulative_angles(angles: torch.Tensor, dt: torch.Tensor, init: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """theta (B, L, H, K) = init + cumsum(tanh(angles) dt pi), kept in [0, 2pi) chunk by chunk.

    The per-chunk offsets are summed in float64 and reduced modulo 2pi, so theta stays accurate at
    any length (a plain fp32 cumsum drifts by ~1e-3 rad after 10^4 tokens).
    """
    inc = torch.tanh(angles)[:, :, None, :] * dt[..., None] * math.pi  # (B, L, H, K)
    B, L, H, K = inc.shape
    nc = -(-L // chunk)
    inc_c = F.pad(inc, (0, 0, 0, 0, 0, nc * chunk - L)).view(B, nc, chunk, H, K)
    within = torch.cumsum(inc_c, dim=2)
    totals = within[:, :, -1].detach().to(torch.float64)
    offsets = torch.cumsum(totals, dim=1) - totals
    if init is not None:
        offsets = offsets + init.detach().to(torch.float64)[:, None]
    offsets = torch.remainder(offsets, TWO_PI).to(inc.dtype)
    # The offset's gradient equals the cumulative gradient of the earlier chunks' increments; add it
    # back through a zero-valued term so autograd stays exact while the value stays reduced.
    exact_offsets = torch.cumsum(within[:, :, -1], dim=1) - within[:, :, -1]
    if init is not None:
        exact_offsets = exact_offsets + init[:, None]
    offsets = offsets + (exact_offsets - exact_offsets.detach())
    theta = within + offsets[:, :, None]
    return theta.reshape(B, nc * chunk, H, K)[:, :L]


def trapezoid_weights(dt: torch.Tensor, trap: torch.Tensor, lengths: torch.Tensor | None):
    """(gamma, nxt, w), each (B, L, H): gamma_s = lambda_s dt_s weighs the current input, nxt_s =
    (1 - lambda_s) dt_s is beta_s without its alpha, and w_s = gamma_s + nxt_{s+1} is the total weight
    of input s in the state (zero next-term at each sequence's last position)."""
    lam = torch.sigmoid(trap)
    gamma = lam * dt
    nxt = (1 - lam) * dt
    shifted = F.pad(nxt[:, 1:], (0, 0, 0, 1))  # last position: no next token yet
    if lengths is not None:  # padded varlen rows: no next token after each row's last real one
        pos = torch.arange(dt.shape[1], device=dt.device)
        shifted = shifted.masked_fill((pos[None, :] >= (lengths[:, None] - 1))[..., None], 0)
    return gamma, nxt, gamma + shifted


def entering_state(init: Mamba3State | None, nxt: torch.Tensor, mx: torch.Tensor, shape, dtype, device):
    """The state the first chunk starts from: the given ssm state plus the trapezoid's previous-input
    term of the first new token (its alpha is applied by the first decay), zeros without a state."""
    if init is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    mx_prev = init.v[:, None] * mx  # (B, R, H, P)
    return init.ssm + nxt[:, 0, :, None, None] * torch.einsum("brhp,brhn->bhpn", mx_prev, init.k)


def final_state(angle_last, ssm: torch.Tensor, kr_last, v: torch.Tensor, lengths: torch.Tensor | None,
                dtype) -> Mamba3State:
    """Gather each row's last real position into a Mamba3State (angle_last, kr_last: callables rows, last ->
    the angles (B, H, K) and rotated keys (B, R, H, N) there)."""
    B, L = v.shape[:2]
    last = (lengths - 1) if lengths is not None else torch.full((B,), L - 1, device=v.device)
    last = last.clamp(min=0)
    rows = torch.arange(B, device=v.device)
    return Mamba3State(torch.remainder(angle_last(rows, last), TWO_PI), ssm, kr_last(rows, last), v[rows, last].to(dtype))


def sequence_flags(seq: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
    """Where packed sequences (`common.sequence_index`, (B, L)) cut the chunked scan's decays, per chunk of `chunk`
    positions (the last one padded with the row's last index): same (B, nc, C, C), positions t and s in one sequence
    (the intra-chunk decay mask); enter (B, nc, C), t in the sequence of the state entering the chunk (that of the
    position before it; the row's first for chunk 0); end (B, nc, C), s in the sequence of the chunk's last position
    (s reaches the state it hands on); carry (B, nc), the entering state handed on through the chunk."""
    B, L = seq.shape
    nc = max(1, -(-L // chunk))
    sq = torch.cat((seq, seq[:, -1:].expand(B, nc * chunk - L)), 1).view(B, nc, chunk)
    prev = torch.cat((sq[:, :1, 0], sq[:, :-1, -1]), 1)  # (B, nc)
    last = sq[..., -1]
    return (sq[..., :, None] == sq[..., None, :], sq == prev[..., None], sq == last[..., None], last == prev)


def _chunked_batched(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                     rope_pairwise, chunk, initial_state, lengths, seq=None):
    B, L, R, G, N = q.shape
    H, P = v.shape[2:]
    cdt = compute_dtype(q, v)
    C = chunk
    nc = max(1, -(-L // C))
    Lp = nc * C
    qh = heads_from_groups(q.to(cdt), H, 3) + q_bias.to(cdt).transpose(0, 1)  # (B, L, R, H, N)
    kh = heads_from_groups(k.to(cdt), H, 3) + k_bias.to(cdt).transpose(0, 1)
    dt_, adt_ = dt.to(cdt), adt.to(cdt)
    init = initial_state.to(cdt) if initial_state is not None else None
    theta = _cumulative_angles(angles.to(cdt), dt_, None if init is None else init.angle, C)
    qr = rotate(qh, theta[:, :, None], rope_pairwise)
    kr = rotate(kh, theta[:, :, None], rope_pairwise)
    mx = mimo_or_ones(mimo_x, R, H, P, qh)
    vr = v.to(cdt)[:, :, None] * mx  # (B, L, R, H, P)

    gamma, nxt, w = trapezoid_weights(dt_, trap.to(cdt), lengths)

    def chunks(x, inner):  # (B, L, [R,] H, X) -> (B, H, nc, C*R or C, X)
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, Lp - L))
        if inner:
            return x.permute(0, 3, 1, 2, 4).reshape(B, H, nc, C * R, x.shape[-1])
        return x.permute(0, 2, 1).reshape(B, H, nc, C)

    qf, kf, vf = chunks(qr, True), chunks(kr, True), chunks(vr, True)
    a = chunks(adt_, False)
    gam, wf = chunks(gamma, False), chunks(w, False)
    a_cs = torch.cumsum(a, dim=-1)

    # Intra-chunk: strictly causal decayed weights, gamma on the diagonal, Kronecker over ranks.
    seg = torch.exp(_segsum(a))  # (B, H, nc, C, C)
    eye = torch.eye(C, dtype=torch.bool, device=q.device)
    mask = torch.where(eye, gam[..., :, None], seg * wf[..., None, :])
    mask = torch.where(torch.tril(torch.ones(C, C, dtype=torch.bool, device=q.device)), mask, 0)
    if seq is not None:  # packed sequences: no decay crosses a sequence's start
        same, enter, end, carry = (f[:, None] for f in sequence_flags(seq, C))  # broadcast over heads
        mask = mask * same
    mask = mask.repeat_interleave(R, dim=-1).repeat_interleave(R, dim=-2)
    scores = qf @ kf.transpose(-1, -2)
    o = (scores * mask) @ vf

    # Chunk states, then pass them across chunks (the initial state is chunk "-1").
    to_end = torch.exp(a_cs[..., -1:] - a_cs) * wf  # weight of position s in its chunk's final state
    enter_decay = torch.exp(a_cs)  # of the state entering the chunk, at each position
    if seq is not None:
        to_end, enter_decay = to_end * end, enter_decay * enter
    kw = kf * to_end.repeat_interleave(R, dim=-1)[..., None]
    states = vf.transpose(-1, -2) @ kw  # (B, H, nc, P, N)
    s0 = entering_state(init, nxt, mx, (B, H, P, N), cdt, q.device)
    all_states = torch.cat((s0[:, :, None], states), dim=2)
    chunk_decay = torch.exp(_segsum(F.pad(a_cs[..., -1], (1, 0))))  # (B, H, nc+1, nc+1)
    if seq is not None:  # state j reaches chunk i only if no chunk in between starts a sequence
        breaks = F.pad((~carry).cumsum(-1), (1, 0))  # (B, 1, nc+1): sequence starts up to each chunk
        chunk_decay = chunk_decay * (breaks[..., :, None] == breaks[..., None, :])
    passed = torch.einsum("bhij,bhjpn->bhipn", chunk_decay, all_states)
    entering, final_ssm = passed[:, :, :-1], passed[:, :, -1]
    o = o + enter_decay.repeat_interleave(R, dim=-1)[..., None] * (qf @ entering.transpose(-1, -2))

    o = o.view(B, H, Lp, R, P).permute(0, 2, 3, 1, 4)[:, :L]  # (B, L, R, H, P)
    if D is not None:
        o = o + D.to(cdt)[:, None] * vr
    if z is not None:
        o = o * F.silu(z.to(cdt)[:, :, None] * mimo_or_ones(mimo_z, R, H, P, qh))
    if mimo_o is not None:
        o = (o * mimo_o.to(cdt).transpose(0, 1)).sum(2)

    final = final_state(lambda rows, last: theta[rows, last], final_ssm, lambda rows, last: kr[rows, last], v,
                        lengths, cdt)
    return o.to(v.dtype), final


def mamba3_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor, trap: torch.Tensor,
    q_bias: torch.Tensor, k_bias: torch.Tensor, angles: torch.Tensor, *,
    mimo_x: torch.Tensor | None = None, mimo_z: torch.Tensor | None = None, mimo_o: torch.Tensor | None = None,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, rope_pairwise: bool = False,
    chunk_size: int = 64, initial_state: Mamba3State | None = None, return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Mamba3State | None]:
    """Mamba-3 (MIMO rank R; SISO is R = 1) over whole sequences, chunk by chunk.

    Any length (padding happens inside), an optional initial state (batch = number of sequences),
    the final state on request, and packed sequences: seq_idx (B, L) int, any number of rows, a new sequence
    (zero state) wherever it changes along a row; or cu_seqlens (int, (S+1,), batch dim 1), which also takes
    per-sequence initial/final states (`common.packed_sequences`). Tensor layout: see
    `hybrid_mamba3.kernels.common`. Computes in fp32 (fp64 for fp64 inputs); returns v's dtype.
    """
    check_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, rope_pairwise,
                 per_token=False)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    args = (q_bias, k_bias)
    opts = (mimo_x, mimo_z, mimo_o, D)
    cu_seqlens, seq = packed_sequences(cu_seqlens, seq_idx, q, initial_state, return_final_state)
    if cu_seqlens is None:
        if initial_state is not None and initial_state.ssm.shape[0] != q.shape[0]:
            raise ValueError(f"initial_state has batch {initial_state.ssm.shape[0]}, inputs have {q.shape[0]}")
        y, fin = _chunked_batched(q, k, v, adt, dt, trap, *args, angles, *opts, z, rope_pairwise, chunk_size,
                                  initial_state, None, seq)
        return y, (fin if return_final_state else None)

    # Packed sequences: scatter into a zero-padded batch (zero dt and v make padding a no-op), run, gather.
    lengths, valid, pad = varlen_layout(cu_seqlens, q, initial_state)
    y, fin = _chunked_batched(pad(q), pad(k), pad(v), pad(adt), pad(dt), pad(trap), *args, pad(angles), *opts,
                              pad(z), rope_pairwise, chunk_size, initial_state, lengths)
    return y[valid][None], (fin if return_final_state else None)
