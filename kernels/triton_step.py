"""Mamba-3 decode step in Triton: one token per sequence, the (P, N) state updated in place.

One program per (sequence, head) reads its (P, N) fp32 state once and writes it once, so the step is
bound by the state's bytes; everything else (the rank-R inputs, the rotation) is a few vectors. Same
function as `mamba3_step`. Several tokens at a time with a cache go through the chunked op with an
initial state (`mamba3_chunked_triton(..., initial_state=...)`).
"""

from __future__ import annotations

import functools
import math

import torch

from .common import Mamba3State, check_inputs
from .triton_chunked import _pow2, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _advance(angle_ptr, raw_ptr, idx, m, dt):
        """(angle + tanh(raw) dt pi) mod 2pi at the given angle indices."""
        two_pi = 2.0 * math.pi
        raw = tl.load(raw_ptr + idx, mask=m, other=0.0).to(tl.float32)
        th = tl.load(angle_ptr + idx, mask=m, other=0.0) + (2.0 * tl.sigmoid(2.0 * raw) - 1.0) * dt * math.pi
        return th - two_pi * tl.floor(th / two_pi)

    @triton.jit
    def _step_kernel(q_ptr, k_ptr, qb_ptr, kb_ptr, v_ptr, adt_ptr, dt_ptr, trap_ptr, ang_ptr,
                     mx_ptr, mz_ptr, mo_ptr, d_ptr, z_ptr,
                     angle_ptr, ssm_ptr, kprev_ptr, vprev_ptr, angle_new_ptr, knew_ptr, out_ptr,
                     H, G, K, N, P,
                     R: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
                     PAIRWISE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, CONTRACT: tl.constexpr):
        pid, pblk = tl.program_id(0), tl.program_id(1)  # (sequence, head), block of headdim rows
        b, h = pid // H, pid % H
        g = h // (H // G)
        offs_n, offs_p, offs_k = tl.arange(0, BN), pblk * BP + tl.arange(0, BP), tl.arange(0, BK)
        nmask, pmask, kmask = offs_n < N, offs_p < P, offs_k < K

        dt = tl.load(dt_ptr + b * H + h).to(tl.float32)
        adt = tl.load(adt_ptr + b * H + h).to(tl.float32)
        lam = tl.sigmoid(tl.load(trap_ptr + b * H + h).to(tl.float32))
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
        th_k = _advance(angle_ptr + pid * K, ang_ptr + b * K, offs_k, kmask, dt)
        tl.store(angle_new_ptr + pid * K + offs_k, th_k, mask=kmask & (offs_k * 0 + pblk == 0))  # one program per head writes it
        valid = (ai < K) & nmask
        th = _advance(angle_ptr + pid * K, ang_ptr + b * K, ai, valid, dt)
        cos = tl.where(valid, tl.cos(th), 1.0)
        sin = tl.where(valid, sign * tl.sin(th), 0.0)

        v = tl.load(v_ptr + pid * P + offs_p, mask=pmask, other=0.0).to(tl.float32)
        vprev = tl.load(vprev_ptr + pid * P + offs_p, mask=pmask, other=0.0)
        sp = ssm_ptr + pid * P * N + offs_p[:, None] * N + offs_n[None, :]
        pn = pmask[:, None] & nmask[None, :]
        upd = tl.zeros((BP, BN), dtype=tl.float32)
        for r in tl.static_range(R):
            kb = kb_ptr + (h * R + r) * N
            kbase = k_ptr + (b * R + r) * G * N + g * N
            kr = ((tl.load(kbase + offs_n, mask=nmask, other=0.0).to(tl.float32) + tl.load(kb + offs_n, mask=nmask, other=0.0)) * cos
                  + (tl.load(kbase + sw, mask=nmask, other=0.0).to(tl.float32) + tl.load(kb + sw, mask=nmask, other=0.0)) * sin)
            kprev = tl.load(kprev_ptr + ((b * R + r) * H + h) * N + offs_n, mask=nmask, other=0.0)
            tl.store(knew_ptr + ((b * R + r) * H + h) * N + offs_n, kr, mask=nmask & (offs_n * 0 + pblk == 0))
            mx = tl.load(mx_ptr + (h * R + r) * P + offs_p, mask=pmask, other=0.0)
            upd += (beta * vprev * mx)[:, None] * kprev[None, :] + (gamma * v * mx)[:, None] * kr[None, :]
        # The state is loaded after the update is built (loading it first keeps both tiles live: at 2 warps and
        # 64 rows that spills, 152 -> 227 us at B*H = 4096 on H100).
        ssm = alpha * tl.load(sp, mask=pn, other=0.0) + upd
        tl.store(sp, ssm, mask=pn)

        if HAS_Z:
            z = tl.load(z_ptr + pid * P + offs_p, mask=pmask, other=0.0).to(tl.float32)
        y = tl.zeros((BP,), dtype=tl.float32)
        for r in tl.static_range(R):
            qb = qb_ptr + (h * R + r) * N
            qbase = q_ptr + (b * R + r) * G * N + g * N
            qr = ((tl.load(qbase + offs_n, mask=nmask, other=0.0).to(tl.float32) + tl.load(qb + offs_n, mask=nmask, other=0.0)) * cos
                  + (tl.load(qbase + sw, mask=nmask, other=0.0).to(tl.float32) + tl.load(qb + sw, mask=nmask, other=0.0)) * sin)
            o = tl.sum(ssm * qr[None, :], axis=1)
            if HAS_D:
                mx = tl.load(mx_ptr + (h * R + r) * P + offs_p, mask=pmask, other=0.0)
                o += tl.load(d_ptr + h) * v * mx
            if HAS_Z:
                zz = z * tl.load(mz_ptr + (h * R + r) * P + offs_p, mask=pmask, other=0.0)
                o = o * zz * tl.sigmoid(zz)
            if CONTRACT:
                y += o * tl.load(mo_ptr + (h * R + r) * P + offs_p, mask=pmask, other=0.0)
            else:
                tl.store(out_ptr + ((b * R + r) * H + h) * P + offs_p, o, mask=pmask)
        if CONTRACT:
            tl.store(out_ptr + pid * P + offs_p, y, mask=pmask)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device, looked up once per device (the step runs once per token)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def step_launch(heads: int, P: int, device: torch.device) -> tuple[int, int]:
    """(headdim rows per program, warps) for B*H = heads: whole heads in 2 warps when the heads alone fill the
    GPU, else headdim split in blocks of 16 so batch 1 still launches enough programs. Measured on H100 (d_state
    128, P 64): at B*H = 4096 whole heads in 2 warps take R4 254 -> 152 us, SISO 117 -> 106 us against 16-row
    blocks in 4 warps; at B*H = 64, 16-row blocks in 4 warps are the fastest (6.4 us R4)."""
    sms = _sm_count(device) if device.type == "cuda" else 1
    if heads >= 16 * sms:
        return _pow2(P), 2
    return min(_pow2(P), 16), 4


def _fp32_contiguous(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


def mamba3_step_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor, trap: torch.Tensor,
    q_bias: torch.Tensor, k_bias: torch.Tensor, angles: torch.Tensor, state: Mamba3State, *,
    mimo_x: torch.Tensor | None = None, mimo_z: torch.Tensor | None = None, mimo_o: torch.Tensor | None = None,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, rope_pairwise: bool = False,
) -> tuple[torch.Tensor, Mamba3State]:
    """Same contract as `mamba3_step`, except that the ssm tensor of an fp32 contiguous state is updated
    in place (and returned in the new state with fresh angle/k/v tensors); any other state is copied
    to fp32 first."""
    check_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, rope_pairwise,
                 per_token=True)
    if triton is None:
        raise RuntimeError("mamba3_step_triton needs the triton package (pip install 'hybrid-mamba3[gpu]')")
    B, R, G, N = q.shape
    H, P = v.shape[1:]
    K = angles.shape[-1]
    if N % 2:
        raise ValueError(f"d_state must be even for the rotation, got {N}")
    if not all(_fp32_contiguous(t) for t in state):
        state = Mamba3State(*(t.to(torch.float32).contiguous() for t in state))
    f32 = torch.float32
    mims = (mimo_x, mimo_z, mimo_o)
    ones = None if all(m is not None for m in mims) else torch.ones(H, R, P, device=q.device, dtype=f32)
    mx, mz, mo = ((m.to(f32).contiguous() if m is not None else ones) for m in mims)
    contract = mimo_o is not None
    out = torch.empty((B, H, P) if contract else (B, R, H, P), device=q.device, dtype=v.dtype)
    vc = v.contiguous()
    angle_new, k_new = torch.empty_like(state.angle), torch.empty_like(state.k)
    bp, warps = step_launch(B * H, P, q.device)
    _step_kernel[(B * H, triton.cdiv(P, bp))](
        q.contiguous(), k.contiguous(), q_bias.to(f32).contiguous(), k_bias.to(f32).contiguous(), vc,
        adt.contiguous(), dt.contiguous(), trap.contiguous(), angles.contiguous(), mx, mz, mo,
        D.to(f32).contiguous() if D is not None else mx, z.contiguous() if z is not None else vc,
        *state, angle_new, k_new, out, H, G, K, N, P,
        R=R, BN=_pow2(N), BP=bp, BK=triton.next_power_of_2(K), HALF=N // 2, PAIRWISE=rope_pairwise,
        HAS_D=D is not None, HAS_Z=z is not None, CONTRACT=contract, num_warps=warps)
    return out, Mamba3State(angle_new, state.ssm, k_new, v.to(torch.float32))
