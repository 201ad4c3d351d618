"""Sequential reference: the decode step applied token by token. Run it on float64 inputs for ground truth."""

from __future__ import annotations

import torch

from .common import Mamba3State, check_inputs, compute_dtype, packed_sequences
from .step import mamba3_step


def mamba3_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor, trap: torch.Tensor,
    q_bias: torch.Tensor, k_bias: torch.Tensor, angles: torch.Tensor, *,
    mimo_x: torch.Tensor | None = None, mimo_z: torch.Tensor | None = None, mimo_o: torch.Tensor | None = None,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, rope_pairwise: bool = False,
    initial_state: Mamba3State | None = None, return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None, chunk_size: int | None = None, seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Mamba3State | None]:
    """Same contract as `mamba3_chunked` (chunk_size is accepted and ignored); O(L) Python steps. Packed
    sequences run one by one."""
    check_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, rope_pairwise,
                 per_token=False)
    common = dict(mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o, D=D, rope_pairwise=rope_pairwise)
    packed = cu_seqlens is not None or seq_idx is not None
    cu_seqlens, seq = packed_sequences(cu_seqlens, seq_idx, q, initial_state, return_final_state)
    if seq is not None:  # each row's runs of one sequence index, one reference call each
        rows = []
        for b in range(q.shape[0]):
            starts = [0] + (torch.nonzero(seq[b, 1:] != seq[b, :-1]).flatten() + 1).tolist() + [q.shape[1]]
            cu = torch.tensor(starts)
            row = lambda t: None if t is None else t[b:b + 1]  # noqa: E731
            rows.append(mamba3_reference(row(q), row(k), row(v), row(adt), row(dt), row(trap), q_bias, k_bias,
                                         row(angles), z=row(z), cu_seqlens=cu, return_final_state=True,
                                         **common)[0])
        return torch.cat(rows, 0), None
    if packed:
        outs, finals = [], []
        bounds = cu_seqlens.tolist()
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            sl = slice(s, e)
            init = initial_state.select(slice(i, i + 1)) if initial_state is not None else None
            y, fin = mamba3_reference(
                q[:, sl], k[:, sl], v[:, sl], adt[:, sl], dt[:, sl], trap[:, sl], q_bias, k_bias, angles[:, sl],
                z=None if z is None else z[:, sl], initial_state=init, return_final_state=True, **common)
            outs.append(y)
            finals.append(fin)
        final = Mamba3State(*(torch.cat(parts, 0) for parts in zip(*finals)))
        return torch.cat(outs, 1), (final if return_final_state else None)
    B, L, R, G, N = q.shape
    H, P = v.shape[2:]
    cdt = compute_dtype(q, v)
    state = (initial_state.to(cdt) if initial_state is not None else
             Mamba3State.zeros(B, H, P, N, R, angles.shape[-1], device=q.device, dtype=cdt))
    ys = []
    for t in range(L):
        y, state = mamba3_step(q[:, t], k[:, t], v[:, t], adt[:, t], dt[:, t], trap[:, t], q_bias, k_bias,
                               angles[:, t], state, z=None if z is None else z[:, t], **common)
        ys.append(y)
    y = torch.stack(ys, 1) if ys else v.new_zeros((B, 0) + ((H, P) if mimo_o is not None else (R, H, P)))
    return y, (state if return_final_state else None)
