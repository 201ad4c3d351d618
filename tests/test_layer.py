"""The Mamba3 layer: official parameter layout and init, step == scan, padding, dtypes, errors."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from hybrid_mamba3 import Mamba3

CONFIGS = [
    dict(is_mimo=True, mimo_rank=4, chunk_size=8),
    dict(is_mimo=True, mimo_rank=2, rope_fraction=1.0, ngroups=2, chunk_size=4),
    dict(is_mimo=False, chunk_size=16),
    dict(is_mimo=True, mimo_rank=2, is_outproj_norm=True, chunk_size=8),
    dict(is_mimo=False, is_outproj_norm=True, rope_fraction=1.0),
    dict(is_mimo=True, mimo_rank=4, a_activation="heavy_tail", chunk_size=8),
]


def make_layer(dtype=torch.float64, **kw):
    layer = Mamba3(d_model=32, d_state=16, headdim=8, layer_idx=0, **kw).to(dtype)
    with torch.no_grad():  # move every parameter off its init so no term can hide behind a 1 or a 0
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def test_official_parameter_names_shapes_and_init():
    D, N, P, R, G, E = 64, 32, 16, 4, 2, 2
    m = Mamba3(d_model=D, d_state=N, expand=E, headdim=P, ngroups=G, is_mimo=True, mimo_rank=R, rope_fraction=0.5)
    H, K = E * D // P, N // 4
    expected = {
        "in_proj.weight": (2 * E * D + 2 * N * G * R + 3 * H + K, D), "dt_bias": (H,), "B_bias": (H, R, N),
        "C_bias": (H, R, N), "B_norm.weight": (N,), "C_norm.weight": (N,), "mimo_x": (H, R, P), "mimo_z": (H, R, P),
        "mimo_o": (H, R, P), "D": (H,), "out_proj.weight": (D, E * D)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert bool((dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all())
    assert torch.equal(m.mimo_x, torch.full_like(m.mimo_x, 1 / R)) and torch.equal(m.mimo_z, torch.ones_like(m.mimo_z))
    assert torch.equal(m.B_bias, torch.ones_like(m.B_bias)) and torch.equal(m.D, torch.ones_like(m.D))
    siso = Mamba3(d_model=D, d_state=N, headdim=P, is_mimo=False, is_outproj_norm=True, rope_fraction=1.0)
    keys = set(siso.state_dict())
    assert "norm.weight" in keys and not any(k.startswith("mimo") for k in keys)
    assert siso.B_bias.shape == (H, 1, N) and siso.num_rope_angles == N // 2


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_step_loop_equals_scan_and_continuation(kw):
    layer = make_layer(**kw)
    u = torch.randn(2, 21, 32, dtype=torch.float64)
    y, st = layer(u, return_final_state=True)
    assert layer.last_backend == "torch"
    s = layer.allocate_state(2).to(torch.float64)
    for t in range(21):
        o, s = layer.step(u[:, t], s)
        assert rel_err(o, y[:, t]) < 1e-10
    for a, b in zip(s, st):
        assert rel_err(a, b) < 1e-10
    y1, s1 = layer(u[:, :9], return_final_state=True)  # prefill, then several tokens at once
    y2 = layer(u[:, 9:], initial_state=s1)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-10


def test_a_activation_options_differ_and_heavy_tail_formula():
    from hybrid_mamba3.kernels.common import a_activation_fn
    u = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    assert torch.allclose(a_activation_fn("heavy_tail", u), torch.tensor([0.25, 1 / 1.5, 1.0, 1.5, 4.0]))
    a = make_layer(a_activation="softplus", is_mimo=True, mimo_rank=2)
    b = make_layer(a_activation="heavy_tail", is_mimo=True, mimo_rank=2)
    b.load_state_dict(a.state_dict())
    u = torch.randn(1, 12, 32, dtype=torch.float64)
    assert rel_err(a(u), b(u)) > 1e-3


def test_left_padding_leaves_sequences_unchanged():
    layer = make_layer(is_mimo=True, mimo_rank=2, chunk_size=4)
    u = torch.randn(2, 11, 32, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    y, st = layer(u, attention_mask=mask, return_final_state=True)
    y_short, st_short = layer(u[1:, 4:], return_final_state=True)
    assert rel_err(y[1, 4:], y_short[0]) < 1e-10
    for a, b in zip(st.select(slice(1, 2)), st_short):
        assert rel_err(a, b) < 1e-10
    y_full = layer(u[:1])
    assert rel_err(y[:1], y_full) < 1e-10


def test_right_padding_without_state_equals_unpadded_runs():
    """Right padding (and left and right at once) where no state is carried on: outputs at real tokens and every
    parameter's gradient through them equal those of the unpadded sequences run one by one."""
    layer = make_layer(is_mimo=True, mimo_rank=2, chunk_size=4)
    u = torch.randn(3, 11, 32, dtype=torch.float64)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padded
    mask[2, :2], mask[2, 9:] = 0, 0  # both
    spans = [(0, 11), (0, 7), (2, 9)]
    dy = torch.randn(3, 11, 32, dtype=torch.float64)
    y = layer(u, attention_mask=mask)
    sum((y[i, a:b] * dy[i, a:b]).sum() for i, (a, b) in enumerate(spans)).backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    for i, (a, b) in enumerate(spans):
        yi = layer(u[i:i + 1, a:b])
        assert rel_err(y[i, a:b], yi[0]) < 1e-10
        (yi[0] * dy[i, a:b]).sum().backward()
    for n, p in layer.named_parameters():
        assert rel_err(got[n], p.grad) < 1e-10, n


def test_packed_rows_equal_separate_calls():
    """seq_idx: several rows, each with sequences packed along it (a new one wherever seq_idx changes), run as the
    sequences one by one; outputs and gradients."""
    layer = make_layer(is_mimo=True, mimo_rank=2, chunk_size=4)
    u = torch.randn(2, 13, 32, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[3] * 5 + [4] * 1 + [7] * 7, [0] * 8 + [1] * 5])  # any labels; lengths 5, 1, 7 | 8, 5
    dy = torch.randn(2, 13, 32, dtype=torch.float64)
    (layer(u, seq_idx=seq_idx) * dy).sum().backward()
    got = u.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()}
    u.grad = None
    layer.zero_grad()
    for row, spans in enumerate([[(0, 5), (5, 6), (6, 13)], [(0, 8), (8, 13)]]):
        for a, b in spans:
            (layer(u[row:row + 1, a:b]) * dy[row:row + 1, a:b]).sum().backward()
    assert rel_err(got[0], u.grad) < 1e-10
    for n, p in layer.named_parameters():
        assert rel_err(got[1][n], p.grad) < 1e-10, n


def test_packed_sequences_equal_separate_calls():
    layer = make_layer(is_mimo=True, mimo_rank=2, chunk_size=4)
    u = torch.randn(1, 20, 32, dtype=torch.float64)
    y = layer(u, cu_seqlens=torch.tensor([0, 7, 20]))
    assert rel_err(y[:, :7], layer(u[:, :7])) < 1e-10 and rel_err(y[:, 7:], layer(u[:, 7:])) < 1e-10
    y2 = layer(u, cu_seq_lens_q=torch.tensor([0, 7, 20], dtype=torch.int32))  # transformers' packing kwarg
    assert torch.equal(y, y2)


def test_bf16_cast_keeps_fp32_parameters_and_runs():
    layer = Mamba3(d_model=32, d_state=16, headdim=8, is_mimo=True, mimo_rank=2, is_outproj_norm=True)
    before = layer.dt_bias.detach().clone()
    layer = layer.to(torch.bfloat16)
    dtypes = {n: p.dtype for n, p in layer.named_parameters()}
    assert dtypes.pop("in_proj.weight") == torch.bfloat16 and dtypes.pop("out_proj.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}
    assert torch.equal(layer.dt_bias, before)  # not rounded through bf16
    y = layer(torch.randn(2, 10, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and not torch.isnan(y).any()
    layer.half()
    assert layer.D.dtype == torch.float32


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible by headdim"):
        Mamba3(d_model=30, headdim=16)
    with pytest.raises(ValueError, match="rope_fraction"):
        Mamba3(d_model=32, headdim=8, rope_fraction=0.25)
    with pytest.raises(ValueError, match="mimo_rank"):
        Mamba3(d_model=32, headdim=8, is_mimo=True, mimo_rank=0)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba3(d_model=32, headdim=8, ngroups=3)
    with pytest.raises(ValueError, match="a_activation"):
        Mamba3(d_model=32, headdim=8, a_activation="relu")
    with pytest.raises(ValueError, match="backend"):
        Mamba3(d_model=32, headdim=8, backend="cuda")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        Mamba3(d_model=32, d_state=16, headdim=8, bogus=1)
    assert any("bogus" in str(x.message) for x in w)
    layer = make_layer(is_mimo=True, mimo_rank=2)
    u = torch.randn(2, 6, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="right padding with a cache"):
        layer(u, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]), return_final_state=True)
    with pytest.raises(ValueError, match="padding between real tokens"):
        layer(u, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="not both"):
        layer(u[:1], attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]), seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="seq_idx packs sequences"):
        layer(u, seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1]]), return_final_state=True)
    with pytest.raises(ValueError, match="2D"):
        layer(u, attention_mask=torch.ones(2, 1, 6, 6))
    with pytest.raises(ValueError, match=r"\(batch, seqlen, 32\)"):
        layer(torch.randn(2, 6, 31, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA"):
        Mamba3(d_model=32, d_state=16, headdim=8, backend="triton")(torch.randn(1, 4, 32))


@pytest.mark.parametrize("group_size,gated,before", [(None, False, True), (None, True, True), (None, True, False),
                                                     (8, True, True)])
def test_gated_rmsnorm_formula(group_size, gated, before):
    """GatedRMSNorm == x / rms(x) * weight (per group), gated by silu(z) before or after the norm, in fp64."""
    from hybrid_mamba3.norms import GatedRMSNorm

    torch.manual_seed(0)
    norm = GatedRMSNorm(32, eps=1e-3, group_size=group_size, norm_before_gate=before).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x, z = torch.randn(3, 5, 32, dtype=torch.float64) * 4, torch.randn(3, 5, 32, dtype=torch.float64)
    h = x * F.silu(z) if gated and not before else x
    g = h.unflatten(-1, (-1, group_size or 32))
    want = (g / (g.square().mean(-1, keepdim=True) + 1e-3).sqrt()).flatten(-2) * norm.weight
    if gated and before:
        want = want * F.silu(z)
    assert torch.allclose(norm(x, z if gated else None), want, rtol=1e-12, atol=0)


def test_oracle_layer_grads_reads_the_layer_unchanged():
    """tests/oracle.py's layer_grads (the gradient oracle's collector): its in_proj hook leaves the output as it is,
    and the per-token in_proj gradients it returns are the ones the weight's gradient sums (W.grad = G^T u)."""
    from oracle import layer_grads

    torch.manual_seed(0)
    m = Mamba3(d_model=32, d_state=16, headdim=16, is_mimo=True, mimo_rank=2, chunk_size=8, backend="torch")
    u, dy = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    g = layer_grads(m, u, dy, m._split)
    with torch.no_grad():
        assert torch.equal(g["output"], m(u))
    parts = ("z", "x", "B", "C", "dd_dt", "dd_A", "trap", "angles")
    proj = torch.cat([g[f"proj.{n}"] for n in parts], -1).flatten(0, 1)
    assert proj.shape[1] == m.in_proj.out_features
    assert rel_err(proj.T @ u.flatten(0, 1), g["in_proj.weight"]) < 1e-5
    uu = u.clone().requires_grad_()
    (m(uu) * dy).sum().backward()
    assert rel_err(g["input"], uu.grad) < 1e-6
    assert {n for n, _ in m.named_parameters()} <= g.keys()
