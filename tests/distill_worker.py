"""One distillation run of a few Trainer steps on the tiny teacher, for tests that need their own processes
(DeepSpeed, FSDP, several ranks): `torchrun ... tests/distill_worker.py OUT.json [ds_zero2|ds_zero3|fsdp|none] BATCH
[bf16] [save|resume]`. Writes the logged losses (rank 0); per Mamba-3 fp32 parameter, the dtype it is stored and
trained in; the dtype each Mamba-3 layer's dt_bias has while the layer runs, and the dtype of an attention
projection's output. save: a checkpoint every 2 steps, in OUT's folder; resume: from the one of step 2."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from fsdp_cpu import lift_cpu_gate  # noqa: E402
from test_distill import _rows, _teacher  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from hybrid_mamba3.convert import convert_llama  # noqa: E402
from hybrid_mamba3.distill.run import fsdp_args  # noqa: E402
from hybrid_mamba3.distill.trainer import DistillTrainer, select_trainable  # noqa: E402

out, ds, batch, flags = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
config = None if ds in ("none", "fsdp") else str(Path(__file__).resolve().parents[1] / "configs" / f"{ds}.json")
if ds == "fsdp":
    lift_cpu_gate()
teacher = _teacher()
student, _ = convert_llama(teacher, mamba_layers=[1, 3], init="attention", d_state=16, mimo_rank=2, chunk_size=8,
                           progress=False)
select_trainable(student, "mamba")
running = {}  # what a layer sees while it runs (under FSDP: the gathered parameters)
for name, module in student.named_modules():
    if name.endswith(".mamba"):
        module.register_forward_pre_hook(
            lambda m, a, name=name: running.setdefault(name, str(m.dt_bias.dtype)) and None)
student.model.layers[0].self_attn.q_proj.register_forward_hook(
    lambda m, a, o: running.setdefault("q_proj output", str(o.dtype)) and None)
work = Path(out).parent / f"work-{os.environ.get('RANK', '0')}"
work.mkdir(parents=True, exist_ok=True)
rows = _rows(work)
checkpoints = Path(out).with_suffix("")  # (one folder for all ranks: each writes its part of a sharded checkpoint)
args = TrainingArguments(output_dir=str(checkpoints), per_device_train_batch_size=batch, max_steps=4,
                         learning_rate=1e-3, report_to=[], use_cpu=True,
                         save_strategy="steps" if "save" in flags else "no", save_steps=2, logging_steps=1,
                         disable_tqdm=True, seed=0, deepspeed=config, lr_scheduler_type="constant",
                         bf16="bf16" in flags, **fsdp_args(ds == "fsdp"))
trainer = DistillTrainer(model=student, args=args, teacher=teacher, stage="kd", train_dataset=rows)
trainer.train(resume_from_checkpoint=str(checkpoints / "checkpoint-2") if "resume" in flags else None)
fp32 = {n: (str(p.dtype), str(getattr(p, "ds_tensor", p).dtype)) for n, p in trainer.model.named_parameters()
        if n.endswith(("dt_bias", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", ".D", "B_norm.weight",
                       "C_norm.weight"))}
teacher_partitioned = any(hasattr(p, "ds_tensor") for p in trainer.teacher.parameters())
if trainer.is_world_process_zero():
    Path(out).write_text(json.dumps(dict(
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h], fp32=fp32, running=running,
        world=int(os.environ.get("WORLD_SIZE", 1)), teacher_partitioned=teacher_partitioned,
        engine=type(trainer.model_wrapped).__name__)))
if torch.distributed.is_initialized():  # an orderly exit: a gloo group left to the interpreter's exit can abort it
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
