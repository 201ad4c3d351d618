"""Mamba-3 decode step in Triton: one token per sequence, the (P, N) state updated in place.

One program per (sequence, head) (or per block of its headdim rows) reads its (P, N) fp32 state once and
writes it once, so the step is bound by the state's bytes. The rank-R work runs on tensor cores: the update
is one (P, 2R) x (2R, N) product (previous and current token's ranks side by side, padded to 16) and the R
outputs one (P, N) x (N, R) product, so the state tile is the only large thing a thread holds (against outer
products and row sums in fp32 FMAs: kernels/NOTES.md "Decode step").

Same function as `mamba3_step`. With `activations`, the step starts from the layer's raw in_proj output
(B/C before their RMS norms, dd_dt and dd_A before softplus and the A activation) and does those per-token
activations itself: a layer's decode step is then in_proj, this kernel and out_proj, with no small torch ops
between them. Several tokens at a time with a cache go through the chunked op with an initial state
(`mamba3_chunked_triton(..., initial_state=...)`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .common import FMA, Mamba3State, cdiv, check_inputs, check_int32_offsets, next_pow2, rows_of
from .triton_setup import _pow2, _sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton; mamba3_step_triton says so
    triton = None

if triton is not None:
    from .triton_angles import _tanh
    from .triton_scalars import _activations

    @triton.jit
    def _advance(angle_ptr, raw_ptr, idx, m, dt):
        """(angle + tanh(raw) dt pi) mod 2pi at the given angle indices."""
        # pi as a literal, not math.pi: torch.compile rebuilds user kernels from their source without its module's
        # globals (inductor failed with "math is not defined" on the decode step)
        pi = 3.141592653589793
        two_pi = 2.0 * pi
        raw = tl.load(raw_ptr + idx, mask=m, other=0.0).to(tl.float32)
        th = tl.load(angle_ptr + idx, mask=m, other=0.0) + _tanh(raw) * dt * pi  # the chunked op's tanh
        return th - two_pi * tl.floor(th / two_pi)

    @triton.jit
    def _qk_rows(ptr, sb, b, g, G, N, rj, rmask, offs_n, nmask, sw, cos, sin, bias_ptr, h, norm_ptr, eps,
                 R: tl.constexpr, RR: tl.constexpr, BN: tl.constexpr, PAIRWISE: tl.constexpr, RAW: tl.constexpr):
        """(RR, BN) tile of rotated, bias-added q or k vectors: row j is rank rj[j] (zero where rmask is off).
        RAW: the inputs are the in_proj's C/B, RMS-normalised over N here (a reduction within each warp's rows)
        and rounded to their dtype, as the layer's norm does before the op."""
        m = rmask[:, None] & nmask[None, :]
        base = ptr + b * sb + (rj[:, None] * G + g) * N
        bias = bias_ptr + (h * R + rj[:, None]) * N
        x = tl.load(base + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
        if RAW:
            # eps cast as `_activations` casts a_floor (fp64 where inductor launches the kernel)
            inv = tl.rsqrt(tl.sum(x * x, axis=1) / N + tl.cast(eps, tl.float32))[:, None]
            x = (x * inv * tl.load(norm_ptr + offs_n, mask=nmask, other=0.0)[None, :])
            x = x.to(ptr.dtype.element_ty).to(tl.float32)
        x += tl.load(bias + offs_n[None, :], mask=m, other=0.0)
        if PAIRWISE:  # pairs (2j, 2j + 1) are neighbours: swap them within the tile
            xa, xb = tl.split(tl.reshape(x, (RR, BN // 2, 2)))
            xs = tl.reshape(tl.join(xb, xa), (RR, BN))
        else:  # pairs (j, j + N/2): the partners are loaded (and normalised, biased) as a second tile
            xs = tl.load(base + sw[None, :], mask=m, other=0.0).to(tl.float32)
            if RAW:
                xs = (xs * inv * tl.load(norm_ptr + sw, mask=nmask, other=0.0)[None, :])
                xs = xs.to(ptr.dtype.element_ty).to(tl.float32)
            xs += tl.load(bias + sw[None, :], mask=m, other=0.0)
        return tl.where(m, x * cos[None, :] + xs * sin[None, :], 0.0)

    @triton.jit
    def _rank_weights(w_ptr, h, P, rj, cmask, offs_p, pmask, R: tl.constexpr, HAS: tl.constexpr):
        """(BP, RR) tile of a mimo projection for ranks rj (ones when the projection is absent), 0 off cmask."""
        m = pmask[:, None] & cmask[None, :]
        if HAS:
            return tl.load(w_ptr + (h * R + rj[None, :]) * P + offs_p[:, None], mask=m, other=0.0)
        return tl.where(m, 1.0, 0.0)

    @triton.jit
    def _step_kernel(q_ptr, sq, k_ptr, sk, qb_ptr, kb_ptr, v_ptr, sv, adt_ptr, sadt, dt_ptr, sdt, trap_ptr, strap,
                     ang_ptr, sang, mx_ptr, mz_ptr, mo_ptr, d_ptr, z_ptr, sz, dtb_ptr, qn_ptr, kn_ptr, eps, a_floor,
                     angle_ptr, ssm_ptr, kprev_ptr, vprev_ptr, angle_new_ptr, knew_ptr, vnew_ptr, out_ptr,
                     H, G, K, N, P,
                     R: tl.constexpr, RR: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
                     HALF: tl.constexpr, PAIRWISE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                     HAS_MX: tl.constexpr, HAS_MZ: tl.constexpr, CONTRACT: tl.constexpr, RAW: tl.constexpr,
                     HEAVY_TAIL: tl.constexpr, PREC: tl.constexpr):
        """Grid (B*H, P / BP); per token q, k [B, R, G, N], v, z [B, H, P], adt / dt / trap [B, H], angles [B, K]
        (rows of their own batch strides); state angle [B, H, K], ssm [B, H, P, N] (updated in place), k [B, R, H, N],
        v [B, H, P] -> new angle / k / v, out [B, H, P] (CONTRACT; else [B, R, H, P]).

        One token of `mamba3_step` for a (sequence, head) and block of BP headdim rows: the angle advanced, the
        update S = alpha S + (previous and current token's ranks) as one (BP, 2R) x (2R, N) product, the R outputs
        S q_r as one (BP, N) x (N, R) product, then D skip, z gate and the rank contraction. RAW: q, k, adt, dt are
        the layer's raw C, B, dd_A, dd_dt, normalised and activated here (`StepActivations`)."""
        pid, pblk = tl.program_id(0), tl.program_id(1)  # (sequence, head), block of headdim rows
        b, h = pid // H, pid % H
        g = h // (H // G)
        offs_n, offs_p, offs_k = tl.arange(0, BN), pblk * BP + tl.arange(0, BP), tl.arange(0, BK)
        nmask, pmask, kmask = offs_n < N, offs_p < P, offs_k < K

        dt = tl.load(dt_ptr + b * sdt + h).to(tl.float32)
        adt = tl.load(adt_ptr + b * sadt + h).to(tl.float32)
        if RAW:  # dt = softplus(dd_dt + dt_bias); A = -act(dd_A) <= -A_floor; adt = A dt
            dt, A = _activations(dt, adt, tl.load(dtb_ptr + h), a_floor, HEAVY_TAIL)
            adt = A * dt
        lam = tl.sigmoid(tl.load(trap_ptr + b * strap + h).to(tl.float32))
        alpha = tl.exp(adt)
        gamma = lam * dt
        beta = (1.0 - lam) * dt * alpha

        # Angle: advance and reduce mod 2pi (written to the new-angle buffer), and the per-dim cos/sin.
        if PAIRWISE:
            ai = offs_n // 2
            sign = tl.where(offs_n % 2 == 0, -1.0, 1.0)
            sw = offs_n ^ 1
        else:
            ai = offs_n % HALF
            sign = tl.where(offs_n < HALF, -1.0, 1.0)
            sw = (offs_n + HALF) % N
        th_k = _advance(angle_ptr + pid * K, ang_ptr + b * sang, offs_k, kmask, dt)
        tl.store(angle_new_ptr + pid * K + offs_k, th_k, mask=kmask & (offs_k * 0 + pblk == 0))  # by one program a head
        valid = (ai < K) & nmask
        th = _advance(angle_ptr + pid * K, ang_ptr + b * sang, ai, valid, dt)
        cos = tl.where(valid, tl.cos(th), 1.0)
        sin = tl.where(valid, sign * tl.sin(th), 0.0)

        # Update: columns j < R are the previous token's ranks (beta, cached k and v), R <= j < 2R this token's.
        offs_j = tl.arange(0, RR)
        prev = offs_j < R
        rj = tl.where(prev, offs_j, offs_j - R)
        cur = (offs_j >= R) & (offs_j < 2 * R)
        kr = _qk_rows(k_ptr, sk, b, g, G, N, rj, cur, offs_n, nmask, sw, cos, sin, kb_ptr, h, kn_ptr, eps, R, RR, BN,
                      PAIRWISE, RAW)
        krow = ((b * R + rj[:, None]) * H + h) * N + offs_n[None, :]
        tl.store(knew_ptr + krow, kr, mask=(cur & (offs_j * 0 + pblk == 0))[:, None] & nmask[None, :])
        kt = kr + tl.load(kprev_ptr + krow, mask=prev[:, None] & nmask[None, :], other=0.0)
        v = tl.load(v_ptr + b * sv + h * P + offs_p, mask=pmask, other=0.0).to(tl.float32)
        tl.store(vnew_ptr + pid * P + offs_p, v, mask=pmask)
        vprev = tl.load(vprev_ptr + pid * P + offs_p, mask=pmask, other=0.0)
        xs = tl.where(prev[None, :], (beta * vprev)[:, None], (gamma * v)[:, None])
        xs *= _rank_weights(mx_ptr, h, P, rj, prev | cur, offs_p, pmask, R, HAS_MX)
        sp = ssm_ptr + pid * P * N + offs_p[:, None] * N + offs_n[None, :]
        pn = pmask[:, None] & nmask[None, :]
        ssm = tl.dot(xs, kt, alpha * tl.load(sp, mask=pn, other=0.0), input_precision=PREC)
        tl.store(sp, ssm, mask=pn)

        # Outputs: o_r = S q_r for the R ranks in one product, then D skip, z gate and the rank contraction.
        qc = offs_j < R
        qt = _qk_rows(q_ptr, sq, b, g, G, N, offs_j, qc, offs_n, nmask, sw, cos, sin, qb_ptr, h, qn_ptr, eps, R, RR, BN,
                      PAIRWISE, RAW)
        o = tl.dot(ssm, tl.trans(qt), input_precision=PREC)
        if HAS_D:
            o += tl.load(d_ptr + h) * v[:, None] * _rank_weights(mx_ptr, h, P, offs_j, qc, offs_p, pmask, R, HAS_MX)
        if HAS_Z:
            zz = tl.load(z_ptr + b * sz + h * P + offs_p, mask=pmask, other=0.0).to(tl.float32)[:, None]
            zz = zz * _rank_weights(mz_ptr, h, P, offs_j, qc, offs_p, pmask, R, HAS_MZ)
            o = o * zz * tl.sigmoid(zz)
        if CONTRACT:
            y = tl.sum(o * _rank_weights(mo_ptr, h, P, offs_j, qc, offs_p, pmask, R, True), axis=1)
            tl.store(out_ptr + pid * P + offs_p, y, mask=pmask)
        else:
            tl.store(out_ptr + ((b * R + offs_j[None, :]) * H + h) * P + offs_p[:, None], o,
                     mask=pmask[:, None] & qc[None, :])


class StepActivations(NamedTuple):
    """The layer's per-token activations, for a step that starts from its raw in_proj output:
    k = RMSNorm(B) * b_norm, q = RMSNorm(C) * c_norm (eps, rounded to B/C's dtype), dt = softplus(dd_dt +
    dt_bias), adt = min(-act(dd_A), -a_floor) * dt with act softplus or 'heavy_tail' (`a_activation_fn`)."""
    dt_bias: torch.Tensor
    b_norm: torch.Tensor
    c_norm: torch.Tensor
    eps: float
    a_activation: str
    a_floor: float


def step_launch(heads: int, P: int, device: torch.device) -> tuple[int, int]:
    """(headdim rows per program, warps) for B*H = heads: whole heads in 4 warps when the heads alone fill the
    GPU, else blocks of 32 rows in 2 warps so batch 1 still launches enough programs (kernels/NOTES.md "Decode
    step")."""
    if heads >= 16 * _sm_count(device):
        return _pow2(P), 4
    return min(_pow2(P), 32), 2


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):  # the layer's fp32 parameters: as they are
        return t
    return t.to(torch.float32).contiguous()


def step_elements_per_row(*tensors: torch.Tensor | None) -> int:
    """The most elements between consecutive batch rows of the step's tensors (states, and per-token inputs that may
    be views of a wider projection): batch x this must stay below `common.INT32_LIMIT`."""
    # shapes and strides only (no views: the decode step is on the host's hot path)
    # a loop, not max(..., default=0): torch.compile (dynamo) traces this on the decode step and rejects `default`
    most = 0
    for t in tensors:
        if t is not None and t.dim() > 0:
            most = max(most, t.stride(0), math.prod(t.shape[1:]))
    return most


def mamba3_step_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor, trap: torch.Tensor,
    q_bias: torch.Tensor, k_bias: torch.Tensor, angles: torch.Tensor, state: Mamba3State, *,
    mimo_x: torch.Tensor | None = None, mimo_z: torch.Tensor | None = None, mimo_o: torch.Tensor | None = None,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, rope_pairwise: bool = False,
    activations: StepActivations | None = None, check: bool = True,
) -> tuple[torch.Tensor, Mamba3State]:
    """Same contract as `mamba3_step`, except that the ssm tensor of an fp32 contiguous state is updated
    in place (and returned in the new state with fresh angle/k/v tensors); any other state is copied
    to fp32 first. With `activations`, q and k are the layer's C and B before their norms and adt, dt its
    dd_A and dd_dt (see `StepActivations`). Per-token inputs may be strided views (e.g. slices of the
    in_proj output): only their rows need to be contiguous. check=False skips the input checks except the
    state's (the layer's decode path, which builds the inputs itself, once per token)."""
    if triton is None:
        raise RuntimeError("mamba3_step_triton needs the triton package (pip install 'hybrid-mamba3[gpu]')")
    B, R, G, N = q.shape
    H, P = v.shape[1:]
    K = angles.shape[-1]
    if check:
        check_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, rope_pairwise,
                     per_token=True)
        if N % 2:
            raise ValueError(f"d_state must be even for the rotation, got {N}")
        if activations is not None and activations.a_activation not in ("softplus", "heavy_tail"):
            raise ValueError(f"a_activation must be 'softplus' or 'heavy_tail', got {activations.a_activation!r}")
    expect = (B, H, K), (B, H, P, N), (B, R, H, N), (B, H, P)
    if tuple(tuple(t.shape) for t in state) != expect:
        raise ValueError(f"state shapes {[tuple(t.shape) for t in state]} do not match the inputs: expected "
                         f"{list(expect)} (angle, ssm, k, v); allocate it with Mamba3State.zeros or the layer")
    check_int32_offsets("mamba3_step_triton", B, step_elements_per_row(q, k, v, z, *state),
                        "split the batch (the Mamba3 layer does)")
    if not all(t.dtype == torch.float32 and t.is_contiguous() for t in state):
        state = Mamba3State(*(t.to(torch.float32).contiguous() for t in state))
    # every batch row contiguous (the kernel takes the batch strides), copied only where it is not
    q, k, v, adt, dt, trap, angles, z = (rows_of(t, lead=1) for t in (q, k, v, adt, dt, trap, angles, z))
    mx, mz, mo, d = _f32(mimo_x), _f32(mimo_z), _f32(mimo_o), _f32(D)
    act = activations
    out = torch.empty((B, H, P) if mo is not None else (B, R, H, P), device=q.device, dtype=v.dtype)
    angle_new, k_new, v_new = torch.empty_like(state.angle), torch.empty_like(state.k), torch.empty_like(state.v)
    bp, warps = step_launch(B * H, P, q.device)
    low = v.dtype in (torch.bfloat16, torch.float16)
    anyf = q_bias  # any fp32 pointer for the absent optional inputs (never read)
    _step_kernel[(B * H, cdiv(P, bp))](
        q, q.stride(0), k, k.stride(0), _f32(q_bias), _f32(k_bias), v, v.stride(0), adt, adt.stride(0),
        dt, dt.stride(0), trap, trap.stride(0), angles, angles.stride(0),
        anyf if mx is None else mx, anyf if mz is None else mz, anyf if mo is None else mo, anyf if d is None else d,
        v if z is None else z, v.stride(0) if z is None else z.stride(0),
        *((anyf,) * 3 if act is None else (_f32(act.dt_bias), _f32(act.c_norm), _f32(act.b_norm))),
        1e-6 if act is None else act.eps, 0.0 if act is None else act.a_floor,
        *state, angle_new, k_new, v_new, out, H, G, K, N, P,
        R=R, RR=max(16, next_pow2(2 * R)), BN=_pow2(N), BP=bp, BK=next_pow2(K),
        HALF=N // 2, PAIRWISE=rope_pairwise, HAS_D=d is not None, HAS_Z=z is not None, HAS_MX=mx is not None,
        HAS_MZ=mz is not None, CONTRACT=mo is not None, RAW=act is not None,
        HEAVY_TAIL=act is not None and act.a_activation == "heavy_tail",
        # tf32 products on 16-bit inputs (10-bit mantissas against the inputs' 8); the state itself is added in
        # fp32. fp32 inputs (tests) get exact fp32 products.
        PREC="tf32" if low else "ieee", num_warps=warps, **FMA)
    return out, Mamba3State(angle_new, state.ssm, k_new, v_new)
