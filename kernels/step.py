"""One decode step of the Mamba-3 recurrence: the literal statement of the layer's semantics.

    S_t = alpha_t S_{t-1} + beta_t sum_r v_{t-1,r} kB_{t-1,r}^T + gamma_t sum_r v_{t,r} kB_{t,r}^T
    o_{t,r} = S_t qC_{t,r} + D v_{t,r};  y_t = sum_r mimo_o[r] * o_{t,r} * silu(z_t * mimo_z[r])

The sequential reference is this step in a loop; the chunked and Triton ops are checked against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import TWO_PI, Mamba3State, check_inputs, compute_dtype, heads_from_groups, mimo_or_ones, rotate


def mamba3_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor, trap: torch.Tensor,
    q_bias: torch.Tensor, k_bias: torch.Tensor, angles: torch.Tensor, state: Mamba3State, *,
    mimo_x: torch.Tensor | None = None, mimo_z: torch.Tensor | None = None, mimo_o: torch.Tensor | None = None,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, rope_pairwise: bool = False,
) -> tuple[torch.Tensor, Mamba3State]:
    """Advance every sequence of the batch by one token.

    Shapes as in `common` without the L dim: q, k (B, R, G, N); v, z (B, H, P); adt, dt, trap (B, H);
    angles (B, K). Returns y ((B, H, P) with mimo_o, else (B, R, H, P)) in v's dtype, and the new state
    (in the state's dtype, fp32 or fp64). The given state is not modified.
    """
    check_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, rope_pairwise,
                 per_token=True)
    cdt = compute_dtype(q, v, state.ssm)
    R, H, P = q.shape[1], v.shape[1], v.shape[2]
    st = state.to(cdt)
    qh = heads_from_groups(q.to(cdt), H, 2) + q_bias.to(cdt).transpose(0, 1)
    kh = heads_from_groups(k.to(cdt), H, 2) + k_bias.to(cdt).transpose(0, 1)
    dt_, adt_ = dt.to(cdt), adt.to(cdt)
    theta = torch.remainder(st.angle + torch.tanh(angles.to(cdt))[:, None, :] * dt_[..., None] * math.pi, TWO_PI)
    qr = rotate(qh, theta[:, None], rope_pairwise)
    kr = rotate(kh, theta[:, None], rope_pairwise)
    lam = torch.sigmoid(trap.to(cdt))
    alpha = torch.exp(adt_)
    gamma = lam * dt_
    beta = (1 - lam) * dt_ * alpha
    mx = mimo_or_ones(mimo_x, R, H, P, qh)
    x_now = v.to(cdt)[:, None] * mx
    x_prev = st.v[:, None] * mx
    ssm = (alpha[..., None, None] * st.ssm
           + beta[..., None, None] * torch.einsum("brhp,brhn->bhpn", x_prev, st.k)
           + gamma[..., None, None] * torch.einsum("brhp,brhn->bhpn", x_now, kr))
    o = torch.einsum("bhpn,brhn->brhp", ssm, qr)
    if D is not None:
        o = o + D.to(cdt)[None, None, :, None] * x_now
    if z is not None:
        o = o * F.silu(z.to(cdt)[:, None] * mimo_or_ones(mimo_z, R, H, P, qh))
    if mimo_o is not None:
        o = (o * mimo_o.to(cdt).transpose(0, 1)).sum(1)
    return o.to(v.dtype), Mamba3State(theta, ssm, kr, v.to(cdt))
