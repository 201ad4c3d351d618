"""Generation with a hybrid: transformers' static cache, beam search, num_return_sequences, assisted generation and
prompt lookup (the recurrent state rolls back rejected draft tokens), left-padded batches, chunked prefill, a reset
cache, a compiled decode step, pipeline and TextStreamer, and the Mamba-3 cache slot's hooks.

Every comparison is against what the eager path with transformers' dynamic cache (or each prompt alone) gives. Greedy
and beam tokens are compared exactly in fp32: the paths differ only in summation order (a static slot's attention runs
over max_cache_len masked keys), ~1e-7 relative, far below the logit gaps that pick a token on these random models."""

import contextlib
import io

import pytest
import torch
from transformers import CompileConfig, DynamicCache, LlamaForCausalLM, StaticCache, TextStreamer, pipeline

from hybrid_mamba3.cache import CACHE_KWARG, Mamba3CacheLayer
from hybrid_mamba3.mamba3 import Mamba3

from test_batches import _tokenizer
from test_model import hybrid, llama_config

LAYOUTS = {"attention-first": (1, 3), "mamba-first": (0, 2), "all-mamba": (0, 1, 2, 3)}


def left_padded(lengths=(9, 4, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 97, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return prompts, ids, mask


def new_tokens(out, prompt_width):
    return out[:, prompt_width:]


@pytest.mark.parametrize("layers", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_static_cache_greedy_equals_dynamic_and_each_prompt_alone(layers):
    """The bug this fixes: generate(cache_implementation="static") hands the model a dict of prebuilt masks."""
    model = hybrid(layers)
    prompts, ids, mask = left_padded()
    kw = dict(max_new_tokens=7, do_sample=False)
    dynamic = model.generate(ids, attention_mask=mask, **kw)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               cache_implementation="static", **kw)
        assert torch.equal(new_tokens(static, ids.shape[1])[i], new_tokens(alone, len(p))[0])


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_chunked_prefill_equals_one_prefill(cache_implementation):
    """generate(prefill_chunk_size=k) (transformers' chunked prefill, which bounds the prefill's activations by the
    chunk): the prompt goes in in chunks, each continuing the Mamba-3 state and the keys the one before left, and
    greedy tokens equal one whole prefill, on a left-padded batch whose padding spans a whole chunk."""
    model = hybrid((1, 3))
    _, ids, mask = left_padded(lengths=(23, 4, 13))
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation=cache_implementation)
    whole = model.generate(ids, **kw)
    widths = []
    hook = model.model.register_forward_pre_hook(lambda m, a, k: widths.append(k["input_ids"].shape[1]),
                                                 with_kwargs=True)
    try:
        chunked = model.generate(ids, prefill_chunk_size=8, **kw)
    finally:
        hook.remove()
    assert widths[:3] == [8, 8, 7] and set(widths[3:]) == {1}
    assert torch.equal(chunked, whole)


def test_static_cache_bf16_logits_match_dynamic():
    """bf16: the static path's logits within 2 bf16 ulps' worth (2**-7 relative to the largest) of the dynamic
    path's, step by step (both round the same activations to bf16; only the attention's reduction length differs)."""
    model = hybrid((1, 3)).to(torch.bfloat16)
    _, ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    dynamic = model.generate(ids, **kw)
    static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    for got, want in zip(static.logits, dynamic.logits):
        assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_beam_search_and_num_return_sequences_equal_independent_runs(cache_implementation):
    """Beam search reorders the Mamba-3 states (in place) every step, num_return_sequences repeats each prompt's
    rows: a left-padded batch of two prompts gives each prompt's beams as generating it alone without a cache does
    (the cacheless run recomputes everything from the tokens, so no state can be reordered wrongly there)."""
    model = hybrid((1, 3))
    prompts, ids, mask = left_padded((8, 5))
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False)
    batched = model.generate(ids, attention_mask=mask, cache_implementation=cache_implementation, **kw)
    assert batched.shape[0] == 4
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), use_cache=False,
                               **kw)
        assert torch.equal(new_tokens(batched, ids.shape[1])[2 * i:2 * i + 2], new_tokens(alone, len(p)))


@pytest.fixture
def rollbacks(monkeypatch):
    """The token counts each Mamba-3 slot's crop() rolled back."""
    seen = []
    crop = Mamba3CacheLayer.crop

    def spy(self, tokens_to_remove):
        seen.append(-tokens_to_remove)
        return crop(self, tokens_to_remove)
    monkeypatch.setattr(Mamba3CacheLayer, "crop", spy)
    return seen


@pytest.fixture(params=["new-state", "in-place"])
def step_kind(request, monkeypatch):
    """The decode step as the torch op runs it (it returns a new state) or as the Triton step does on a GPU (it updates
    the state it is given in place and returns it): the rollback history must keep each position's own state either
    way (the in-place kind found a history whose entries the next step overwrote)."""
    if request.param == "in-place":
        step = Mamba3.step

        def in_place(self, u, state):
            out, new = step(self, u, state)
            for old, value in zip(state, new):
                old.copy_(value)
            return out, state
        monkeypatch.setattr(Mamba3, "step", in_place)
    return request.param


@pytest.mark.parametrize("layers", [(1, 3), (0, 2)], ids=["attention-first", "mamba-first"])
def test_assisted_generation_with_a_draft_model_equals_greedy(layers, rollbacks, step_kind):
    """A random 2-layer Llama drafts 4 tokens a round (constant schedule, no confidence cut), nearly all rejected:
    the states roll back by up to the whole draft, the first round's included (its call also holds the prompt).
    Greedy verification keeps the target's own tokens: exactly plain greedy's."""
    model = hybrid(layers)
    draft = LlamaForCausalLM(llama_config(layers=2)).eval()
    draft.generation_config.update(num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                                   assistant_confidence_threshold=0.0)
    ids = torch.randint(3, 97, (1, 9))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assisted = model.generate(ids, assistant_model=draft, **kw)
    assert torch.equal(assisted, model.generate(ids, **kw))
    assert rollbacks[0] == 4 and max(rollbacks) == 4  # the whole first draft, prompt call and all


def test_prompt_lookup_equals_greedy(rollbacks, step_kind):
    """Prompt lookup drafts from the prompt's n-grams: the prompt repeats its own opening after the model's greedy
    continuation of it, so the lookup proposes that continuation again (in a new context: partly rejected)."""
    model = hybrid((1, 3))
    p = torch.randint(3, 97, (1, 6))
    cont = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=6, do_sample=False)
    ids = torch.cat([cont, p], 1)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=4, **kw), model.generate(ids, **kw))
    assert rollbacks and max(rollbacks) > 0


def test_static_cache_reused_after_reset_equals_a_fresh_one():
    model = hybrid((0, 2))
    cache = StaticCache(config=model.config, max_cache_len=24)
    first, second = torch.randint(3, 97, (2, 7)), torch.randint(3, 97, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False)
    model.generate(first, attention_mask=torch.ones_like(first), **{CACHE_KWARG: cache}, **kw)
    slot = cache.layers[0]
    addresses = [slot.recurrent_states[i].data_ptr() for i in range(4)]
    cache.reset()
    reused = model.generate(second, attention_mask=torch.ones_like(second), **{CACHE_KWARG: cache}, **kw)
    fresh = model.generate(second, attention_mask=torch.ones_like(second), cache_implementation="static", **kw)
    assert torch.equal(reused, fresh)
    assert [slot.recurrent_states[i].data_ptr() for i in range(4)] == addresses  # updated in place throughout


def test_decode_step_compiles_to_one_graph_and_gives_the_same_tokens():
    """The decode step traced whole (fullgraph: any host sync, .item() or data-dependent branch would break the
    graph and fail), with transformers' own compiled decoding in generate. Backend "eager": the trace is the point
    here; code generation and CUDA graphs are the GPU's part."""
    from torch._dynamo.utils import counters

    model = hybrid((0, 2))
    _, ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="static")
    eager = model.generate(ids, **kw)
    config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers compiles the decode step on accelerators only, unless told
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(ids, compile_config=config, **kw)
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] >= 1


def test_decode_steps_skip_the_padding_check(monkeypatch):
    """With a left-padded batch and transformers' dynamic cache, generate() passes the growing 2D mask every step:
    only the prompt's call checks it (the check is a host sync), once for all Mamba-3 layers, and the decode steps
    do not."""
    import hybrid_mamba3.mamba3 as layer
    import hybrid_mamba3.modeling_hybrid_mamba3 as modeling

    calls = []
    check = modeling.mamba_padding_mask
    counted = lambda *a, **k: calls.append(a[1]) or check(*a, **k)  # noqa: E731
    monkeypatch.setattr(modeling, "mamba_padding_mask", counted)
    monkeypatch.setattr(layer, "padding_mask", counted)
    model = hybrid((1, 3))
    _, ids, mask = left_padded()
    model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert calls == [ids.shape[1]]


def test_cache_slot_hooks_reorder_repeat_and_roll_back():
    """The Mamba-3 slot's hooks, against recomputation: in-place beam reordering, a prompt's cache fanned out to
    three continuations, and crop() rolling a call back to the state before its last k tokens."""
    model = hybrid((0, 2))
    ids = torch.randint(3, 97, (2, 8))

    def prefilled(x):
        cache = DynamicCache(config=model.config)
        model(x, cache=cache, use_cache=True)
        return cache

    def next_logits(cache, x, positions):
        return model(x, cache=cache, position_ids=positions, use_cache=True).logits

    step = torch.randint(3, 97, (3, 1))
    cache = prefilled(ids)
    slot = cache.layers[0]
    assert type(slot) is Mamba3CacheLayer
    address = slot.recurrent_states[1].data_ptr()
    cache.reorder_cache(torch.tensor([1, 1]))
    assert slot.recurrent_states[1].data_ptr() == address
    want = prefilled(ids[[1, 1]])
    assert torch.equal(next_logits(cache, step[:2], torch.full((2, 1), 8)),
                       next_logits(want, step[:2], torch.full((2, 1), 8)))

    cache = prefilled(ids[:1])
    cache.batch_repeat_interleave(3)
    got = next_logits(cache, step, torch.full((3, 1), 8))
    assert (got - next_logits(prefilled(ids[[0, 0, 0]]), step, torch.full((3, 1), 8))).abs().max() < 1e-5

    # roll back: 8 tokens in, then 5 more in one call, crop 3 of them: as if only 2 of the 5 had come
    more = torch.randint(3, 97, (2, 5))
    cache = prefilled(ids)
    cache.activate_past_recording()  # no count (as transformers 5.17 calls it): the slot's default
    model(more, cache=cache, position_ids=torch.arange(8, 13)[None].expand(2, -1), use_cache=True)
    cache.crop(-3)
    want = prefilled(torch.cat([ids, more[:, :2]], 1))
    pos = torch.full((2, 1), 10)
    assert (next_logits(cache, step[:2], pos) - next_logits(want, step[:2], pos)).abs().max() < 1e-5
    # recorded since that crop: the one-token step above and these 5 tokens; 7 back is more than that
    model(more, cache=cache, position_ids=torch.arange(11, 16)[None].expand(2, -1), use_cache=True)
    with pytest.raises(RuntimeError, match="roll a Mamba-3 state back by 7 tokens: 6 recorded"):
        cache.crop(-7)


def test_pipeline_and_text_streamer():
    model = hybrid((1, 3))
    tok = _tokenizer()
    tok.padding_side = "left"
    model.generation_config.pad_token_id = tok.pad_token_id
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    texts = ["w5 w17 w42 w8", "w60 w3"]
    outs = pipe(texts, max_new_tokens=5, do_sample=False, cache_implementation="static", return_full_text=False)
    for text, out in zip(texts, outs):
        ids = tok(text, return_tensors="pt").input_ids
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        assert out[0]["generated_text"].split() == tok.decode(want[0, ids.shape[1]:]).split()
    ids = tok(texts[0], return_tensors="pt").input_ids
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             streamer=TextStreamer(tok, skip_prompt=True), cache_implementation="static")
    assert printed.getvalue().split() == tok.decode(out[0, ids.shape[1]:]).split()


def test_bucketed_generation_reuses_one_cache_and_one_compiled_step():
    """BucketedGenerator: batches of 3 and 4 run as 4 rows through one static cache (same tensors, reset between
    calls) and one traced decode step (no new graph for the second batch size, where plain static generate()
    traces again); each call's tokens equal plain generate()'s, with the padding rows dropped."""
    from torch._dynamo.utils import counters

    from hybrid_mamba3 import BucketedGenerator

    model = hybrid((0, 2))
    config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # (transformers compiles the decode step on accelerators only, unless told)
    kw = dict(max_new_tokens=5, do_sample=False, compile_config=config)
    _, ids3, mask3 = left_padded((9, 4, 6))
    _, ids4, mask4 = left_padded((8, 9, 3, 5), seed=1)
    gen = BucketedGenerator(model, batch_buckets=(1, 2, 4), length_multiple=32)
    assert gen.bucket(3) == 4 and gen.bucket(4) == 4 and gen.bucket(5) == 5 and gen.cache_length(9, 5) == 32

    torch._dynamo.reset()
    counters.clear()
    out3 = gen.generate(ids3, attention_mask=mask3, **kw)
    graphs = counters["stats"]["unique_graphs"]
    cache = next(iter(gen.caches.values()))
    slot = next(layer for layer in cache.layers if isinstance(layer, Mamba3CacheLayer))
    address = slot.recurrent_states[1].data_ptr()
    out4 = gen.generate(ids4, attention_mask=mask4, **kw)
    assert counters["stats"]["unique_graphs"] == graphs >= 1  # the second batch size traced nothing new
    assert len(gen.caches) == 1 and slot.recurrent_states[1].data_ptr() == address

    for ids, mask, out in ((ids3, mask3, out3), (ids4, mask4, out4)):
        plain = model.generate(ids, attention_mask=mask, cache_implementation="static", max_new_tokens=5,
                               do_sample=False)
        assert torch.equal(out, plain)

    torch._dynamo.reset()
    counters.clear()
    model.generate(ids3, attention_mask=mask3, cache_implementation="static", **kw)
    graphs = counters["stats"]["unique_graphs"]
    model.generate(ids4, attention_mask=mask4, cache_implementation="static", **kw)
    assert counters["stats"]["unique_graphs"] > graphs  # without buckets a new batch size is a new trace


def test_bucketed_generation_refuses_a_cache_of_the_callers_and_bad_buckets():
    from hybrid_mamba3 import BucketedGenerator

    model = hybrid((0, 2))
    with pytest.raises(ValueError, match="batch_buckets"):
        BucketedGenerator(model, batch_buckets=(0, 4))
    with pytest.raises(ValueError, match="cache_implementation"):
        BucketedGenerator(model).generate(torch.ones(1, 3, dtype=torch.long), cache_implementation="static")


def test_bucketed_generation_with_beams_keeps_each_prompts_rows():
    from hybrid_mamba3 import BucketedGenerator

    model = hybrid((1, 3))
    _, ids, mask = left_padded((9, 4, 6))
    kw = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    out = BucketedGenerator(model, batch_buckets=(4,)).generate(ids, attention_mask=mask, **kw)
    assert torch.equal(out, model.generate(ids, attention_mask=mask, cache_implementation="static", **kw))
