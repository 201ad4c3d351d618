"""`HybridMamba3Model` / `HybridMamba3ForCausalLM`: Llama with a registry-chosen mixer per layer.

Embeddings, RMSNorms, MLPs and rotary embedding are Llama's own modules, and kept attention layers
are transformers' `LlamaAttention` under the attribute `self_attn`, so a Llama state dict maps key
for key. Attention mixers get the causal mask from `create_causal_mask`; recurrent mixers get the 2D
padding mask. Caching goes through transformers' `DynamicCache(config=...)` or
`StaticCache(config=..., max_cache_len=...)` (`generate(cache_implementation="static")`), passed as `cache` (or, as
before transformers 5.24, `past_key_values`; see `cache.CACHE_KWARG`); the Mamba-3 slots and their generation hooks
are in `cache`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention import SPLIT_KV
from .cache import CACHE_FIELD, CACHE_KWARG, one_cache
from .configuration_hybrid_mamba3 import HybridMamba3Config
from .mamba3 import Mamba3
from .mamba3 import padding_mask as mamba_padding_mask
from .registry import get_mixer
from .remote_code import REMOTE_AUTO_MAP

# see HybridMamba3ForCausalLM._prepare_cache_for_generation
GENERATE_NAMES_IT_CACHE_PARAMS = '"cache_params"' in inspect.getsource(GenerationMixin._prepare_cache_for_generation)


class HybridMamba3DecoderLayer(GradientCheckpointingLayer):
    """norm -> mixer -> residual -> norm -> MLP -> residual, the mixer chosen by `config.mixers[i]`."""

    def __init__(self, config: HybridMamba3Config, layer_idx: int):
        super().__init__()
        self.spec = get_mixer(config.mixers[layer_idx])
        setattr(self, self.spec.attr, self.spec.build(config, layer_idx))
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.spec.attr)

    def forward(self, hidden_states: torch.Tensor, causal_mask=None, padding_mask=None, position_embeddings=None,
                seq_idx=None, **kwargs) -> torch.Tensor:
        """The cache comes in kwargs under `CACHE_KWARG` (there gradient checkpointing finds it to drop it), and
        goes on to the mixer under that name. Attention mixers take the causal mask (packed sequences are in it, or
        in the flash kwargs), other mixers the 2D padding mask (checked by the model, `mask_checked`) and the packed
        sequences' `seq_idx`."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.spec.is_attention:
            out = self.mixer(hidden_states, position_embeddings=position_embeddings, attention_mask=causal_mask,
                             **kwargs)
        else:
            out = self.mixer(hidden_states, attention_mask=padding_mask, mask_checked=True, seq_idx=seq_idx, **kwargs)
        hidden_states = residual + (out[0] if isinstance(out, tuple) else out)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class HybridMamba3PreTrainedModel(PreTrainedModel):
    config_class = HybridMamba3Config
    config: HybridMamba3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridMamba3DecoderLayer"]
    _skip_keys_device_placement = [CACHE_KWARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # the decode step traces whole with the torch ops (tests/test_generation.py); True once the Triton step does too
    _can_compile_fullgraph = False
    # Mamba-3 decay/bias/MIMO/norm parameters stay fp32 when loading in fp16 or bf16.
    _keep_in_fp32_modules_strict = ["dt_bias", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", "mamba.D",
                                    "B_norm", "C_norm", "mamba.norm"]
    _can_record_outputs = {"hidden_states": HybridMamba3DecoderLayer, "attentions": LlamaAttention}

    def save_pretrained(self, save_directory, *args, remote_code: bool = True, **kwargs):
        """safetensors + config, plus (remote_code) two small remote-code files named in config.json's auto_map, so
        that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a process that never
        imported hybrid_mamba3 (the package must be installed): stock lm-eval and TRL command lines, say.

        The price of remote code is transformers' question: any process that reads such a config.json without
        trust_remote_code and without hybrid_mamba3 imported (AutoTokenizer reads it too) asks whether to run it.
        remote_code=False writes neither: nothing ever asks, and the model loads wherever hybrid_mamba3 is
        imported."""
        from .remote_code import write_remote_code
        if remote_code:
            self.config.auto_map = dict(REMOTE_AUTO_MAP)
        elif getattr(self.config, "auto_map", None) == REMOTE_AUTO_MAP:
            del self.config.auto_map
        super().save_pretrained(save_directory, *args, **kwargs)
        if remote_code:
            write_remote_code(save_directory)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """No attention asked for: where transformers would take sdpa, `sdpa_splitkv` (attention.py), which is sdpa
        except at one-token decode steps on a GPU. There its split-KV kernels decode faster than torch's sdpa in
        every cell measured (H100, evals/results/bench_model_h100.json): Llama-3.2-1B shape, 16 x 16k, 1.66x for the
        50% hybrid with a static cache and compile, 1.7x with the default dynamic cache."""
        chosen = super().get_correct_attn_implementation(requested_attention, is_init_check)
        return SPLIT_KV if requested_attention is None and chosen == "sdpa" else chosen

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Mamba3):
            module.reset_mamba_parameters(copy=init.copy_)


class HybridMamba3Model(HybridMamba3PreTrainedModel):
    def __init__(self, config: HybridMamba3Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(HybridMamba3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                past_key_values: Cache | None = None, **kwargs) -> BaseModelOutputWithPast:
        cache = one_cache(cache, past_key_values, kwargs.pop("cache_params", None))
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None and self.training:
            use_cache = False  # training builds no cache, and the Mamba-3 layers compute no final state
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        seq_idx = kwargs.pop("seq_idx", None)
        if position_ids is None:
            past_seen = _past_length(cache)
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)
        elif (seq_idx is None and kwargs.get("cu_seq_lens_q") is None and attention_mask is None and cache is None
              and self.config.mamba_layers):
            # transformers' own rule for its attention masks: a new sequence wherever a position is not its
            # predecessor's plus one (TRL's padding-free and packing batches send no other mark); None when no row
            # holds more than one
            seq_idx = find_packed_sequence_indices(position_ids)
        # generate() with a compileable (static) cache hands over the masks already built, one per layer kind
        # (transformers' create_masks_for_generate): a 4D one for attention and the 2D padding mask for recurrent
        # layers, None where nothing is padded or at a one-token step
        masks = attention_mask if isinstance(attention_mask, dict) else None
        if masks is not None and self.config.mamba_layers and "linear_attention" not in masks:
            raise ValueError(f"a dict attention_mask needs a 'linear_attention' entry (the 2D padding mask) for the "
                             f"Mamba-3 layers, got keys {sorted(masks)}: pass the 2D mask instead")
        padding_mask = recurrent_padding_mask(masks["linear_attention"] if masks is not None else attention_mask,
                                              inputs_embeds.shape[1], cache) if self.config.mamba_layers else None
        causal_mask = None
        if masks is not None:
            causal_mask = masks.get("full_attention")
        elif any(get_mixer(m).is_attention for m in self.config.mixers):
            # the cache positionally: its keyword is `cache` from transformers 5.24, `past_key_values` before
            causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache,
                                             position_ids=position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(hidden_states, causal_mask=causal_mask, padding_mask=padding_mask,
                                  position_embeddings=position_embeddings, position_ids=position_ids, seq_idx=seq_idx,
                                  use_cache=use_cache, **{CACHE_KWARG: cache}, **kwargs)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})


def recurrent_padding_mask(attention_mask: torch.Tensor | None, length: int, cache: Cache | None):
    """The Mamba-3 layers' padding mask for a call on `length` new positions, checked here once for all layers
    (`mamba3.padding_mask`: one host sync). A one-token call with a cache is a decode step, and a generated token is
    never padding (transformers' `create_recurrent_attention_mask` has the same rule): no check, no sync, so the
    decode step stays capturable."""
    if attention_mask is None or (length == 1 and cache is not None):
        return None
    if attention_mask.dim() != 2:
        raise ValueError("Mamba-3 layers take a 2D (batch, seq) padding mask; custom 4D masks cannot be honoured by "
                         "a recurrent layer (pack sequences with seq_idx or position_ids instead)")
    return mamba_padding_mask(attention_mask, length, carries_state=cache is not None)


def _past_length(cache: Cache | None) -> int | torch.Tensor:
    """Tokens already in the cache, as its first attention slot counts them (a static slot counts in a tensor, so
    that compiled code does not specialise on it). A cache with no attention slot (an all-Mamba model) cannot say,
    and needs not: positions only feed the rotary embedding of attention layers."""
    layers = getattr(cache, "layers", None) or []
    first = next((i for i, layer in enumerate(layers) if isinstance(layer, CacheLayerMixin)), None)
    return 0 if first is None else cache.get_seq_length(first)


class HybridMamba3ForCausalLM(HybridMamba3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: HybridMamba3Config):
        super().__init__(config)
        self.model = HybridMamba3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """Releases whose generate() keeps the cache of any model whose class name holds "mamba" under `cache_params`
        (the Mamba models' keyword; 5.17 does, 5.25 does not) also look for the user's cache there. The model takes
        that name too, but their assisted generation looks for the cache under `past_key_values` only: keep it
        there, as later releases do for every model. Not for a model without attention, whose cache those releases
        cannot ask for its length (they raise): there it stays under `cache_params`, as for their Mamba models."""
        if not GENERATE_NAMES_IT_CACHE_PARAMS:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get(CACHE_KWARG) is not None:  # the user's cache, where those releases look for it
            model_kwargs["cache_params"] = model_kwargs.pop(CACHE_KWARG)
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        has_attention = self.config.num_hidden_layers > len(self.config.mamba_layers)
        if model_kwargs.get("cache_params") is not None and has_attention:
            model_kwargs[CACHE_KWARG] = model_kwargs.pop("cache_params")
        return out

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                past_key_values: Cache | None = None, **kwargs) -> CausalLMOutputWithPast:
        if labels is not None and use_cache is None:
            use_cache = False  # a loss needs no cache (an explicit use_cache=True still builds one)
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)
