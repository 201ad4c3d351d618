"""Triton kernels on the GPU (run on the device: pytest -m gpu): bf16 kernels vs the fp32 chunked torch op.

Tolerance: bf16 inputs carry ~3 significant digits; the kernels' matmuls take bf16 operands (tensor cores)
and accumulate in fp32, so outputs and gradients differ from the fp32 op on the same (upcast) inputs by
~1e-3..1e-2 relative (max-norm); 2e-2 is the issue's bound. Inputs are drawn fresh for each case, and the
caching allocator is filled with NaN before every run so any output element a kernel forgets to write shows.
"""

import pytest
import torch
from conftest import make_op_inputs, rel_err

from hybrid_mamba3.kernels import Mamba3State, mamba3_chunked, mamba3_step

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")
from hybrid_mamba3.kernels.triton_chunked import mamba3_chunked_triton  # noqa: E402
from hybrid_mamba3.kernels.triton_step import mamba3_step_triton  # noqa: E402

TOL = 2e-2
NAMES = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles")


def _poison():
    """Fill free cached blocks with NaN, so torch.empty inside the kernels' wrappers returns NaN memory."""
    torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
    blk = torch.full((min(free // 4, 2 ** 28) // 4,), float("nan"), device="cuda")
    del blk


def _inputs(B, L, R, G, N, H, P, K, mimo, gate, skip, seed):
    g = torch.Generator().manual_seed(seed)
    args, opts = make_op_inputs(B=B, L=L, R=R, G=G, N=N, H=H, P=P, K=K, dtype=torch.float32, mimo=mimo, gate=gate,
                                skip=skip, gen=g)
    to = lambda t: None if t is None else t.cuda()  # noqa: E731
    return [to(a) for a in args], {k: to(v) for k, v in opts.items()}


def _bf16_and_fp32_inputs(args, opts):
    """The bf16 inputs of the Triton op and their fp32 copies for the chunked op, all leaves that take gradients."""
    low = [a.bfloat16().requires_grad_() for a in args]
    lowo = {k: None if v is None else v.bfloat16().requires_grad_() for k, v in opts.items()}
    ref_in = [a.detach().float().requires_grad_() for a in low]
    ref_o = {k: None if v is None else v.detach().float().requires_grad_() for k, v in lowo.items()}
    return low, lowo, ref_in, ref_o


def _assert_same_gradients(y, ref, low, lowo, ref_in, ref_o):
    """Backpropagate one random dy through the Triton output y and the reference ref: every input's gradient is
    written (no NaN from the poisoned allocator) and within TOL of the reference's."""
    dy = torch.randn_like(ref)
    ref.backward(dy)
    _poison()
    y.backward(dy.bfloat16())
    pairs = list(zip(NAMES, low, ref_in)) + [(k, lowo[k], ref_o[k]) for k in lowo if lowo[k] is not None]
    for name, a, b in pairs:
        assert a.grad is not None and not torch.isnan(a.grad).any(), name
        assert rel_err(a.grad, b.grad) < TOL, (name, rel_err(a.grad, b.grad))


GRID = [
    # R, G, N, K(=N/4 rope 0.5 | N/2 rope 1.0), pairwise, gate, skip, init, headdim P
    (4, 1, 128, 32, False, True, True, False, 64),
    (4, 2, 128, 64, False, True, True, True, 64),
    (1, 1, 128, 32, True, True, True, False, 64),   # SISO
    (1, 2, 128, 64, True, False, True, True, 64),
    (2, 1, 128, 32, False, False, False, False, 64),
    (8, 1, 128, 64, False, True, True, True, 64),
    (3, 1, 128, 32, False, True, True, False, 64),  # ranks padded to 4 inside the kernels
    (4, 1, 64, 32, False, True, True, True, 64),    # d_state 64 (the oracle's rope 1.0 layers)
    (1, 1, 64, 16, True, True, False, False, 64),
    (4, 1, 128, 32, False, True, True, False, 32),  # headdim 32 (lanes padded to 64 on CUDA)
]


@pytest.mark.parametrize("R,G,N,K,pw,gate,skip,init,P", GRID)
@pytest.mark.parametrize("L", [300, 1024])
def test_forward_and_gradients_vs_chunked(R, G, N, K, pw, gate, skip, init, P, L, monkeypatch, kept_checkpoints):
    from hybrid_mamba3.kernels import triton_scan

    B, H = 2, 8
    if L == 1024:  # 16 heads leave most SMs idle, so the state scans take narrow blocks (`state_scan_block`) and the
        # backward recomputes the states from checkpoints; at this length, the many-heads case: wide blocks and no
        # checkpoints, the device counted as 1 SM
        monkeypatch.setattr(triton_scan, "_sm_count", lambda device: 1)
    else:  # checkpoints every 64 positions: 5 segments of 1-4 chunks (the last one partial)
        monkeypatch.setattr(triton_scan, "CKPT_POSITIONS", 64)
    args, opts = _inputs(B, L, R, G, N, H, P, K, R > 1, gate, skip, seed=hash((R, G, N, K, P, L)) % 2 ** 31)
    st = None
    if init:
        st = Mamba3State(torch.rand(B, H, K, device="cuda") * 6, torch.randn(B, H, P, N, device="cuda") * 0.1,
                         torch.randn(B, R, H, N, device="cuda"), torch.randn(B, H, P, device="cuda"))
    low, lowo, ref_in, ref_o = _bf16_and_fp32_inputs(args, opts)
    ref, ref_fin = mamba3_chunked(*ref_in, **ref_o, rope_pairwise=pw, chunk_size=64, initial_state=st,
                                  return_final_state=True)
    _poison()
    y, fin = mamba3_chunked_triton(*low, **lowo, rope_pairwise=pw, initial_state=st, return_final_state=True)
    assert y.dtype == torch.bfloat16 and not torch.isnan(y).any()
    assert rel_err(y, ref) < TOL
    for name, a, b in zip(Mamba3State._fields, fin, ref_fin):
        assert not torch.isnan(a).any() and rel_err(a, b) < TOL, name
    _assert_same_gradients(y, ref, low, lowo, ref_in, ref_o)
    assert kept_checkpoints == ([None] if L == 1024 else [5])  # the patched setting reached the training forward


@pytest.mark.parametrize("R,pw", [(4, False), (1, True)])
def test_state_checkpoints_on_gpu(R, pw, monkeypatch, kept_checkpoints):
    """fp32 inputs (exact fp32 matmuls): every gradient with the backward's states recomputed from checkpoints
    (`CKPT_POSITIONS` 64: segments of 4 chunks at R4, 1 at SISO, the last one partial) within 1e-5 of the recompute
    from the start (0). Not bit for bit: the segments' walks take other state blocks than the forward's, so their
    matmuls may sum in another order (fp32 rounding, ~1e-7)."""
    from hybrid_mamba3.kernels import triton_scan

    B, H, L, N, P, K = 2, 8, 300, 128, 64, 32
    args, opts = _inputs(B, L, R, 1, N, H, P, K, R > 1, True, True, seed=11)
    st = Mamba3State(torch.rand(B, H, K, device="cuda") * 6, torch.randn(B, H, P, N, device="cuda") * 0.1,
                     torch.randn(B, R, H, N, device="cuda"), torch.randn(B, H, P, device="cuda"))
    dy = torch.randn(mamba3_chunked_triton(*args, **opts, rope_pairwise=pw)[0].shape, device="cuda")
    grads = []
    for positions in (0, 64):
        monkeypatch.setattr(triton_scan, "CKPT_POSITIONS", positions)
        ins = [a.clone().requires_grad_() for a in args]
        ops = {k: None if v is None else v.clone().requires_grad_() for k, v in opts.items()}
        _poison()
        y, _ = mamba3_chunked_triton(*ins, **ops, rope_pairwise=pw, initial_state=st)
        y.backward(dy)
        grads.append([t.grad for t in ins] + [t.grad for t in ops.values() if t is not None])
    assert kept_checkpoints == [None, 5]
    for i, (a, b) in enumerate(zip(*grads)):
        assert not torch.isnan(a).any() and rel_err(a, b) < 1e-5, (i, rel_err(a, b))


def test_angle_table_on_gpu(monkeypatch, kernel_launches):
    """The rotation table on the GPU, theta past 1500 rad over 64 blocks, vs fp64 theta = init + cumsum(tanh(angles)
    pi dt): fp32 (libdevice cos / sin) to 2.5e-4, the fp32 sums of increments up to 2.6 rad within blocks of 128
    (H100: 5.6e-5 at theta ~8500 rad; before pi and the block sums went to float64, blocks of 32 were 1.3e-4 off at
    ~2000); fp16 (the 16-bit kernels' table) to that plus fp16's rounding (half an ulp below 1, 2^-12; the fp16
    kernel's layout may sum in another order, so its theta is not the fp32 table's to the bit). FAST_SINCOS (the
    hardware's approximations, ~1e-6 off) against libdevice in the same fp16 table: at most one fp16 ulp apart
    (2^-11), and that in under 5% of entries (a rounding flip; a reduction or approximation error of 1e-4 would flip
    ~40%)."""
    from hybrid_mamba3.kernels import triton_angles as ta

    g = torch.Generator().manual_seed(3)
    B, H, K, L = 2, 8, 32, ta.BLOCK * 64 - 7
    angles = (torch.randn(B, L, K, generator=g) + 1.5).to(torch.bfloat16)
    dt = (torch.rand(B, L, H, generator=g) + 0.05) * 0.8
    init = torch.rand(B, H, K, generator=g) * 6
    theta = init.double()[:, None] + torch.cumsum(torch.tanh(angles.double())[:, :, None] * torch.pi
                                                  * dt.double()[..., None], dim=1)
    assert theta.abs().max() > 1500
    ref = torch.stack((theta.cos(), theta.sin()), dim=-2)
    tables, launches = {}, kernel_launches(ta, "_angle_table_kernel")
    for fast, dtype in ((0, torch.float32), (0, torch.float16), (1, torch.float16)):
        monkeypatch.setattr(ta, "FAST_SINCOS", fast)
        tables[fast, dtype] = ta.angle_table(angles.cuda(), dt.cuda(), init.cuda(), dtype)[0].double().cpu()
    assert [kw["FAST"] for kw in launches] == [False, False, True]  # FAST_SINCOS reached the fp16 table's launch
    assert (tables[0, torch.float32] - ref).abs().max() < 2.5e-4
    assert (tables[0, torch.float16] - ref).abs().max() < 2.5e-4 + 2.0 ** -12
    flips = (tables[1, torch.float16] - tables[0, torch.float16]).abs()
    assert flips.max() <= 2.0 ** -11 and (flips > 0).double().mean() < 0.05


def test_strided_v_and_z_read_in_place():
    """bf16 v and z as views of one wider projection (as the layer passes them): read in place, bitwise the same
    output and v / z gradients as contiguous copies (the same kernels on the same values)."""
    from hybrid_mamba3.kernels.common import rows_of

    B, L, H, P = 2, 300, 8, 64
    args, opts = _inputs(B, L, 4, 1, 128, H, P, 32, True, True, True, seed=3)
    args = [a.bfloat16() for a in args]
    opts = {k: v.bfloat16() for k, v in opts.items()}
    wide = torch.randn(B, L, 2 * H * P + 24, device="cuda", dtype=torch.bfloat16)
    wide[..., :H * P], wide[..., H * P:2 * H * P] = opts["z"].flatten(-2), args[2].flatten(-2)
    dy = torch.randn(B, L, H, P, device="cuda", dtype=torch.bfloat16)
    v_ref, z_ref = args[2].clone().requires_grad_(), opts["z"].clone().requires_grad_()
    _poison()
    y_ref, _ = mamba3_chunked_triton(*args[:2], v_ref, *args[3:], **{**opts, "z": z_ref})
    y_ref.backward(dy)
    wide.requires_grad_()
    z_view, v_view = wide[..., :H * P].unflatten(-1, (H, P)), wide[..., H * P:2 * H * P].unflatten(-1, (H, P))
    assert rows_of(v_view) is v_view and rows_of(z_view) is z_view
    _poison()
    y, _ = mamba3_chunked_triton(*args[:2], v_view, *args[3:], **{**opts, "z": z_view})
    y.backward(dy)
    assert torch.equal(y, y_ref)
    assert torch.equal(wide.grad[..., H * P:2 * H * P], v_ref.grad.flatten(-2))
    assert torch.equal(wide.grad[..., :H * P], z_ref.grad.flatten(-2))


def test_varlen_equals_separate_calls():
    lens = [100, 1, 257, 64]
    args, opts = _inputs(1, sum(lens), 4, 1, 128, 8, 64, 32, True, True, True, seed=1)
    args = [a.bfloat16() for a in args]
    opts = {k: v.bfloat16() for k, v in opts.items()}
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0)
    _poison()
    y, fin = mamba3_chunked_triton(*args, **opts, cu_seqlens=cu, return_final_state=True)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sl = lambda t: t if t.dim() < 3 or t.shape[0] != 1 or t.shape[1] != cu[-1] else t[:, s:e]  # noqa: E731
        yi, fi = mamba3_chunked_triton(*[a if j in (6, 7) else sl(a) for j, a in enumerate(args)],
                                       **{k: sl(v) if k == "z" else v for k, v in opts.items()},
                                       return_final_state=True)
        assert rel_err(y[:, s:e], yi) < 1e-2
        for a, b in zip(fin, fi):
            assert rel_err(a[i:i + 1], b) < 1e-3


@pytest.mark.parametrize("R,pw,ckpt", [(4, False, False), (1, True, False), (4, False, True)],
                         ids=["mimo_r4", "siso", "mimo_r4_checkpoints"])
def test_packed_rows_vs_chunked(R, pw, ckpt, monkeypatch, kept_checkpoints):
    """seq_idx on the GPU: bf16 kernels with the state reset at every sequence start inside them, vs the fp32 chunked
    op on the same packed rows (itself checked against the reference run sequence by sequence in CI); documents of
    1-300 tokens, starts anywhere in a chunk; with checkpoints every 64 positions (the backward's recompute from
    them), or none."""
    from hybrid_mamba3.kernels import triton_scan

    if ckpt:
        monkeypatch.setattr(triton_scan, "CKPT_POSITIONS", 64)
    else:
        monkeypatch.setattr(triton_scan, "_sm_count", lambda device: 1)
    B, L, H, P, N, K = 2, 1024, 8, 64, 128, 32
    g = torch.Generator().manual_seed(R)
    starts = (torch.rand(B, L - 1, generator=g) < 1 / 150).long()  # a document starts after ~150 tokens
    seq = torch.cat((torch.zeros(B, 1, dtype=torch.long), starts), 1).cumsum(1)
    seq[1, 100:101] += 1  # a one-token document
    seq[1, 101:] += 2
    seq = seq.cuda()
    args, opts = _inputs(B, L, R, 1, N, H, P, K, R > 1, True, True, seed=7 + R)
    low, lowo, ref_in, ref_o = _bf16_and_fp32_inputs(args, opts)
    ref, _ = mamba3_chunked(*ref_in, **ref_o, rope_pairwise=pw, chunk_size=64, seq_idx=seq)
    _poison()
    y, _ = mamba3_chunked_triton(*low, **lowo, rope_pairwise=pw, seq_idx=seq)
    assert not torch.isnan(y).any() and rel_err(y, ref) < TOL
    _assert_same_gradients(y, ref, low, lowo, ref_in, ref_o)
    assert kept_checkpoints == ([16] if ckpt else [None])  # 64-position segments of 1024, or none on "1 SM"


def test_bc_norm_kernel_vs_torch_norm():
    """The Triton B/C norm on a bf16 view of a projection (read in place, as the layer's C) against the torch
    GatedRMSNorm on the same values: both compute in fp32 and round y / dx to bf16, so they differ by at most about
    one bf16 rounding (2^-8 relative): 1e-2; the weight's gradient is fp32 on both sides (summation order only): 1e-4."""
    from hybrid_mamba3.norms import GatedRMSNorm

    B, L, R, N = 4, 1000, 4, 128
    proj = torch.randn(B, L, R * N + 40, device="cuda").bfloat16().requires_grad_()
    norm = GatedRMSNorm(N, device="cuda")
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(N, device="cuda"))
    dy = torch.randn(B, L, R, 1, N, device="cuda").bfloat16()
    out = {}
    for fused in (False, True):
        proj.grad, norm.weight.grad = None, None
        _poison()
        y = norm(proj[..., 40:].unflatten(-1, (R, 1, N)), fused=fused)
        y.backward(dy)
        out[fused] = (y, proj.grad[..., 40:].clone(), norm.weight.grad.clone())
    for a, b, tol in zip(out[True], out[False], (1e-2, 1e-2, 1e-4)):
        assert not torch.isnan(a).any() and rel_err(a, b) < tol
    assert (proj.grad[..., :40] == 0).all()


@pytest.mark.parametrize("R,pw,B", [(4, False, 64), (1, True, 1)])
def test_step_vs_reference_step(R, pw, B):
    args, opts = _inputs(B, 1, R, 1, 128, 16, 64, 32, R > 1, True, True, seed=2)
    args = [a if i in (6, 7) else a[:, 0] for i, a in enumerate(args)]
    opts["z"] = opts["z"][:, 0]
    st = Mamba3State(torch.rand(B, 16, 32, device="cuda") * 6, torch.randn(B, 16, 64, 128, device="cuda"),
                     torch.randn(B, R, 16, 128, device="cuda"), torch.randn(B, 16, 64, device="cuda"))
    low = [a.bfloat16() if i not in (6, 7) else a for i, a in enumerate(args)]
    ref, ref_st = mamba3_step(*[a.float() for a in low], st, **opts, rope_pairwise=pw)  # same (rounded) inputs
    _poison()
    y, new = mamba3_step_triton(*low, Mamba3State(*(t.clone() for t in st)), **opts, rope_pairwise=pw)
    assert rel_err(y, ref) < TOL
    # angles live on a circle (mod 2 pi): compare the wrapped difference, in radians
    wrapped = torch.remainder(new.angle - ref_st.angle + torch.pi, 2 * torch.pi) - torch.pi
    assert wrapped.abs().max() < 1e-4
    for name, a, b in list(zip(Mamba3State._fields, new, ref_st))[1:]:
        assert rel_err(a, b) < TOL, name


@pytest.mark.parametrize("mimo,act", [(True, "softplus"), (False, "heavy_tail")])
def test_layer_step_fused_vs_torch_step(mimo, act):
    """bf16 layer: the decode step as in_proj + one kernel (norms and activations inside) vs the layer's torch
    step (the same bf16 module, norms and activations in torch, `mamba3_step`), chained over 8 tokens."""
    from hybrid_mamba3 import Mamba3
    torch.manual_seed(5)
    layer = Mamba3(d_model=256, d_state=64, headdim=32, is_mimo=mimo, mimo_rank=4, a_activation=act).cuda()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer = layer.bfloat16()
    u = torch.randn(64, 8, 256, device="cuda", dtype=torch.bfloat16)
    ref_layer = Mamba3(d_model=256, d_state=64, headdim=32, is_mimo=mimo, mimo_rank=4, a_activation=act,
                       backend="torch").cuda().bfloat16()
    ref_layer.load_state_dict(layer.state_dict())
    st, ref_st = layer.allocate_state(64), ref_layer.allocate_state(64)
    with torch.no_grad():
        for t in range(8):
            _poison()
            y, st = layer.step(u[:, t], st)
            ref, ref_st = ref_layer.step(u[:, t], ref_st)
            assert layer.last_backend == "triton" and ref_layer.last_backend == "torch"
            assert rel_err(y, ref) < TOL, t
    for name, a, b in list(zip(Mamba3State._fields, st, ref_st))[1:]:
        assert rel_err(a, b) < TOL, name


def test_layer_uses_triton_on_cuda_by_default():
    from hybrid_mamba3 import Mamba3
    layer = Mamba3(d_model=256, d_state=64, headdim=32, is_mimo=True, mimo_rank=4).cuda().bfloat16()
    u = torch.randn(2, 100, 256, device="cuda", dtype=torch.bfloat16)
    y, st = layer(u, return_final_state=True)
    assert layer.last_backend == "triton"
    ref = Mamba3(d_model=256, d_state=64, headdim=32, is_mimo=True, mimo_rank=4, backend="torch").cuda()
    ref.load_state_dict(layer.state_dict())
    assert rel_err(y, ref(u.float())) < TOL
    y2, _ = layer.step(u[:, 0], layer.allocate_state(2))
    assert layer.last_backend == "triton" and not torch.isnan(y2).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_kl_vs_reference_at_a_real_vocabulary(dtype):
    """kernels/triton_kl.py at SmolLM2's vocabulary (49152, 12 blocks a row) against the torch reference on the same
    logits: KL and CE in fp32 both ways, summed in another order (1e-5 relative, ~100x the fp32 rounding of the
    row sums); the gradient is written in the logits' dtype, so bf16 rounding (2^-8) bounds it there: 8e-3."""
    from hybrid_mamba3.kernels.kl_div import kl_rows, kl_rows_reference

    torch.manual_seed(0)
    N, V = 1000, 49152
    zs = (torch.randn(N, V, device="cuda") * 4).to(dtype)
    zt = (torch.randn(N, V, device="cuda") * 4 + zs.float() * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[::7] = -100
    out = []
    for fn in (kl_rows, kl_rows_reference):
        _poison()
        x = zs.clone().requires_grad_()
        kl, ce = fn(x, zt, labels, 1.5)
        (kl.sum() + 0.5 * ce.sum()).backward()
        out.append((kl, ce, x.grad))
    for name, a, b in zip(("kl", "ce", "grad"), *out):
        tol = 8e-3 if name == "grad" and dtype == torch.bfloat16 else 1e-5
        assert torch.isfinite(a).all() and rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.parametrize("shape", [(16, 32, 8, 16429, 64), (16, 9, 3, 16429, 64), (1, 32, 8, 2100, 64),
                                   (3, 8, 8, 700, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_vs_reference(shape, dtype):
    """kernels/triton_decode_attention.py at the Llama-3.2-1B and SmolLM2 shapes over a static cache of 16k + 45
    slots (the last 45 free, left padding on some rows), batch 1 at 2k, and a 128-wide head without grouping, against
    the torch reference in fp32 on the same inputs. fp32: exact products, 1e-5 (as the interpreter tests). bf16: the
    softmax weights are rounded to bf16 before the value product and the output once more, 2^-8 each: 2e-2."""
    from hybrid_mamba3.kernels.decode_attn import decode_attention, decode_attention_reference

    B, H, HKV, L, D = shape
    torch.manual_seed(0)
    q = torch.randn(B, H, D, device="cuda").to(dtype)
    k = torch.randn(B, HKV, L, D, device="cuda").to(dtype)
    v = torch.randn(B, HKV, L, D, device="cuda").to(dtype)
    mask = torch.ones(B, L, dtype=torch.bool, device="cuda")
    mask[:, L - 45:] = False
    mask[::2, :100] = False  # left padding
    k[:, :, L - 45:] = float("nan")  # free slots are never read into the result
    for m in (mask, None):
        keys = k if m is not None else k.nan_to_num()
        _poison()
        out = decode_attention(q, keys, v, m)
        ref = decode_attention_reference(q.float(), keys.float(), v.float(), m)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert torch.isfinite(out).all() and rel_err(out.float(), ref) < tol, rel_err(out.float(), ref)


def test_sdpa_splitkv_generates_as_sdpa_on_cuda():
    """A tiny hybrid on the GPU, fp32, left padding, static cache: generate() with sdpa_splitkv gives sdpa's greedy
    tokens and logits within 1e-4 (TF32 is off; the kernels sum in another order), eager and under torch.compile."""
    from test_generation import left_padded
    from test_model import hybrid
    from transformers import CompileConfig

    torch.manual_seed(0)
    model = hybrid((1, 3)).cuda().eval()
    _, ids, mask = left_padded()
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static",
              output_logits=True, return_dict_in_generate=True)
    model.config._attn_implementation = "sdpa"
    ref = model.generate(ids, **kw)
    model.config._attn_implementation = "sdpa_splitkv"
    for extra in ({}, {"compile_config": CompileConfig(fullgraph=True)}):
        ours = model.generate(ids, **kw, **extra)
        assert torch.equal(ours.sequences, ref.sequences)
        for a, b in zip(ours.logits, ref.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
