"""Host-side setup of the Triton scan, shared by its forward and backward: chunk length, tile sizes, launch options.

- `kernel_chunk`: C positions per chunk, C x R' = 64 rows (R' = R padded to a power of two).
- `_Setup`: shapes (q [B, L, R, G, N], v [B, L, H, P], angles [B, L, K]), fp32 views of the small parameters (mimo_x /
  mimo_z / mimo_o [H, R, P], D [H], biases [H, R, N]; ones stand in for absent ones) and the constexprs every kernel
  takes (R, RP, CR = C * RP, BH = N/2 lanes, BP = P lanes, DOT / PREC by the operand dtype, num_warps).
- `_sm_count`: the GPU's multiprocessors, which the state scans' blocks (`triton_scan`) and the decode step's
  (`triton_step`) are planned for.
"""

from __future__ import annotations

import functools

import torch

from .chunked import entering_state
from .common import next_pow2
from .triton_angles import angle_table

try:
    import triton.language as tl
except ImportError:  # CPU install without triton: triton_chunked reports it before anything here is called
    tl = None


def _rank_pad(rank: int) -> int:
    return next_pow2(rank)


def kernel_chunk(rank: int) -> int:
    """Chunk length C of the kernels: C x R' = 64 rows (R' = R padded to a power of two; 128 for R' = 8) in the
    intra-chunk products. Tensor-core sized, and small enough that the kernels' tiles stay in registers: at 128 rows
    they spill and every kernel ran slower, though larger chunks would halve the entering states' traffic
    (kernels/NOTES.md "Chunk length")."""
    return max(16, 64 // _rank_pad(rank))


# The 16-bit kernels' cos/sin table in fp16 (16), else fp32 (32; evals/kernel_dev/kernel_report.py --set for an
# A/B). fp16's rounding (< 2.5e-4) is ~16x below that of the bf16 operands the rotated rows become. The table holds a
# cos and a sin per (position, head, angle) and five kernels read it: at b8 x 2048, 64 heads, K 32 it is 268 MB in
# fp32, against 34 MB for q and k together at R4.
TABLE_BITS = 16


def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


def _initial_state(st: "_Setup", nxt0: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """The state entering the first chunk (B, H, P, N) from the initial state `st.init` (not None), `first_next`
    and mx (H, R, P). Torch, on small tensors (differentiable: the backward takes it back to nxt0 and mx under
    autograd)."""
    return entering_state(st.init, nxt0[:, None], mx.transpose(0, 1), None, None, None)


class _Setup:
    """Everything both directions need: shapes, fp32 views of the small tensors, launch meta-parameters."""

    def __init__(self, q, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, init, lengths,
                 C: int, bias_pairs: bool, seq: torch.Tensor | None = None):
        self.B, self.L, self.R, self.G, self.N = q.shape
        self.H, self.P = v.shape[2:]
        self.K = angles.shape[-1]
        self.C, self.nc = C, max(1, -(-self.L // C))
        dev, f32 = q.device, torch.float32
        # ones stand in for absent projections (and D)
        absent = any(t is None for t in (mimo_x, mimo_z, mimo_o, D))
        ones = _ones(self.H, self.R, self.P, dev) if absent else None
        self.mx = mimo_x.to(f32).contiguous() if mimo_x is not None else ones
        self.mz = mimo_z.to(f32).contiguous() if mimo_z is not None else ones
        self.mo = mimo_o.to(f32).contiguous() if mimo_o is not None else ones
        # biases in the pairs layout (bias_pairs: SISO) are read so by the kernels (`_bias_columns`)
        self.qb, self.kb = q_bias.to(f32).contiguous(), k_bias.to(f32).contiguous()
        self.D = D.to(f32).contiguous() if D is not None else ones
        self.has_d, self.has_z, self.contract = D is not None, z is not None, mimo_o is not None
        self.init, self.lengths, self.seq = init, lengths, seq
        low = q.dtype in (torch.bfloat16, torch.float16)
        dot = (tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16) if low else tl.float32
        self.operand_dtype = q.dtype if low else torch.float32
        rp = _rank_pad(self.R)
        # The pair lanes (BH) and headdim lanes (BP) are at least 64 for 16-bit operands on CUDA. At BH 32 (d_state
        # 64) Triton 3.6 compiled the bf16 dQ kernel into out-of-range shared/local memory accesses (compute-sanitizer
        # memcheck, H200, SISO and MIMO alike: an illegal-address fault or wrong gradients, depending on what lies
        # there); others report the same sm_90 fault for kernels with several tl.dot whose dims are 16 or 32, so
        # headdim 32 gets the same floor. The fp32 kernels are clean at 32 (memcheck, and gradients within 3e-6 of
        # the chunked op), and at 64 ptxas takes minutes on them. Padding lanes are masked like any j >= N/2, p >= P
        # (the interpreter tests pass with both floors forced on).
        floor = 64 if q.is_cuda and low else 1
        bh, bp = max(_pow2(self.N // 2), floor), max(_pow2(self.P), floor)
        self.meta = dict(R=self.R, RP=rp, CR=C * rp, BH=bh, BP=bp, HALF=self.N // 2,
                         BIAS_PAIRS=bias_pairs, DOT=dot, PREC="tf32" if low else "ieee", HAS_SEQ=seq is not None,
                         # 4 warps: the tiles take ~255 registers a thread either way (a few spill at 4), and
                         # 4 warps let 2 programs share an SM, hiding each other's load latency (faster than 8:
                         # kernels/NOTES.md "Warps")
                         num_warps=4)

    def seq_or(self, placeholder: torch.Tensor) -> torch.Tensor:
        """The packed rows' `common.sequence_index` for a launch, or without packed rows (HAS_SEQ False: never read) a
        tensor the launch takes anyway."""
        return self.seq if self.seq is not None else placeholder

    def rotation_table(self, angles, dt, final: bool = False):
        """The kernels' (B, L, H, 2, K) cos | sin table from the raw angles (a `rows_of` view) and dt, and with
        `final` the angle at each row's last position (else None). The 16-bit kernels get it in fp16
        (`TABLE_BITS`); fp32 inputs, the tests' exact path, in fp32."""
        low = TABLE_BITS == 16 and self.operand_dtype != torch.float32
        return angle_table(angles, dt, None if self.init is None else self.init.angle,
                           torch.float16 if low else torch.float32, self.lengths, final)


@functools.lru_cache(maxsize=16)
def _ones(H: int, R: int, P: int, device: torch.device) -> torch.Tensor:
    """A (H, R, P) fp32 ones tensor standing in for absent mimo projections and D, made once per shape and device
    (the kernels only read it): a fill launch less per call each way, ~0.1 ms of the GPU machine's host time."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when first made under inference mode
        return torch.ones(H, R, P, device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device, looked up once per device (the decode step runs once per token); 1 off
    CUDA (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
