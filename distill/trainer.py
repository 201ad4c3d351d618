"""Distillation on transformers' Trainer: a subclass that only adds the loss (DeepSpeed, accelerate, gradient
accumulation and checkpointing, bf16, schedulers, logging and resuming stay the Trainer's).

- Stage "align" (after MOHAWK and LoLCATs): one teacher pass gives, at every layer the student replaced, the input of
  its attention (after the layer's input norm) and the attention's output; each new Mamba-3 layer is trained to map
  the one to the other (`losses.alignment_loss`), all of them at once from that pass. The Trainer's model is then
  `ReplacedLayers`, the student's new mixers alone: only they train, and a distributed run's gradient sync sees
  every call (the wrapper's forward runs them).
- Stage "kd": the student end to end, against the teacher's next-token distribution (`losses.distillation_loss`).
  The Trainer's model is the student (or its PEFT wrapper); which parameters train is `select_trainable`'s choice.
  The student's forward keeps no logits (an empty `logits_to_keep`): the loss makes them chunk by chunk from the
  final hidden state, which a hook on the base model hands over.
The teacher is frozen, in eval mode, outside the optimizer, on the training device; under DeepSpeed ZeRO-3 it is
partitioned across the ranks as the student is (TRL's `prepare_deepspeed`, an inference engine without optimizer);
under FSDP every rank holds it whole.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import Trainer
from transformers.masking_utils import find_packed_sequence_indices

from ..norms import fuse_rms_norms
from .losses import alignment_loss, distillation_loss
from .options import STAGES, TRAINABLE


def replaced_layers(student, teacher) -> list[int]:
    """Indices of the student's layers whose mixer is not the teacher's attention (those distillation trains first);
    checks that the student is a hybrid of this teacher (layer count, widths, vocabulary)."""
    s, t = student.config, teacher.config
    for name in ("num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size"):
        if getattr(s, name) != getattr(t, name):
            raise ValueError(f"the student is not a hybrid of this teacher: {name} {getattr(s, name)} vs "
                             f"{getattr(t, name)} (convert the teacher with hybrid-mamba3 convert)")
    if not hasattr(s, "mixers"):
        raise ValueError(f"the student ({type(student).__name__}) is not a hybrid: convert the teacher first")
    layers = [i for i, m in enumerate(s.mixers) if m != "attention"]
    if not layers:
        raise ValueError("the student has no Mamba-3 layer: nothing to distil")
    return layers


def select_trainable(student, train: str) -> list[str]:
    """Freeze the student but for `train`: "mamba" (the new mixers), "mamba+mlp" (and every MLP), "all". Returns the
    names of the trainable parameters. (train "lora": `run._with_lora` wraps the student with PEFT.)"""
    if train not in TRAINABLE:
        raise ValueError(f"train must be one of {TRAINABLE}, got {train!r}")
    names = []
    for name, p in student.named_parameters():
        keep = (train == "all" or ".mamba." in name or (train == "mamba+mlp" and ".mlp." in name))
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    return names


class ReplacedLayers(nn.Module):
    """The student's new mixers, keyed by layer index: stage 1's trainable model. forward(inputs, seq_idx) maps the
    teacher's attention inputs at those layers to the mixers' outputs."""

    _no_split_modules = ["Mamba3"]  # FSDP's default wrap policy: a unit per mixer

    def __init__(self, student, layers: list[int]):
        super().__init__()
        self.layers = layers
        self.mixers = nn.ModuleDict({str(i): student.model.layers[i].mixer for i in layers})

    def forward(self, inputs: dict[int, torch.Tensor], seq_idx: torch.Tensor | None = None):
        return [self.mixers[str(i)](inputs[i], seq_idx=seq_idx) for i in self.layers]


@contextlib.contextmanager
def attention_io(teacher, layers: list[int]):
    """Records, during a teacher forward, each listed layer's attention input and output (dicts by layer index)."""
    ins, outs, handles = {}, {}, []
    for i in layers:
        def hook(module, args, kwargs, output, i=i):
            ins[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            outs[i] = output[0] if isinstance(output, tuple) else output
        handles.append(teacher.model.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        yield ins, outs
    finally:
        for h in handles:
            h.remove()


class DistillTrainer(Trainer):
    """Trainer whose loss is distillation from `teacher` (module docstring). stage: "align" (model: a
    `ReplacedLayers`) or "kd" (model: the student). The KD options are `losses.distillation_loss`'s; fused_norms:
    `norms.fuse_rms_norms` on both models."""

    def __init__(self, *args, teacher, stage: str = "kd", temperature: float = 1.0, top_k: int | None = None,
                 kl_weight: float = 1.0, ce_weight: float = 0.0, chunk_tokens: int = 2048, fused_norms: bool = False,
                 **kwargs):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.kd = dict(temperature=temperature, top_k=top_k, kl_weight=kl_weight, ce_weight=ce_weight,
                       chunk_tokens=chunk_tokens)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        # under FSDP2 bf16 is autocast around the student's forward, as accelerate gives every other engine's forward
        # (its FSDP2 path gives none, relying on the gather in bf16 this replaces)
        self._autocast = contextlib.nullcontext
        if self.is_fsdp_enabled:
            fsdp_gathers_parameters_as_stored(self.accelerator.state.fsdp_plugin)
            if self.accelerator.native_amp:
                self._autocast = self.accelerator.autocast
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            from trl.models.utils import prepare_deepspeed  # the teacher partitioned as the student is, for inference

            self.teacher = prepare_deepspeed(self.teacher, self.accelerator).module
        if fused_norms:  # the teacher's and the student's Llama RMSNorms on the Triton kernel (CUDA inputs)
            fuse_rms_norms(self.teacher)
            fuse_rms_norms(self.model)
        # kd: the Trainer counts the predicted positions of all the micro-batches an optimizer step accumulates (over
        # all ranks) and hands the count to compute_loss, which divides its sums by it; align: a mean per
        # micro-batch (each layer's error relative to its own target), which the Trainer divides by the steps
        self.model_accepts_loss_kwargs = self.loss_is_scaled_for_ga = stage == "kd"
        self.args.remove_unused_columns = False  # the loss takes labels and position_ids, whatever the model's forward
        self._sums: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if v is not None}
        labels = inputs.pop("labels")
        mask = inputs.get("attention_mask")
        seq_idx = None
        if mask is None and "position_ids" in inputs:
            seq_idx = find_packed_sequence_indices(inputs["position_ids"])  # the model's rule (packed rows)
        if self.stage == "align":
            core = self.accelerator.unwrap_model(model)
            with torch.no_grad(), attention_io(self.teacher, core.layers) as (ins, outs):
                self.teacher.model(**inputs, use_cache=False)
            dtype = next(core.parameters()).dtype  # the student's (the teacher may run in another)
            with self._autocast():
                preds = model({i: x.to(dtype) for i, x in ins.items()}, seq_idx=seq_idx)
            loss = alignment_loss(preds, [outs[i] for i in core.layers], None if mask is None else mask.bool())
            self._track(align_mse=float(loss.detach()))
            return (loss, None) if return_outputs else loss
        with torch.no_grad():
            teacher_hidden = self.teacher.model(**inputs, use_cache=False).last_hidden_state
        causal_lm = _causal_lm(self.accelerator.unwrap_model(model))
        stash = {}
        handle = causal_lm.model.register_forward_hook(lambda m, a, out: stash.update(h=out.last_hidden_state))
        try:  # no logits: an empty index keeps none
            with self._autocast():
                model(**inputs, use_cache=False, logits_to_keep=torch.zeros(0, dtype=torch.long, device=labels.device))
        finally:
            handle.remove()
        loss, parts = distillation_loss(stash["h"], causal_lm.lm_head, teacher_hidden, self.teacher.lm_head, labels,
                                        num_items=num_items_in_batch, **self.kd)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # the count is over all ranks; their gradients are averaged
        self._track(kl=parts["kl"], ce=parts["ce"])
        return (loss, None) if return_outputs else loss

    def _track(self, **values):
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._sums["_n"] = self._sums.get("_n", 0) + 1

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds the loss parts' means since the last log (kl, ce; align_mse) to what the Trainer logs."""
        n = self._sums.pop("_n", 0)
        if n:
            prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
            logs.update({prefix + k: v / n for k, v in self._sums.items()})
        self._sums = {}
        super().log(logs, *args, **kwargs)


def fsdp_gathers_parameters_as_stored(plugin) -> None:
    """FSDP2 as the DeepSpeed configs' torch_autocast mode: parameters gathered in the dtype they are stored in,
    gradients reduced in fp32, the matmuls in bf16 by the Trainer's autocast. With bf16 on, accelerate's FSDP policy
    would gather every parameter in bf16, the Mamba-3 fp32 ones (dt_bias, B/C biases, MIMO, D, norms) included."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError("distillation under FSDP needs FSDP2 (TrainingArguments fsdp_config version 2, accelerate's "
                         "fsdp_version: 2): FSDP1 gathers each unit's parameters as one flat buffer of one dtype, the "
                         "Mamba-3 fp32 ones with the rest")
    plugin.mixed_precision_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)


def _causal_lm(model) -> nn.Module:
    """The causal LM itself (its .model returns last_hidden_state, its .lm_head makes logits), PEFT-wrapped or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
