"""One decode step of grouped-query attention over a key/value cache, split along the cache (flash-decoding): the
CUDA path of `decode_attn.decode_attention`.

Why: a one-token step reads the whole cache once and does little arithmetic, so its speed is the bandwidth the
kernel reaches. torch's sdpa kernels are built for prefill: one program per (batch, head, block of queries), each
walking the whole cache alone. At a decode step that is B x H_kv programs (SmolLM2-135M at batch 16: 48, on an H100's
132 SMs), each streaming up to ~16k keys in sequence; profiled inside a compiled decode step of the Llama-3.2-1B shape
at 16 x 16k, cuDNN's kernel took 7.2 ms of the Llama's 8.8 ms step, ~0.45 ms a layer for 0.54 GB of keys and values
(~1.2 TB/s of the card's ~3 TB/s; evals/results/bench_model_h100.json, cells with decode_kernels). Alone, in a CUDA
graph, torch's default sdpa on packed heads reads 16 x 16,384 slots at 2.1 TB/s but 16 x 16,429 (the model's cache:
16k prompt + 45) at 1.1 TB/s, and SmolLM2's 3 key/value heads at 0.8 TB/s; these kernels read 2.4-2.9 TB/s at each
of those shapes (evals/results/sweep_decode_attention_h100.json).

- split, grid (B x H_kv, S): each program takes the G = H / H_kv query heads of one key/value head (so each key and
  value is read once, for all of them) and one of S slices of the cache, with an online softmax over its blocks of
  keys; writes its normalised partial output and its log-sum-exp. S is chosen so that about two programs run per SM
  (`Launch`).
  Masked slots (a static cache's free ones, padding) are not fetched: their loads are predicated off. (Skipping a
  wholly masked block with a branch instead kept Triton from pipelining the loads: `kernel_sass.py` showed them
  serialised.)
- combine, grid (B x H_kv,): the S partials of each query head, weighted by their softmax mass.
The query heads are padded to 16 rows for the tensor-core dot (G is 3-8 at usual shapes): the extra rows cost
arithmetic, which a step bound by memory has to spare. Measurements: kernels/NOTES.md "Decode attention".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .common import FMA, cdiv, next_pow2
from .triton_setup import _sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU install without triton: decode_attention_triton says so when called
    triton = None

MIN_SPLIT = 256  # keys a slice has at least: below that the partials' traffic and the combine outweigh the gain


@dataclass(frozen=True)
class Launch:
    """Launch settings of the split kernel. The defaults had the best geometric mean over eight decode cells (the
    Llama-3.2-1B and SmolLM2 shapes, batch 1-64, 2k-32k keys) among 192 settings timed in CUDA graphs on an H100:
    within 1.07x of each cell's best (evals/kernel_dev/sweep_decode_attention.py; kernels/NOTES.md)."""

    programs_per_sm: int = 2  # slices of the cache are cut so that about this many programs run on each SM
    block_n: int = 128  # keys a program holds at once
    num_warps: int = 4
    num_stages: int = 2  # Triton's software pipeline depth over the blocks of keys
    skip_masked: bool = True  # masked slots not fetched (False: fetched and zeroed, the loads independent of the mask)


LAUNCH = Launch()
_LOG2E = 1.4426950408889634
_DOT = {} if triton is None else {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

if triton is not None:

    # The cache length and the split count change at every step of a dynamic cache's decode: not specialized on
    # (Triton would compile a variant for lengths divisible by 16 in the middle of a generation, ~0.3 s once)
    @triton.jit(do_not_specialize=["L", "S"])
    def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, part_ptr, lse_ptr, HKV, L, CHUNK, S,
                      sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l, qk_scale,
                      G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
                      HAS_MASK: tl.constexpr, SKIP_MASKED: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
        """Grid (B * H_kv, S). q [B, H, D] (strided), k / v [B, H_kv, L, D] (last dim contiguous), mask [B, L]
        (bool, strided; False = masked) -> part [B * H_kv, S, G, D] fp32 (this slice's softmax-weighted values,
        normalised), lse [B * H_kv, S, G] fp32 (its log2-sum-exp2 of the scaled scores; -inf: nothing unmasked)."""
        bh = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        rows = tl.arange(0, GP)
        cols = tl.arange(0, DP)
        rmask = rows < G
        cmask = cols < D
        q = tl.load(q_ptr + b * sq_b + (h * G + rows[:, None]) * sq_h + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(DOT)
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, L)
        for n0 in range(start, end, BN):
            offs = n0 + tl.arange(0, BN)
            valid = offs < end
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + b * sm_b + offs * sm_l, mask=valid, other=0) != 0)
            if SKIP_MASKED:  # masked slots are not fetched: free cache costs no bandwidth (the pipeline prefetches
                kv_mask = valid[:, None] & cmask[None, :]  # the mask with the keys: no slower, kernels/NOTES.md)
            else:  # the loads independent of the mask's; masked values zeroed (a free slot may hold NaN)
                kv_mask = (offs < end)[:, None] & cmask[None, :]
            k = tl.load(k_base + offs[:, None] * sk_l + cols[None, :], mask=kv_mask, other=0.0).to(DOT)
            s = (tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale).to(tl.float32)  # (GP, BN), log2 units
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing unmasked yet stay 0
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs[:, None] * sv_l + cols[None, :], mask=kv_mask, other=0.0).to(DOT)
            if not SKIP_MASKED:
                v = tl.where(valid[:, None], v, 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PREC)
            m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        slot = bh * S + split
        tl.store(part_ptr + (slot * G + rows[:, None]) * D + cols[None, :], out, mask=rmask[:, None] & cmask[None, :])
        tl.store(lse_ptr + slot * G + rows, lse, mask=rmask)

    @triton.jit(do_not_specialize=["S"])
    def _combine_kernel(part_ptr, lse_ptr, o_ptr, HKV, S, so_b, so_h,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
        """Grid (B * H_kv,): the S partials of each of the G query heads -> o [B, H, D] (strided, o's dtype); a head
        whose every key was masked gets zeros."""
        bh = tl.program_id(0).to(tl.int64)
        b = bh // HKV
        h = bh % HKV
        rows = tl.arange(0, GP)
        cols = tl.arange(0, DP)
        rmask = rows < G
        tile = rmask[:, None] & (cols < D)[None, :]
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for split in range(0, S):
            slot = bh * S + split
            lse = tl.load(lse_ptr + slot * G + rows, mask=rmask, other=float("-inf"))
            part = tl.load(part_ptr + (slot * G + rows[:, None]) * D + cols[None, :], mask=tile, other=0.0)
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe)
            total = total * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * part
            m = m_new
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(o_ptr + b * so_b + (h * G + rows[:, None]) * so_h + cols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=tile)


def num_splits(batch: int, kv_heads: int, length: int, multiprocessors: int, programs_per_sm: int | None = None) -> int:
    """Slices of the cache per (batch, key/value head): enough programs for `programs_per_sm` (default: LAUNCH's) on
    every SM, each slice at least MIN_SPLIT keys."""
    wanted = cdiv((programs_per_sm or LAUNCH.programs_per_sm) * multiprocessors, batch * kv_heads)
    return max(1, min(wanted, length // MIN_SPLIT))


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            scale: float, launch: Launch | None = None) -> torch.Tensor:
    """q [B, H, D], k / v [B, H_kv, L, D] (last dims contiguous), mask [B or 1, L] bool or None -> [B, H, D] in q's
    dtype. Inputs are checked by `decode_attn.decode_attention`; launch: default LAUNCH."""
    if triton is None:
        raise RuntimeError("decode_attention_triton needs triton (pip install triton)")
    cfg = launch or LAUNCH
    batch, heads, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    splits = num_splits(batch, kv_heads, length, _sm_count(q.device), cfg.programs_per_sm)
    # fp32 tiles are twice the bytes: 128-key blocks spill there (255 registers; kernel_sass.py --variants)
    block_n = min(cfg.block_n, 64) if q.dtype == torch.float32 else cfg.block_n
    chunk = cdiv(cdiv(length, splits), block_n) * block_n
    splits = cdiv(length, chunk)
    part = torch.empty(batch * kv_heads, splits, groups, dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch * kv_heads, splits, groups, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    if mask is None:
        m, sm_b, sm_l = q, 0, 0  # not read
    else:
        m = mask  # bool, read as such (a dtype view of it does not lower under torch.compile's inductor)
        sm_b, sm_l = (m.stride(0) if m.shape[0] > 1 else 0), m.stride(1)
    consts = dict(G=groups, GP=max(16, next_pow2(groups)), D=dim, DP=max(16, next_pow2(dim)))
    # 16-bit inputs: tensor-core dots in their dtype (the softmax weights rounded to it, as flash kernels do); fp32
    # ones: exact (ieee) products. Triton's interpreter (3.9) computes 16-bit dots wrongly: there they run in fp32.
    dot = _DOT.get(q.dtype, tl.float32) if os.environ.get("TRITON_INTERPRET") != "1" else tl.float32
    prec = "ieee" if dot == tl.float32 else "tf32"  # (the 16-bit setting as the layer's kernels pass it)
    _split_kernel[(batch * kv_heads, splits)](
        q, k, v, m, part, lse, kv_heads, length, chunk, splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        sm_b, sm_l, scale * _LOG2E, BN=block_n, HAS_MASK=mask is not None, SKIP_MASKED=cfg.skip_masked, DOT=dot,
        PREC=prec, **consts, **FMA, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _combine_kernel[(batch * kv_heads,)](part, lse, out, kv_heads, splits, out.stride(0), out.stride(1), **consts,
                                         **FMA)
    return out


__all__ = ["LAUNCH", "Launch", "decode_attention_triton", "num_splits"]
