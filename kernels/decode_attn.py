"""One decode step of attention over a key/value cache: `decode_attention`, its torch reference and its CUDA path.

    q     [B, H, D]        the step's query, one per head
    k, v  [B, H_kv, L, D]  the cache (a static cache's whole length, or a dynamic cache's), H a multiple of H_kv
    mask  [B or 1, L]      optional, bool: True where a slot may be attended (written and not padding)
    -> [B, H, D] in q's dtype: softmax(scale q k^T, masked) v, query head i reading key/value head i // (H / H_kv)

A head whose every slot is masked gets zeros (torch's sdpa gives NaN there). On CUDA the split-KV Triton kernels run
(`triton_decode_attention`), elsewhere the reference; tests/test_decode_attention.py holds them to each other and to
float64.
"""

from __future__ import annotations

import torch

from .triton_decode_attention import decode_attention_triton, triton

TRITON_DEVICES = ("cuda",)  # where the Triton kernels run (tests add "cpu" under Triton's interpreter)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """`decode_attention` in torch: scores and softmax in fp32 (fp64 for fp64 inputs), one matmul each way."""
    batch, heads, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim).to(dt)
    s = torch.matmul(qg, k.to(dt).transpose(-1, -2)) * (dim**-0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask.reshape(-1, 1, 1, length), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows: zeros
    return torch.matmul(p, v.to(dt)).reshape(batch, heads, dim).to(q.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of one query token per head over a cache; see the module docstring."""
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2]:
        raise ValueError(f"decode_attention takes q [B, H, D] and k, v [B, H_kv, L, D] of one batch and head size, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"the query heads ({q.shape[1]}) must be a multiple of the key/value heads ({k.shape[1]})")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[1] != k.shape[2]
                             or mask.shape[0] not in (1, q.shape[0])):
        raise ValueError(f"mask must be bool [B or 1, L] = [{q.shape[0]} or 1, {k.shape[2]}], got {mask.dtype} "
                         f"{tuple(mask.shape)} (an additive float mask: pass mask == 0 where it is 0 / -inf)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fused = (triton is not None and q.device.type in TRITON_DEVICES and q.dtype != torch.float64
             and q.dtype == k.dtype == v.dtype)
    if not fused:
        return decode_attention_reference(q, k, v, mask, scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return decode_attention_triton(q, k, v, mask, scale)
