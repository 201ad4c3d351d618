"""Mamba-3 layers past the Triton kernels' 32-bit offsets, on the GPU (run on the device: pytest -m gpu).

The kernels index in 32 bits; a layer whose tensors would need more runs in pieces (`Mamba3.max_rows_per_call`):
slices of the batch, and at inference stretches of a row, each from the state the one before left. Each case is
compared with the same layer run in explicitly smaller pieces: both in bf16 through the same kernels, they differ
only where cuBLAS tiles the projections of other row counts differently (~1e-3); 1e-2 is the bf16 kernels' bound.
"""

import pytest
import torch
from conftest import rel_err

from hybrid_mamba3 import Mamba3
from hybrid_mamba3.kernels.common import INT32_LIMIT

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

TOL = 1e-2
# the layer that conversion gives a Llama-3.2-1B (32 heads x 64, d_state 64, B/C per head, MIMO R4)
CONVERTED_1B = dict(d_model=2048, d_state=64, expand=1, headdim=64, ngroups=32, is_mimo=True, mimo_rank=4,
                    chunk_size=16)
# the kernel benchmark's layer (64 heads x 64, d_state 128): its chunk states are the widest per-token tensor
BENCH = dict(d_model=2048, d_state=128, expand=2, headdim=64, is_mimo=True, mimo_rank=4, chunk_size=16)


def _layer(kw) -> Mamba3:
    torch.manual_seed(0)
    layer = Mamba3(layer_idx=0, **kw).cuda()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return layer.to(torch.bfloat16)


def _in_rows(layer, u, rows, **kw):
    return torch.cat([layer(u[i:i + rows], **kw) for i in range(0, u.shape[0], rows)])


@torch.no_grad()
def test_converted_1b_layer_past_2_31_elements_equals_split_batch():
    """The issue's crash: B/C of 33 x 8192 positions hold 2^31 + 2^26 elements (the kernels faulted with an illegal
    memory access at 48 x 8192). Now the layer runs the batch in slices and gives what explicit slices of 8 rows
    give."""
    layer = _layer(CONVERTED_1B)
    B, L = 33, 8192
    assert B * L * 4 * 32 * 64 >= INT32_LIMIT and layer.max_rows_per_call(L) < B
    u = torch.randn(B, L, 2048, device="cuda", dtype=torch.bfloat16)
    y = layer(u)
    assert layer.last_backend == "triton" and not torch.isnan(y).any()
    assert rel_err(y, _in_rows(layer, u, 8)) < TOL


def test_fwd_bwd_past_2_31_elements_equals_split_batch():
    """Training past the limit: at 9 x 8192 the benchmark layer's chunk states (B, H, chunks, P, N) hold 2^31 + 2^28
    elements. Output, input gradient and every parameter gradient against explicit slices of 4 rows."""
    layer = _layer(BENCH)
    B, L = 9, 8192
    assert B * (L // 16) * 64 * 64 * 128 >= INT32_LIMIT and layer.max_rows_per_call(L) < B
    u = torch.randn(B, L, 2048, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(u)
    got = []
    for rows in (None, 4):
        layer.zero_grad()
        x = u.clone().requires_grad_()
        y = layer(x) if rows is None else _in_rows(layer, x, rows)
        y.backward(dy)
        got.append((y.detach(), x.grad, {n: p.grad.float() for n, p in layer.named_parameters()}))
    assert not torch.isnan(got[0][0]).any()
    assert rel_err(got[0][0], got[1][0]) < TOL and rel_err(got[0][1], got[1][1]) < TOL
    for name, g in got[1][2].items():
        assert rel_err(got[0][2][name], g) < TOL, name


@torch.no_grad()
def test_long_prefill_runs_in_stretches():
    """A row longer than one call takes (the converted layer's in_proj output passes 2^31 elements at ~104k
    positions) runs at inference in stretches, the state handed on (a chunked prefill): the output and final state
    equal three explicit stretches of a third each, handed on by hand."""
    layer = _layer(CONVERTED_1B)
    L = layer.max_length_per_call() + 3000
    assert layer.max_rows_per_call(L) == 0
    u = torch.randn(1, L, 2048, device="cuda", dtype=torch.bfloat16)
    y, fin = layer(u, return_final_state=True)
    state, parts = None, []
    for a in range(0, L, -(-L // 3)):
        part, state = layer(u[:, a:a - (-L // 3)], initial_state=state, return_final_state=True)
        parts.append(part)
    assert not torch.isnan(y).any() and rel_err(y, torch.cat(parts, 1)) < TOL
    for a, b in zip(fin, state):
        assert rel_err(a, b) < TOL
