"""Generation on CUDA with the Triton ops (run on the device: pytest -m gpu tests/test_gpu_generation.py): the static
cache, beam search, assisted generation (the Triton decode step updates the ssm state in place, which the rollback
history must not see) and the decode step compiled with CUDA graphs, each against the dynamic-cache eager path.
Tokens are compared exactly in fp32 (the paths differ in summation order only); bf16 logits within 2**-6 of the
largest (four bf16 ulps: the static path's attention reduces over max_cache_len masked keys)."""

import pytest
import torch
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from hybrid_mamba3 import HybridMamba3Config, HybridMamba3ForCausalLM

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

LLAMA = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HybridMamba3ForCausalLM(HybridMamba3Config.from_llama(LlamaConfig(**LLAMA), "MA", d_state=64, headdim=64))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".mamba." in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m.cuda().eval()


def padded_batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (3, 20), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, :7], mask[2, :12] = 0, 0
    return ids, mask


def test_static_cache_beam_search_and_compiled_decode(model):
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    dynamic = model.generate(ids, **kw)
    assert model.model.layers[0].mamba.last_backend == "triton"
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw), dynamic)
    compiled = model.generate(ids, cache_implementation="static", compile_config=CompileConfig(fullgraph=True), **kw)
    assert torch.equal(compiled, dynamic)
    beams = dict(attention_mask=mask, num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, cache_implementation="static", **beams), model.generate(ids, **beams))


def test_assisted_generation_and_prompt_lookup_equal_greedy(model):
    draft = LlamaForCausalLM(LlamaConfig(**{**LLAMA, "num_hidden_layers": 2})).cuda().eval()
    draft.generation_config.update(num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                                   assistant_confidence_threshold=0.0)
    one = padded_batch()[0][:1]
    kw = dict(max_new_tokens=16, do_sample=False)
    greedy = model.generate(one, attention_mask=torch.ones_like(one), **kw)
    assert torch.equal(model.generate(one, attention_mask=torch.ones_like(one), assistant_model=draft, **kw), greedy)
    again = torch.cat([greedy, one], 1)  # the lookup proposes the first continuation again, in a new context
    kw = dict(attention_mask=torch.ones_like(again), max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(again, prompt_lookup_num_tokens=4, **kw), model.generate(again, **kw))


def test_bf16_static_logits_match_dynamic(model):
    ids, mask = padded_batch()
    m = model.to(torch.bfloat16)
    try:
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
        dynamic = m.generate(ids, **kw)
        static = m.generate(ids, cache_implementation="static", **kw)
        for got, want in zip(static.logits, dynamic.logits):
            assert (got.float() - want.float()).abs().max() <= 2 ** -6 * want.float().abs().max()
    finally:
        model.float()
