"""Checkpoint conversion: exact copies, GQA shapes, the attention-init mapping's property, layer choice, errors, CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import hybrid_mamba3  # noqa: F401  (registers the Auto classes)
from hybrid_mamba3.cli import main
from hybrid_mamba3.convert import (DT_GRID, attention_shapes, choose_layers, convert_llama, dt_grid_values,
                                   format_summary, parse_mamba_layers, save_hybrid)
from hybrid_mamba3.kernels import mamba3_chunked

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def llama(kv=2, tie=False, **kw):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_key_value_heads": kv, "tie_word_embeddings": tie, **kw})).eval()


def calib(n=4, L=24, seed=1):
    return torch.randint(3, 97, (n, L), generator=torch.Generator().manual_seed(seed))


IDS = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(7))


def test_zero_layers_replaced_gives_identical_logits_and_tensors():
    src = llama(tie=True)
    model, report = convert_llama(src, [], progress=False)
    assert report["mamba_layers"] == [] and report["layout"] == "AAAA"
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, src(IDS).logits)
    sd, ssd = model.state_dict(), src.state_dict()
    assert set(sd) == set(ssd) and all(torch.equal(sd[k], ssd[k]) for k in ssd)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tying kept


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_copied_tensors_identical_and_gqa_shapes(kv):
    src = llama(kv=kv)
    model, report = convert_llama(src, [1, 3], calibration_ids=calib(), mimo_rank=2, progress=False)
    sd, ssd = model.state_dict(), src.state_dict()
    for k, v in ssd.items():
        if ".layers.1.self_attn." in k or ".layers.3.self_attn." in k:
            assert k not in sd
        else:
            assert torch.equal(sd[k], v), k
    layer = model.model.layers[1].mamba
    assert (layer.nheads, layer.headdim, layer.d_state, layer.num_bc_heads, layer.mimo_rank) == (4, 16, 16, 4, 2)
    assert report["params_before"] == sum(p.numel() for p in src.parameters())
    with torch.no_grad():
        out = model(IDS).logits
    assert out.shape == (2, 19, 97) and torch.isfinite(out).all()
    assert "init_err" in format_summary(report)


def _rms(x, eps=1e-5):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _expected_from_llama(attn, layer, u, c, shared=None):
    """Direct computation of the claimed property from the Llama weights (independent of the Mamba-3 ops); with
    `shared`, head h takes the mean query rows of the heads in shared[h]."""
    H, d, Hkv = attn.config.num_attention_heads, attn.head_dim, attn.config.num_key_value_heads
    B, L, _ = u.shape
    wq = attn.q_proj.weight
    if shared is not None:
        wq = torch.cat([wq.view(H, d, -1)[heads].mean(0) for heads in shared])
    q = _rms((u @ wq.T).view(B, L, H, d))
    k = _rms((u @ attn.k_proj.weight.T).view(B, L, Hkv, d)).repeat_interleave(H // Hkv, dim=2)
    v = (u @ attn.v_proj.weight.T).view(B, L, Hkv, d).repeat_interleave(H // Hkv, dim=2)
    z = (u @ layer.in_proj.weight[: H * d].T).view(B, L, H, d)  # the gate is the converted layer's own choice
    dt = F.softplus(layer.dt_bias)  # (H,), constant per head at init
    alpha = torch.exp(-math.log(2.0) * dt)  # A = -softplus(0)
    t = torch.arange(L, dtype=u.dtype)
    lag = t[:, None] - t[None, :]
    m = dt[:, None, None] * alpha[:, None, None] ** lag.clamp(min=0)  # dt alpha^(t-s) below the diagonal
    m = torch.where(lag > 0, m, torch.where(lag == 0, dt[:, None, None] / 2, torch.zeros_like(m)))
    o = torch.einsum("bhts,bshd->bthd", torch.einsum("bthd,bshd->bhts", q, k) * m, v)
    y = c[:, None] * F.silu(z) * o
    return y.reshape(B, L, H * d) @ attn.o_proj.weight.T


@pytest.mark.parametrize("mimo", [dict(mimo_rank=4), dict(is_mimo=False)], ids=["mimo4", "siso"])
def test_attention_init_is_gated_decayed_linear_attention(mimo):
    """The converted layer = W_o [c_h silu(z) sum_s m_ts (q_t.k_s) v_s], q/k RMS-normed, no RoPE (docstring)."""
    src = llama(kv=2).double()
    model, report = convert_llama(src, [2], calibration_ids=calib(), progress=False, **mimo)
    layer = model.model.layers[2].mamba.double()
    attn = src.model.layers[2].self_attn
    u = torch.randn(2, 21, 64, dtype=torch.float64)
    c = torch.tensor(report["head_scales"][2], dtype=torch.float64)  # fitted per-head scales
    if layer.is_mimo:
        assert torch.allclose(layer.mimo_o.double() * layer.mimo_rank, c[:, None, None].expand_as(layer.mimo_o))
    with torch.no_grad():
        got, ref = layer(u), _expected_from_llama(attn, layer, u, c)
    assert report["per_layer"][2]["dt"] in DT_GRID and report["dt_grid"] == list(DT_GRID)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5  # fp32 weights


def test_the_fit_chooses_dt_from_the_grid_given():
    """dt_grid (CLI --dt-grid) is what the fit chooses from: a one-value grid is that dt everywhere, and as that value
    is also in the full grid, the full grid's fit is at least as close."""
    src = llama(kv=2).double()
    _, full = convert_llama(src, [1, 2], calibration_ids=calib(), progress=False)
    model, pinned = convert_llama(src, [1, 2], calibration_ids=calib(), progress=False, dt_grid=(0.001,))
    assert pinned["dt_grid"] == [0.001] and all(pinned["per_layer"][i]["dt"] == 0.001 for i in (1, 2))
    dt = torch.nn.functional.softplus(model.model.layers[1].mamba.dt_bias.double())
    assert torch.allclose(dt, torch.full_like(dt, 0.001))
    assert all(pinned["per_layer"][i]["init_error"] >= full["per_layer"][i]["init_error"] for i in (1, 2))
    with pytest.raises(ValueError, match="must be positive"):
        dt_grid_values("0.1,0")


def test_fewer_groups_keep_each_heads_keys_and_queries_on_its_own_rank():
    """ngroups = the kv head count at rank R >= heads per group: B is exactly the keys, rank r of a group holds its
    r-th head's queries and mimo_o routes each head through its own rank, so the smaller layer (in_proj (H - G) * 2 *
    R * N rows fewer) computes exactly what one group per head computes: same fit, same logits."""
    src = llama(kv=2).double()
    full, full_report = convert_llama(src, [2], calibration_ids=calib(), progress=False)
    model, report = convert_llama(src, [2], calibration_ids=calib(), progress=False, ngroups=2)
    layer = model.model.layers[2].mamba.double()
    assert layer.num_bc_heads == 2 and model.config.mamba_ngroups == 2
    rows = full.model.layers[2].mamba.in_proj.out_features - layer.in_proj.out_features
    assert rows == (4 - 2) * 2 * 4 * 16
    attn = src.model.layers[2].self_attn
    B = layer.in_proj.weight[2 * 64: 2 * 64 + 4 * 2 * 16].view(4, 2 * 16, 64)
    C = layer.in_proj.weight[2 * 64 + 4 * 2 * 16: 2 * 64 + 8 * 2 * 16].view(4, 2, 16, 64)
    assert all(torch.equal(B[r], attn.k_proj.weight.to(B.dtype)) for r in range(4))
    wq = attn.q_proj.weight.view(2, 2, 16, 64).to(C.dtype)  # (group, head in group, d, hidden)
    assert torch.equal(C[0], wq[:, 0]) and torch.equal(C[2], wq[:, 1])  # head j takes rank j * R // Q = 2j
    assert torch.allclose(C[1], wq.mean(1)) and torch.allclose(C[3], wq.mean(1))  # unowned ranks: the mean query
    c = torch.tensor(report["head_scales"][2], dtype=torch.float64)
    routed = torch.zeros(4, 4, dtype=torch.float64)
    routed[[0, 1, 2, 3], [0, 2, 0, 2]] = 1
    assert torch.allclose(layer.mimo_o[..., 0], c[:, None] * routed)
    u = torch.randn(2, 21, 64, dtype=torch.float64)
    with torch.no_grad():
        got, ref = layer(u), _expected_from_llama(attn, layer, u, c)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5  # fp32 weights
    assert report["per_layer"][2]["dt"] == full_report["per_layer"][2]["dt"]
    assert report["head_scales"][2] == pytest.approx(full_report["head_scales"][2], rel=1e-4)
    with torch.no_grad():  # the gate is fitted on the same statistics, so whole models agree too
        a, b = model.double()(IDS).logits, full.double()(IDS).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
    with pytest.raises(ValueError, match=r"ngroups 3 does not divide the 4 attention heads: choose one of \[1, 2, 4\]"):
        convert_llama(src, [2], progress=False, ngroups=3)


@pytest.mark.parametrize("kv,ngroups,mimo,shared", [
    (1, 1, dict(mimo_rank=2), [[0, 1], [0, 1], [2, 3], [2, 3]]),  # 4 heads on 2 ranks: neighbours share a rank
    (2, 2, dict(is_mimo=False), [[0, 1], [0, 1], [2, 3], [2, 3]]),  # SISO: one rank, the group's mean query
    (2, 1, dict(mimo_rank=4), None),  # a group across kv heads: the mean key (below), each head's own query
], ids=["rank<heads", "siso", "across-kv"])
def test_fewer_ranks_than_heads_share_their_mean_query(kv, ngroups, mimo, shared):
    """Where a group has more heads than ranks, the heads that share a rank share their mean query, and the fit runs
    on the layer's own shape; a group spanning kv heads takes their mean key."""
    src = llama(kv=kv).double()
    model, report = convert_llama(src, [2], calibration_ids=calib(), progress=False, ngroups=ngroups, **mimo)
    layer = model.model.layers[2].mamba.double()
    attn = src.model.layers[2].self_attn
    c = torch.tensor(report["head_scales"][2], dtype=torch.float64)
    u = torch.randn(2, 21, 64, dtype=torch.float64)
    with torch.no_grad():
        got = layer(u)
        if kv == 2 and ngroups == 1:  # compare against a Llama whose kv heads were averaged
            mean_k = attn.k_proj.weight.view(2, 16, 64).mean(0)
            attn.k_proj.weight.copy_(mean_k.repeat(2, 1))
        ref = _expected_from_llama(attn, layer, u, c, shared)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5  # fp32 weights
    assert report["per_layer"][2]["init_error"] is not None


def test_decay_off_rank_one_is_unnormalised_causal_linear_attention():
    """Op level: A dt = 0, lambda = 1, dt = 1, no bias/rotation/skip/gate -> (q k^T * causal) v exactly."""
    g = torch.Generator().manual_seed(3)
    B, L, H, N, P = 2, 29, 3, 8, 5
    q, k = torch.randn(B, L, 1, H, N, generator=g, dtype=torch.float64), torch.randn(B, L, 1, H, N, generator=g,
                                                                                       dtype=torch.float64)
    v = torch.randn(B, L, H, P, generator=g, dtype=torch.float64)
    zeros, ones = torch.zeros(B, L, H, dtype=torch.float64), torch.ones(B, L, H, dtype=torch.float64)
    y, _ = mamba3_chunked(q, k, v, zeros, ones, ones * 50.0, torch.zeros(H, 1, N, dtype=torch.float64),
                          torch.zeros(H, 1, N, dtype=torch.float64), torch.zeros(B, L, 2, dtype=torch.float64),
                          mimo_o=torch.ones(H, 1, P, dtype=torch.float64), chunk_size=8)
    causal = torch.tril(torch.ones(L, L, dtype=torch.float64))
    ref = torch.einsum("bhts,bshp->bthp", torch.einsum("bthn,bshn->bhts", q[:, :, 0], k[:, :, 0]) * causal, v)
    assert (y - ref).abs().max().item() < 1e-10


def test_mimo_ranks_start_identical_rank_r_equals_rank_one():
    src = llama()
    outs = []
    for opts in (dict(mimo_rank=1), dict(mimo_rank=4), dict(is_mimo=False)):
        model, _ = convert_llama(src, [1], calibration_ids=calib(), progress=False, **opts)
        layer = model.model.layers[1].mamba
        if layer.is_mimo:
            R = layer.mimo_rank
            B = layer.in_proj.weight[2 * 64: 2 * 64 + R * 4 * 16].view(R, -1, 64)
            assert all(torch.equal(B[0], B[r]) for r in range(R))
        with torch.no_grad():
            outs.append(model(IDS).logits)
    assert (outs[0] - outs[1]).abs().max().item() < 1e-4 and (outs[0] - outs[2]).abs().max().item() < 1e-4


def test_data_driven_choice_is_deterministic_and_picks_lowest_scores():
    src = llama(num_hidden_layers=6)
    runs = [convert_llama(src, "auto:0.5", calibration_ids=calib(), select=s, progress=False)[1]
            for s in ("kl", "kl", "layer_output")]
    a, b, c = runs
    assert a["selection"]["scores"] == b["selection"]["scores"] and a["mamba_layers"] == b["mamba_layers"]
    scores = a["selection"]["scores"]
    assert len(a["mamba_layers"]) == 3 and a["mamba_layers"] == choose_layers(scores, 3)
    assert max(scores[i] for i in a["mamba_layers"]) <= min(scores[i] for i in a["attention_layers"])
    assert c["selection"]["method"] == "layer_output" and len(c["mamba_layers"]) == 3
    assert choose_layers({0: 1.0, 1: 0.5, 2: 0.5, 3: 2.0}, 2) == [1, 2]
    # "ce": what replacing the one layer adds to the next-token cross-entropy on the calibration tokens
    ce = convert_llama(src, "auto:0.5", calibration_ids=calib(), select="ce", progress=False)[1]["selection"]["scores"]
    i = max(ce, key=ce.get)
    one, _ = convert_llama(src, [i], calibration_ids=calib(), progress=False)
    nll = lambda m: torch.nn.functional.cross_entropy(m(calib()).logits[:, :-1].flatten(0, 1), calib()[:, 1:].flatten())
    with torch.no_grad():
        assert abs((nll(one) - nll(src)).item() - ce[i]) < 1e-4  # (the layer alone, as the hybrid computes it)
    # precomputed scores skip the scoring pass and give the same choice
    again = convert_llama(src, "auto:0.5", calibration_ids=calib(), scores=scores, progress=False)[1]
    assert again["mamba_layers"] == a["mamba_layers"]


def test_data_driven_choice_scores_a_bf16_teacher_with_fp32_candidates():
    """Distillation loads the teacher in bf16 on a GPU; the candidate Mamba-3 layers it scores are fp32."""
    src = llama(num_hidden_layers=2).to(torch.bfloat16)
    report = convert_llama(src, "auto:0.5", calibration_ids=calib(n=2, L=16), dtype=torch.float32, progress=False)[1]
    assert len(report["mamba_layers"]) == 1 and all(math.isfinite(v) for v in report["selection"]["scores"].values())


def test_random_init_option():
    src = llama()
    model, report = convert_llama(src, 0.5, init="random", calibration_ids=calib(), progress=False)
    assert report["init"] == "random" and report["mamba_layers"] == [1, 3]
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    assert report["per_layer"][1]["init_error"] > 0.5  # random layers do not reproduce the attention


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2_convert(arch):
    torch.manual_seed(0)
    kw = {**SMALL, "num_key_value_heads": 2}
    src = (MistralForCausalLM(MistralConfig(**kw, sliding_window=None)) if arch == "mistral"
           else Qwen2ForCausalLM(Qwen2Config(**kw))).eval()
    with torch.no_grad():
        if arch == "qwen2":  # make the q/k/v biases matter
            for layer in src.model.layers:
                for p in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, p).bias.normal_()
        model, _ = convert_llama(src, [], progress=False)
        assert torch.equal(model(IDS).logits, src(IDS).logits)
        model, report = convert_llama(src, [0], calibration_ids=calib(), progress=False)
        assert torch.isfinite(model(IDS).logits).all()
    assert (arch == "qwen2") == any("bias" in w for w in report["warnings"])


def test_errors_on_unsupported_inputs(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        convert_llama(gpt2, [0], progress=False)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        convert_llama(tmp_path / "gpt2", [0], progress=False)
    (tmp_path / "w.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="unsupported source file"):
        convert_llama(tmp_path / "w.bin", [0], progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        convert_llama(tmp_path / "nothing", [0], progress=False)
    with pytest.raises(ValueError, match="not a multiple of hidden_size"):
        convert_llama(llama(head_dim=8), [0], progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        convert_llama(llama(), "auto:0.5", progress=False)
    with pytest.raises(ValueError, match="derives"):
        convert_llama(llama(), [0], d_state=32, progress=False)
    with pytest.raises(ValueError, match="init must be"):
        convert_llama(llama(), [0], init="zeros", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        convert_llama(llama(), [9], progress=False)
    assert parse_mamba_layers("auto:0.25", 8) == (None, 0.25)
    assert attention_shapes(llama().config) == dict(d_state=16, headdim=16, ngroups=4, expand=1)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(ord("a") + i): 3 + i for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_save_load_roundtrip_and_cli(tmp_path, capsys):
    src = llama(tie=True)
    tok = _tiny_tokenizer()
    src.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    text = "the quick brown fox jumps over the lazy dog " * 40
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "a.txt").write_text(text)
    rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--mamba-layers", "auto:0.5",
               "--calibration", str(tmp_path / "calib"), "--calibration-seq-len", "32", "--mimo-rank", "2",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "per-layer scores" in out and "init_err" in out
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert len(report["mamba_layers"]) == 2 and report["calibration"]["source"] == "texts"
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded).__name__ == "HybridMamba3ForCausalLM" and loaded.config.mamba_layers == report["mamba_layers"]
    # the CLI result equals the library result, and survives the round trip
    model, _ = convert_llama(tmp_path / "src", "auto:0.5", calibration_texts=[text], calibration_seq_len=32,
                             mimo_rank=2, progress=False)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
        gen = loaded.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)
    with pytest.raises(ValueError, match="exists"):
        save_hybrid(model, tmp_path / "out")
    rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--mamba-layers", "0,2", "--no-progress"])
    assert rc == 2 and "exists" in capsys.readouterr().err
    rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--mamba-layers", "0,2", "--no-progress",
               "--overwrite", "--dtype", "bfloat16", "--init", "random"])
    assert rc == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.mamba_layers == [0, 2] and loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--mamba-layers", "1", "--no-progress",
               "--overwrite", "--ngroups", "kv"])  # the source's 2 key/value heads
    assert rc == 0 and AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[1].mamba.num_bc_heads == 2
    rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--mamba-layers", "1", "--no-progress",
               "--overwrite", "--ngroups", "4"])
    assert rc == 0 and AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[1].mamba.num_bc_heads == 4
    for bad, says in (("3", "choose one of [1, 2, 4]"), ("two", "a divisor of the 4 attention heads or 'kv' (2)")):
        rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--mamba-layers", "1", "--no-progress",
                   "--overwrite", "--ngroups", bad])
        assert rc == 2 and says in capsys.readouterr().err
