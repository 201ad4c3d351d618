"""`sft(options)`: LoRA fine-tuning of a hybrid with TRL, for users who do not write the TRL code themselves.

    output_dir/
      train/      the Trainer's checkpoints (checkpoint-N, each with a COMPLETE marker once written)
      adapter/    the LoRA adapter (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), adapter))
                  with the tokenizer (and the chat template it trained with)
      merged/     (merge) the model with the adapter merged in: a plain hybrid directory
      sft_report.json   options, LoRA targets, held-out loss before and after, the loss curve, the tokens this call
                        trained on (not padding) and tokens/s (training alone, evaluations left out)

- mode "sft": TRL's SFTTrainer with a `peft.LoraConfig` whose targets are `hybrid_mamba3.lora_targets` (checked to
  have all been adapted). Packing, padding-free rows, completion-only and assistant-only loss are TRL's own options.
- mode "gkd": on-policy distillation from the original Llama (the teacher), TRL's GKDTrainer. TRL 1.16 keeps it in
  `trl.experimental.gkd` (its stable `DistillationTrainer` is the lmbda=1 case). The student generates from
  left-padded prompts inside training.
Everything else (DeepSpeed, bf16, gradient checkpointing, resuming, logging) is transformers' Trainer's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from ..configs import load_chat_template
from ..lora import check_lora_targets, lora_targets
from .run import _CompleteMarker, latest_complete_checkpoint, start_run, trainer_bf16
from .sft_options import SFTOptions

FORMATS = (("messages",), ("prompt", "completion"), ("text",))


def load_rows(paths) -> "datasets.Dataset":  # noqa: F821
    """The data as a `datasets.Dataset`: .jsonl files (one JSON object a line) or one directory written by
    `Dataset.save_to_disk`. Every row needs `messages`, or `prompt` and `completion`, or `text` (TRL's formats)."""
    from datasets import Dataset, load_from_disk

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if len(paths) == 1 and paths[0].is_dir():
        ds = load_from_disk(str(paths[0]))
    else:
        rows = []
        for p in paths:
            if not p.is_file():
                raise ValueError(f"data {str(p)!r} is neither a .jsonl file nor a saved dataset directory")
            with open(p, encoding="utf-8") as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
        ds = Dataset.from_list(rows)
    if not len(ds):
        raise ValueError(f"no rows in {[str(p) for p in paths]}")
    if not any(all(k in ds.column_names for k in f) for f in FORMATS):
        raise ValueError(f"the rows have columns {ds.column_names}; TRL takes messages (conversations), prompt and "
                         "completion, or text")
    return ds


def sft(options: SFTOptions, callbacks: list | None = None) -> Path:
    """Fine-tune `options.model` with LoRA (module docstring); returns output_dir. Every rank of a distributed launch
    calls it; the first writes the merged model and the report."""
    from accelerate import PartialState
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerState, set_seed
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ..convert import save_hybrid

    o = options.check()
    set_seed(o.seed)  # the LoRA initialisation (PEFT wraps the model before the Trainer seeds) repeats run to run
    state = PartialState(cpu=not torch.cuda.is_available())
    out = start_run(o, state)
    bf16 = torch.cuda.is_available() if o.bf16 is None else o.bf16
    tokenizer = AutoTokenizer.from_pretrained(o.model)
    if o.chat_template:
        tokenizer.chat_template = load_chat_template(o.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # fp32 weights: bf16 runs under autocast (the Trainer's and the DeepSpeed configs'), the Mamba-3 decay, norm and
    # MIMO parameters stay fp32 as they must
    model = AutoModelForCausalLM.from_pretrained(o.model, dtype=torch.float32)
    if not hasattr(model.config, "mixers"):
        raise ValueError(f"{o.model!r} is not a hybrid ({type(model).__name__}): convert it with hybrid-mamba3 "
                         "convert (and distil it) first")
    targets = lora_targets(model, o.lora_targets)
    peft_config = LoraConfig(r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    data = load_rows(o.data)
    split = data.train_test_split(test_size=o.eval_fraction, seed=o.seed) if o.eval_fraction and len(data) > 1 \
        else {"train": data, "test": None}
    trainer = _trainer(o, model, tokenizer, peft_config, split["train"], split["test"], bf16, callbacks)
    check_lora_targets(trainer.model, targets)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    report = dict(options=dataclasses.asdict(o), lora_targets=len(targets), trainable_parameters=trainable,
                  rows=dict(train=len(split["train"]), eval=len(split["test"] or [])))
    t0 = time.perf_counter()
    resume_from = latest_complete_checkpoint(out / "train") if o.resume else None
    # a resumed run's state starts as its checkpoint's: the tokens and evaluations before it are not this call's
    before = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json")) if resume_from else None
    result = trainer.train(resume_from_checkpoint=resume_from)
    session = trainer.state.log_history[len(before.log_history) if before else 0:]
    # training time alone: train_runtime less the held-out evaluations inside it (eval_on_start, eval steps)
    train_s = result.metrics["train_runtime"] - sum(h.get("eval_runtime", 0) for h in session)
    tokens = int(trainer.state.num_input_tokens_seen - (before.num_input_tokens_seen if before else 0))
    report.update(seconds=round(time.perf_counter() - t0, 1), resumed_from=resume_from,
                  train_loss=result.training_loss, tokens=tokens, train_seconds=round(train_s, 2),
                  tokens_per_s=round(tokens / max(train_s, 1e-9), 1),
                  curve=[dict(step=h["step"], loss=h["loss"]) for h in trainer.state.log_history if "loss" in h])
    if split["test"] is not None:  # the first: evaluated at the start of training (eval_on_start)
        report["eval_before"] = next(h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h)
        report["eval_after"] = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(out / "adapter"))  # the adapter alone, gathered under ZeRO-3
    state.wait_for_everyone()
    if state.is_main_process:
        tokenizer.save_pretrained(out / "adapter")
        if o.merge:  # the documented route: the base model as saved, the adapter loaded on it, merged
            unset_hf_deepspeed_config()  # (a whole model, not one built partitioned for a ZeRO-3 Trainer)
            base = AutoModelForCausalLM.from_pretrained(o.model, dtype=torch.float32)
            merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
            save_hybrid(merged, out / "merged", tokenizer=tokenizer, overwrite=True)
        (out / "sft_report.json").write_text(json.dumps(report, indent=1, default=str))
    state.wait_for_everyone()
    return out


def _trainer(o: SFTOptions, model, tokenizer, peft_config, train, held, bf16: bool, callbacks):
    common = dict(
        output_dir=str(Path(o.output_dir) / "train"), num_train_epochs=o.epochs, max_steps=o.max_steps,
        per_device_train_batch_size=o.batch_size, per_device_eval_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum, learning_rate=o.lr, warmup_steps=float(o.warmup_ratio),  # (a ratio)
        weight_decay=o.weight_decay, lr_scheduler_type="cosine", logging_steps=o.logging_steps,
        save_steps=o.save_steps, save_total_limit=2, report_to=[], bf16=trainer_bf16(bf16, o.deepspeed),
        deepspeed=o.deepspeed,
        gradient_checkpointing=o.gradient_checkpointing, seed=o.seed, data_seed=o.seed,
        disable_tqdm=not o.progress, use_cpu=not torch.cuda.is_available(), max_length=o.max_length,
        # the held-out loss before training, from inside train(): an evaluate() before it would set DeepSpeed up for
        # inference only, and training would then find no engine to step
        eval_on_start=held is not None,
        include_num_input_tokens_seen="non_padding")  # the report's tokens/s: real tokens, packed or padded
    callbacks = [_CompleteMarker()] + list(callbacks or [])
    if o.mode == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, packing=o.packing, padding_free=o.padding_free,
                         assistant_only_loss=o.assistant_only_loss, completion_only_loss=o.completion_only_loss)
        return SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=held, processing_class=tokenizer,
                          peft_config=peft_config, callbacks=callbacks)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # (GKD lives in trl.experimental in TRL 1.x)
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from ..convert import load_source

    if "messages" not in train.column_names:
        raise ValueError(f"mode gkd takes conversations (a messages column: the last message is the reply the student "
                         f"writes itself), got columns {train.column_names}")
    teacher = load_source(o.teacher, dtype=torch.float32)[0]
    if teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the teacher's vocabulary ({teacher.config.vocab_size}) is not the student's "
                         f"({model.config.vocab_size}): GKD needs the original Llama the hybrid was converted from")
    args = GKDConfig(**common, lmbda=o.lmbda, beta=o.beta, temperature=o.temperature,
                     max_new_tokens=o.max_new_tokens)
    return GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=train, eval_dataset=held,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
