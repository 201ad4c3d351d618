"""The options of a distillation run (`DistillOptions`): the CLI's flags and a YAML recipe's keys (`load_recipe`).
Kept free of heavy imports, so the CLI builds its parser without loading the Trainer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

STAGES = ("align", "kd")
TRAINABLE = ("mamba", "mamba+mlp", "all", "lora")
# packed rows: sdpa gets a block-diagonal 4D mask (no flash kernel), flex_attention a block mask, flash_attention_2
# the documents' boundaries (varlen; needs flash-attn)
ATTENTION = ("sdpa", "flex_attention", "flash_attention_2", "eager")


@dataclasses.dataclass
class DistillOptions:
    """Everything a distillation run takes; field names are the CLI flags (dashes for underscores) and recipe keys."""

    teacher: str = ""  # a Hugging Face directory or a .gguf file (a Llama-style causal LM)
    output_dir: str = ""
    data: list = dataclasses.field(default_factory=list)  # text files / directories / .jsonl, or a shard directory
    student: str | None = None  # a converted hybrid directory; None: convert the teacher (mamba_layers, ...)
    mamba_layers: Any = "auto:0.25"
    mimo_rank: int = 4
    ngroups: str | None = None  # B/C groups of the converted layers: a divisor of the heads or "kv" (None: one a head)
    dt_grid: str | None = None  # comma-separated dt values the conversion's fit chooses from (a YAML list too; None:
    # convert.DT_GRID)
    chunk_size: int = 16
    stage: str = "both"  # align, kd or both
    align_tokens: int = 2_000_000
    tokens: int = 20_000_000  # for stage kd
    seq_len: int = 1024
    batch_size: int = 8  # rows per device and step
    grad_accum: int = 1
    lr: float = 1e-3  # stage kd
    align_lr: float = 3e-3
    warmup_ratio: float = 0.02
    weight_decay: float = 0.0
    train: str = "mamba"  # what stage kd trains: mamba, mamba+mlp, all, lora (the mixers + LoRA on the rest)
    lora_rank: int = 16  # train lora: the adapters' rank (alpha = 2 x rank)
    temperature: float = 1.0
    top_k: int | None = None
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 2048
    heldout: float = 0.01
    max_data_tokens: int | None = None
    eval_tokens: int = 65536  # held-out tokens scored before and after
    save_steps: int = 200
    deepspeed: str | None = None  # a DeepSpeed JSON (configs/ds_zero2.json, ds_zero3.json) or None
    # FSDP2 through accelerate (TrainingArguments' fsdp): the student's parameters, gradients and optimizer state
    # sharded over the ranks, a unit per decoder layer; the teacher whole on every rank (ZeRO-3 partitions it too)
    fsdp: bool = False
    # seconds a rank waits in a collective before the run fails (TrainingArguments' ddp_timeout): a short one ends a
    # run whose other rank died instead of hanging on it
    ddp_timeout: int = 1800
    bf16: bool | None = None  # None: on CUDA
    tf32: bool | None = None  # fp32 matmuls (the loss's student head) on TF32 tensor cores; None: with bf16 on CUDA
    # both models' Llama RMSNorms on the Triton norm kernel (CUDA inputs only: elsewhere the torch formula runs;
    # norms.fuse_rms_norms). H100, SmolLM2 50% b16 x 2048: 81.2k -> 94.7k tokens/s, the same losses
    fused_norms: bool = True
    gradient_checkpointing: bool = False
    # stage kd's student under torch.compile (TrainingArguments' torch_compile; the first steps pay the compile, ~1
    # min). H100, SmolLM2 50% b16 x 2048: 94.2k -> 110.2k tokens/s, peak 31.6 -> 29.0 GiB (evals/bench_distill.py)
    torch_compile: bool = False
    torch_compile_backend: str = "inductor"
    attn_implementation: str | None = None  # teacher's and student's attention (sdpa, flex_attention, ...); None: default
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def check(self) -> "DistillOptions":
        if not self.teacher:
            raise ValueError("a teacher is needed (--teacher: a Hugging Face directory or a .gguf file)")
        if not self.output_dir:
            raise ValueError("an output directory is needed (--output-dir)")
        if not self.data:
            raise ValueError("no data (--data: text files, directories, .jsonl files, a shard directory, "
                             "python-docs for the documentation Python ships, or teacher:<tokens> to sample documents "
                             "from the teacher)")
        from .data import teacher_tokens

        teacher_tokens(self.data)  # (a malformed teacher:N raises here, before anything runs)
        if self.stage not in STAGES + ("both",):
            raise ValueError(f"stage must be align, kd or both, got {self.stage!r}")
        if self.train not in TRAINABLE:
            raise ValueError(f"train must be one of {', '.join(TRAINABLE)}, got {self.train!r}")
        if self.attn_implementation not in (None,) + ATTENTION:
            raise ValueError(f"attn_implementation must be one of {', '.join(ATTENTION)}, got "
                             f"{self.attn_implementation!r}")
        if isinstance(self.dt_grid, (list, tuple)):  # a YAML recipe's list: the flag's text form, as the report keeps
            self.dt_grid = ",".join(str(x) for x in self.dt_grid)
        if self.dt_grid is not None:
            from ..convert import dt_grid_values

            dt_grid_values(self.dt_grid)  # (a malformed grid raises here, before anything runs)
        if self.fsdp and self.deepspeed:
            raise ValueError("choose one engine: fsdp or deepspeed, not both")
        for name in ("seq_len", "batch_size", "grad_accum", "save_steps", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self


def deepspeed_config(path: str) -> dict:
    """A DeepSpeed JSON config, as the runs read it to choose their Trainer flags."""
    import json

    return json.loads(Path(path).read_text())


def load_recipe(path_or_name: str, options: type = DistillOptions) -> dict:
    """A YAML recipe (yaml.safe_load): a path, or the name of one shipped in configs/ ("distill_smollm2"); its keys
    must be fields of `options` (DistillOptions, or SFTOptions for fine-tuning recipes)."""
    import yaml

    from ..configs import load_config

    path = Path(path_or_name)
    recipe = yaml.safe_load(path.read_text()) if path.is_file() else load_config(
        path_or_name if path_or_name.endswith((".yaml", ".yml")) else path_or_name + ".yaml")
    fields = {f.name for f in dataclasses.fields(options)}
    recipe = {k.replace("-", "_"): v for k, v in (recipe or {}).items()}
    unknown = sorted(set(recipe) - fields)
    if unknown:
        raise ValueError(f"unknown recipe keys {unknown}; known: {sorted(fields)}")
    return recipe
