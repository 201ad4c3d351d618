"""Mamba-3 ops: one public function per op, references beside the fast paths.

- `mamba3_reference`: sequential recurrence (run in float64: the ground truth).
- `mamba3_chunked`: chunked torch implementation (CPU default; autograd gradients).
- `mamba3_step`: one decode step.
Tensor layout: see `hybrid_mamba3.kernels.common`.
"""

from .chunked import mamba3_chunked
from .common import Mamba3State, rotate
from .reference import mamba3_reference
from .step import mamba3_step

__all__ = ["Mamba3State", "mamba3_chunked", "mamba3_reference", "mamba3_step", "rotate"]
