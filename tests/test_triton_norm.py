"""The Triton RMSNorm (kernels/triton_norm.py) under TRITON_INTERPRET=1 on the CPU, against GatedRMSNorm in fp64.

Forward, x's gradient and the weight's, on the inputs the kernels are given (16-bit ones upcast exactly), so the
only differences are the kernels' fp32 arithmetic and the rounding of their outputs:
- fp32 outputs: ~1e-7 relative measured; 1e-5 leaves ~100x headroom and still catches a dropped term.
- bf16 outputs (y, dx) are rounded to bf16 (8 significant bits): 2^-8 ~ 4e-3 relative under round-to-nearest (the
  GPU), and the interpreter truncates fp32 -> bf16 (< 2^-7 ~ 7.8e-3, a hard bound): 8e-3. fp16 likewise: 2^-11
  ~ 5e-4 (numpy rounds to nearest), 1e-3. The weight's gradient is fp32 whatever x's dtype: 1e-5 there.
Errors are max-norm relative (`rel_err`). Shapes are tiny: N = 24 is not a power of two (the column mask) and the
row counts are not multiples of the row block.
"""

import os

import torch

# conftest sets it first when run under pytest; never on a GPU machine (see tests/test_triton_interpret.py)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import rel_err  # noqa: E402

from hybrid_mamba3.norms import GatedRMSNorm  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
    pytest.skip("interpreter tests are for CPU machines", allow_module_level=True)
from hybrid_mamba3.kernels import triton_norm  # noqa: E402
from hybrid_mamba3.kernels.triton_norm import _rows_layout, rms_norm_triton  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
EPS = 1e-5


def _weight(N: int) -> torch.Tensor:
    return (1 + 0.3 * torch.randn(N)).requires_grad_()


def _check(x: torch.Tensor, w: torch.Tensor, eps: float = EPS, leaf: torch.Tensor | None = None,
           in_place: bool = True) -> None:
    """rms_norm_triton(x, w) and its gradients vs GatedRMSNorm's in fp64. x is `leaf` (requires grad) or a view
    of it; in_place: whether the kernels must read x where it lies (else through a contiguous copy)."""
    leaf = x if leaf is None else leaf
    laid = _rows_layout(x.detach())[0]
    assert (laid.data_ptr() == x.data_ptr() and laid.stride() == x.stride()) == in_place
    before = leaf.detach().clone()
    y = rms_norm_triton(x, w, eps)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    dy = torch.randn(x.shape).to(x.dtype)
    y.backward(dy)
    assert torch.equal(leaf.detach(), before)  # input untouched

    x64 = x.detach().double().requires_grad_()
    norm = GatedRMSNorm(x.shape[-1], eps=eps).double()
    with torch.no_grad():
        norm.weight.copy_(w.detach().double())
    ref = norm(x64)
    ref.backward(dy.double())
    tol = TOL[x.dtype]
    assert rel_err(y, ref) < tol, "y"
    grad = leaf.grad
    if x is not leaf:  # x is a view of the (contiguous) leaf: its part of the leaf's gradient, zero elsewhere
        mask = torch.zeros_like(leaf, dtype=torch.bool)
        mask.as_strided(x.shape, x.stride(), x.storage_offset()).fill_(True)
        assert not grad[~mask].any(), "gradient outside x"
        grad = grad.as_strided(x.shape, x.stride(), x.storage_offset())
    assert grad.dtype == x.dtype and rel_err(grad, x64.grad) < tol, "dx"
    if w.requires_grad:
        assert w.grad.dtype == w.dtype and rel_err(w.grad, norm.weight.grad) < TOL[torch.float32], "dweight"


def _proj_view(dtype, B=3, L=7, R=2, G=2, N=24, width=131, start=5):
    """x = proj[..., start:start + R*G*N] as (B, L, R, G, N): the layer's B / C, a strided view of its in_proj."""
    proj = torch.randn(B, L, width, dtype=dtype, requires_grad=True)
    return proj[..., start:start + R * G * N].unflatten(-1, (R, G, N)), proj


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_projection_view(dtype):
    """The layer's case, read in place: 84 rows of 24 in tokens 131 elements apart (4 rows each)."""
    x, proj = _proj_view(dtype)
    assert _rows_layout(x)[1:] == (4, 131)
    _check(x, _weight(24), leaf=proj)


@pytest.mark.parametrize("B,L", [(1, 5), (4, 1)])
def test_projection_view_size_one_lead(B, L):
    """One batch row (its stride is free), or one position (decode: tokens are batch rows)."""
    x, proj = _proj_view(torch.bfloat16, B=B, L=L)
    _check(x, _weight(24), leaf=proj)


def test_2d_and_3d():
    x2 = torch.randn(37, 24, dtype=torch.float16, requires_grad=True)
    _check(x2, _weight(24))
    base = torch.randn(2, 9, 40, requires_grad=True)  # (B, L, N) slice of a wider tensor: 1 row per token
    _check(base[..., 3:27], _weight(24), leaf=base)


def test_contiguous_fallback():
    """Layouts the kernels cannot index go through a contiguous copy: N strided (a transpose), and batches not L
    positions apart (positions sliced)."""
    base = torch.randn(24, 37, requires_grad=True)
    _check(base.t(), _weight(24), leaf=base, in_place=False)
    base3 = torch.randn(3, 10, 2, 24, dtype=torch.bfloat16, requires_grad=True)
    _check(base3[:, 1:8], _weight(24), leaf=base3, in_place=False)


def test_eps_and_small_rows():
    """Rows of mean square ~1e-6, below eps = 1e-5, mixed with unit ones: eps must be in the forward and in the
    backward's recomputed rstd."""
    scale = 10 ** torch.linspace(-3, 0, 30).view(30, 1)
    x = (torch.randn(30, 24) * scale).requires_grad_()
    _check(x, _weight(24))


def test_wide_offsets(monkeypatch, kernel_launches):
    """The int64 indexing path, taken where offsets could reach 2^31, forced here by lowering the limit."""
    monkeypatch.setattr(triton_norm, "_INT32_LIMIT", 64)
    fwd = kernel_launches(triton_norm, "_rms_norm_fwd_kernel")
    bwd = kernel_launches(triton_norm, "_rms_norm_bwd_kernel")
    x, proj = _proj_view(torch.float32)
    _check(x, _weight(24), leaf=proj)
    assert fwd and bwd and all(kw["WIDE"] for kw in fwd + bwd)


def test_frozen_weight_and_fp64_weight():
    """No weight gradient asked (the kernel skips its partial sums), and a float64 weight (computed in fp32)."""
    x = torch.randn(2, 7, 3, 24, requires_grad=True)
    _check(x, _weight(24).detach())
    x.grad = None
    w = _weight(24).detach().double().requires_grad_()
    y = rms_norm_triton(x, w, EPS)
    y.sum().backward()
    assert y.dtype == torch.float32 and w.grad.dtype == torch.float64


def test_empty():
    x = torch.randn(0, 5, 24, requires_grad=True)
    w = _weight(24)
    y = rms_norm_triton(x, w, EPS)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(24))


def test_bad_inputs():
    x = torch.randn(4, 24)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm_triton(x, torch.ones(16), EPS)
    with pytest.raises(ValueError, match="at least 2 dims"):
        rms_norm_triton(torch.randn(24), torch.ones(24), EPS)
    with pytest.raises(TypeError, match="GatedRMSNorm"):
        rms_norm_triton(x.double(), torch.ones(24), EPS)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        rms_norm_triton(x.int(), torch.ones(24), EPS)


@pytest.mark.parametrize("fused", [True, False])
def test_halves_layout(fused):
    """halves (the SISO layer's q / k for the Triton scan): the same values with each pair (2j, 2j+1) stored at
    (j, j + N/2), and the gradients read back from that layout: bitwise the plain kernel's (fused), or the torch
    norm's output permuted (float64, which stays in torch)."""
    norm = GatedRMSNorm(24)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(24))
    x, proj = _proj_view(torch.float32 if fused else torch.float64)
    perm = torch.cat([torch.arange(0, 24, 2), torch.arange(1, 24, 2)])  # halves position i holds dim perm[i]
    dy = torch.randn(x.shape, dtype=x.dtype)
    y = norm(x, fused=fused)
    y.backward(dy)
    g, gw = proj.grad.clone(), norm.weight.grad.clone()
    proj.grad, norm.weight.grad = None, None
    yh = norm(x, fused=fused, halves=True)
    assert torch.equal(yh, y[..., perm])
    yh.backward(dy[..., perm])
    assert torch.equal(proj.grad, g) and torch.allclose(norm.weight.grad, gw, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="last dim must be even"):
        rms_norm_triton(torch.randn(4, 5), torch.ones(5), EPS, halves=True)


def test_fuse_rms_norms_runs_a_llamas_norms_on_the_kernel(monkeypatch):
    """`fuse_rms_norms` on a tiny Llama (fp32, the interpreter standing in for CUDA): every LlamaRMSNorm switched
    once (2 a layer and the final one), each call through the kernel, and the logits, the input embeddings' and
    every parameter's gradient equal the torch formula's to 1e-5 (fp32: summation order only, as above)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import hybrid_mamba3.norms as norms

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    plain = LlamaForCausalLM(config)
    with torch.no_grad():
        for module in plain.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.weight.add_(0.3 * torch.randn_like(module.weight))
    fused = copy.deepcopy(plain)
    monkeypatch.setattr(norms, "FUSED_NORM_DEVICES", ("cpu",))
    assert norms.fuse_rms_norms(fused) == 2 * 2 + 1 and norms.fuse_rms_norms(fused) == 0
    calls = []
    original = triton_norm.rms_norm_triton
    monkeypatch.setattr(triton_norm, "rms_norm_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = torch.randint(0, 64, (2, 11))
    got = []
    for model in (plain, fused):
        out = model(ids, labels=ids)
        out.loss.backward()
        got.append(dict(logits=out.logits.detach(), **{n: p.grad for n, p in model.named_parameters()}))
    assert len(calls) == 5
    for name, want in got[0].items():
        assert rel_err(got[1][name], want) < 1e-5, name
