"""Mamba-3 ops: one public function per op, references beside the fast paths.

- `mamba3_reference`: sequential recurrence (run in float64: the ground truth).
- `mamba3_chunked`: chunked torch implementation (CPU default; autograd gradients).
- `mamba3_step`: one decode step.
- `kl_rows`: distillation's per-token KL (and CE) from student and teacher logits (`kl_rows_reference` in torch).
- `decode_attention`: one decode step of grouped-query attention over a key/value cache, split along the cache on
  CUDA (`decode_attention_reference` in torch).
Tensor layout: see `hybrid_mamba3.kernels.common`.
"""

from .chunked import mamba3_chunked
from .common import Mamba3State, rotate
from .decode_attn import decode_attention, decode_attention_reference
from .kl_div import kl_rows, kl_rows_reference
from .reference import mamba3_reference
from .step import mamba3_step

__all__ = ["Mamba3State", "decode_attention", "decode_attention_reference", "kl_rows", "kl_rows_reference",
           "mamba3_chunked", "mamba3_reference", "mamba3_step", "rotate"]
