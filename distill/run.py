"""`distill(options)`: from a Llama teacher and text to a distilled hybrid directory, in resumable stages.

    output_dir/
      converted/        the student as converted from the teacher (when no --student is given)
      data/             token shards of the data (train, heldout), built once
      align/, kd/       each stage's Trainer checkpoints (checkpoint-N, each with a COMPLETE marker once written)
                        and, when the stage is done, its student (align/student) and a DONE marker
      model/            the result: the distilled hybrid, with the teacher's tokenizer, chat template and generation
                        config, a model card (README.md), distill_report.json and the loss curves (JSON, PNG)

Run again with resume=True (`--resume`), it picks up where it stopped: finished stages are skipped, an unfinished one
continues from its newest complete checkpoint (a checkpoint the run was killed while writing is passed over).
The options (`DistillOptions`) are the CLI's flags and a YAML recipe's keys (`load_recipe`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from ..cache import kv_bytes_per_token
from .data import (PackedRows, build_shards, iter_documents, load_meta, teacher_documents, teacher_tokens,
                   tokenizer_fingerprint)
from .options import DistillOptions, load_recipe  # noqa: F401  (re-exported: the run's options and recipes)
from .options import deepspeed_config
from .trainer import DistillTrainer, ReplacedLayers, replaced_layers, select_trainable

COMPLETE, DONE = "COMPLETE", "DONE"


class _CompleteMarker(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written all of it (on_save comes after the writes)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE).touch()


class _TokensPerSecond(TrainerCallback):
    """Adds tokens/s (all ranks) since the last log to each training log."""

    def __init__(self, tokens_per_step: int):
        self.per_step, self.t, self.step = tokens_per_step, None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.t is None:
            self.t, self.step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.t is not None and "loss" in logs and state.global_step > self.step:
            now = time.perf_counter()
            logs["tokens_per_s"] = round((state.global_step - self.step) * self.per_step / (now - self.t))
            self.t, self.step = now, state.global_step


def latest_complete_checkpoint(folder: Path) -> str | None:
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE).exists() and p.name.split("-")[-1].isdigit()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def distill(options: DistillOptions, callbacks: list | None = None) -> Path:
    """Run the stages `options` asks for; returns the result directory (output_dir/model). In a distributed launch
    (torchrun, deepspeed, accelerate) every rank calls it: the first builds the shards and converts, the others then
    read them; each stage trains on all ranks; the first writes the reports and the result."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ..convert import load_source, save_hybrid

    o = options.check()
    state = process_state(o)
    out = start_run(o, state)
    bf16 = torch.cuda.is_available() if o.bf16 is None else o.bf16
    teacher, tokenizer, source = load_source(o.teacher, dtype=torch.bfloat16 if bf16 else torch.float32)
    if tokenizer is None:
        raise ValueError(f"the teacher {o.teacher!r} has no tokenizer files: the data is tokenized with them")
    with state.main_process_first():  # the first rank builds and converts; the others read what it wrote
        shards = _data(o, teacher, tokenizer, out)
        student, conversion = _student(o, teacher, tokenizer, shards, out)
    layers = replaced_layers(student, teacher)
    report = dict(teacher=source, student=o.student or str(out / "converted"), mamba_layers=layers,
                  layout="".join("M" if i in layers else "A" for i in range(student.config.num_hidden_layers)),
                  options=dataclasses.asdict(o), stages={}, conversion=conversion)
    if state.is_main_process:
        report["eval_before"] = _heldout_ppl(student, teacher, shards, o)
    curves = {}
    for stage in (("align", "kd") if o.stage == "both" else (o.stage,)):
        path, curves[stage], report["stages"][stage] = _stage(stage, o, student, teacher, tokenizer, shards, out,
                                                              bf16, callbacks)
        state.wait_for_everyone()
        # as the stage saved it, whole: not built partitioned, as loading is while a ZeRO-3 Trainer's config is set
        # (the next stage's DeepSpeed engine partitions it itself)
        unset_hf_deepspeed_config()
        student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    result = out / "model"
    if state.is_main_process:
        if report.get("eval_before"):  # the teacher is unchanged (and under ZeRO-3 now partitioned): score the student
            after = _heldout_ppl(student, None, shards, o)
            teacher_ppl = report["eval_before"]["teacher"]
            report["eval_after"] = dict(teacher=teacher_ppl, student=after["student"],
                                        ratio=after["student"] / teacher_ppl)
        student.config.use_cache = True
        save_hybrid(student, result, tokenizer=tokenizer, report=conversion, overwrite=True)
        if teacher.generation_config is not None:
            teacher.generation_config.save_pretrained(result)
        (result / "distill_report.json").write_text(json.dumps(report, indent=1, default=str))
        (result / "distill_curves.json").write_text(json.dumps(curves, indent=1))
        _plot_curves(curves, result / "distill_curves.png")
        (result / "README.md").write_text(_model_card(report))
    state.wait_for_everyone()
    return result


def process_state(o: DistillOptions):
    """accelerate's process state; in a distributed launch it starts the process group, with the run's collective
    timeout (the Trainer's ddp_timeout reaches only a group that the Trainer starts itself)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=o.ddp_timeout))


def start_run(o, state) -> Path:
    """The run's output directory, made by the first rank (with the options as options.json); one that is not empty
    is taken only to resume (`o.resume`), so an earlier run's results are never overwritten by mistake."""
    out = Path(o.output_dir)
    with state.main_process_first():
        if state.is_main_process:
            if out.exists() and any(out.iterdir()) and not o.resume:
                raise ValueError(f"{str(out)!r} is not empty: pass resume (--resume) to continue that run, or choose "
                                 "another")
            out.mkdir(parents=True, exist_ok=True)
            (out / "options.json").write_text(json.dumps(dataclasses.asdict(o), indent=1, default=str))
    return out


# Sampled documents end at the teacher's EOS or at this many tokens. generate() steps every row until the longest
# ends, so a longer cap mostly steps finished rows.
SAMPLE_LENGTH = 1024


def sampling_rows(config, dtype: torch.dtype, length: int, free_bytes: int | None) -> int:
    """Rows to sample at once: on a GPU (`free_bytes` of its memory free) as many, up to 1024, as a third of that holds
    the caches of, since a decode step is launch-bound until the batch is large (SmolLM2-135M: ~23 MB a row of 1024
    tokens in bf16); 16 on a CPU (free_bytes None)."""
    if free_bytes is None:
        return 16
    per_row = length * kv_bytes_per_token(config, dtype.itemsize)
    return int(max(16, min(1024, free_bytes // 3 // per_row)))


def _data(o: DistillOptions, teacher, tokenizer, out: Path) -> Path:
    """The shard directory (train/, heldout/): given, or built once into output_dir/data (from the documents, or
    sampled from the teacher for --data teacher:N)."""
    sampled = teacher_tokens(o.data)
    given = Path(o.data[0]) if len(o.data) == 1 and sampled is None else None
    folder = given if given is not None and (given / "train" / "meta.json").exists() else out / "data"
    if not (folder / "train" / "meta.json").exists():
        if sampled is not None:
            cuda = torch.cuda.is_available()
            home = next(teacher.parameters()).device  # (where conversion expects it after)
            teacher.to("cuda" if cuda else "cpu")
            length = min(o.seq_len, SAMPLE_LENGTH)
            rows = sampling_rows(teacher.config, teacher.dtype, length, torch.cuda.mem_get_info()[0] if cuda else None)
            docs = teacher_documents(teacher, tokenizer, sampled, length=length, batch_size=rows, seed=o.seed,
                                     progress=o.progress)
        else:
            docs = iter_documents(o.data)
        build_shards(docs, tokenizer, folder, heldout=o.heldout, seed=o.seed, max_tokens=o.max_data_tokens,
                     progress=o.progress)
        if sampled is not None:
            teacher.to(home)
    meta = load_meta(folder / "train")
    if meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"the shards in {str(folder)!r} were made with another tokenizer ({meta['tokenizer']}) than "
                         "the teacher's: rebuild them from the text")
    if meta["tokens"] < o.seq_len * o.batch_size:
        raise ValueError(f"{meta['tokens']} training tokens are fewer than one batch ({o.batch_size} x {o.seq_len}): "
                         "give more data or shorter rows")
    return folder


def _student(o: DistillOptions, teacher, tokenizer, shards: Path, out: Path):
    """(student, conversion report or None): loaded from --student, from an earlier run's conversion, or converted
    (and saved, so that a resumed run and the other ranks load it)."""
    from transformers import AutoModelForCausalLM

    from ..convert import DT_GRID, convert_llama, dt_grid_values, save_hybrid

    path = Path(o.student) if o.student else out / "converted"
    if o.student or (path / "config.json").exists():
        student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        report = json.loads((path / "conversion_report.json").read_text()) \
            if (path / "conversion_report.json").exists() else None
        return student, report
    rows = PackedRows(shards / "train", min(o.seq_len, 256))
    calib = torch.stack([rows[i]["input_ids"] for i in range(min(8, len(rows)))])
    shape = {} if o.ngroups is None else {"ngroups": o.ngroups}
    student, report = convert_llama(teacher, mamba_layers=o.mamba_layers, calibration_ids=calib, dtype=torch.float32,
                                    mimo_rank=o.mimo_rank, chunk_size=o.chunk_size, seed=o.seed, progress=o.progress,
                                    dt_grid=DT_GRID if o.dt_grid is None else dt_grid_values(o.dt_grid), **shape)
    save_hybrid(student, path, tokenizer=tokenizer, report=report, overwrite=True)
    return student, report


def _stage(stage: str, o: DistillOptions, student, teacher, tokenizer, shards: Path, out: Path, bf16: bool,
           callbacks):
    """One stage on the Trainer, resumable; returns (the directory of the student it saved, loss curve, report).
    The stage's student is a whole hybrid directory (with the tokenizer), for evaluating each stage apart."""
    folder = out / stage
    if (folder / DONE).exists():  # finished in an earlier run
        done = json.loads((folder / DONE).read_text())
        return folder / "student", done["curve"], done
    align = stage == "align"
    lora = not align and o.train == "lora"
    if o.attn_implementation:
        for model in (student, teacher):
            model.set_attn_implementation(o.attn_implementation)
    layers = replaced_layers(student, teacher)
    select_trainable(student, "mamba" if align or lora else o.train)
    model = ReplacedLayers(student, layers) if align else _with_lora(student, layers, o.lora_rank) if lora else student
    world = max(1, int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1)
    per_step = o.batch_size * o.grad_accum * o.seq_len * world
    steps = max(1, math.ceil((o.align_tokens if align else o.tokens) / per_step))
    args = TrainingArguments(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum, learning_rate=o.align_lr if align else o.lr,
        warmup_steps=max(0, round(o.warmup_ratio * steps)), weight_decay=o.weight_decay, lr_scheduler_type="cosine",
        logging_steps=max(1, min(25, steps // 20)), save_steps=o.save_steps, save_total_limit=2, report_to=[],
        bf16=trainer_bf16(bf16, o.deepspeed), tf32=_tf32(o.tf32, bf16), deepspeed=o.deepspeed, **fsdp_args(o.fsdp),
        **_checkpointing(o.gradient_checkpointing and not align),
        seed=o.seed, data_seed=o.seed, disable_tqdm=not o.progress, dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available(), save_only_model=False, ddp_timeout=o.ddp_timeout,
        **_compile(o.torch_compile and not align, o.torch_compile_backend))
    trainer = DistillTrainer(model=model, args=args, teacher=teacher, stage=stage, train_dataset=PackedRows(
        shards / "train", o.seq_len), temperature=o.temperature, top_k=o.top_k, kl_weight=o.kl_weight,
        ce_weight=o.ce_weight, chunk_tokens=o.chunk_tokens, fused_norms=o.fused_norms,
        callbacks=[_CompleteMarker(), _TokensPerSecond(per_step)] + list(callbacks or []))
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    resume_from = latest_complete_checkpoint(folder) if o.resume else None
    result = trainer.train(resume_from_checkpoint=resume_from)
    key = "align_mse" if align else "kl"
    curve = [dict(step=h["step"], loss=h["loss"], **{k: h[k] for k in (key, "ce", "tokens_per_s") if k in h})
             for h in trainer.state.log_history if "loss" in h]
    report = dict(steps=steps, tokens=steps * per_step, seconds=round(time.perf_counter() - t0, 1),
                  resumed_from=resume_from, train_loss=result.training_loss, ranks=world,
                  engine=type(trainer.model_wrapped).__name__, peak_gib=_peak_gib(), curve=curve)
    trained = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathered under ZeRO-3 (every rank takes part)
    if trained is not None:  # (None on the other ranks under ZeRO-3)
        trained = {k.removeprefix("_orig_mod."): v for k, v in trained.items()}  # (torch_compile's wrapper)
    if trainer.is_world_process_zero():
        full = student.state_dict()
        if align:  # "mixers.<i>.<name>" of ReplacedLayers -> the student's "model.layers.<i>.<mixer attr>.<name>"
            for key, value in trained.items():
                _, i, name = key.split(".", 2)
                full[f"model.layers.{i}.{student.model.layers[int(i)].spec.attr}.{name}"] = value
        elif lora:  # the adapters merged into the kept layers, the trained mixers in place: a plain hybrid again
            student = _merged_lora(student, trained, layers, o.lora_rank)
            full = student.state_dict()
        else:
            full.update(trained)
        student.save_pretrained(folder / "student", state_dict=full)
        tokenizer.save_pretrained(folder / "student")
        (folder / DONE).write_text(json.dumps(report, indent=1))
        for ckpt in folder.glob("checkpoint-*"):  # the stage's result replaces its checkpoints
            shutil.rmtree(ckpt, ignore_errors=True)
    return folder / "student", curve, report


def _merged_lora(student, trained: dict, layers: list[int], rank: int):
    """The student with the adapters of `trained` merged in by PEFT: a fresh copy of the model (one that no DeepSpeed
    engine partitioned: under ZeRO-3 the trained model holds only this rank's shards) takes the gathered adapter
    state dict whole, then merge_and_unload."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # (elsewhere in other releases)
        from transformers.modeling_utils import no_init_weights

    unset_hf_deepspeed_config()  # (built whole, not partitioned at construction)
    with no_init_weights():  # every tensor is overwritten by the load below: no random init to pay for
        fresh = type(student)(student.config)
    fresh.tie_weights()  # (no_init_weights skips the tying too)
    model = _with_lora(fresh, layers, rank)
    model.load_state_dict(trained)  # (strict: every adapter and mixer tensor, and nothing else)
    return model.merge_and_unload()


def _with_lora(student, layers: list[int], rank: int):
    """Stage kd's model for train=lora (after LoLCATs): LoRA adapters on the teacher's layers the student kept
    (attention, MLPs), the new Mamba-3 mixers trained whole (PEFT's modules_to_save: checkpoints hold them too)."""
    from peft import LoraConfig, get_peft_model

    from ..lora import check_lora_targets, lora_targets

    targets = lora_targets(student, "attention+mlp")
    mixers = sorted({student.model.layers[i].spec.attr for i in layers})
    model = get_peft_model(student, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                                               modules_to_save=mixers))
    check_lora_targets(model, targets)
    return model


def trainer_bf16(bf16: bool, deepspeed: str | None) -> bool:
    """The Trainer's bf16 flag for a run that wants bf16: off where the DeepSpeed config brings its own autocast
    (configs/ds_zero*.json: torch_autocast). With the flag on, accelerate adds DeepSpeed's bf16 mode to the config,
    which casts every parameter to bf16, the Mamba-3 fp32 ones and the adapters included."""
    if not bf16 or not deepspeed:
        return bf16
    return not deepspeed_config(deepspeed).get("torch_autocast", {}).get("enabled", False)


def _peak_gib() -> list[float] | None:
    """Each rank's peak GPU memory since the stage began, GiB (None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if not torch.distributed.is_initialized():
        return [peak]
    peaks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(peaks, peak)
    return peaks


def fsdp_args(fsdp: bool) -> dict:
    """TrainingArguments' FSDP flags: FSDP2, a unit per `_no_split_modules` class (the student's decoder layers; stage
    align's mixers), full state dicts in checkpoints. (accelerate launch with an FSDP config sets it up instead.)"""
    return dict(fsdp=True, fsdp_config=dict(version=2)) if fsdp else {}


def _tf32(tf32: bool | None, bf16: bool) -> bool | None:
    """TrainingArguments' tf32: as asked, else on for a bf16 run on a GPU with TF32 tensor cores (Ampere on). The
    distillation loss runs the student's output head outside the autocast of the model's forward, on the fp32
    master weights: in plain fp32 that one matmul was ~18% of a SmolLM2 step on an H100."""
    if tf32 is not None:
        return tf32
    return True if bf16 and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 else None


def _compile(on: bool, backend: str) -> dict:
    """TrainingArguments' compile flags for a stage: stage align is too short to repay compiling its mixers."""
    return dict(torch_compile=True, torch_compile_backend=backend) if on else {}


def _checkpointing(on: bool) -> dict:
    """TrainingArguments' activation checkpointing flag under its name (gradient_checkpointing before transformers
    5.24), only when on."""
    if not on:
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": True}


@torch.no_grad()
def _heldout_ppl(student, teacher, shards: Path, o: DistillOptions) -> dict:
    from ..evals.perplexity import perplexity

    rows = PackedRows(shards / "heldout", o.seq_len)
    if not len(rows):
        return {}
    ids = torch.cat([rows[i]["input_ids"] for i in range(min(len(rows), max(1, o.eval_tokens // o.seq_len)))])
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    was = next(student.parameters()).device
    models = (("teacher", teacher), ("student", student)) if teacher is not None else (("student", student),)
    out = {name: perplexity(m.to(dev), ids, window=o.seq_len, progress=False)["ppl"] for name, m in models}
    student.to(was)
    if teacher is not None:
        out["ratio"] = out["student"] / out["teacher"]
    return out


def _plot_curves(curves: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (stage, curve) in zip(axes[0], curves.items()):
        ax.plot([c["step"] for c in curve], [c["loss"] for c in curve])
        ax.set(title=f"stage {stage}", xlabel="step", ylabel="alignment MSE" if stage == "align" else "KD loss")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _model_card(report: dict) -> str:
    before, after = report.get("eval_before", {}), report.get("eval_after", {})
    lines = [f"# Hybrid Mamba-3 / attention model distilled from {report['teacher']}", "",
             f"- layers: `{report['layout']}` (M: Mamba-3 MIMO, A: the teacher's attention), Mamba-3 at "
             f"{report['mamba_layers']}", f"- student before distillation: {report['student']}"]
    for stage, r in report["stages"].items():
        lines.append(f"- stage {stage}: {r['steps']} steps, {r['tokens']:,} tokens, {r['seconds']} s")
    if before and after:
        lines.append(f"- held-out perplexity: teacher {before['teacher']:.2f}; student {before['student']:.2f} "
                     f"({before['ratio']:.3f}x) before, {after['student']:.2f} ({after['ratio']:.3f}x) after")
    lines += ["", "Load it with `import hybrid_mamba3` and `AutoModelForCausalLM.from_pretrained(dir)` (or pass "
              "`trust_remote_code=True`). Reports: `distill_report.json`, `conversion_report.json`; loss curves: "
              "`distill_curves.json` / `.png`.", ""]
    return "\n".join(lines)
