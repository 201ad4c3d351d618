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
