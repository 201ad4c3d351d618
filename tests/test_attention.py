"""attn_implementation="sdpa_gqa" (hybrid_mamba3/attention.py): the same outputs as transformers' sdpa, and the
one-token step packs grouped-query heads instead of repeating keys and values, under torch.compile too."""

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa
from transformers import CompileConfig, LlamaForCausalLM, StaticCache

import hybrid_mamba3  # noqa: F401  (registers sdpa_gqa)
from hybrid_mamba3.cache import CACHE_KWARG

from test_generation import left_padded
from test_model import hybrid, llama_config


def _with(model, implementation):
    model.config._attn_implementation = implementation
    return model


def generates_as_sdpa(kind: str, implementation: str) -> None:
    """fp32, left padding, static cache: every step's logits within 1e-5 of sdpa's (the same products summed in
    another order), greedy tokens equal."""
    torch.manual_seed(0)
    model = (LlamaForCausalLM(llama_config()) if kind == "llama" else hybrid((1, 3))).eval()
    _, ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static",
              output_logits=True, return_dict_in_generate=True)
    ref = _with(model, "sdpa").generate(ids, **kw)
    ours = _with(model, implementation).generate(ids, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "hybrid"])
def test_sdpa_gqa_gives_sdpa_logits_and_tokens(kind):
    generates_as_sdpa(kind, "sdpa_gqa")


def test_compiled_decode_step_reads_keys_without_repeating_them(monkeypatch):
    """Under torch.compile (backend eager: the trace is the point), transformers' sdpa repeats the keys and values
    at a masked one-token step; sdpa_gqa does not call repeat_kv at all there."""
    model = _with(hybrid((1, 3)), "sdpa").eval()
    _, ids, mask = left_padded()
    repeats = []
    original = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: repeats.append(x.shape[2]) or original(x, n))

    def decode(implementation):
        _with(model, implementation)
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
            torch._dynamo.reset()
            step = torch.compile(model, backend="eager", fullgraph=True)
            full = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
            repeats.clear()
            return step(ids[:, -1:], attention_mask=full, position_ids=full.sum(1, keepdim=True) - 1,
                        cache_position=torch.tensor([ids.shape[1]]), use_cache=True, **{CACHE_KWARG: cache}).logits

    reference = decode("sdpa")
    assert repeats and all(length == 16 for length in repeats)  # the whole static cache, repeated
    ours = decode("sdpa_gqa")
    assert repeats == []
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_one_token_step_with_gradients_backpropagates():
    """A one-token forward that needs gradients (a custom training loop on one position) goes through the packed
    step too, and its gradients equal sdpa's."""
    torch.manual_seed(0)
    model = _with(hybrid((1, 3)), "sdpa").train()
    ids = torch.randint(3, 100, (2, 1))
    grads = []
    for implementation in ("sdpa", "sdpa_gqa"):
        _with(model, implementation).zero_grad()
        model(ids, labels=ids).logits.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sdpa_gqa_loads_by_name_and_decodes_compiled(tmp_path):
    """from_pretrained(attn_implementation="sdpa_gqa") passes transformers' own checks, for a saved hybrid and a
    Llama, and generate()'s compiled decoding runs on it."""
    from transformers import AutoModelForCausalLM

    hybrid((0, 2)).save_pretrained(tmp_path / "h")
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "l")
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "l", attn_implementation="sdpa_gqa")
    assert llama.config._attn_implementation == "sdpa_gqa"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "h", attn_implementation="sdpa_gqa").eval()
    assert model.config._attn_implementation == "sdpa_gqa"
    _, ids, mask = left_padded()
    config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(model.generate(ids, compile_config=config, **kw), _with(model, "sdpa").generate(ids, **kw))


def test_a_hybrid_decodes_on_sdpa_splitkv_unless_told_otherwise(tmp_path):
    """With no attn_implementation, a hybrid (built, or loaded) takes sdpa_splitkv, which is sdpa but at GPU decode
    steps; one that is asked for is kept, config.json records none, and a Llama is left on sdpa. Its multi-token
    forward (padding, training) is sdpa's exactly."""
    import json

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = hybrid((1, 3))
    assert model.config._attn_implementation == "sdpa_splitkv"
    model.save_pretrained(tmp_path / "h")
    assert not [k for k in json.loads((tmp_path / "h" / "config.json").read_text()) if "attn_impl" in k]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "h").config._attn_implementation == "sdpa_splitkv"
    for asked in ("sdpa", "eager", "sdpa_gqa"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "h", attn_implementation=asked)
        assert loaded.config._attn_implementation == asked
    assert LlamaForCausalLM(llama_config()).config._attn_implementation == "sdpa"
    _, ids, mask = left_padded()
    ours = model(ids, attention_mask=mask, labels=ids)
    ref = _with(model, "sdpa")(ids, attention_mask=mask, labels=ids)
    assert torch.equal(ours.logits, ref.logits) and torch.equal(ours.loss, ref.loss)
