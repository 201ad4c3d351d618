"""Decode attention (kernels/decode_attn.py, kernels/triton_decode_attention.py) and attn_implementation
"sdpa_splitkv" (hybrid_mamba3/attention.py): the split-KV Triton kernels under TRITON_INTERPRET=1 on the CPU against
the torch reference in float64, and a model decoding through them against transformers' sdpa.

Tolerances: fp32 inputs with exact (ieee) products differ from float64 only by fp32 rounding over one softmax and two
dot products of <= a few hundred terms: ~1e-7 measured, 1e-5 max-norm relative. bf16 inputs: the interpreter runs
the dots in fp32 (its 16-bit dots are wrong in Triton 3.9), so only the output's rounding to bf16 remains, which
the interpreter truncates (< 2^-7): 8e-3. The GPU's bf16 dots also round the softmax weights: tests/test_triton_gpu.py.
"""

import os

import torch

# conftest sets it first when run under pytest; never on a GPU machine (see tests/test_triton_interpret.py)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import rel_err  # noqa: E402

from hybrid_mamba3.kernels import decode_attn as op  # noqa: E402
from hybrid_mamba3.kernels import triton_decode_attention as tk  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
    pytest.skip("interpreter tests are for CPU machines", allow_module_level=True)

from test_attention import generates_as_sdpa  # noqa: E402
from test_generation import left_padded  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


CALLS = []  # the caches the Triton kernels were called on (the on_cpu fixture records them)


@pytest.fixture
def on_cpu(monkeypatch):
    """The kernels on CPU tensors (the interpreter), slices of 16 keys and 16 programs for the interpreter's one
    "multiprocessor" so that small caches split, and each call of the kernels recorded in CALLS."""
    monkeypatch.setattr(op, "TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(tk, "MIN_SPLIT", 16)
    monkeypatch.setattr(tk, "LAUNCH", tk.Launch(programs_per_sm=16))
    original = op.decode_attention_triton
    monkeypatch.setattr(op, "decode_attention_triton", lambda *a: CALLS.append(a[1].shape) or original(*a))
    CALLS.clear()


def _inputs(batch, heads, kv_heads, length, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check(q, k, v, mask=None, scale=None):
    CALLS.clear()
    out = op.decode_attention(q, k, v, mask, scale)
    assert CALLS, "the Triton kernels did not run"
    ref = op.decode_attention_reference(q.double(), k.double(), v.double(), mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    err = rel_err(out.double(), ref)
    assert err < TOL[q.dtype], err
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 48), (4, 4, 16)])
def test_kernel_matches_float64(on_cpu, dtype, heads, kv_heads, dim):
    """Groups of 3 (SmolLM2's), 4 and 1 (no grouping); head sizes that fill the tile (64, 16) and one that does not
    (48); a length that is no multiple of the key block, split in several slices; no mask."""
    q, k, v = _inputs(2, heads, kv_heads, 150, dim, dtype)
    assert tk.num_splits(2, kv_heads, 150, tk._sm_count(q.device)) > 1
    _check(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skip_masked", [True, False])
def test_kernel_masks_padding_and_free_slots(on_cpu, monkeypatch, dtype, skip_masked):
    """A static cache's mask: left padding of different lengths per row and free slots at the end, some slices
    wholly free and a mask broadcast over the batch; a custom scale. Both ways of masking: masked slots not fetched
    (the default), or fetched and zeroed (64-key blocks, the other block size the sweep tried)."""
    if not skip_masked:
        monkeypatch.setattr(tk, "LAUNCH", tk.Launch(programs_per_sm=16, block_n=64, skip_masked=False))
    q, k, v = _inputs(3, 8, 2, 300, 32, dtype, seed=1)
    mask = torch.zeros(3, 300, dtype=torch.bool)
    mask[0, 5:40] = True
    mask[1, 0:200] = True
    mask[2, 17:18] = True  # one slot
    _check(q, k, v, mask)
    _check(q, k, v, mask[1:2], scale=0.3)
    # the same cache with its free slots filled with huge values and NaN: never read into the result
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 200:], v2[:, :, 200:] = 1e4, float("nan")
    a = op.decode_attention(q, k, v, mask)
    b = op.decode_attention(q, k2, v2, mask)
    assert torch.equal(a, b)


def test_a_head_with_every_slot_masked_gets_zeros(on_cpu):
    q, k, v = _inputs(2, 4, 2, 64, 16, torch.float32)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1] = False
    out, _ = _check(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0


def test_strided_query_and_cache(on_cpu):
    """A query that is a view of a (B, 1, H, D) projection and a cache that is a slice of a longer one."""
    q, k, v = _inputs(2, 6, 3, 200, 32, torch.float32, seed=2)
    q_view = q[:, None].transpose(1, 2)[:, :, 0]  # same values, the strides of transformers' transposed query
    _check(q_view, k[:, :, :130], v[:, :, :130])


def test_bad_inputs_say_what_to_change():
    q, k, v = _inputs(1, 4, 2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        op.decode_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="q \\[B, H, D\\]"):
        op.decode_attention(q[:, None], k, v)
    with pytest.raises(ValueError, match="additive float mask"):
        op.decode_attention(q, k, v, torch.zeros(1, 8))


@pytest.mark.parametrize("kind", ["llama", "hybrid"])
def test_sdpa_splitkv_decodes_as_sdpa(on_cpu, kind):
    """generate() as in tests/test_attention.py (fp32, left padding, static cache: logits within 1e-5 of sdpa's,
    greedy tokens equal), with every one-token step through the split-KV kernels, over the whole static cache."""
    generates_as_sdpa(kind, "sdpa_splitkv")
    prompt = left_padded()[1].shape[1]
    assert CALLS and all(shape[2] >= prompt for shape in CALLS)
