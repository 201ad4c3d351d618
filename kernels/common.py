"""Shared pieces of the Mamba-3 ops: the decode state, input checks, the data-dependent rotation.

Tensor conventions for every op in this package (B batch, L length, H heads, P headdim, G groups,
R MIMO rank, N d_state, K rotary angles):

    q, k        (B, L, R, G, N)  C and B after their RMSNorm, before bias and rotation
    v           (B, L, H, P)     x
    adt, dt     (B, L, H)        A*dt (<= 0) and dt, both after their activations
    trap        (B, L, H)        trapezoid logits (lambda = sigmoid(trap))
    q_bias/k_bias (H, R, N)      per-head, per-rank biases of C and B
    angles      (B, L, K)        raw angle projection (theta advances by tanh(angles) * dt * pi)
    mimo_x/z/o  (H, R, P) or None (None means all ones)
    D           (H,) or None;  z (B, L, H, P) or None

With mimo_o given the output is (B, L, H, P) (ranks contracted); with mimo_o None it is
(B, L, R, H, P) (ranks kept, as the official kernel does for the out-projection norm path).
The step takes the same tensors without the L dimension.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

TWO_PI = 2.0 * math.pi


class Mamba3State(NamedTuple):
    """Decode state of one Mamba-3 layer for a batch of sequences.

    angle (B, H, K): cumulative rotation angle, kept modulo 2*pi.
    ssm   (B, H, P, N): the recurrent state.
    k     (B, R, H, N): last position's rotated, biased B (the next step's trapezoid term needs it).
    v     (B, H, P): last position's x (before the MIMO x projection, as in the official module).
    """

    angle: torch.Tensor
    ssm: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def zeros(batch: int, nheads: int, headdim: int, d_state: int, mimo_rank: int, num_angles: int,
              device=None, dtype: torch.dtype = torch.float32) -> "Mamba3State":
        return Mamba3State(
            torch.zeros(batch, nheads, num_angles, device=device, dtype=dtype),
            torch.zeros(batch, nheads, headdim, d_state, device=device, dtype=dtype),
            torch.zeros(batch, mimo_rank, nheads, d_state, device=device, dtype=dtype),
            torch.zeros(batch, nheads, headdim, device=device, dtype=dtype),
        )

    def to(self, dtype: torch.dtype) -> "Mamba3State":
        return Mamba3State(*(t.to(dtype) for t in self))

    def select(self, index: torch.Tensor | slice | int) -> "Mamba3State":
        return Mamba3State(*(t[index] for t in self))


A_ACTIVATIONS = ("softplus", "heavy_tail")

# Launch option of every Triton kernel here: FP contraction (a * b + c -> one fma) on. Triton 3.10 turns it off unless
# a launch asks (3.9 warns); the kernels were written and timed with it, and tests' tolerances assume its rounding.
FMA = {"enable_fp_fusion": True}


# The Triton kernels compute element offsets in 32 bits (64-bit ones cost registers where they are scarce). Every
# public Triton function refuses tensors whose offsets could reach this limit (`check_int32_offsets`), before launching;
# the layer splits its batch (and at inference its sequence) so that its calls stay below it.
INT32_LIMIT = 2**31


def check_int32_offsets(op: str, rows: int, per_row: int, fix: str) -> None:
    """Refuse, with an error that says what to change, `rows` rows of `per_row` elements that 32-bit offsets cannot
    address."""
    if rows * per_row >= INT32_LIMIT:
        raise ValueError(f"{op}: {rows} rows x {per_row} elements reach 2^31, past the Triton kernels' 32-bit offsets; "
                         f"{fix}")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for launch grids. Plain Python on purpose: in Triton 3.6 (and 3.8) `triton.cdiv` and
    `triton.next_power_of_2` are constexpr functions costing ~6 us a host call, and a training step makes dozens."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (`triton.next_power_of_2` on the host; see `cdiv`)."""
    return 1 << (int(n) - 1).bit_length()


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or fp64 when it is fp64 (the layer's per-token math never runs in 16 bits)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def a_activation_fn(name: str, u: torch.Tensor) -> torch.Tensor:
    """act(dd_A) with A = -act: softplus (mamba-ssm 2.3.2.post1) or the heavy tail of the later code."""
    if name == "softplus":
        return torch.nn.functional.softplus(u)
    return torch.where(u >= 0, 1 + u, 1 / (1 - u.clamp(max=0)))


def token_activations(dd_dt: torch.Tensor, dd_A: torch.Tensor, dt_bias: torch.Tensor, a_activation: str,
                      a_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's per-token activations of its in_proj output (B, L, H): dt = softplus(dd_dt + dt_bias) and
    adt = min(-act(dd_A), -a_floor) dt, in at least fp32 (`triton_scalars.token_activations_triton` is the
    same in one kernel each way)."""
    A = (-a_activation_fn(a_activation, at_least_fp32(dd_A))).clamp(max=-a_floor)
    dt = torch.nn.functional.softplus(at_least_fp32(dd_dt) + dt_bias)
    return dt, A * dt


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64 (reference runs), else fp32: the ops never accumulate in 16 bits."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def rotate(x: torch.Tensor, theta: torch.Tensor, pairwise: bool) -> torch.Tensor:
    """Rotate the last dim of x (size N) by angles theta (last dim K, broadcast over the rest).

    pairwise=True pairs dims (2i, 2i+1) for i < K (the official SISO layout); pairwise=False pairs
    dim i with i + N/2 for i < K (the official MIMO layout). Dims outside the K pairs pass through.
    """
    n, nk = x.shape[-1], theta.shape[-1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    if pairwise:
        pairs = x[..., : 2 * nk].unflatten(-1, (nk, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((rot, x[..., 2 * nk:]), dim=-1)
    half = n // 2
    a, b = x[..., :nk], x[..., half: half + nk]
    return torch.cat((a * cos - b * sin, x[..., nk:half], a * sin + b * cos, x[..., half + nk:]), dim=-1)


def check_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                 rope_pairwise: bool, per_token: bool) -> None:
    """Shape checks with messages that say what to change. per_token: the step's (no L dim) layout."""
    lead = 1 if per_token else 2
    if q.dim() != lead + 3 or k.shape != q.shape:
        raise ValueError(f"q and k must both be {'(B, R, G, N)' if per_token else '(B, L, R, G, N)'}; "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    R, G, N = q.shape[lead:]
    H, P = v.shape[lead:]
    if v.shape[:lead] != q.shape[:lead]:
        raise ValueError(f"v {tuple(v.shape)} and q {tuple(q.shape)} disagree on the leading (batch/length) dims")
    if H % G:
        raise ValueError(f"nheads ({H}) must be a multiple of ngroups ({G})")
    for name, t in (("adt", adt), ("dt", dt), ("trap", trap)):
        if t.shape != v.shape[:lead] + (H,):
            raise ValueError(f"{name} must be {tuple(v.shape[:lead]) + (H,)}, got {tuple(t.shape)}")
    for name, t in (("q_bias", q_bias), ("k_bias", k_bias)):
        if t.shape != (H, R, N):
            raise ValueError(f"{name} must be (H, R, N) = {(H, R, N)}, got {tuple(t.shape)}")
    nk = angles.shape[-1]
    if angles.shape[:-1] != v.shape[:lead]:
        raise ValueError(f"angles must be {tuple(v.shape[:lead]) + ('K',)}, got {tuple(angles.shape)}")
    limit = N // 2
    if nk < 1 or nk > limit:
        raise ValueError(f"number of rotary angles must be in [1, d_state/2 = {limit}], got {nk}")
    for name, t in (("mimo_x", mimo_x), ("mimo_z", mimo_z), ("mimo_o", mimo_o)):
        if t is not None and t.shape != (H, R, P):
            raise ValueError(f"{name} must be (H, R, P) = {(H, R, P)}, got {tuple(t.shape)}")
    if D is not None and D.shape != (H,):
        raise ValueError(f"D must be ({H},), got {tuple(D.shape)}")
    if z is not None and z.shape != v.shape:
        raise ValueError(f"z must have the shape of v {tuple(v.shape)}, got {tuple(z.shape)}")


def heads_from_groups(x: torch.Tensor, nheads: int, group_dim: int) -> torch.Tensor:
    """Broadcast B/C groups to heads: head h reads group h // (H / G), as in the official kernels."""
    return x.repeat_interleave(nheads // x.shape[group_dim], dim=group_dim)


def mimo_or_ones(w: torch.Tensor | None, rank: int, nheads: int, headdim: int, like: torch.Tensor) -> torch.Tensor:
    """(R, H, P) view of a MIMO projection, ones when absent (SISO)."""
    if w is None:
        return torch.ones(rank, nheads, headdim, dtype=like.dtype, device=like.device)
    return w.to(like.dtype).transpose(0, 1)


def varlen_layout(cu_seqlens: torch.Tensor, q: torch.Tensor, initial_state: "Mamba3State | None"):
    """Packed sequences (batch 1, boundaries cu_seqlens) -> a zero-padded batch, one row per sequence.

    Returns (lengths (S,), valid (S, maxlen) bool, pad) where pad(x) turns a packed (1, T, ...) tensor
    into (S, maxlen, ...) with zeros past each length (zero dt and v make padding a no-op) and
    y[valid][None] packs a padded result back.
    """
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch dim must be 1 (sequences packed along L), got {q.shape[0]}")
    total = q.shape[1]
    cu = _checked_cu_seqlens(cu_seqlens, total, q.device)
    lengths = cu[1:] - cu[:-1]
    S, maxlen = lengths.numel(), max(int(lengths.max()), 1)
    if initial_state is not None and initial_state.ssm.shape[0] != S:
        raise ValueError(f"initial_state has batch {initial_state.ssm.shape[0]}, cu_seqlens holds {S} sequences")
    pos = torch.arange(maxlen, device=q.device)
    valid = pos[None, :] < lengths[:, None]
    src = (cu[:-1, None] + pos[None, :]).clamp(max=max(total - 1, 0))

    def pad(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        g = x[0][src]
        return g.masked_fill(~valid.view(S, maxlen, *([1] * (g.dim() - 2))), 0)

    return lengths, valid, pad


def sequence_index(seq_idx: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Packed sequences as the ops take them: (B, L) int32, 0 at each row's first token and one more at every token
    whose `seq_idx` differs from the previous token's (a new sequence starts there: its state starts from zero). Any
    integer labels will do (transformers' `seq_idx`, document numbers); only where they change matters."""
    if seq_idx.dim() == 1:
        seq_idx = seq_idx[None]
    if seq_idx.dim() != 2 or seq_idx.shape[1] != length or seq_idx.shape[0] not in (1, batch):
        raise ValueError(f"seq_idx must be (batch, seqlen) = {(batch, length)} (or (1, seqlen)), got "
                         f"{tuple(seq_idx.shape)}")
    if seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
        raise TypeError(f"seq_idx must hold integers, got {seq_idx.dtype}")
    starts = torch.nn.functional.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))
    return starts.cumsum(1, dtype=torch.int32).expand(batch, length).contiguous()


def packed_sequences(cu_seqlens: torch.Tensor | None, seq_idx: torch.Tensor | None, q: torch.Tensor,
                     initial_state: "Mamba3State | None", return_final_state: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """How an op runs packed sequences: (cu_seqlens, seq) with at most one not None. Without states in or out, packed
    rows run as they are, the state reset inside the scan wherever `seq` (`sequence_index`, from seq_idx or
    cu_seqlens) changes: they cost what their tokens cost. Per-sequence initial / final states need cu_seqlens
    (batch 1), which the ops lay out as a padded batch, one row per sequence."""
    B, L = q.shape[:2]
    if cu_seqlens is not None and seq_idx is not None:
        raise ValueError("pass cu_seqlens or seq_idx, not both")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"with cu_seqlens the batch dim must be 1 (sequences packed along L), got {B}; "
                         "for several packed rows pass seq_idx (batch, seqlen)")
    if seq_idx is not None and (initial_state is not None or return_final_state):
        raise ValueError("seq_idx packs sequences that start from a zero state and return none; for per-sequence "
                         "initial or final states pack them along one row with cu_seqlens")
    if cu_seqlens is not None and initial_state is None and not return_final_state:
        return None, seq_idx_from_cu_seqlens(cu_seqlens, L, q.device)
    return cu_seqlens, None if seq_idx is None else sequence_index(seq_idx.to(q.device), B, L)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """(1, total) `sequence_index` of sequences packed along one row at boundaries cu_seqlens (checked)."""
    cu = _checked_cu_seqlens(cu_seqlens, total, device)
    starts = torch.zeros(total + 1, dtype=torch.int32, device=device)
    starts.index_add_(0, cu[1:-1], torch.ones_like(cu[1:-1], dtype=torch.int32))
    return starts[:total].cumsum(0, dtype=torch.int32)[None]


def _checked_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if cu.dim() != 1 or cu.numel() < 2 or cu[0] != 0 or cu[-1] != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {cu.tolist()}")
    return cu


def rows_of(x: torch.Tensor | None, lead: int = 2) -> torch.Tensor | None:
    """x as the kernels index it: its first `lead` dims flattened into rows `row_stride(x, lead)` elements apart,
    each row's remaining dims contiguous (size-1 dims aside). x itself when it is laid out so (the layer's v and z,
    and the decode step's per-token inputs, are such views of its in_proj output: no copy), else a contiguous copy."""
    if x is None:
        return None
    return x if in_rows_layout(x, lead) else x.contiguous()


def in_rows_layout(x: torch.Tensor, lead: int = 2) -> bool:
    """Whether the kernels can index x in place as `rows_of` describes (kernels writing into such views check it)."""
    if x.is_contiguous():  # checked first: this runs ~10 times a layer call, on the host's path (7 -> 0.5 us)
        return True
    shape, strides = x.shape, x.stride()
    expect = 1
    for i in range(len(shape) - 1, lead - 1, -1):
        if shape[i] != 1 and strides[i] != expect:
            return False
        expect *= shape[i]
    step = strides[1] if lead == 2 and shape[1] > 1 else strides[0]  # `row_stride`
    if lead == 2 and shape[0] > 1 and shape[1] > 1 and strides[0] != shape[1] * step:
        return False  # batches are not L positions apart
    # the kernels' offsets are 32-bit
    return (shape[0] * shape[1] if lead == 2 else shape[0]) * step < 2**31


def grad_needed(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on these tensors. The Triton ops call their forward directly when not
    (inference): autograd.Function.apply costs the host 13-22 us a call, ~4 calls a layer."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def row_stride(x: torch.Tensor, lead: int = 2) -> int:
    """Elements between consecutive rows of a `rows_of` tensor: positions (lead 2; batches when L == 1), or
    batches (lead 1)."""
    return x.stride(1) if lead == 2 and x.shape[1] > 1 else x.stride(0)


def halves_layout(x: torch.Tensor) -> torch.Tensor:
    """Last dim (2j, 2j+1) pairs -> (j, j + N/2): even dims first, then odd (the Triton scan's rotation layout). One
    strided copy, and one for its gradient (a cat of the two strided slices costs five launches in the backward)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def pairs_layout(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `halves_layout`."""
    return x.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)
