"""The Triton kernels run under TRITON_INTERPRET=1 on the CPU, at tiny sizes, against the fp64 reference.

The interpreter executes the same kernel source with numpy, so indexing, masking, the in-kernel bias and
rotation, the chunk-state passing and the epilogue are all checked in CI without a GPU. fp32 inputs make
the kernels use exact fp32 dot products; 3e-6 relative error (vs 1e-5 for the torch chunked op) leaves
~10x headroom over the ~3e-7 measured and still catches any wrong term. The layer's whole CUDA path (fused norms,
activations, step) runs here too, against its torch path (`test_layer_triton_path_vs_torch_path`).
"""

import os

import torch

# conftest sets it first when run under pytest. Never on a GPU machine: the variable stays set for the whole
# pytest process, and every Triton kernel defined after this import (the official mamba-ssm oracle's, say)
# would then run in the interpreter, which fails on their library calls.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import make_op_inputs, rel_err  # noqa: E402

from hybrid_mamba3.kernels import Mamba3State, mamba3_chunked, mamba3_reference, mamba3_step  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
    pytest.skip("interpreter tests are for CPU machines (on a GPU, tests/test_triton_gpu.py runs)",
                allow_module_level=True)
from hybrid_mamba3.kernels.triton_chunked import mamba3_chunked_triton  # noqa: E402
from hybrid_mamba3.kernels.triton_setup import kernel_chunk  # noqa: E402
from hybrid_mamba3.kernels.triton_step import mamba3_step_triton  # noqa: E402

TOL = 3e-6
SIZES = dict(N=16, H=4, P=16)  # tl.dot needs every matmul dim >= 16


def _f32(args, opts):
    cast = lambda t: None if t is None else t.detach().float()  # noqa: E731
    return [cast(a) for a in args], {k: cast(v) for k, v in opts.items()}


def _state(B, R, K, H=4, P=16, N=16):
    return Mamba3State(torch.rand(B, H, K, dtype=torch.float64) * 6, torch.randn(B, H, P, N, dtype=torch.float64),
                       torch.randn(B, R, H, N, dtype=torch.float64), torch.randn(B, H, P, dtype=torch.float64))


@pytest.mark.parametrize("R,G,K,pw,L,mimo,gate,skip,init", [
    (4, 1, 4, False, 37, True, True, True, True),     # MIMO R4, rope 0.5, initial state, length not a chunk multiple
    (2, 2, 8, False, 70, True, False, True, False),  # MIMO R2, rope 1.0, ngroups 2, no gate, several chunks
    (1, 2, 4, True, 41, False, True, False, True),   # SISO (pairwise rotation), no D
    (8, 1, 8, False, 19, True, True, True, False),   # R8: kernel chunk 16
    (3, 1, 4, False, 40, True, True, True, True),    # R3: ranks padded to 4 inside the kernels
])
def test_forward_matches_reference(R, G, K, pw, L, mimo, gate, skip, init):
    args, opts = make_op_inputs(B=2, L=L, R=R, G=G, K=K, mimo=mimo, gate=gate, skip=skip, **SIZES)
    st = _state(2, R, K) if init else None
    ref, ref_fin = mamba3_reference(*args, **opts, rope_pairwise=pw, initial_state=st, return_final_state=True)
    a32, o32 = _f32(args, opts)
    y, fin = mamba3_chunked_triton(*a32, **o32, rope_pairwise=pw, return_final_state=True,
                                   initial_state=st.to(torch.float32) if init else None)
    assert y.dtype == torch.float32 and rel_err(y, ref) < TOL
    for name, a, b in zip(Mamba3State._fields, fin, ref_fin):
        assert rel_err(a, b) < TOL, name
    if L > kernel_chunk(R):
        assert L % kernel_chunk(R)  # the grid above covers partial last chunks


@pytest.mark.parametrize("N,K,pairs", [(16, 4, None), (64, 24, 16)])
def test_state_scan_blocks(N, K, pairs, monkeypatch, kernel_launches):
    """Both state scans (forward, and the backward's reverse one) split the state over programs
    (`state_scan_block`): by default one head of P = 48 is one block of 64 rows (16 masked) in both; monkeypatched,
    blocks of 32 rows (the second partly masked) x 16 rotation pairs, here the first block of pairs rotated, the
    second partly (K = 24). Forward and final state vs the reference; every gradient, the initial state's included,
    vs fp64 autograd; both scans launched with the blocks."""
    from hybrid_mamba3.kernels import triton_backward, triton_scan

    assert triton_scan.state_scan_block(N, 2, 1, 1) == (64, N // 2)  # (the interpreter counts as 1 SM)
    want_blocks = {(64, 16)} if pairs is None else {(32, pairs)}  # N = 16 pads its 8 pairs to a 16-wide block
    if pairs is not None:
        monkeypatch.setattr(triton_scan, "state_scan_block", lambda N, *_: (32, pairs))
    blocks, scan_block = [], triton_scan.scan_block
    monkeypatch.setattr(triton_scan, "scan_block", lambda *a, **kw: blocks.append(scan_block(*a, **kw)) or blocks[-1])
    fwd_scans = kernel_launches(triton_scan, "_state_scan_kernel")
    bwd_scans = kernel_launches(triton_backward, "_state_scan_bwd_kernel")
    args, opts = make_op_inputs(B=1, L=45, R=2, H=1, N=N, P=48, K=K)
    st = _state(1, 2, K, H=1, P=48, N=N)
    ref, ref_fin = mamba3_reference(*args, **opts, initial_state=st, return_final_state=True)
    a32, o32 = _f32(args, opts)
    y, fin = mamba3_chunked_triton(*a32, **o32, initial_state=st.to(torch.float32), return_final_state=True)
    assert rel_err(y, ref) < TOL
    for name, a, b in zip(Mamba3State._fields, fin, ref_fin):
        assert rel_err(a, b) < TOL, name
    dy = torch.randn(ref.shape, dtype=torch.float64)
    _, want = _grads(mamba3_chunked, args, opts, dy, initial_state=st)
    _, got = _grads(mamba3_chunked_triton, a32, o32, dy, initial_state=st.to(torch.float32))
    _assert_grads(got, want)
    assert set(blocks) == want_blocks
    assert fwd_scans and bwd_scans  # the forward and the backward's recompute, and the reverse scan
    assert {(kw["BPB"], kw["BJ"]) for kw in fwd_scans + bwd_scans} == want_blocks


def test_mimo_z_without_z_has_no_gradient():
    """mimo_z only scales the gate, so without z it is unused: no gradient, as from the torch op (the out-projection
    norm's layers gate after the op; the op once returned the dO kernel's unwritten partial sums for it)."""
    args, opts = make_op_inputs(B=1, L=20, R=2, gate=False, **SIZES)
    opts["mimo_z"] = torch.randn(SIZES["H"], 2, SIZES["P"], dtype=torch.float64)
    dy = torch.randn(1, 20, SIZES["H"], SIZES["P"], dtype=torch.float64)
    _, want = _grads(mamba3_chunked, args, opts, dy)
    _, got = _grads(mamba3_chunked_triton, *_f32(args, opts), dy)
    assert want[-4] is None and got[-4] is None  # mimo_z's place in the input order
    _assert_grads(got, want)


def test_state_scan_block_policy():
    """Narrower state blocks only where a block per head leaves more than half the SMs without a program."""
    from hybrid_mamba3.kernels.triton_scan import state_scan_block

    assert state_scan_block(128, 4, 64, 132) == (32, 32)  # b1, 64 heads, H100
    assert state_scan_block(128, 1, 64, 132) == (64, 32)
    assert state_scan_block(128, 4, 128, 132) == (64, 64)  # b2
    assert state_scan_block(64, 1, 512, 132) == (64, 32)  # b8 (d_state 64: all 32 pairs)


def test_per_rank_output():
    args, opts = make_op_inputs(B=1, L=20, R=2, **SIZES)
    opts["mimo_o"] = None
    ref, _ = mamba3_reference(*args, **opts)
    y, _ = mamba3_chunked_triton(*_f32(args, opts)[0], **_f32(args, opts)[1])
    assert y.shape == (1, 20, 2, 4, 16) and rel_err(y, ref) < TOL


def test_varlen_equals_separate_calls():
    lens = [5, 23, 1, 18]
    args, opts = make_op_inputs(B=1, L=sum(lens), R=2, K=4, **SIZES)
    cu = torch.tensor([0] + lens).cumsum(0)
    st = _state(len(lens), 2, 4)
    ref, ref_fin = mamba3_reference(*args, **opts, cu_seqlens=cu, initial_state=st, return_final_state=True)
    a32, o32 = _f32(args, opts)
    y, fin = mamba3_chunked_triton(*a32, **o32, cu_seqlens=cu, initial_state=st.to(torch.float32),
                                   return_final_state=True)
    assert rel_err(y, ref) < TOL
    for a, b in zip(fin, ref_fin):
        assert rel_err(a, b) < TOL


GRAD_TOL = 2e-5  # fp32 kernels vs fp64 autograd: ~1e-6 measured (sums over a few hundred terms); 20x headroom
GRAD_NAMES = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "mimo_x", "mimo_z", "mimo_o", "D", "z")


def _assert_grads(got, ref, same=lambda g, r: g.dtype == torch.float32 and rel_err(g, r) < GRAD_TOL):
    """A gradient for exactly the inputs the reference has one for, each `same` as the reference's."""
    for name, g, r in zip(GRAD_NAMES, got, ref):
        assert (g is None) == (r is None), name
        if r is not None:
            assert same(g, r), name


def _grads(fn, args, opts, dy, **kw):
    a = [t.detach().clone().requires_grad_() for t in args]
    o = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in opts.items()}
    y, _ = fn(*a, **o, **kw)
    (y * dy.to(y.dtype)).sum().backward()
    return y, [t.grad for t in a] + [None if o[k] is None else o[k].grad for k in o]


@pytest.mark.parametrize("R,G,K,pw,L,mimo,gate,skip,init,per_rank,lens", [
    (4, 1, 4, False, 37, True, True, True, True, False, None),   # MIMO R4, all options, initial state
    (2, 2, 8, False, 70, True, False, True, False, False, None),  # ngroups 2, rope 1.0, several chunks, no gate
    (1, 2, 4, True, 41, False, True, False, True, True, None),    # SISO: per-rank output, no D
    (3, 1, 4, False, 40, True, True, True, True, True, None),     # R3 padded to 4, ranks kept (mimo_o None)
    (2, 1, 4, False, 47, True, True, True, True, False, [5, 23, 1, 18]),  # packed sequences
])
def test_gradients_match_fp64_autograd(R, G, K, pw, L, mimo, gate, skip, init, per_rank, lens):
    """The Triton backward (three kernels + torch for the per-token scalars) vs autograd through the fp64
    chunked op, for every input that has a gradient."""
    B = 1 if lens else 2
    args, opts = make_op_inputs(B=B, L=L, R=R, G=G, K=K, mimo=mimo, gate=gate, skip=skip, **SIZES)
    if per_rank:
        opts["mimo_o"] = None
    S = len(lens) if lens else B
    st = _state(S, R, K) if init else None
    cu = torch.tensor([0] + lens).cumsum(0) if lens else None
    y64 = mamba3_chunked(*args, **opts, rope_pairwise=pw, initial_state=st, cu_seqlens=cu)[0]
    dy = torch.randn(y64.shape, dtype=torch.float64)
    _, ref = _grads(mamba3_chunked, args, opts, dy, rope_pairwise=pw, initial_state=st, cu_seqlens=cu)
    a32, o32 = _f32(args, opts)
    kw = dict(rope_pairwise=pw, cu_seqlens=cu, initial_state=st.to(torch.float32) if init else None)
    y, got = _grads(mamba3_chunked_triton, a32, o32, dy, **kw)
    # inputs without gradients take the forward directly (no autograd.Function): the same output
    assert torch.equal(y.detach(), mamba3_chunked_triton(*a32, **o32, **kw)[0])
    _assert_grads(got, ref)


@pytest.mark.parametrize("R,G,pw", [(4, 1, False), (1, 2, True), (2, 1, False)], ids=["mimo_r4", "siso_g2", "mimo_r2"])
def test_packed_rows_match_fp64_autograd(R, G, pw):
    """seq_idx: sequences packed along 2 rows, the state reset inside the kernels wherever a sequence starts (mid
    chunk, on a chunk's last and first rows, a single token, several in a chunk): the forward and every gradient vs
    autograd through the fp64 chunked op (itself checked against the reference run sequence by sequence, test_ops),
    the rows kept as they are (no padded batch)."""
    c = kernel_chunk(R)
    L = 2 * c + 9
    first = [0] * 5 + [1] * (c - 6) + [2] + [3] * 3 + [4] * (c - 3) + [5] * 4 + [6] * 5  # starts 5, c-1, c, c+3, 2c..
    seq = torch.tensor([first, [i * 3 // L for i in range(L)]])
    args, opts = make_op_inputs(B=2, L=L, R=R, G=G, K=4, mimo=R > 1, **SIZES)
    args[3].mul_(0.05)  # slow decays: a state carried across a sequence start would not fade below the tolerance
    y64 = mamba3_chunked(*args, **opts, rope_pairwise=pw, seq_idx=seq)[0]
    dy = torch.randn(y64.shape, dtype=torch.float64)
    _, ref = _grads(mamba3_chunked, args, opts, dy, rope_pairwise=pw, seq_idx=seq)
    a32, o32 = _f32(args, opts)
    y, got = _grads(mamba3_chunked_triton, a32, o32, dy, rope_pairwise=pw, seq_idx=seq)
    assert rel_err(y, y64) < TOL
    _assert_grads(got, ref)


@pytest.mark.parametrize("R,L,pw,lens", [(4, 37, False, None), (1, 150, True, None), (4, 80, False, [40, 7, 33]),
                                        (4, 37, False, "seq")])
def test_state_checkpoints(R, L, pw, lens, monkeypatch, kept_checkpoints):
    """The backward recomputes the states from the forward's fp32 checkpoints (`CKPT_POSITIONS`), one program per
    segment: segments of one chunk, and of two (the last one partial), give every gradient bit for bit as the
    recompute from the start (0: no checkpoints) does, initial state included; the checkpoints kept are one per
    segment; packed sequences too (padded to 40 positions inside). Checkpoints are kept only where the heads are few
    for the GPU's SMs (the interpreter counts 1 SM: made 64 here, then back to 1, where none are kept)."""
    from hybrid_mamba3.kernels import triton_scan

    C = kernel_chunk(R)
    packed = lens == "seq"  # packed rows (seq_idx: a sequence starts mid chunk, another on a checkpoint), no state
    lens = None if packed else lens
    assert -(-(max(lens) if lens else L) // C) == 3
    B = 1 if lens else 2
    args, opts = make_op_inputs(B=B, L=L, R=R, G=1, K=4, mimo=R > 1, **SIZES)
    a32, o32 = _f32(args, opts)
    st = None if packed else _state(len(lens) if lens else B, R, 4).to(torch.float32)
    kw = dict(rope_pairwise=pw, initial_state=st, cu_seqlens=torch.tensor([0] + lens).cumsum(0) if lens else None)
    if packed:
        kw["seq_idx"] = torch.tensor([[0] * 5 + [1] * (C - 5) + [2] * (L - C), [0] * L])
    dy = torch.randn(mamba3_chunked_triton(*a32, **o32, **kw)[0].shape, dtype=torch.float64)
    grads = {}
    monkeypatch.setattr(triton_scan, "_sm_count", lambda device: 64)  # 2 x 4 heads: a GPU with SMs to spare
    for positions in (0, C, 2 * C):
        monkeypatch.setattr(triton_scan, "CKPT_POSITIONS", positions)
        grads[positions] = _grads(mamba3_chunked_triton, a32, o32, dy, **kw)[1]
    monkeypatch.setattr(triton_scan, "_sm_count", lambda device: 1)
    _grads(mamba3_chunked_triton, a32, o32, dy, **kw)
    assert kept_checkpoints == [None, 3, 2, None]
    for positions in (C, 2 * C):
        for i, (a, b) in enumerate(zip(grads[positions], grads[0])):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (positions, i)


def test_angle_table_over_many_blocks(monkeypatch, kernel_launches):
    """The rotation table and its gradient against theta = init + cumsum(tanh(angles) pi dt) in fp64, over 40 blocks
    of positions with the offsets scan made to take three steps (the last one partial) each way, so a wrong carry,
    order or reduction mod 2 pi fails. The raw angles are a bf16 strided view (read in place, tanh in the kernels),
    with values near 0 (tanh's small-argument branch), around its switch at 0.3 and large (saturated). theta reaches
    ~4000 rad: the table's cos/sin are checked to 8e-5 (fp32 sums within a block of 128, partial sums to ~150 rad
    here, ulp 1.5e-5: 4.8e-5; blocks summed in float64, pi applied in float64), in fp16 (the 16-bit kernels' table)
    to 3e-4 (that plus fp16's half ulp below 1, 2.4e-4); the final angle at each row's last position (L - 1, or
    lengths - 1 with a zero length taken as 0) to 5e-5 mod 2 pi (3e-5 here) whatever the table's dtype;
    d dt to 1e-5 relative, d angles (stored in bf16) to 8e-3; the kernels' tanh alone to 5e-7 relative."""
    from hybrid_mamba3.kernels import triton_angles as ta

    monkeypatch.setattr(ta, "OFFSET_TILE", 64)  # 16 blocks per step at 4 angles
    offset_scans = kernel_launches(ta, "_block_offsets_kernel")
    torch.manual_seed(0)
    B, H, K = 1, 2, 4
    L = ta.BLOCK * 40 - 5
    proj = (torch.randn(B, L, 3 * K) + 1.5).to(torch.bfloat16)  # mostly positive: theta runs to ~4000
    proj[0, :40, K:2 * K] = (torch.rand(40, K) * 0.6 - 0.3).to(torch.bfloat16)  # |a| < 0.3 and around it
    proj[0, 40:60, K:2 * K] = 12.0  # tanh saturated
    angles = proj[..., K:2 * K]
    dt = (torch.rand(B, L, H) + 0.05) * 0.6
    init = torch.rand(B, H, K) * 6
    tp = torch.tanh(angles.double()) * torch.pi
    theta = init.double()[:, None] + torch.cumsum(tp[:, :, None, :] * dt.double()[..., None], dim=1)
    cs, none = ta.angle_table(angles, dt, init)
    assert cs.dtype == torch.float32 and none is None
    assert theta.abs().max() > 3000
    assert (cs[..., 0, :] - theta.cos()).abs().max() < 8e-5 and (cs[..., 1, :] - theta.sin()).abs().max() < 8e-5

    def wrapped(a, b):  # distance mod 2 pi
        d = torch.remainder(a.double() - b + torch.pi, 2 * torch.pi) - torch.pi
        return d.abs().max()

    # three rows: full length, part of it, and empty (its "last" position is 0)
    angles3, dt3 = proj.repeat(3, 1, 1)[..., K:2 * K], dt.repeat(3, 1, 1)
    init3 = init.repeat(3, 1, 1)
    for lengths, last in [(None, [L - 1] * 3), (torch.tensor([L, 300, 0]), [L - 1, 299, 0])]:
        cs16, theta_last = ta.angle_table(angles3, dt3, init3, torch.float16, lengths, final=True)
        assert cs16.dtype == torch.float16 and theta_last.shape == (3, H, K)
        assert (cs16[..., 0, :].float() - theta.cos()).abs().max() < 3e-4
        assert (cs16[..., 1, :].float() - theta.sin()).abs().max() < 3e-4
        assert wrapped(theta_last, theta[0, last].double()) < 5e-5

    dtheta = torch.randn(B, L, H, K)
    da, ddt = ta.angle_table_backward(dtheta, angles, dt)
    assert da.dtype == angles.dtype and da.shape == angles.shape
    leaves = [t.double().requires_grad_() for t in (angles, dt)]
    ref = torch.autograd.grad((torch.cumsum(torch.tanh(leaves[0])[:, :, None, :] * torch.pi * leaves[1][..., None],
                                            dim=1) * dtheta.double()).sum(), leaves)
    assert rel_err(da, ref[0]) < 8e-3 and rel_err(ddt, ref[1]) < 1e-5

    # tanh itself, through d dt at one position and one angle: d dt_s = sum_t>=s d theta_t tanh(a_s) pi
    x = torch.cat([torch.linspace(-0.35, 0.35, 57), torch.tensor([1e-6, -3e-4, 0.2999, 0.3001, 5.0, -20.0])])
    n = x.numel()
    one = torch.zeros(1, n, 1)
    dth = torch.zeros(1, n, 1, 1)
    dth[0, :, 0, 0] = 1.0
    _, d_dt = ta.angle_table_backward(dth, x.view(1, n, 1), one + 1)
    want = torch.tanh(x.double()) * torch.pi * torch.arange(n, 0, -1, dtype=torch.float64)
    assert ((d_dt.view(n).double() - want).abs() / want.abs()).max() < 5e-7
    assert {kw["BB"] for kw in offset_scans if kw["BK"] == K} == {16}  # OFFSET_TILE reached the offsets scans


@pytest.mark.parametrize("lens", [None, (29, 11)])
def test_token_scalars_kernels_match_torch(lens):
    """The per-token scalar kernels against the torch formula in fp64 and its autograd: a chunk not filled (L 29,
    C 8), heads not a power of two (5, masked lanes), trap a bf16 view of a wider projection (read in place),
    padded varlen rows, every gradient part fed separately (a dropped part or a wrong shift fails). fp32 sums of
    at most C terms against fp64: 1e-5 relative leaves ~10x headroom."""
    from hybrid_mamba3.kernels.triton_scalars import token_scalars, token_scalars_backward, token_scalars_reference

    torch.manual_seed(0)
    B, L, H, C = 2, 29, 5, 8
    nc = -(-L // C)
    adt = -torch.rand(B, L, H) * 0.5
    dt = torch.rand(B, L, H) + 0.05
    trap = torch.randn(B, L, 3 * H, dtype=torch.bfloat16)[..., H:2 * H]
    lengths = None if lens is None else torch.tensor(lens)
    gam, w, acs, atot = token_scalars(adt, dt, trap, lengths, C)
    leaves = [t.double().requires_grad_() for t in (adt, dt, trap)]
    ref = token_scalars_reference(*leaves, lengths, C)
    for got, want in zip((gam, w, acs, atot), ref):
        assert got.dtype == torch.float32 and got.shape == want.shape and rel_err(got, want) < 1e-5

    g = lambda *shape: torch.randn(*shape)  # noqa: E731
    dgam, dw, dacs, datot, ddt_angles, dn0 = g(B, L, H), (g(B, L, H), g(B, L, H)), (g(B, L, H), g(B, L, H)), \
        (g(B * H, nc), g(B * H, nc)), g(B, L, H), g(B, H)
    d_adt, d_dt, d_trap = token_scalars_backward(dt, trap, lengths, C, dgam, dw, dacs, datot, ddt_angles, dn0,
                                                 (torch.float32, torch.float32, torch.bfloat16))
    nxt0 = (1 - torch.sigmoid(leaves[2][:, 0])) * leaves[1][:, 0]
    loss = sum((t * d.double()).sum() for t, d in zip(ref, (dgam, dw[0] + dw[1], dacs[0] + dacs[1],
                                                            (datot[0] + datot[1]).view(B, H, nc))))
    loss = loss + (leaves[1] * ddt_angles.double()).sum() + (nxt0 * dn0.double()).sum()
    want = torch.autograd.grad(loss, leaves)
    assert d_trap.dtype == torch.bfloat16
    for got, w_, tol in zip((d_adt, d_dt, d_trap), want, (1e-5, 1e-5, 8e-3)):  # d trap is stored in bf16
        assert rel_err(got, w_) < tol


@pytest.mark.parametrize("act", ["softplus", "heavy_tail"])
def test_token_activations_kernels_match_torch(act):
    """dt and adt from the raw in_proj columns (bf16 views of a wider projection, read in place) against the torch
    version in fp64, forward and every gradient: values on both sides of 0, past softplus's threshold (20) and where
    the A floor clamps (its gradient must be cut there), 5 heads (masked lanes), rows not a block multiple.
    fp32 against fp64: 1e-5 relative; the bf16 input gradients are rounded to bf16: 8e-3."""
    from hybrid_mamba3.kernels.common import token_activations
    from hybrid_mamba3.kernels.triton_scalars import token_activations_triton

    torch.manual_seed(0)
    B, L, H, floor = 3, 37, 5, 0.05
    proj = (torch.randn(B, L, 4 * H) * 3).to(torch.bfloat16)
    proj[0, :3, :H] = 25.0  # dd_dt past the threshold
    proj[1, :4, 2 * H:3 * H] = -40.0  # act(dd_A) below the floor: clamped, no gradient
    dd_dt, dd_A = proj[..., :H], proj[..., 2 * H:3 * H]
    dt_bias = torch.randn(H)
    dt, adt = token_activations_triton(dd_dt, dd_A, dt_bias, act, floor)
    leaves = [t.detach().double().requires_grad_() for t in (dd_dt, dd_A, dt_bias)]
    want = token_activations(*leaves, act, floor)
    for got, ref in zip((dt, adt), want):
        assert got.dtype == torch.float32 and rel_err(got, ref) < 1e-5
    g_dt, g_adt = torch.randn(B, L, H), torch.randn(B, L, H)
    leaves32 = [t.detach().requires_grad_() for t in (dd_dt, dd_A, dt_bias)]
    dt, adt = token_activations_triton(*leaves32, act, floor)
    torch.autograd.backward((dt, adt), (g_dt, g_adt))
    ref = torch.autograd.grad(want, leaves, (g_dt.double(), g_adt.double()))
    assert (ref[1][1, :4] == 0).all() and (leaves32[1].grad[1, :4] == 0).all()
    for leaf, r, tol in zip(leaves32, ref, (8e-3, 8e-3, 1e-5)):
        assert leaf.grad.dtype == leaf.dtype and rel_err(leaf.grad, r) < tol


@pytest.mark.parametrize("R,G,K,pw,mimo,P", [(4, 1, 4, False, True, 16), (1, 2, 8, True, False, 48)])
def test_step_matches_reference_step(R, G, K, pw, mimo, P):
    args, opts = make_op_inputs(B=3, L=1, R=R, G=G, K=K, mimo=mimo, **dict(SIZES, P=P))  # P=48: 3 headdim blocks
    args = [a if i in (6, 7) else a[:, 0] for i, a in enumerate(args)]  # drop L (biases have none)
    opts["z"] = opts["z"][:, 0]
    st = _state(3, R, K, P=P)
    ref, ref_st = mamba3_step(*args, st, **opts, rope_pairwise=pw)
    a32, o32 = _f32(args, opts)
    st32 = st.to(torch.float32)
    y, new = mamba3_step_triton(*a32, st32, **o32, rope_pairwise=pw)
    assert rel_err(y, ref) < TOL
    for name, a, b in zip(Mamba3State._fields, new, ref_st):
        assert rel_err(a, b) < TOL, name
    assert new.ssm.data_ptr() == st32.ssm.data_ptr()  # the (P, N) state is updated in place


@pytest.mark.parametrize("mimo,act,G", [(True, "softplus", 1), (True, "heavy_tail", 2), (False, "softplus", 1)])
def test_layer_step_from_raw_projection(mimo, act, G):
    """The layer's decode step as in_proj + one kernel (norms, softplus, A activation and its floor done in the
    kernel) == the layer's torch step (norms and activations in torch, then `mamba3_step`)."""
    from hybrid_mamba3 import Mamba3

    torch.manual_seed(3)
    layer = Mamba3(d_model=32, d_state=16, headdim=16, ngroups=G, is_mimo=mimo, mimo_rank=2, a_activation=act,
                   backend="torch")
    layer.A_floor = 0.4  # large enough that the floor clamps some heads
    with torch.no_grad():  # every parameter away from its init, so each one's role is checked
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
        layer.dt_bias[0] = 25.0  # head 0 beyond softplus' linear threshold (20)
    R, K = layer.mimo_rank, layer.num_rope_angles
    st = _state(3, R, K).to(torch.float32)
    u = torch.randn(3, 32)
    with torch.no_grad():
        ref, ref_st = layer.step(u, st)
        y, new = layer._step_triton(u, Mamba3State(*(t.clone() for t in st)))
    # both sides fp32 here (the layer is fp32), and head 0's angle advance is ~dt pi = 80 rad, whose fp32 ulp
    # (8e-6) shows in the rotated k: 2e-5 (measured 5e-6)
    assert rel_err(y, ref) < 2e-5
    for name, a, b in zip(Mamba3State._fields, new, ref_st):
        assert rel_err(a, b) < 2e-5, name


@pytest.mark.parametrize("L", [19, 1])
def test_strided_v_and_z_are_read_in_place(L):
    """v and z as the layer passes them (views of one wider projection, positions `width` apart) are read in place
    (`rows_of` returns them, no copy) and give the same output and gradients as contiguous copies."""
    from hybrid_mamba3.kernels.common import rows_of

    args, opts = make_op_inputs(B=2, L=L, R=2, **SIZES)
    a32, o32 = _f32(args, opts)
    H, P = SIZES["H"], SIZES["P"]
    wide = torch.randn(2, L, 2 * H * P + 5)  # z | v | something else, as in the in_proj output
    wide[..., H * P:2 * H * P] = a32[2].flatten(-2)
    wide[..., :H * P] = o32["z"].flatten(-2)
    z_view, v_view = wide[..., :H * P].unflatten(-1, (H, P)), wide[..., H * P:2 * H * P].unflatten(-1, (H, P))
    assert rows_of(v_view) is v_view and rows_of(z_view) is z_view
    assert rows_of(v_view.transpose(2, 3)) is not None and not rows_of(v_view.transpose(2, 3)).data_ptr() == \
        v_view.data_ptr()  # a layout the kernels cannot index is copied
    dy = torch.randn(2, L, H, P, dtype=torch.float64)
    y_ref, g_ref = _grads(mamba3_chunked_triton, a32, o32, dy)
    wide.requires_grad_()
    z_view, v_view = wide[..., :H * P].unflatten(-1, (H, P)), wide[..., H * P:2 * H * P].unflatten(-1, (H, P))
    args_s = [t.detach().clone().requires_grad_() for t in a32]
    opts_s = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in o32.items()}
    y = mamba3_chunked_triton(*args_s[:2], v_view, *args_s[3:], **{**opts_s, "z": z_view})[0]
    (y * dy.float()).sum().backward()
    assert torch.equal(y, y_ref)
    got = [t.grad for t in args_s] + [None if t is None else t.grad for t in opts_s.values()]
    got[2] = wide.grad[..., H * P:2 * H * P].unflatten(-1, (H, P))
    got[GRAD_NAMES.index("z")] = wide.grad[..., :H * P].unflatten(-1, (H, P))
    _assert_grads(got, g_ref, torch.equal)


@pytest.mark.parametrize("mimo", [True, False])
def test_layer_scan_on_triton_backend(mimo, monkeypatch):
    """The layer's forward and backward with the Triton op (what it runs on CUDA) == with the torch op: the plumbing
    around the op (SISO's per-rank output, squeezed in `_finish`; MIMO's contraction in the kernel) and every
    parameter's gradient."""
    from hybrid_mamba3 import Mamba3

    torch.manual_seed(5)
    layer = Mamba3(d_model=32, d_state=16, headdim=16, is_mimo=mimo, mimo_rank=2, backend="torch")
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    u = torch.randn(2, 21, 32)
    dy = torch.randn(2, 21, 32)

    def run(backend):
        monkeypatch.setattr(layer, "_select_backend", lambda device: backend)
        layer.zero_grad()
        y = layer(u)
        (y * dy).sum().backward()
        assert layer.last_backend == backend
        return y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    y_ref, g_ref = run("torch")
    y, g = run("triton")
    assert rel_err(y, y_ref) < TOL
    for name, grad in g.items():
        assert rel_err(grad, g_ref[name]) < 1e-5, name  # both fp32, summed in other orders: <= 6e-7 measured


def test_steps_continue_a_triton_scan():
    """Prefill with the chunked kernel, decode with the step kernel == one reference pass."""
    args, opts = make_op_inputs(B=2, L=24, R=2, K=4, **SIZES)
    ref, _ = mamba3_reference(*args, **opts)
    a32, o32 = _f32(args, opts)
    cut = lambda t, s: t if t is None or t.dim() < 3 or t.shape[0] != 2 else t[:, s]  # noqa: E731
    pre = slice(0, 20)
    y0, st = mamba3_chunked_triton(*[cut(a, pre) if i not in (6, 7) else a for i, a in enumerate(a32)],
                                   **{k: cut(v, pre) if k == "z" else v for k, v in o32.items()},
                                   return_final_state=True)
    ys = [y0]
    for t in range(20, 24):
        y, st = mamba3_step_triton(*[a if i in (6, 7) else a[:, t] for i, a in enumerate(a32)], st,
                                   **{k: v[:, t] if k == "z" else v for k, v in o32.items()})
        ys.append(y[:, None])
    assert rel_err(torch.cat(ys, 1), ref) < TOL


def test_bad_inputs():
    args, opts = make_op_inputs(B=1, L=4, R=1, **SIZES)
    with pytest.raises(TypeError, match="float64"):
        mamba3_chunked_triton(*args, **opts)
    a32, o32 = _f32(args, opts)
    with pytest.raises(ValueError, match="q_bias"):
        mamba3_chunked_triton(*a32[:6], a32[6][:, :, :8], *a32[7:], **o32)


def test_grad_precision_script():
    """evals/kernel_dev/grad_precision.py (a device eval) runs end to end here, in fp16: the interpreter's bf16 is not
    numpy's and gives garbage, fp16 it emulates. fp16 operands round at ~5e-4, so every error is small but not zero."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("grad_precision", Path(__file__).parents[1] / "evals" /
                                                  "kernel_dev" / "grad_precision.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    err = mod.errors(1, 40, 4, 2, 16, 16, 4, "cpu", torch.float16)
    assert set(err) == {"y", *mod.NAMES}
    assert all(0 < e < 2e-2 for e in err.values()), err


@pytest.mark.parametrize("cfg", [
    dict(is_mimo=True, mimo_rank=4),
    dict(is_mimo=True, mimo_rank=2, rope_fraction=1.0, ngroups=2),
    dict(is_mimo=False),
    dict(is_mimo=True, mimo_rank=2, is_outproj_norm=True),
    dict(is_mimo=False, is_outproj_norm=True, rope_fraction=1.0, a_activation="heavy_tail"),
], ids=["mimo_r4", "mimo_r2_g2_rope1", "siso", "mimo_outnorm", "siso_outnorm_heavy"])
def test_layer_triton_path_vs_torch_path(cfg, monkeypatch, in_place_record):
    """The layer's CUDA path (in_proj, the fused B/C norm and token activation kernels, v and z read in place from
    the projection, SISO's q/k in the kernels' pair layout, the Triton op, the fused decode step) run here in the
    interpreter, in fp32, against the same layer's torch path: output, input gradient and every parameter's
    gradient over 37 tokens, and 3 decode steps, to 1e-5 (measured ~1e-6: summation order). The Triton path's
    kernels write their in_proj pieces' gradients in place (`shared_grad`): all eight, but z with the out-projection
    norm (its gate is torch's)."""
    from hybrid_mamba3 import Mamba3

    torch.manual_seed(0)
    ref = Mamba3(d_model=32, d_state=16, headdim=16, layer_idx=0, backend="torch", **cfg)
    with torch.no_grad():  # every parameter off its constant init
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tri = Mamba3(d_model=32, d_state=16, headdim=16, layer_idx=0, backend="triton", **cfg)
    tri.load_state_dict(ref.state_dict())
    for name in ("_select_backend", "_select_backend_default"):  # CPU tensors, Triton kernels
        monkeypatch.setattr(tri, name, lambda device: "triton")
    u, dy = torch.randn(2, 37, 32), torch.randn(2, 37, 32)
    got = {}
    for layer in (ref, tri):
        x = u.clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
        assert layer.last_backend == ("torch" if layer is ref else "triton")
        got[layer] = dict(y=y.detach(), u=x.grad, **{n: p.grad for n, p in layer.named_parameters()})
        st = layer.allocate_state(2)
        with torch.no_grad():
            for t in range(3):
                got[layer][f"step{t}"], st = layer.step(u[:, t], st)
        assert layer.last_backend == ("torch" if layer is ref else "triton")
    # pieces z, x, B, C, dd_dt, dd_A, trap, angles
    assert in_place_record == [set(range(1 if cfg.get("is_outproj_norm") else 0, 8))]
    assert got[ref].keys() == got[tri].keys()
    for name, want in got[ref].items():
        assert want is not None and rel_err(got[tri][name], want) < 1e-5, name


@pytest.mark.parametrize("cfg", [dict(is_mimo=True, mimo_rank=4), dict(is_mimo=False)], ids=["mimo_r4", "siso"])
def test_layer_with_row_aligned_in_proj(cfg, monkeypatch, in_place_record):
    """`RowAlignedLinear`'s padded GEMM (a GPU's, for large inputs; forced here on the CPU at any size) under the
    layer's Triton path: the in_proj output's rows lie a multiple of 8 elements apart, the kernels still write its
    pieces' gradients in place, and the output and every gradient equal the plain projection's (1e-5, as above)."""
    import copy

    import hybrid_mamba3.mamba3 as mamba3_module
    from hybrid_mamba3 import Mamba3

    torch.manual_seed(0)
    plain = Mamba3(d_model=24, d_state=16, headdim=16, layer_idx=0, backend="triton", **cfg)  # 3 heads: odd width
    width = plain.in_proj.out_features
    assert width % 8 and isinstance(plain.in_proj, torch.nn.Linear)
    aligned = copy.deepcopy(plain)
    strides = []
    aligned.in_proj.register_forward_hook(lambda module, args, out: strides.append(out.stride(-2)))
    u, dy = torch.randn(2, 37, 24), torch.randn(2, 37, 24)
    got = []
    for layer in (plain, aligned):
        for name in ("_select_backend", "_select_backend_default"):  # CPU tensors, Triton kernels
            monkeypatch.setattr(layer, name, lambda device: "triton")
        if layer is aligned:
            monkeypatch.setattr(mamba3_module, "ROW_ALIGN_DEVICES", ("cpu",))
            monkeypatch.setattr(mamba3_module, "ROW_ALIGN_MIN_ROWS", 1)
        x = u.clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
        got.append(dict(y=y.detach(), u=x.grad, **{n: p.grad for n, p in layer.named_parameters()}))
    assert strides == [width + (-width % 8)]
    assert in_place_record == [set(range(8))] * 2
    for name, want in got[0].items():
        assert rel_err(got[1][name], want) < 1e-5, name


@pytest.mark.parametrize("reentrant", [False, True])
def test_layer_triton_path_under_gradient_checkpointing(reentrant, monkeypatch, in_place_record):
    """transformers' gradient checkpointing (torch.utils.checkpoint, either mode) around the layer's Triton path: the
    same gradients as without it, bit for bit, and the in_proj pieces' gradients still land in the shared buffer (the
    non-reentrant mode recomputes only the saved tensors, and the graph's slots stay those of the first forward)."""
    from torch.utils.checkpoint import checkpoint

    from hybrid_mamba3 import Mamba3

    torch.manual_seed(0)
    layer = Mamba3(d_model=32, d_state=16, headdim=16, layer_idx=0, backend="triton", is_mimo=True, mimo_rank=2)
    for name in ("_select_backend", "_select_backend_default"):
        monkeypatch.setattr(layer, name, lambda device: "triton")
    u, dy = torch.randn(2, 21, 32), torch.randn(2, 21, 32)
    grads = []
    for wrapped in (False, True):
        layer.zero_grad()
        x = u.clone().requires_grad_()
        y = checkpoint(layer, x, use_reentrant=reentrant) if wrapped else layer(x)
        y.backward(dy)
        grads.append([x.grad, *(p.grad for p in layer.parameters())])
    assert in_place_record == [set(range(8))] * 2
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _piecewise_layer(monkeypatch, seed: int):
    """A small MIMO layer with perturbed parameters on the torch op, whose piece logic runs as it does for Triton."""
    from hybrid_mamba3 import Mamba3

    torch.manual_seed(seed)
    layer = Mamba3(d_model=32, d_state=16, headdim=16, is_mimo=True, mimo_rank=2, backend="torch", layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    monkeypatch.setattr(layer, "_select_backend", lambda device: "triton")
    return layer


def test_layer_runs_in_pieces_past_the_kernels_int32_offsets(monkeypatch):
    """Inputs past the Triton kernels' 32-bit offsets (`common.INT32_LIMIT`, lowered here to a few thousand elements)
    run in pieces (`Mamba3.max_rows_per_call`), with the results of one call: slices of the batch (training: output
    and every gradient; with a final state), stretches of a row too long for one call at inference (a chunked
    prefill, each stretch from the state the one before left; left padding included), and decode steps. Training on
    a row too long for one call, and the op called directly past the limit, are refused with a clear error."""
    from hybrid_mamba3 import mamba3 as layer_module

    layer = _piecewise_layer(monkeypatch, seed=6)
    u, dy = torch.randn(5, 70, 32), torch.randn(5, 70, 32)

    def run(limit, **kw):
        monkeypatch.setattr(layer_module, "INT32_LIMIT", limit)
        layer.zero_grad()
        x = u.clone().requires_grad_()
        y, fin = layer(x, return_final_state=True, **kw)
        (y * dy).sum().backward()
        return y.detach(), fin, x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    whole = run(2**31)
    limit = 2 * layer.row_elements(70) + 1
    assert layer_module.Mamba3.max_rows_per_call(layer, 70) > 5 and (limit - 1) // layer.row_elements(70) == 2
    pieces = run(limit)  # rows 2 + 2 + 1
    assert rel_err(pieces[0], whole[0]) < TOL and rel_err(pieces[2], whole[2]) < TOL
    for a, b in zip(pieces[1], whole[1]):
        assert rel_err(a, b) < TOL
    for name, g in whole[3].items():
        assert rel_err(pieces[3][name], g) < 1e-5, name

    mask = torch.ones(5, 70, dtype=torch.long)
    mask[1, :40] = 0  # left padding past the first stretch
    with torch.no_grad():
        monkeypatch.setattr(layer_module, "INT32_LIMIT", 2**31)
        y_ref, fin_ref = layer(u, attention_mask=mask, return_final_state=True)
        monkeypatch.setattr(layer_module, "INT32_LIMIT", layer.row_elements(64) + 1)  # rows of 64 positions at most
        assert layer.max_length_per_call() == 64 and layer.max_rows_per_call(70) == 0
        y, fin = layer(u, attention_mask=mask, return_final_state=True)  # stretches of 64 and 6 positions
        assert rel_err(y, y_ref) < TOL
        for a, b in zip(fin, fin_ref):
            assert rel_err(a, b) < TOL
        steps = layer(u[:, :1], initial_state=fin_ref, return_final_state=True)  # decode: 1 row per call here
        monkeypatch.setattr(layer_module, "INT32_LIMIT", 2**31)
        steps_ref = layer(u[:, :1], initial_state=fin_ref, return_final_state=True)
        assert torch.equal(steps[0], steps_ref[0])
    monkeypatch.setattr(layer_module, "INT32_LIMIT", layer.row_elements(64) + 1)
    with pytest.raises(ValueError, match="train on shorter rows"):
        layer(u)
    with pytest.raises(ValueError, match="pack the sequences into more, shorter rows"), torch.no_grad():
        layer(u[:1], seq_idx=torch.zeros(1, 70, dtype=torch.long))


def test_inference_runs_in_pieces_that_bound_the_layers_memory(monkeypatch):
    """At inference a call whose widest per-row tensor passes `inference_elements_per_call` runs in pieces: slices of
    the batch, or stretches of a row too long alone (state carried on, left padding included), each piece within the
    bound; outputs and final states as one call gives. Training, packed sequences (seq_idx) and None keep one call."""
    layer = _piecewise_layer(monkeypatch, seed=7)
    calls = []
    scan = layer._scan
    monkeypatch.setattr(layer, "_scan", lambda u, *a: calls.append(tuple(u.shape[:2])) or scan(u, *a))
    u = torch.randn(5, 70, 32)
    mask = torch.ones(5, 70, dtype=torch.long)
    mask[1, :40] = 0  # left padding past the first stretch

    def run(cap, grad=False, **kw):
        layer.inference_elements_per_call = cap
        calls.clear()
        with torch.set_grad_enabled(grad):
            y, fin = layer(u, return_final_state=True, **kw)
        return y.detach(), [t.detach() for t in fin], list(calls)

    y_ref, fin_ref, one = run(None, attention_mask=mask)
    assert one == [(5, 70)]
    for cap, pieces in ((2 * layer.row_elements(70), [(2, 70), (2, 70), (1, 70)]),
                        (layer.row_elements(64), [(1, 64), (1, 6)] * 5)):
        y, fin, got = run(cap, attention_mask=mask)
        assert got == pieces
        assert all(b * layer.row_elements(n) <= cap for b, n in got)
        assert rel_err(y, y_ref) < TOL
        for a, b in zip(fin, fin_ref):
            assert rel_err(a, b) < TOL
    cap = layer.row_elements(64)
    assert run(cap, grad=True)[2] == [(5, 70)]  # training: one call (the 32-bit limit alone splits it)
    calls.clear()
    with torch.no_grad():
        layer(u, seq_idx=torch.zeros(5, 70, dtype=torch.long))
    assert calls == [(5, 70)]


def test_op_refuses_inputs_past_int32_offsets():
    """The Triton ops check the size of what they would index (inputs and their own buffers) before launching: the
    scan and the decode step at the Llama-3.2-1B conversion's layer shape (33 x 8192: B/C alone 2^31 + 2^26 elements;
    2^14 + 1 decode states), and the token activations on 2^26 positions, on meta tensors."""
    B, L, R, G, N, H, P, K = 33, 8192, 4, 32, 64, 32, 64, 16
    meta = dict(device="meta", dtype=torch.bfloat16)
    args = (torch.empty(B, L, R, G, N, **meta), torch.empty(B, L, R, G, N, **meta), torch.empty(B, L, H, P, **meta),
            torch.empty(B, L, H, **meta), torch.empty(B, L, H, **meta), torch.empty(B, L, H, **meta),
            torch.empty(H, R, N, **meta), torch.empty(H, R, N, **meta), torch.empty(B, L, K, **meta))
    with pytest.raises(ValueError, match="32-bit offsets; split the batch"):
        mamba3_chunked_triton(*args)
    from hybrid_mamba3.kernels.triton_scalars import token_activations_triton

    with pytest.raises(ValueError, match="token_activations_triton: .* 32-bit offsets"):
        token_activations_triton(*(torch.empty(1, 2**26, H, **meta) for _ in range(2)), torch.zeros(H), "softplus",
                                 1e-4)  # (B, L, H) of 2^31 elements
    S = 2**14 + 1  # decode states of 32 x 64 x 64 elements a row: 2^31 + 2^17 in all
    one = [torch.empty(S, *a.shape[2:], **meta) if a.dim() == 5 or a.shape[:2] == (B, L) else a for a in args]
    state = Mamba3State(*(torch.empty(S, *shape, device="meta") for shape in [(H, K), (H, P, N), (R, H, N), (H, P)]))
    with pytest.raises(ValueError, match="mamba3_step_triton: .* 32-bit offsets"):
        mamba3_step_triton(*one, state)
