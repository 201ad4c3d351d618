"""Two attention implementations for decoding, registered with transformers when hybrid_mamba3 is imported:

- `attn_implementation="sdpa_gqa"`: transformers' sdpa attention, with one-token decode steps of grouped-query heads
  packed onto their key/value heads under torch.compile too (torch's kernels; below).
- `attn_implementation="sdpa_splitkv"`: the same, except that one-token steps on a GPU run the split-KV Triton
  kernels of `kernels.decode_attn` (flash-decoding): torch's sdpa kernels give each (batch, key/value head) one
  program that walks the whole cache alone, too few programs at decode to reach the card's bandwidth (SmolLM2-135M
  at batch 16: 48 programs for 132 SMs). Elsewhere (CPU, per-head or float masks, dropout) it is sdpa_gqa. A hybrid
  takes it when no attention is asked for (`HybridMamba3PreTrainedModel.get_correct_attn_implementation`).

At a one-token step, transformers' sdpa gives grouped-query attention to torch's kernel as is (`enable_gqa`) only
when there is no mask; a static cache always has one (its unwritten slots). Outside torch.compile, transformers
5.25 then packs each key/value head's query heads into the query axis (`pack_gqa`), but under compile, the one place
a static cache decodes fast (CUDA graphs), it repeats every key and value head for its query heads (`repeat_kv`):
the whole cache is copied num_key_value_groups times per layer and step, several times the step's other traffic at
long contexts (the Llama-3.2-1B shape at batch 16 x 16k: ~29 ms a step against ~4 ms of cache and weights to read,
`evals/bench_model.py`). This packs there too, (B, H, 1, D) -> (B, H_kv, H / H_kv, D), which reads each key and value
once and keeps the masked kernel. Every other call (prefill, training) is transformers' sdpa unchanged.

Both are registered with transformers' `AttentionInterface` and `AttentionMaskInterface` (their masks are sdpa's), so
any model takes them, a Llama included: `AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa_gqa")`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kernels import decode_attn as decode_op

NAME = "sdpa_gqa"
SPLIT_KV = "sdpa_splitkv"


def sdpa_gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, Q, D), key / value (B, H_kv, L, D), a mask broadcastable to (B, 1 or H, Q, L) -> (B, Q, H, D)."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    mask = attention_mask
    per_head_mask = mask is not None and mask.shape[1] != 1
    if q_len != 1 or groups == 1 or kwargs.get("position_bias") is not None or per_head_mask:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if mask is not None:  # (B, 1, 1, L): one row for the query, shared by every head of the group
        mask = mask[:, :, :, : key.shape[-2]]
    packed = query.reshape(batch, heads // groups, groups, dim)  # heads g * groups + r read key/value head g
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def sdpa_splitkv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """`sdpa_gqa_attention`, with one-token steps on the split-KV kernels where they run."""
    mask = attention_mask
    decode = (query.shape[2] == 1 and decode_op.triton is not None and query.device.type in decode_op.TRITON_DEVICES
              and not (dropout and module.training) and kwargs.get("position_bias") is None
              and kwargs.get("softcap") is None and (mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1)))
    if not decode:
        return sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)
    if mask is not None:  # (B, 1, 1, L'): the query's row, up to the keys given
        mask = mask[:, 0, 0, : key.shape[-2]]
    out = decode_op.decode_attention(query[:, :, 0], key, value, mask, scaling)
    return out.unsqueeze(1), None


AttentionInterface.register(NAME, sdpa_gqa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
AttentionInterface.register(SPLIT_KV, sdpa_splitkv_attention)
AttentionMaskInterface.register(SPLIT_KV, sdpa_mask)
