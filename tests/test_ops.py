"""Chunked torch op and decode step against the float64 sequential reference."""

import pytest
import torch
from conftest import make_op_inputs, rel_err

from hybrid_mamba3.kernels import Mamba3State, mamba3_chunked, mamba3_reference, mamba3_step

# fp32 chunked vs fp64 truth: the chunked form reassociates sums over <= 64 terms per chunk in fp32
# (unit roundoff 6e-8); 1e-5 leaves two orders of magnitude of headroom and still catches any wrong term.
FP32_TOL = 1e-5
# fp64 chunked vs fp64 sequential: same function, different summation order.
FP64_TOL = 1e-12

GRID = [
    # R, G, N, K, pairwise, L, chunk
    (1, 1, 16, 4, True, 37, 8),     # SISO, rope_fraction 0.5 (K = N/4), adjacent pairs
    (1, 2, 16, 8, True, 50, 16),    # SISO, rope_fraction 1.0, ngroups 2
    (2, 1, 16, 4, False, 45, 8),    # MIMO R2, halves layout
    (4, 1, 16, 4, False, 37, 4),    # MIMO R4, rope_fraction 0.5
    (4, 2, 16, 8, False, 29, 16),   # MIMO R4, rope_fraction 1.0, ngroups 2
    (4, 4, 16, 4, False, 17, 16),   # one group per head, one partial chunk
]


def _to(args, opts, dtype):
    cast = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in opts.items()}


@pytest.mark.parametrize("R,G,N,K,pw,L,C", GRID)
def test_chunked_matches_reference(R, G, N, K, pw, L, C):
    args, opts = make_op_inputs(L=L, R=R, G=G, N=N, K=K)
    ref, ref_state = mamba3_reference(*args, **opts, rope_pairwise=pw, return_final_state=True)
    y64, s64 = mamba3_chunked(*args, **opts, rope_pairwise=pw, chunk_size=C, return_final_state=True)
    assert rel_err(y64, ref) < FP64_TOL
    for a, b in zip(s64, ref_state):
        assert rel_err(a, b) < FP64_TOL
    a32, o32 = _to(args, opts, torch.float32)
    y32, s32 = mamba3_chunked(*a32, **o32, rope_pairwise=pw, chunk_size=C, return_final_state=True)
    assert y32.dtype == torch.float32 and not torch.isnan(y32).any()
    assert rel_err(y32, ref) < FP32_TOL
    for a, b in zip(s32, ref_state):
        assert rel_err(a, b) < FP32_TOL


@pytest.mark.parametrize("mimo,gate,skip", [(True, False, True), (True, True, False), (False, True, True)])
def test_optional_terms_and_per_rank_output(mimo, gate, skip):
    args, opts = make_op_inputs(L=21, R=2 if mimo else 1, mimo=mimo, gate=gate, skip=skip)
    ref, _ = mamba3_reference(*args, **opts)
    y, _ = mamba3_chunked(*args, **opts, chunk_size=8)
    assert rel_err(y, ref) < FP64_TOL
    opts["mimo_o"] = None  # ranks kept: (B, L, R, H, P)
    ref, _ = mamba3_reference(*args, **opts)
    y, _ = mamba3_chunked(*args, **opts, chunk_size=8)
    assert y.shape == (2, 21, 2 if mimo else 1, 4, 8) and rel_err(y, ref) < FP64_TOL


@pytest.mark.parametrize("pw,R", [(True, 1), (False, 4)])
def test_initial_state_continues_a_sequence(pw, R):
    args, opts = make_op_inputs(L=40, R=R)
    whole, whole_state = mamba3_reference(*args, **opts, rope_pairwise=pw, return_final_state=True)
    cut = 23
    first = tuple(a[:, :cut] if a.dim() > 2 and a.shape[1] == 40 else a for a in args)
    rest = tuple(a[:, cut:] if a.dim() > 2 and a.shape[1] == 40 else a for a in args)
    o1 = {**opts, "z": opts["z"][:, :cut]}
    o2 = {**opts, "z": opts["z"][:, cut:]}
    y1, s1 = mamba3_chunked(*first, **o1, rope_pairwise=pw, chunk_size=8, return_final_state=True)
    y2, s2 = mamba3_chunked(*rest, **o2, rope_pairwise=pw, chunk_size=8, initial_state=s1, return_final_state=True)
    assert rel_err(torch.cat([y1, y2], 1), whole) < FP64_TOL
    for a, b in zip(s2, whole_state):
        assert rel_err(a, b) < FP64_TOL


def test_varlen_resets_state_at_boundaries():
    lengths = [5, 17, 1, 30]
    args, opts = make_op_inputs(B=1, L=sum(lengths), R=2)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    inits = Mamba3State(*(torch.randn(len(lengths), *s, dtype=torch.float64)
                          for s in [(4, 4), (4, 8, 16), (2, 4, 16), (4, 8)]))
    y, fin = mamba3_chunked(*args, **opts, chunk_size=8, cu_seqlens=cu, initial_state=inits, return_final_state=True)
    yr, finr = mamba3_reference(*args, **opts, cu_seqlens=cu, initial_state=inits, return_final_state=True)
    assert rel_err(y, yr) < FP64_TOL
    for a, b in zip(fin, finr):
        assert rel_err(a, b) < FP64_TOL
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):  # separate calls agree
        sl = lambda t: t[:, s:e] if t.dim() > 2 and t.shape[1] == cu[-1] else t  # noqa: E731
        yi, fi = mamba3_chunked(*map(sl, args), **{**opts, "z": opts["z"][:, s:e]}, chunk_size=8,
                                initial_state=inits.select(slice(i, i + 1)), return_final_state=True)
        assert rel_err(y[:, s:e], yi) < FP64_TOL
        for a, b in zip(fi, fin.select(slice(i, i + 1))):
            assert rel_err(a, b) < FP64_TOL


# packed rows: (seq_idx, chunk) with boundaries mid-chunk, on a chunk's first and last position, single-token
# sequences, several in one chunk, and runs of a label that repeats in another row
PACKED = [
    ([[0] * 7 + [1] * 20 + [2] * 1 + [3] * 17, [5] * 30 + [9] * 15], 8),
    ([[0] * 8 + [1] * 8 + [2] * 3 + [3] + [4] * 25, [0] * 45], 8),
    ([[i // 3 for i in range(45)], [0] * 44 + [1]], 4),
]


@pytest.mark.parametrize("seq,C", PACKED, ids=["mid-chunk", "chunk-edges", "short"])
@pytest.mark.parametrize("R,pw", [(1, True), (4, False)])
def test_packed_rows_equal_sequences_one_by_one(seq, C, R, pw):
    """seq_idx: a zero state at every sequence's start, inside the chunked scan (rows keep their length: no padded
    batch); outputs and every gradient against the sequential reference run on each sequence alone."""
    args, opts = make_op_inputs(B=2, L=45, R=R, mimo=R > 1, requires_grad=True)
    seq = torch.tensor(seq)
    leaves = [t for t in (*args, *opts.values()) if t is not None]
    outs, grads = [], []
    for fn in (mamba3_reference, mamba3_chunked):
        y, _ = fn(*args, **opts, rope_pairwise=pw, chunk_size=C, seq_idx=seq)
        w = w if outs else torch.randn_like(y)
        outs.append(y)
        grads.append(torch.autograd.grad((y * w).sum(), leaves))
    assert rel_err(outs[1], outs[0]) < FP64_TOL
    for g_ref, g in zip(*grads):
        assert rel_err(g, g_ref) < 1e-10
    # the reference itself: the first row's second sequence alone
    row = lambda t: t[:1, 7:27] if t.dim() > 2 and t.shape[1] == 45 else t  # noqa: E731
    alone, _ = mamba3_reference(*map(row, args), **{**opts, "z": row(opts["z"])}, rope_pairwise=pw)
    if seq[0, 7] != seq[0, 6] and seq[0, 26] != seq[0, 27] and bool((seq[0, 7:27] == seq[0, 7]).all()):
        assert rel_err(outs[0][:1, 7:27], alone) < FP64_TOL


def test_cu_seqlens_without_states_runs_packed_in_place(monkeypatch):
    """cu_seqlens with no state in or out runs as seq_idx does (no padded batch), with the same result as with
    states (the padded-batch layout)."""
    from hybrid_mamba3.kernels import chunked

    lengths = [5, 17, 1, 22]
    args, opts = make_op_inputs(B=1, L=sum(lengths), R=2)
    cu = torch.tensor([0] + lengths).cumsum(0)
    y_states, _ = mamba3_chunked(*args, **opts, chunk_size=8, cu_seqlens=cu, return_final_state=True)
    monkeypatch.setattr(chunked, "varlen_layout", None)  # called, it would fail
    y, fin = mamba3_chunked(*args, **opts, chunk_size=8, cu_seqlens=cu)
    assert fin is None and rel_err(y, y_states) < FP64_TOL


def test_step_loop_equals_one_chunked_call():
    args, opts = make_op_inputs(L=19, R=4)
    y, fin = mamba3_chunked(*args, **opts, chunk_size=8, return_final_state=True)
    state = Mamba3State.zeros(2, 4, 8, 16, 4, 4, dtype=torch.float64)
    for t in range(19):
        yt, state = mamba3_step(*(a[:, t] if a.dim() > 2 and a.shape[1] == 19 else a for a in args), state,
                                **{**opts, "z": opts["z"][:, t]})
        assert rel_err(yt, y[:, t]) < FP64_TOL
    for a, b in zip(state, fin):
        assert rel_err(a, b) < FP64_TOL


@pytest.mark.parametrize("R,pw", [(1, True), (4, False)])
def test_chunked_gradients_match_reference(R, pw):
    args, opts = make_op_inputs(B=1, L=13, R=R, G=1, H=2, P=4, N=8, K=2, requires_grad=True)
    init = Mamba3State(*(torch.randn(1, *s, dtype=torch.float64, requires_grad=True)
                         for s in [(2, 2), (2, 4, 8), (R, 2, 8), (2, 4)]))
    leaves = [t for t in (*args, *opts.values(), *init) if t is not None]
    w = torch.randn(1, 13, 2, 4, dtype=torch.float64)
    grads = []
    for fn in (mamba3_reference, mamba3_chunked):
        y, fin = fn(*args, **opts, rope_pairwise=pw, chunk_size=4, initial_state=init, return_final_state=True)
        loss = (y * w).sum() + fin.ssm.square().sum() + fin.angle.sin().sum() + fin.k.sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for g_ref, g in zip(*grads):
        assert rel_err(g, g_ref) < 1e-10


def test_long_sequence_angles_stay_accurate():
    """theta is reduced modulo 2pi per chunk, so fp32 stays accurate far past where a raw cumsum drifts."""
    args, opts = make_op_inputs(B=1, L=3000, R=1, H=2, P=4, N=8, K=2)
    args = list(args)
    args[4] = args[4] * 0 + 1.0  # dt = 1: theta grows by up to pi per token
    args[3] = -1e-4 * args[4]    # almost no decay, so late tokens still see the early state
    ref, _ = mamba3_chunked(*args, **opts, rope_pairwise=True, chunk_size=64)
    a32, o32 = _to(args, opts, torch.float32)
    y32, _ = mamba3_chunked(*a32, **o32, rope_pairwise=True, chunk_size=64)
    assert rel_err(y32, ref) < 1e-4


def test_bad_inputs_are_rejected():
    args, opts = make_op_inputs(L=8, R=2)
    with pytest.raises(ValueError, match="q_bias"):
        mamba3_chunked(*args[:6], args[6][:, :1], *args[7:], **opts)
    with pytest.raises(ValueError, match="batch dim must be 1"):
        mamba3_chunked(*args, **opts, cu_seqlens=torch.tensor([0, 8]))
    a1, o1 = make_op_inputs(B=1, L=8, R=2)
    with pytest.raises(ValueError, match=r"seq_idx must be \(batch, seqlen\)"):
        mamba3_chunked(*args, **opts, seq_idx=torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens or seq_idx, not both"):
        mamba3_chunked(*a1, **o1, cu_seqlens=torch.tensor([0, 8]), seq_idx=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_idx must hold integers"):
        mamba3_chunked(*a1, **o1, seq_idx=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        mamba3_chunked(*a1, **o1, cu_seqlens=torch.tensor([0, 5, 4, 8]))


def test_host_grid_helpers_match_triton():
    """kernels.common.cdiv / next_pow2 stand in for triton.cdiv / triton.next_power_of_2 on the host (cheaper to
    call); every launch grid and block size depends on them agreeing."""
    triton = pytest.importorskip("triton")
    from hybrid_mamba3.kernels.common import cdiv, next_pow2

    for n in list(range(1, 300)) + [2**20 - 1, 2**20, 2**20 + 1, 3 * 2**31]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 7, 16, 64, 129):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
