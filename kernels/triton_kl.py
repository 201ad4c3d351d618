"""Distillation's per-token KL (and cross-entropy) from logits, fused: the CUDA path of `kl_div.kl_rows`.

Same function as `kl_div.kl_rows_reference`: student logits zs and teacher logits zt [N, V] (any float dtype, read
as fp32), labels [N] (optional; < 0 ignored) -> per row KL(softmax(zt / T) || softmax(zs / T)) and CE(zs, label),
fp32 [N]. Why a kernel: in torch each [N, V] logits chunk goes through ~10 fp32 elementwise passes (upcasts,
log-softmaxes, exp, products, their saved intermediates and gradients); over a SmolLM2 batch of 32k tokens x 49k
vocabulary that was ~60% of a distillation step's GPU time on an H100 (evals/results/bench_distill_h100.json).
Here the forward reads each logit once, the backward reads each once and writes the student's gradient once.

- forward, grid (N,): one program per row walks the vocabulary in blocks with running maxima (online softmax):
  the student's log-sum-exp at T (and at 1 for the CE), the teacher's, and the teacher-weighted sum of
  (zt - zs), which gives KL = sum p_t (zt - zs) / T - lse_t + lse_s without any [N, V] intermediate (the sum kept
  relative to the running maxima, so that the logits' offsets cancel before, not after, the rounding).
- backward, grid (N,): dKL/dzs = (softmax(zs / T) - softmax(zt / T)) / T, dCE/dzs = softmax(zs) - onehot(label),
  from the row statistics the forward kept, written in zs's dtype. The teacher gets no gradient.
Measurements: kernels/NOTES.md "Distillation KL".
"""

from __future__ import annotations

import torch

from .common import FMA, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU install without triton: kl_rows_triton says so when called
    triton = None

MAX_BLOCK = 4096  # vocabulary entries a program holds at once (fp32: 16 registers a thread per tensor at 8 warps)

if triton is not None:

    @triton.jit
    def _kl_fwd_kernel(zs_ptr, zt_ptr, y_ptr, kl_ptr, ce_ptr, stats_ptr, V, stride_s, stride_t, inv_t,
                       WANT_CE: tl.constexpr, BLOCK: tl.constexpr):
        """Grid (N,): a row of logits a program, its vocabulary in blocks of BLOCK.
        zs, zt [N, V] (last dim contiguous), y [N] int64 -> kl, ce [N] fp32, stats [N, 3] fp32 (the student's
        log-sum-exp at T, the teacher's at T, the student's at 1)."""
        row = tl.program_id(0).to(tl.int64)
        zs_row = zs_ptr + row * stride_s
        zt_row = zt_ptr + row * stride_t
        m_s = float("-inf")
        m_t = float("-inf")
        sum_s = 0.0  # sum exp((zs - m_s) / T)
        sum_1 = 0.0  # sum exp(zs - m_s): the CE's softmax at temperature 1
        sum_t = 0.0  # sum exp((zt - m_t) / T)
        dot_t = 0.0  # sum exp((zt - m_t) / T) ((zt - m_t) - (zs - m_s)): shifted, so no offset cancels at the end
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            a = tl.load(zs_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
            b = tl.load(zt_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
            new_s = tl.maximum(m_s, tl.max(a, 0))
            sum_s = sum_s * tl.exp((m_s - new_s) * inv_t) + tl.sum(tl.exp((a - new_s) * inv_t), 0)
            if WANT_CE:
                sum_1 = sum_1 * tl.exp(m_s - new_s) + tl.sum(tl.exp(a - new_s), 0)
            new_t = tl.maximum(m_t, tl.max(b, 0))
            rescale = tl.exp((m_t - new_t) * inv_t)
            e = tl.exp((b - new_t) * inv_t)
            # the terms so far move by the maxima's shifts (nothing to move before the first block)
            moved = tl.where(sum_t > 0, dot_t + ((new_s - m_s) - (new_t - m_t)) * sum_t, 0.0)
            dot_t = moved * rescale + tl.sum(tl.where(inside, e * ((b - new_t) - (a - new_s)), 0.0), 0)
            sum_t = sum_t * rescale + tl.sum(e, 0)
            m_t = new_t
            m_s = new_s
        lse_s = m_s * inv_t + tl.log(sum_s)
        lse_t = m_t * inv_t + tl.log(sum_t)
        tl.store(kl_ptr + row, dot_t / sum_t * inv_t - tl.log(sum_t) + tl.log(sum_s))
        tl.store(stats_ptr + row * 3, lse_s)
        tl.store(stats_ptr + row * 3 + 1, lse_t)
        if WANT_CE:
            lse_1 = m_s + tl.log(sum_1)
            y = tl.load(y_ptr + row)
            z_y = tl.load(zs_row + tl.where((y >= 0) & (y < V), y, 0)).to(tl.float32)
            # a label past the vocabulary gives NaN (loud), a negative one (ignored) 0
            tl.store(ce_ptr + row, tl.where(y >= 0, tl.where(y < V, lse_1 - z_y, float("nan")), 0.0))
            tl.store(stats_ptr + row * 3 + 2, lse_1)

    @triton.jit
    def _kl_bwd_kernel(zs_ptr, zt_ptr, y_ptr, stats_ptr, gkl_ptr, gce_ptr, dzs_ptr, V, stride_s, stride_t,
                       stride_d, inv_t, WANT_CE: tl.constexpr, BLOCK: tl.constexpr):
        """Grid (N,): a row of logits a program, its vocabulary in blocks of BLOCK.
        zs, zt [N, V], y [N], stats [N, 3] (the forward's), the rows' output gradients gkl, gce [N] fp32 -> dzs [N, V]
        in zs's dtype."""
        row = tl.program_id(0).to(tl.int64)
        zs_row = zs_ptr + row * stride_s
        zt_row = zt_ptr + row * stride_t
        lse_s = tl.load(stats_ptr + row * 3)
        lse_t = tl.load(stats_ptr + row * 3 + 1)
        g_kl = tl.load(gkl_ptr + row) * inv_t
        if WANT_CE:
            lse_1 = tl.load(stats_ptr + row * 3 + 2)
            y = tl.load(y_ptr + row)
            g_ce = tl.where(y >= 0, tl.load(gce_ptr + row), 0.0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            a = tl.load(zs_row + cols, mask=inside, other=0.0).to(tl.float32)
            b = tl.load(zt_row + cols, mask=inside, other=0.0).to(tl.float32)
            g = g_kl * (tl.exp(a * inv_t - lse_s) - tl.exp(b * inv_t - lse_t))
            if WANT_CE:
                g += g_ce * (tl.exp(a - lse_1) - tl.where(cols == y, 1.0, 0.0))
            tl.store(dzs_ptr + row * stride_d + cols, g.to(dzs_ptr.dtype.element_ty), mask=inside)


def _launch_options(V: int, block: int | None) -> dict:
    block = block or min(MAX_BLOCK, next_pow2(V))
    return dict(BLOCK=block, num_warps=8 if block >= 2048 else 4, **FMA)


class _KLRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, labels, temperature, block):
        N, V = zs.shape
        want_ce = labels is not None
        kl = torch.empty(N, device=zs.device, dtype=torch.float32)
        ce = torch.empty_like(kl) if want_ce else None
        stats = torch.empty(N, 3, device=zs.device, dtype=torch.float32)
        y = labels if want_ce else kl  # an unread placeholder pointer without labels
        opts = _launch_options(V, block)
        _kl_fwd_kernel[(N,)](zs, zt, y, kl, ce if want_ce else kl, stats, V, zs.stride(0), zt.stride(0),
                             1.0 / temperature, WANT_CE=want_ce, **opts)
        ctx.save_for_backward(zs, zt, labels if want_ce else None, stats)
        ctx.inv_t, ctx.opts = 1.0 / temperature, opts
        if not want_ce:
            return kl
        return kl, ce

    @staticmethod
    def backward(ctx, gkl, gce=None):
        zs, zt, labels, stats = ctx.saved_tensors
        N, V = zs.shape
        want_ce = labels is not None
        gkl = torch.zeros(N, device=zs.device) if gkl is None else gkl.float().contiguous()
        gce = (torch.zeros(N, device=zs.device) if gce is None else gce.float().contiguous()) if want_ce else gkl
        dzs = torch.empty_like(zs)
        _kl_bwd_kernel[(N,)](zs, zt, labels if want_ce else gkl, stats, gkl, gce, dzs, V, zs.stride(0), zt.stride(0),
                             dzs.stride(0), ctx.inv_t, WANT_CE=want_ce, **ctx.opts)
        return dzs, None, None, None, None


def kl_rows_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                   temperature: float = 1.0, block: int | None = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`kl_div.kl_rows` on the fused kernels (inputs already checked there); `block` (a power of two) overrides the
    vocabulary block, for tests of the running maxima over several blocks."""
    if triton is None:
        raise RuntimeError("kl_rows_triton needs triton (pip install triton); kl_div.kl_rows_reference runs without")
    zs = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    zt = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
    y = None if labels is None else labels.to(torch.int64).contiguous()
    return _KLRows.apply(zs, zt, y, float(temperature), block)
