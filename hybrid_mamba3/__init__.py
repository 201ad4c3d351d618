"""hybrid-mamba3: Mamba-3 MIMO mixers slotted into Llama-style models, inside the Hugging Face stack.

Importing the package registers `HybridMamba3Config` / `HybridMamba3Model` / `HybridMamba3ForCausalLM`
with transformers' Auto classes (model_type "hybrid_mamba3").
"""

from . import _shadow_guard  # noqa: F401  (first: see its docstring)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import attention  # noqa: F401  (registers attn_implementation="sdpa_gqa" with transformers)
from .configuration_hybrid_mamba3 import HybridMamba3Config, resolve_positions
from .generation import BucketedGenerator
from .kernels import Mamba3State
from .lora import check_lora_targets, lora_targets
from .mamba3 import Mamba3
from .modeling_hybrid_mamba3 import HybridMamba3ForCausalLM, HybridMamba3Model, HybridMamba3PreTrainedModel
from .registry import MixerSpec, get_mixer, mixer_names, register_mixer

AutoConfig.register(HybridMamba3Config.model_type, HybridMamba3Config, exist_ok=True)
AutoModel.register(HybridMamba3Config, HybridMamba3Model, exist_ok=True)
AutoModelForCausalLM.register(HybridMamba3Config, HybridMamba3ForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "BucketedGenerator", "HybridMamba3Config", "HybridMamba3ForCausalLM", "HybridMamba3Model",
    "HybridMamba3PreTrainedModel", "Mamba3", "Mamba3State", "MixerSpec", "check_lora_targets", "get_mixer",
    "lora_targets", "mixer_names", "register_mixer", "resolve_positions",
]
