"""The hybrid model inside transformers: Llama equivalence, cache, generate, save/load, registry, config."""

import subprocess
import sys

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

import hybrid_mamba3 as hm
from hybrid_mamba3 import HybridMamba3Config, HybridMamba3ForCausalLM, register_mixer, resolve_positions
from hybrid_mamba3.cache import CACHE_FIELD

MAMBA = dict(d_state=16, headdim=16, mimo_rank=2, chunk_size=4)


def llama_config(layers=4, **kw):
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


def hybrid(mamba_layers=(1, 3), **kw) -> HybridMamba3ForCausalLM:
    cfg = HybridMamba3Config.from_llama(llama_config(), list(mamba_layers), **{**MAMBA, **kw})
    model = HybridMamba3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial Mamba-3 parameters
        for name, p in model.named_parameters():
            if ".mamba." in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_zero_mamba_layers_is_bit_identical_to_llama():
    lc = llama_config()
    llama = LlamaForCausalLM(lc).eval()
    model = HybridMamba3ForCausalLM(HybridMamba3Config.from_llama(lc, [])).eval()
    model.load_state_dict(llama.state_dict(), strict=True)
    ids = torch.randint(3, 97, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert torch.equal(llama(ids).logits, model(ids).logits)
    assert torch.equal(llama(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_kept_attention_keeps_llama_parameter_names():
    model = hybrid((1,))
    names = set(model.state_dict())
    llama_names = set(LlamaForCausalLM(llama_config()).state_dict())
    kept = {n for n in llama_names if ".layers.1." not in n}
    assert kept <= names
    assert "model.layers.1.mamba.in_proj.weight" in names and "model.layers.1.self_attn.q_proj.weight" not in names


def test_dynamic_cache_from_config_builds_recurrent_slots():
    model = hybrid((1, 3))
    assert model.config.layer_types == ["full_attention", "linear_attention"] * 2
    cache = DynamicCache(config=model.config)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds[0] is DynamicLayer and kinds[1] is LinearAttentionLayer
    assert cache.layers[1].number_of_states == 4


@pytest.mark.parametrize("layers,keyword", [((1, 3), "cache"), ((0, 1, 2, 3), "cache"), ((1, 3), "past_key_values")],
                         ids=["hybrid", "all-mamba", "old-keyword"])
def test_cached_incremental_decoding_equals_full_forward(layers, keyword):
    """Both cache keywords: `cache` (transformers >= 5.24) and `past_key_values` (its name before)."""
    model = hybrid(layers).double()
    ids = torch.randint(3, 97, (2, 17))
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    outs = [model(ids[:, a:b], use_cache=True, **{keyword: cache})
            for a, b in [(0, 7), (7, 8), (8, 9), (9, 14), (14, 17)]]  # prefill, single steps, several at once
    assert (torch.cat([o.logits for o in outs], 1) - full).abs().max().item() < 1e-10
    assert all(getattr(o, CACHE_FIELD) is cache for o in outs)
    state = cache.layers[1].recurrent_states[1]
    assert state.shape == (2, model.model.layers[1].mamba.nheads, 16, 16)  # constant size, whatever the length


def test_cache_passed_twice_is_refused():
    model = hybrid((1, 3))
    ids = torch.randint(3, 97, (1, 5))
    with pytest.raises(ValueError, match="pass the cache once"):
        model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_generate_greedy_sampling_and_left_padding():
    model = hybrid((1, 3)).double()
    prompts = [torch.randint(3, 97, (n,)) for n in (9, 4, 6)]
    single = [model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=6,
                             do_sample=False) for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i, s in enumerate(single):
        assert torch.equal(batched[i, width:], s[0, len(prompts[i]):])
    # left padding must not change the logits either (not just the argmax); positions as generate() makes them
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=positions).logits
    for i, p in enumerate(prompts):
        alone = model(p[None]).logits
        assert (out[i, width - len(p):] - alone[0]).abs().max().item() < 1e-12
    torch.manual_seed(1)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20)
    assert sampled.shape == (3, width + 5)


def test_save_load_round_trip_is_bit_exact_and_remote_code_loads(tmp_path):
    model = hybrid((0, 2))
    ids = torch.randint(3, 97, (2, 9))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HybridMamba3ForCausalLM
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    script = ("import sys; from transformers import AutoModelForCausalLM;"
              f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True);"
              "print(type(m).__name__, m.config.mixers)")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "HybridMamba3ForCausalLM ['mamba3', 'attention', 'mamba3', 'attention']" in res.stdout


@pytest.mark.parametrize("remote_code,preamble,kwargs", [
    (True, "import hybrid_mamba3", ""),  # the package registered: transformers knows the model type
    (True, "", ", trust_remote_code=True"),  # the stubs run (they import the package)
    (False, "", ""),  # no remote code declared: nothing to ask about in a process that knows nothing of it
], ids=["imported", "trusted", "no-remote-code"])
def test_tokenizer_of_a_saved_hybrid_loads_without_asking(tmp_path, remote_code, preamble, kwargs):
    """AutoTokenizer reads config.json first; where the config declares remote code that the process cannot resolve,
    transformers asks on stdin whether to run it. Each way to load without that question, in a fresh process (stdin
    closed: a question shows in the output); and save_pretrained(remote_code=False) writes no auto_map or stubs."""
    from test_batches import _tokenizer

    hybrid((1,)).save_pretrained(tmp_path, remote_code=remote_code)
    _tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "modeling_hybrid_mamba3.py").exists() == remote_code
    assert ("auto_map" in (tmp_path / "config.json").read_text()) == remote_code
    script = (f"{preamble}\nfrom transformers import AutoTokenizer\n"
              f"t = AutoTokenizer.from_pretrained({str(tmp_path)!r}{kwargs})\nprint(t('w5 w6').input_ids)")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("[5, 6]") and "custom code" not in res.stdout + res.stderr


def test_bf16_loading_keeps_fp32_parameters(tmp_path):
    hybrid((1,)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    mamba = "model.layers.1.mamba."
    assert fp32 == {mamba + n for n in ("dt_bias", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", "D",
                                        "B_norm.weight", "C_norm.weight")}
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    cast = hybrid((1,)).to(torch.bfloat16)
    assert cast.model.layers[1].mamba.dt_bias.dtype == torch.float32
    out = model(torch.randint(3, 97, (1, 8))).logits
    assert not torch.isnan(out).any()


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointed decoder layers (transformers' switch: activation_checkpointing_enable from 5.24, before that
    gradient_checkpointing_enable) rerun their forward in the backward, Mamba-3 mixers included, and give the same
    gradients."""
    model = hybrid((1, 3)).double().train()
    ids = torch.randint(3, 97, (2, 10))
    calls = []
    model.model.layers[1].mamba.register_forward_hook(lambda *_: calls.append(1))
    grads, runs = [], []
    for ckpt in (False, True):
        model.zero_grad()
        if ckpt:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        calls.clear()
        model(ids, labels=ids).loss.backward()
        runs.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert runs == [1, 2]  # the checkpointed mixer's forward ran again in the backward
    assert grads[0].keys() == grads[1].keys() and any(".mamba.dt_bias" in n for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-12), n


class ScaledIdentityMixer(torch.nn.Module):
    """A user's own recurrent-kind mixer: h -> h * w (no state)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((config.hidden_size,), 0.5))

    def forward(self, hidden_states, **kwargs):
        return hidden_states * self.w


def test_user_registered_mixer_works_end_to_end(tmp_path):
    register_mixer("scaled_identity", ScaledIdentityMixer, "linear_attention", overwrite=True)
    cfg = HybridMamba3Config.from_llama(llama_config(), [2], mixer="scaled_identity")
    model = HybridMamba3ForCausalLM(cfg).eval()
    assert cfg.layer_types[2] == "linear_attention" and "model.layers.2.scaled_identity.w" in model.state_dict()
    ids = torch.randint(3, 97, (1, 6))
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("scaled_identity", ScaledIdentityMixer, "linear_attention")
    with pytest.raises(ValueError, match="cache_kind"):
        register_mixer("other", ScaledIdentityMixer, "kv")


def test_position_constructors():
    assert resolve_positions([0, -1], 8) == [0, 7]
    assert resolve_positions(0.25, 8) == [2, 6]  # each Mamba layer centred in its block of 4
    assert resolve_positions(0.5, 30) == sorted(set(resolve_positions(0.5, 30))) and len(resolve_positions(0.5, 30)) == 15
    assert resolve_positions(0.25, 8, "first") == [0, 1] and resolve_positions(0.25, 8, "last") == [6, 7]
    assert resolve_positions("AAM", 6) == [2, 5]
    assert resolve_positions("AMAMAAAA", 8) == [1, 3]
    assert resolve_positions(0.0, 8) == [] and resolve_positions(1.0, 4) == [0, 1, 2, 3]


def test_config_errors_are_clear():
    lc = llama_config()
    with pytest.raises(ValueError, match="out of range"):
        HybridMamba3Config.from_llama(lc, [4])
    with pytest.raises(ValueError, match="unknown mixer"):
        HybridMamba3Config.from_llama(lc, [1], mixer="mamba4")
    with pytest.raises(ValueError, match="unknown mixer"):
        HybridMamba3Config(**{**lc.to_dict(), "mixers": ["attention", "lstm", "attention", "attention"]})
    with pytest.raises(ValueError, match="does not divide"):
        HybridMamba3Config.from_llama(lc, "AAM")
    with pytest.raises(ValueError, match="only 'A'"):
        HybridMamba3Config.from_llama(lc, "AXAM")
    with pytest.raises(ValueError, match="fraction"):
        HybridMamba3Config.from_llama(lc, 1.5)
    with pytest.raises(ValueError, match="integer"):
        HybridMamba3Config.from_llama(lc, 2)
    with pytest.raises(ValueError, match="repeat"):
        HybridMamba3Config.from_llama(lc, [1, 1])
    with pytest.raises(ValueError, match="not divisible by headdim"):
        HybridMamba3Config.from_llama(lc, [1], headdim=48)
    with pytest.raises(ValueError, match="unknown Mamba-3 options"):
        HybridMamba3Config.from_llama(lc, [1], dstate=16)
    # direct construction: huggingface_hub's strict-dataclass validation wraps the same message
    with pytest.raises(StrictDataclassClassValidationError, match="mixers lists"):
        HybridMamba3Config(**{**lc.to_dict(), "mixers": ["attention"]})
    with pytest.raises(StrictDataclassClassValidationError, match="rope_fraction"):
        HybridMamba3Config(**{**lc.to_dict(), "mixers": ["mamba3"] * 4, "mamba_rope_fraction": 0.3})
    model = hybrid((1,))
    with pytest.raises(ValueError, match="2D"):
        model(torch.randint(3, 97, (1, 4)), attention_mask=torch.ones(1, 1, 4, 4))


def test_package_exports_and_auto_registration():
    from transformers import AutoConfig
    assert AutoConfig.for_model("hybrid_mamba3").__class__ is HybridMamba3Config
    assert {"attention", "mamba3"} <= set(hm.mixer_names())


def test_beam_search_with_cache_equals_without_and_outputs_are_recorded():
    model = hybrid((1, 3)).double()
    ids = torch.randint(3, 97, (2, 7))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, num_beams=3, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 5
