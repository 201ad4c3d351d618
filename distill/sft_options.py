"""The options of a LoRA fine-tuning run (`SFTOptions`): `hybrid-mamba3 sft`'s flags and a YAML recipe's keys
(`options.load_recipe(path, SFTOptions)`). Free of heavy imports, as `options.py` is."""

from __future__ import annotations

import dataclasses

MODES = ("sft", "gkd")


@dataclasses.dataclass
class SFTOptions:
    """Everything `sft.sft` takes; field names are the CLI flags (dashes for underscores) and recipe keys."""

    model: str = ""  # a hybrid directory (hybrid-mamba3 convert / distill), with its tokenizer
    output_dir: str = ""
    data: list = dataclasses.field(default_factory=list)  # .jsonl files (messages / prompt+completion / text) or a
    # dataset saved with datasets' save_to_disk
    mode: str = "sft"  # sft: TRL's SFTTrainer; gkd: on-policy distillation from --teacher (TRL's GKDTrainer)
    teacher: str | None = None  # gkd: the original Llama (directory or .gguf)
    lora_targets: str = "all"  # mamba, attention, mlp, all, or several joined by + (hybrid_mamba3.lora_targets)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    chat_template: str | None = None  # a .jinja path or a shipped name (smollm2_assistant) put on the tokenizer
    assistant_only_loss: bool = False  # conversational data: loss on the assistant's tokens only (needs generation
    # markers in the chat template)
    completion_only_loss: bool | None = None  # prompt+completion data: loss on the completion only (None: TRL's
    # default, on for such data)
    packing: bool = False  # TRL's best-fit packing (padding-free rows; documents kept apart)
    padding_free: bool = False
    max_length: int = 1024
    epochs: float = 1.0
    max_steps: int = -1  # > 0: this many optimizer steps instead of epochs
    batch_size: int = 8  # rows per device and step
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    eval_fraction: float = 0.05  # rows held out; their loss is measured before and after
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: on CUDA
    deepspeed: str | None = None  # a DeepSpeed JSON (configs/ds_zero2.json, ds_zero3.json) or None
    merge: bool = True  # also save the merged model (output_dir/merged), a plain hybrid
    lmbda: float = 0.5  # gkd: share of steps on the student's own generations
    beta: float = 0.5  # gkd: generalized Jensen-Shannon interpolation (0: forward KL, 1: reverse KL)
    temperature: float = 0.9  # gkd: sampling temperature of those generations
    max_new_tokens: int = 128  # gkd
    logging_steps: int = 10
    save_steps: int = 500
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def check(self) -> "SFTOptions":
        if not self.model:
            raise ValueError("a model is needed (--model: a hybrid directory, e.g. hybrid-mamba3 distill's "
                             "OUTPUT_DIR/model)")
        if not self.output_dir:
            raise ValueError("an output directory is needed (--output-dir)")
        if not self.data:
            raise ValueError("no data (--data: .jsonl files with messages, prompt/completion or text, or a dataset "
                             "directory; hybrid-mamba3 sft-data builds one from documentation)")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "gkd" and not self.teacher:
            raise ValueError("mode gkd distils on the student's own generations from a teacher: give --teacher (the "
                             "original Llama)")
        if self.mode == "gkd" and (self.packing or self.padding_free):
            raise ValueError("mode gkd generates from left-padded prompts: packing and padding_free do not apply")
        for name in ("lora_r", "batch_size", "grad_accum", "max_length", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio is a share of the steps, in [0, 1): got {self.warmup_ratio}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        return self
