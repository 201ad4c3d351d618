"""The Triton Mamba-3 scan's interface: the autograd Function and `mamba3_chunked_triton`, the CUDA path of the layer.

Same function and tensor layout as `mamba3_chunked` (see `common`): q, k [B, L, R, G, N], v and z [B, L, H, P],
adt / dt / trap [B, L, H], angles [B, L, K], biases [H, R, N], mimo_x / mimo_z / mimo_o [H, R, P], D [H]; y is
[B, L, H, P] ([B, L, R, H, P] without mimo_o), the final state fp32. Here: the input checks, the dtype policy
(16-bit inputs on tensor cores with fp32 state, fp32 inputs on exact fp32 matmuls, float64 refused), packed sequences
(cu_seqlens padded to a batch and back, or seq_idx passed to the kernels), SISO's pairs layout brought to the
kernels' halves and back, and the choice between the autograd Function (training) and a plain forward (inference).

The kernels live below this module, each file importing only downward:
  triton_tiles (device functions) <- triton_setup (tiles, launch options) <- triton_scan (the state scan)
  <- triton_forward / triton_backward <- this module.
Measurement history of the design choices: kernels/NOTES.md.
"""

from __future__ import annotations

import os

import torch

from .common import (Mamba3State, cdiv, check_inputs, check_int32_offsets, grad_needed, halves_layout,
                     packed_sequences, pairs_layout, varlen_layout)
from .shared_grad import grad_slot
from .triton_backward import chunked_backward
from .triton_forward import forward_batched
from .triton_setup import kernel_chunk

try:
    import triton
except ImportError:  # the CPU install has no triton; triton_available() says so
    triton = None


def triton_available() -> bool:
    """True when triton is importable and there is a GPU (or the interpreter is switched on)."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


_SPLIT_PIECES = {"v": 2, "trap": 5, "angles": 8, "z": 13}  # positions in the op's 14 tensor inputs


def elements_per_row(L: int, R: int, G: int, N: int, H: int, P: int, K: int) -> int:
    """The most elements any tensor of the op (inputs, the buffers it makes, their gradients) holds per batch row of L
    positions: q and k and their gradients (L R G N), the pre-gate output and its gradient (L R H P), the chunks'
    entering states and their gradients (chunks x H P N), the rotation table (L H 2 K). Batch rows x this must stay
    below `common.INT32_LIMIT`."""
    nc = cdiv(max(L, 1), kernel_chunk(R))
    return max(L * R * G * N, L * R * H * P, nc * H * P * N, L * H * 2 * K)


class _Mamba3Triton(torch.autograd.Function):
    """Batched (B, L) scan; packed sequences arrive already padded (differentiable gathers outside)."""

    @staticmethod
    def forward(ctx, initial_state, lengths, seq, need_final, bias_pairs, *tensors):
        with torch.no_grad():
            y, fin, opre, ckpt = forward_batched(*tensors, initial_state, lengths, seq, bias_pairs,
                                                 save_o=any(ctx.needs_input_grad[5:]), need_final=need_final)
        ctx.initial_state, ctx.lengths, ctx.seq, ctx.bias_pairs = initial_state, lengths, seq, bias_pairs
        # the inputs that are pieces of the layer's in_proj split: their gradients go into its buffer (`shared_grad`)
        ctx.slots = {name: grad_slot(tensors[i]) for name, i in _SPLIT_PIECES.items()}
        ctx.save_for_backward(opre, ckpt, *tensors)
        if fin is None:
            return (y,)
        ctx.mark_non_differentiable(*fin)
        return (y, *fin)

    @staticmethod
    def backward(ctx, dy, *_):
        opre, ckpt, *tensors = ctx.saved_tensors
        grads = chunked_backward(dy, opre, *tensors, ctx.initial_state, ctx.lengths, ctx.bias_pairs, ctx.slots,
                                 ckpt, ctx.seq)
        return (None,) * 5 + tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[5:]))


def mamba3_chunked_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor, trap: torch.Tensor,
    q_bias: torch.Tensor, k_bias: torch.Tensor, angles: torch.Tensor, *,
    mimo_x: torch.Tensor | None = None, mimo_z: torch.Tensor | None = None, mimo_o: torch.Tensor | None = None,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, rope_pairwise: bool = False,
    chunk_size: int | None = None, initial_state: Mamba3State | None = None, return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None, qk_halves: bool = False, seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Mamba3State | None]:
    """Triton Mamba-3 scan, same contract as `mamba3_chunked` (chunk_size is accepted and ignored: the
    kernels pick their own). Inputs in bf16/fp16/fp32; state and accumulation in fp32; the final state
    is fp32. fp32 inputs use exact fp32 matmuls (for tests); 16-bit inputs use tensor cores.

    qk_halves (with rope_pairwise): q and k, and only they, come already in the kernels' layout, each pair
    (2j, 2j+1) at (j, j + N/2) (the layer's fused B/C norm writes them so), which saves a copy of each both ways.
    Their gradients come back in that layout too; the biases and states keep the pairs layout."""
    check_inputs(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, rope_pairwise,
                 per_token=False)
    if triton is None:
        raise RuntimeError("mamba3_chunked_triton needs the triton package (pip install 'hybrid-mamba3[gpu]')")
    if q.dtype == torch.float64:
        raise TypeError("the Triton op computes in fp32; use mamba3_chunked / mamba3_reference for float64")
    if q.shape[-1] % 2:
        raise ValueError(f"d_state must be even for the rotation, got {q.shape[-1]}")
    cu_seqlens, seq = packed_sequences(cu_seqlens, seq_idx, q, initial_state, return_final_state)
    if initial_state is not None and cu_seqlens is None and initial_state.ssm.shape[0] != q.shape[0]:
        raise ValueError(f"initial_state has batch {initial_state.ssm.shape[0]}, inputs have {q.shape[0]}")
    bias_pairs = rope_pairwise
    if rope_pairwise:  # the kernels pair dims (j, j + N/2): bring the pairs (2j, 2j+1) there and back (the biases
        # excepted: the kernels read them in place)
        if initial_state is not None:
            initial_state = initial_state._replace(ssm=halves_layout(initial_state.ssm),
                                                   k=halves_layout(initial_state.k))
        if not qk_halves:
            q, k = halves_layout(q), halves_layout(k)
    lengths, valid = None, None
    if cu_seqlens is not None:  # packed sequences -> a padded batch, and back below
        lengths, valid, pad = varlen_layout(cu_seqlens, q, initial_state)
        q, k, v, adt, dt, trap, angles, z = (pad(t) for t in (q, k, v, adt, dt, trap, angles, z))
    (B, L, R, G, N), (H, P) = q.shape, v.shape[2:]
    check_int32_offsets("mamba3_chunked_triton", B, elements_per_row(L, R, G, N, H, P, angles.shape[-1]),
                        "split the batch (the Mamba3 layer does), or shorten the sequences")
    tensors = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z)
    if grad_needed(*tensors):
        y, *fin = _Mamba3Triton.apply(initial_state, lengths, seq, return_final_state, bias_pairs, *tensors)
    else:  # inference: the forward without autograd's bookkeeping
        with torch.no_grad():
            y, fin, _, _ = forward_batched(*tensors, initial_state, lengths, seq, bias_pairs,
                                           need_final=return_final_state)
    if valid is not None:
        y = y[valid][None]
    if not return_final_state:
        return y, None
    fin = Mamba3State(*fin)  # (the autograd path returns its tensors as a list)
    return y, (fin._replace(ssm=pairs_layout(fin.ssm), k=pairs_layout(fin.k)) if rope_pairwise else fin)
