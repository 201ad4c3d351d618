"""The fused distillation KL (kernels/triton_kl.py) under TRITON_INTERPRET=1 on the CPU, against the torch reference.

The reference (`kl_rows_reference`) is checked against the definition in float64 first; then the kernels against
the reference on the same inputs, forward (KL, CE) and the student's gradient:
- fp32 logits: the kernels sum in another order (running maxima over vocabulary blocks) than torch's log-softmax,
  ~1e-7 relative measured; 1e-5 leaves ~100x headroom and still catches a wrong term (a missing 1/T moves the
  result by O(1)).
- bf16 logits are read exactly; only the gradient is rounded to bf16 on the way out, which the interpreter does by
  truncation (< 2^-7 relative): 8e-3.
Errors are max-norm relative (`rel_err`). Vocabulary sizes are not powers of two and `block` forces several blocks
per row, so the masks and the running rescales are exercised.
"""

import os

import pytest
import torch
from conftest import rel_err

from hybrid_mamba3.kernels.kl_div import kl_rows, kl_rows_reference

pytest.importorskip("triton")
# conftest switches the interpreter on before any test module loads, on machines without a GPU only
if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
    pytest.skip("interpreter tests are for CPU machines (on a GPU, tests/test_triton_gpu.py runs)",
                allow_module_level=True)
from hybrid_mamba3.kernels.triton_kl import kl_rows_triton  # noqa: E402


def _inputs(N, V, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(N, V, generator=g) * scale).to(dtype)
    zt = (torch.randn(N, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    return zs, zt, labels


def _both(zs, zt, labels, T, **kw):
    """(kl, ce, dzs) of the kernels and of the reference, the gradient of sum(kl) + 0.5 sum(ce) (each term's
    gradient weighted differently, so a swapped pair shows)."""
    out = []
    for fn in (lambda *a: kl_rows_triton(*a, **kw), kl_rows_reference):
        x = zs.clone().requires_grad_()
        res = fn(x, zt, labels, T)
        kl, ce = res if labels is not None else (res, torch.zeros(()))
        (kl.sum() + 0.5 * ce.sum()).backward()
        out.append((kl.detach(), ce.detach(), x.grad))
    return out


def test_reference_is_the_definition():
    zs, zt, labels = _inputs(4, 37, torch.float64)
    for T in (1.0, 2.5):
        kl, ce = kl_rows_reference(zs, zt, labels, T)
        ps, pt = torch.softmax(zs / T, -1), torch.softmax(zt / T, -1)
        assert torch.allclose(kl, (pt * (pt.log() - ps.log())).sum(-1), rtol=1e-12, atol=1e-12)
        assert torch.allclose(ce, -torch.log_softmax(zs, -1).gather(-1, labels[:, None])[:, 0], rtol=1e-12)


@pytest.mark.parametrize("N,V,T,block,with_labels", [
    (5, 300, 1.0, 64, True),      # 5 blocks, the last one partial
    (3, 1000, 2.0, None, True),   # one block of 1024, masked tail; CE at T = 1 beside the KL at T = 2
    (4, 129, 0.5, 32, False),     # KL alone
    (2, 4100, 1.0, None, True),   # two blocks of the 4096 maximum
])
def test_kernels_match_reference(N, V, T, block, with_labels):
    zs, zt, labels = _inputs(N, V)
    if not with_labels:
        labels = None
    (kl, ce, g), (kl_r, ce_r, g_r) = _both(zs, zt, labels, T, block=block)
    assert rel_err(kl, kl_r) < 1e-5, rel_err(kl, kl_r)
    if with_labels:
        assert rel_err(ce, ce_r) < 1e-5, rel_err(ce, ce_r)
    assert rel_err(g, g_r) < 1e-5, rel_err(g, g_r)


def test_running_maximum_rises_in_every_block_and_large_logits_stay_finite():
    """Logits sorted ascending (each block holds a new maximum, so every running sum is rescaled) and offset by
    1000 (exp would overflow without the maxima); against the reference in float64."""
    zs, zt, labels = _inputs(3, 500)
    zs, zt = zs.sort(-1).values + 1000, zt.sort(-1).values - 1000
    (kl, ce, g), _ = _both(zs, zt, labels, 1.5, block=64)
    kl_r, ce_r = kl_rows_reference(zs.double(), zt.double(), labels, 1.5)
    assert torch.isfinite(kl).all() and torch.isfinite(g).all()
    assert rel_err(kl, kl_r) < 1e-5 and rel_err(ce, ce_r) < 1e-5


def test_ignored_labels_add_nothing_and_a_label_past_the_vocabulary_is_nan():
    zs, zt, labels = _inputs(4, 100)
    labels[1], labels[2] = -100, -1
    (kl, ce, g), (kl_r, ce_r, g_r) = _both(zs, zt, labels, 1.0, block=32)
    assert ce[1] == 0 and ce[2] == 0 and rel_err(ce, ce_r) < 1e-5 and rel_err(g, g_r) < 1e-5
    labels[0] = 100
    _, ce = kl_rows_triton(zs, zt, labels)
    assert ce[0].isnan() and not ce[3].isnan()


def test_bf16_logits():
    zs, zt, labels = _inputs(4, 300, torch.bfloat16)
    (kl, ce, g), (kl_r, ce_r, g_r) = _both(zs, zt, labels, 1.0, block=128)
    assert g.dtype == torch.bfloat16
    assert rel_err(kl, kl_r) < 1e-5 and rel_err(ce, ce_r) < 1e-5
    assert rel_err(g, g_r) < 8e-3, rel_err(g, g_r)


def test_bad_input_says_what_to_change():
    zs, zt, labels = _inputs(2, 10)
    with pytest.raises(ValueError, match="vocabularies must match"):
        kl_rows(zs, zt[:, :9])
    with pytest.raises(ValueError, match="labels must be"):
        kl_rows(zs, zt, labels[:1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kl_rows(zs, zt, temperature=0.0)
    with pytest.raises(ValueError, match="no gradient"):
        kl_rows(zs, zt.requires_grad_())


def test_distillation_loss_on_the_kernels_equals_it_on_the_reference(monkeypatch):
    """distillation_loss (chunks recomputed by reentrant checkpoints in the backward) with the fused kernels in place
    of the reference, as on CUDA: the same loss, hidden-state and head-weight gradients."""
    from hybrid_mamba3.distill import losses

    gen = torch.Generator().manual_seed(1)
    B, L, D, V = 2, 11, 8, 70
    hs = torch.randn(B, L, D, generator=gen)
    ht = torch.randn(B, L, D, generator=gen)
    head_s, head_t = torch.nn.Linear(D, V, bias=False), torch.nn.Linear(D, V, bias=False)
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[0, 7:] = -100
    results, calls = [], []
    for fused in (True, False):
        if fused:
            monkeypatch.setattr(losses, "kl_rows", lambda *a: calls.append(a) or kl_rows_triton(*a, block=16))
        else:
            monkeypatch.undo()
        x = hs.clone().requires_grad_()
        head_s.zero_grad()
        loss, parts = losses.distillation_loss(x, head_s, ht, head_t, labels, temperature=2.0, ce_weight=0.3,
                                               chunk_tokens=4)
        loss.backward()
        results.append((loss.detach(), x.grad, head_s.weight.grad.clone(), parts["ce"]))
    chunks = -(-int((labels[:, 1:] != -100).sum()) // 4)
    assert len(calls) == 2 * chunks  # each chunk once forward, once more in the backward
    for a, b in zip(*results):
        assert rel_err(torch.as_tensor(a), torch.as_tensor(b)) < 1e-5
