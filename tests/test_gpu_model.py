"""Our layer and model on CUDA in bf16 (run on the device: pytest -m gpu)."""

import pytest
import torch
from conftest import rel_err

from hybrid_mamba3 import HybridMamba3Config, HybridMamba3ForCausalLM, Mamba3

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


@pytest.mark.parametrize("kw", [dict(is_mimo=True, mimo_rank=4, chunk_size=16), dict(is_mimo=False, chunk_size=64)])
def test_bf16_layer_on_cuda_matches_fp64_reference(kw):
    torch.manual_seed(0)
    layer = Mamba3(d_model=256, d_state=128, headdim=64, layer_idx=0, **kw).cuda()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    u = torch.randn(2, 300, 256, device="cuda")
    ref = Mamba3(d_model=256, d_state=128, headdim=64, backend="torch", **kw).double().cuda()
    ref.load_state_dict(layer.state_dict())
    expected = ref(u.double())
    y = layer.to(torch.bfloat16)(u.bfloat16())
    assert not torch.isnan(y).any()
    # bf16 projections and activations: ~3 significant digits per operand, errors add over the projections
    assert rel_err(y, expected) < 2e-2
    assert layer.last_backend in ("triton", "torch")


@pytest.mark.parametrize("kw", [dict(is_mimo=True, mimo_rank=4), dict(is_mimo=False),
                                dict(is_mimo=True, mimo_rank=2, is_outproj_norm=True)], ids=["mimo", "siso", "outnorm"])
@pytest.mark.parametrize("padded", ["full", "left", "right", "packed"])
def test_layer_gradients_triton_path_vs_torch_path_on_cuda(kw, padded, in_place_record):
    """The layer's Triton path on CUDA against its torch path, both fp32: output, input gradient and every parameter
    gradient. The kernels write the in_proj pieces' gradients into one buffer (`shared_grad`): all eight in place
    (z, with the out-projection norm, and x, when padding masks it, are copied in). 1e-4: the fp32 kernels (ieee
    dots, exact sin/cos) differ from torch in summation order and their atomics' order only (~1e-6 in the
    interpreter). In bf16 the input gradient alone is 2-3e-2 off the fp32 torch path (measured, H100): rounding, too
    coarse to see a misplaced piece reliably."""
    torch.manual_seed(0)
    ref = Mamba3(d_model=256, d_state=64, headdim=32, layer_idx=0, backend="torch", **kw).cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tri = Mamba3(d_model=256, d_state=64, headdim=32, layer_idx=0, backend="triton", **kw).cuda()
    tri.load_state_dict(ref.state_dict())
    u, dy = torch.randn(2, 300, 256, device="cuda"), torch.randn(2, 300, 256, device="cuda")
    mask = torch.ones(2, 300, dtype=torch.long, device="cuda")
    if padded == "left":
        mask[0, :37] = 0
    if padded == "right":  # runs as if real (no state is carried on): the paths agree everywhere
        mask[1, 250:] = 0
    seq_idx = torch.tensor([[0] * 37 + [1] * 200 + [2] * 63, [0] * 300], device="cuda") if padded == "packed" else None
    got = {}
    for layer in (ref, tri):
        x = u.clone().requires_grad_()
        y = layer(x, attention_mask=mask, seq_idx=seq_idx)
        y.backward(dy)
        got[layer] = dict(y=y.detach(), u=x.grad, **{n: p.grad for n, p in layer.named_parameters()})
    assert tri.last_backend == "triton"
    copied = ({0} if kw.get("is_outproj_norm") else set()) | ({1} if padded == "left" else set())
    assert in_place_record == [set(range(8)) - copied]  # z, x, B, C, dd_dt, dd_A, trap, angles
    for name, want in got[ref].items():
        assert want is not None and not torch.isnan(got[tri][name]).any(), name
        assert rel_err(got[tri][name], want) < 1e-4, (name, rel_err(got[tri][name], want))


def test_bf16_hybrid_generates_and_cache_matches_full_forward_on_cuda():
    from transformers import LlamaConfig
    torch.manual_seed(0)
    lc = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    cfg = HybridMamba3Config.from_llama(lc, "AM", d_state=64, headdim=64)
    model = HybridMamba3ForCausalLM(cfg).cuda().eval()
    ids = torch.randint(3, 512, (2, 40), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config)
        parts = [model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in
                 [(0, 30), (30, 31), (31, 40)]]
    assert rel_err(torch.cat(parts, 1), full) < 1e-4  # fp32 model: only summation order differs
    out = model.to(torch.bfloat16).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                            do_sample=False)
    assert out.shape == (2, 48)


def test_row_aligned_in_proj_on_cuda(monkeypatch):
    """Mamba-3's in_proj with SmolLM2's 9 heads (an odd width: 2731 columns here) on 2048 rows: the padded GEMM's
    output rows lie a multiple of 8 apart, and the layer's bf16 output and gradients equal those with the plain
    projection up to the two cuBLAS kernels' rounding (bf16 outputs of fp32 sums taken in another order: an ulp, 2^-8,
    where they round apart, carried through the layer; 2e-2, the bf16 bound used above; a misplaced column is O(1))."""
    import hybrid_mamba3.mamba3 as mamba3_module

    torch.manual_seed(0)
    layer = Mamba3(d_model=576, d_state=64, headdim=64, expand=1, layer_idx=0, is_mimo=True, mimo_rank=4,
                   ngroups=3).cuda().bfloat16()
    width = layer.in_proj.out_features
    assert width % 8, width
    strides = []
    layer.in_proj.register_forward_hook(lambda module, args, out: strides.append(out.stride(-2)))
    u, dy = torch.randn(2, 1024, 576, device="cuda", dtype=torch.bfloat16), torch.randn(2, 1024, 576, device="cuda",
                                                                                        dtype=torch.bfloat16)
    got = []
    for devices in (mamba3_module.ROW_ALIGN_DEVICES, ()):
        monkeypatch.setattr(mamba3_module, "ROW_ALIGN_DEVICES", devices)
        layer.zero_grad()
        x = u.clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
        got.append(dict(y=y.detach(), u=x.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}))
    assert strides == [width + (-width % 8), width]
    for name, want in got[1].items():
        assert rel_err(got[0][name], want) < 2e-2, name


def test_conversion_runs_where_the_teacher_is():
    """A teacher on the GPU converts there (calibration pass, the layers' fit and the KL layer choice on its device;
    the hybrid is assembled on the CPU as always) to the hybrid a CPU conversion gives: the same layers, fits and
    logits up to fp32 rounding in other kernels (the GPU's Triton scan against the CPU's torch op; 1e-3, where a
    misplaced tensor is O(1))."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_mamba3.convert import convert_llama

    def teacher():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()

    ids = torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(1))
    runs = [convert_llama(t, "auto:0.5", calibration_ids=ids, progress=False, ngroups="kv")
            for t in (teacher(), teacher().cuda())]
    (cpu, cpu_report), (gpu, gpu_report) = runs
    assert gpu_report["mamba_layers"] == cpu_report["mamba_layers"]
    for i in cpu_report["mamba_layers"]:
        assert gpu_report["per_layer"][i]["dt"] == cpu_report["per_layer"][i]["dt"]
    x = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert next(gpu.parameters()).device.type == "cpu"
        assert rel_err(gpu(x).logits, cpu(x).logits) < 1e-3
