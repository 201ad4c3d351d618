#!/usr/bin/env python3
"""The distillation step's speed and memory: our Trainer step beside a naive loop, one run, one GPU.

    python3 evals/bench_distill.py                      # on the device; bench_distill.json (+ table) to --out ($OUT)
    python3 evals/bench_distill.py --smoke              # a tiny shape on the CPU: checks the script runs

Teacher: SmolLM2-135M's shape (random weights, bf16, frozen). Student: its --mamba fraction converted to Mamba-3 MIMO
R4 (evenly spread, attention init), fp32 parameters, the Mamba-3 mixers trained (distill's default). Rows of
documents of 100-2000 tokens packed along --seq-len (position_ids restarting), --batch rows a step.
  naive         teacher forward (bf16, full logits) + student forward/backward under bf16 autocast with the whole
                batch's logits in fp32 + KL + AdamW: the loop the distillation issue measured as its anchor
  trainer       `DistillTrainer` (what `hybrid-mamba3 distill` runs): Trainer bf16, the KL made chunk by chunk
  trainer+ckpt  the same with activation checkpointing of the student's layers
tokens/s: rows x seq_len / the median wall time of a whole optimizer step (synchronised), after --warmup steps;
peak: torch.cuda.max_memory_allocated over the timed steps (the teacher and student weights included).
--attn picks the attention implementation of teacher and student (sdpa, flex_attention, flash_attention_2, eager).
--profile runs one more step after the timed ones under torch.profiler and writes its kernels, the most GPU time
first, to bench_distill_profile_<mode>.txt (and a chrome trace with --trace).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from hybrid_mamba3.evals.bench_packing import documents, packed_batch


class Rows(torch.utils.data.Dataset):
    """Packed rows as `distill.data.PackedRows` gives them (input_ids, position_ids, labels), made up."""

    def __init__(self, n: int, seq_len: int, vocab: int):
        self.batch = packed_batch(documents(seed=0), n, seq_len, vocab, "cpu")

    def __len__(self) -> int:
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.batch.items()}


def models(mamba: float, smoke: bool, device, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_mamba3.configs import load_config
    from hybrid_mamba3.convert import convert_llama

    shape = load_config("smollm2_135m.yaml")["llama"]
    if smoke:
        shape = dict(shape, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    student, _ = convert_llama(teacher, mamba_layers=mamba, mimo_rank=4, dtype=torch.float32, progress=False)
    for model in (teacher, student):
        model.set_attn_implementation(attn)
    return teacher.to(device, torch.bfloat16).requires_grad_(False), student.to(device).train()


class StepProfiler:
    """torch.profiler over one step (the one after the timed ones, so that the timings stay clean); on its end the
    kernels' table (self GPU time, the most first) goes to `path`."""

    def __init__(self, path: str | None, trace: bool = False):
        self.path, self.trace, self.prof = path, trace, None

    def begin(self) -> None:
        if self.path:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()

    def end(self) -> None:
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        with open(self.path, "w") as f:
            f.write(self.prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90))
        if self.trace:
            self.prof.export_chrome_trace(self.path.replace(".txt", ".json"))
        self.prof = None


def step_times(run_step, warmup: int, steps: int, device, profiler: StepProfiler) -> tuple[list[float], float]:
    """Wall seconds of each timed step (synchronised before and after) and the peak GiB over them; then one step
    under the profiler, when it is on."""
    from hybrid_mamba3.evals.bench_model import Clock

    clock, times = Clock(device), []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        wall_ms = clock.time(lambda: run_step(i))[1]
        if i >= warmup:
            times.append(wall_ms / 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    profiler.begin()
    run_step(warmup + steps)
    profiler.end()
    return times, peak


def naive(teacher, student, data, a, device, profiler: StepProfiler):
    from hybrid_mamba3.distill.trainer import select_trainable

    select_trainable(student, "mamba")
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    loader = torch.utils.data.DataLoader(data, batch_size=a.batch, drop_last=True)
    batches = iter(loader)

    def run_step(i):
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            zt = teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            zs = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
        keep = batch["labels"][:, 1:] != -100
        kl = F.kl_div(F.log_softmax(zs[:, :-1][keep], -1), F.log_softmax(zt[:, :-1][keep], -1), log_target=True,
                      reduction="batchmean")
        kl.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step_times(run_step, a.warmup, a.steps, device, profiler)


def trainer(teacher, student, data, a, device, checkpointing: bool, profiler: StepProfiler):
    from transformers import TrainerCallback, TrainingArguments

    from hybrid_mamba3.distill.run import _checkpointing, _tf32
    from hybrid_mamba3.distill.trainer import DistillTrainer, select_trainable

    select_trainable(student, "mamba")
    marks, peaks = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
                if state.global_step == a.warmup:
                    torch.cuda.reset_peak_memory_stats()
            if state.global_step == a.warmup + a.steps:
                peaks.append(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"))
                profiler.begin()
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks[-1] = time.perf_counter() - marks[-1]
            if state.global_step == a.warmup + a.steps + 1:  # (the Trainer counts the step before this callback)
                profiler.end()

    args = TrainingArguments(output_dir=os.path.join(a.out, "bench_distill_trainer"), max_steps=a.warmup + a.steps + 1,
                             per_device_train_batch_size=a.batch, learning_rate=1e-4, bf16=device.type == "cuda",
                             tf32=_tf32(None, device.type == "cuda"),
                             use_cpu=device.type != "cuda", save_strategy="no", report_to=[], logging_steps=10**6,
                             disable_tqdm=True, dataloader_drop_last=True, **_checkpointing(checkpointing),
                             **(dict(torch_compile=True, torch_compile_backend=a.compile) if a.compile else {}))
    DistillTrainer(model=student, args=args, teacher=teacher, train_dataset=data, callbacks=[Clock()],
                   fused_norms=a.fused_norms).train()
    return marks[a.warmup:a.warmup + a.steps], peaks[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mamba", type=float, default=0.5, help="fraction of the layers converted to Mamba-3")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--modes", default="naive,trainer,trainer+ckpt")
    ap.add_argument("--attn", default="sdpa", help="attention implementation of teacher and student")
    ap.add_argument("--fused-norms", action=argparse.BooleanOptionalAction, default=True,
                    help="trainer modes: both models' Llama RMSNorms on the Triton norm kernel (distill's default; "
                         "--no-fused-norms: the torch formula)")
    ap.add_argument("--compile", default=None, metavar="BACKEND",
                    help="trainer modes: the student under torch.compile with this backend (inductor; "
                         "TrainingArguments' torch_compile), to measure what compiling the step gains before distill "
                         "offers it")
    ap.add_argument("--profile", action="store_true", help="profile one more step of each mode (kernel tables)")
    ap.add_argument("--trace", action="store_true", help="with --profile, also a chrome trace per mode")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape, few steps (runs on a CPU)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args(argv)
    if a.smoke:
        a.batch, a.seq_len, a.warmup, a.steps = 2, 64, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(a.out, exist_ok=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    tokens = a.batch * a.seq_len
    rows = {}
    lines = [f"{name}: SmolLM2-135M shape{' (smoke)' if a.smoke else ''}, {a.mamba:.0%} Mamba-3 MIMO R4, "
             f"b{a.batch} x {a.seq_len} packed rows, Mamba-3 mixers trained, {a.attn} attention"
             f"{', fused norms' if a.fused_norms else ''}{f', compiled ({a.compile})' if a.compile else ''}",
             f"{'mode':<14} {'s/step':>8} {'tokens/s':>10} {'peak GiB':>9}"]
    for mode in a.modes.split(","):
        teacher, student = models(a.mamba, a.smoke, device, a.attn)
        data = Rows(a.batch * (a.warmup + a.steps + 1), a.seq_len, teacher.config.vocab_size)
        profiler = StepProfiler(os.path.join(a.out, f"bench_distill_profile_{mode}.txt") if a.profile else None,
                                a.trace)
        try:
            if mode == "naive":
                times, peak = naive(teacher, student, data, a, device, profiler)
            elif mode in ("trainer", "trainer+ckpt"):
                times, peak = trainer(teacher, student, data, a, device, mode.endswith("ckpt"), profiler)
            else:
                raise ValueError(f"unknown mode {mode!r}: naive, trainer, trainer+ckpt")
        except torch.OutOfMemoryError:
            rows[mode] = dict(error="out of memory")
            lines.append(f"{mode:<14} {'out of memory':>29}")
        else:
            s = statistics.median(times)
            rows[mode] = dict(seconds_per_step=s, tokens_per_s=tokens / s, peak_gib=peak, steps=len(times))
            lines.append(f"{mode:<14} {s:>8.3f} {tokens / s:>10.0f} {peak:>9.1f}")
        del teacher, student, data
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = "\n".join(lines)
    print(table)
    result = dict(device=name, mamba=a.mamba, batch=a.batch, seq_len=a.seq_len, attn=a.attn, fused_norms=a.fused_norms,
                  compile=a.compile, rows=rows, table=table)
    with open(os.path.join(a.out, "bench_distill.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
