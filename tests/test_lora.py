"""LoRA on hybrids with PEFT: the target presets (`hybrid_mamba3.lora_targets`) and their check, and LoRA adapters on
the Mamba-3 in_proj / out_proj really acting in the layer's scan and decode step, as the merged model computes them.

Adapted vs merged: the adapter adds s * B(A(x)) beside W x where the merged model computes (W + s * B A) x: the same
value in a different summation order. In fp64 the two agree within 1e-10 relative (measured ~1e-14); the adapter's own
effect on the logits is ~1e-1 relative (random A and B), so a skipped adapter fails by far. The GPU test (Triton
path, fp32 with TF32 off) states its own tolerance."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_model import hybrid
from transformers import DynamicCache

from hybrid_mamba3 import check_lora_targets, lora_targets

TOL = 1e-10


def _adapted(model, targets, seed=0):
    """A PEFT model whose adapters are random (init_lora_weights=False: B is not zero), so they change the output."""
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


def test_presets_name_each_part_exactly_and_from_a_directory(tmp_path):
    model = hybrid((1, 3))  # layers: attention, Mamba-3, attention, Mamba-3
    mamba = [f"model.layers.{i}.mamba.{p}" for i in (1, 3) for p in ("in_proj", "out_proj")]
    attention = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 2) for p in "qkvo"]
    mlp = [f"model.layers.{i}.mlp.{p}_proj" for i in range(4) for p in ("gate", "up", "down")]
    assert lora_targets(model, "mamba") == sorted(mamba)
    assert lora_targets(model, "attention") == sorted(attention)
    assert lora_targets(model, "mlp") == sorted(mlp)
    assert lora_targets(model, "all") == sorted(mamba + attention + mlp)
    assert lora_targets(model, "mamba+mlp") == lora_targets(model, ["mlp", "mamba"]) == sorted(mamba + mlp)
    model.save_pretrained(tmp_path)
    assert lora_targets(str(tmp_path), "all") == lora_targets(model, "all")  # built on the meta device
    peft_model = _adapted(model, lora_targets(model, "mamba"))
    assert lora_targets(peft_model, "mamba") == sorted(mamba)  # a PEFT model's names are its base model's
    check_lora_targets(peft_model, mamba)


def test_requests_that_would_be_skipped_are_refused():
    with pytest.raises(ValueError, match="no attention layers to adapt"):
        lora_targets(hybrid((0, 1, 2, 3)), "attention")
    with pytest.raises(ValueError, match="unknown LoRA target part 'ssm'"):
        lora_targets(hybrid((1, 3)), "ssm")
    # PEFT adapts what matches and skips a name that matches nothing without a word; the check does not
    model = hybrid((1, 3))
    peft_model = _adapted(model, ["model.layers.1.mamba.in_proj", "model.layers.2.mamba.in_proj"])
    with pytest.raises(ValueError, match="1 LoRA target"):
        check_lora_targets(peft_model, ["model.layers.1.mamba.in_proj", "model.layers.2.mamba.in_proj"])


def _logits_and_steps(model, ids):
    """Full-sequence logits, and the logits of a cached prefill then one-token decode steps (the layer's step)."""
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, :5], cache=cache, use_cache=True).logits]
    steps += [model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(5, ids.shape[1])]
    return full, torch.cat(steps, 1)


def test_mamba_adapters_act_in_scan_and_step_as_the_merged_weights_do():
    """Adapters on the Mamba-3 in_proj / out_proj only: the chunked scan (torch path) and the decode step give the
    merged model's logits, which differ from the base model's; the adapters get gradients."""
    torch.manual_seed(0)
    base = hybrid((1, 3)).double()
    ids = torch.randint(3, 97, (2, 11))
    ref_full, _ = _logits_and_steps(base, ids)
    targets = lora_targets(base, "mamba")
    model = _adapted(base, targets)
    full, steps = _logits_and_steps(model, ids)
    assert model.base_model.model.model.layers[1].mamba.last_backend == "torch"
    merged = model.merge_and_unload()  # (in place: the adapted logits are taken before)
    m_full, m_steps = _logits_and_steps(merged, ids)
    scale = ref_full.abs().max()
    assert (full - ref_full).abs().max() > 1e-2 * scale  # the adapters act
    assert (full - m_full).abs().max() < TOL * scale and (steps - m_steps).abs().max() < TOL * scale
    assert (steps - full).abs().max() < TOL * scale  # the decode step sees them too


def test_adapters_get_gradients_and_only_they_train():
    model = _adapted(hybrid((1, 3)), lora_targets(hybrid((1, 3)), "mamba"))
    ids = torch.randint(3, 97, (2, 9))
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 2 * 2  # (A, B) x (in_proj, out_proj) x 2 layers
    assert all(".lora_" in n and g is not None and g.abs().max() > 0 for n, g in grads.items())


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [dict(), dict(mimo_rank=1, is_mimo=False)], ids=["mimo", "siso"])
def test_mamba_adapters_act_in_the_triton_path(layout, tmp_path):
    """On CUDA the Mamba-3 layers run our Triton scan (training forward and backward) and fused decode step: the
    adapters must act there as the merged weights do. fp32 with TF32 off; 1e-4 relative: the kernels' own agreement
    with the torch path at fp32 (test_gpu_model) with room for the two summation orders; the adapters move the logits
    by ~1e-1."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    base = hybrid((1, 3), **layout).cuda()
    base.save_pretrained(tmp_path / "base")
    ids = torch.randint(3, 97, (2, 70), device="cuda")  # more than one chunk
    ref_full, _ = _logits_and_steps(base, ids)
    model = _adapted(base, lora_targets(base, "mamba"))
    full, steps = _logits_and_steps(model, ids)
    assert model.base_model.model.model.layers[1].mamba.last_backend == "triton"
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters() if p.requires_grad)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    from transformers import AutoModelForCausalLM
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base").cuda(),
                                         tmp_path / "adapter")
    merged = reloaded.merge_and_unload()
    m_full, m_steps = _logits_and_steps(merged, ids)
    scale = ref_full.abs().max()
    assert (full - ref_full).abs().max() > 1e-2 * scale
    assert (full - m_full).abs().max() < 1e-4 * scale and (steps - m_steps).abs().max() < 1e-4 * scale
