"""Distillation under FSDP2 through accelerate on the CPU (gloo), each run in its own processes: 2 ranks x batch 2
against 1 rank x batch 4 (tests/distill_worker.py: 4 steps of stage kd on the tiny teacher), a checkpoint and a
resume, and the distill command end to end with --fsdp. accelerate turns FSDP on only on accelerators, so the runs
lift that gate (tests/fsdp_cpu.py); FSDP2 itself shards the student.

- The Mamba-3 fp32 parameters are gathered and used in fp32 while the matmuls run in bf16: bf16 under FSDP is the
  Trainer's autocast around the student, not accelerate's FSDP policy (which gathers every parameter in bf16).
- Loss trajectories: fp32 FSDP 2 x 2 within 1e-5 of 1 x 4 (the same rows and token counts; the gradient reduction
  adds in another order: 1.5e-6 measured); bf16 within 2e-3 of fp32 (autocast rounding, as under DeepSpeed); a run
  resumed from its step-2 checkpoint logs exactly the uninterrupted run's steps 3 and 4; the command's stage kd,
training everything, within 1e-4 of one rank's.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_deepspeed import WORKER, _close, _env, _port, _single
from test_distill_run import FLAGS, make_teacher_and_text
from transformers import AutoModelForCausalLM

from hybrid_mamba3.cli import main

LAUNCHER = Path(__file__).with_name("fsdp_cpu.py")


def _ranks(cwd, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_port()), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    results = {"none": _single(tmp, "none", 4)}
    for name, flags in (("fp32", []), ("bf16", ["bf16", "save"]), ("resumed", ["bf16", "resume"])):
        out = tmp / ("bf16.json" if name == "resumed" else f"{name}.json")  # (resumes the bf16 run's folder)
        _ranks(tmp, WORKER, out, "fsdp", 2, *flags)
        results[name] = json.loads(out.read_text())
    return results


def test_fsdp_shards_the_student_and_keeps_mamba_parameters_fp32(runs):
    for name in ("fp32", "bf16"):
        r = runs[name]
        assert r["engine"] == "FSDPHybridMamba3ForCausalLM" and r["world"] == 2, name
        assert len(r["fp32"]) == 18 and all(v[0] == "torch.float32" for v in r["fp32"].values()), r["fp32"]
        mixers = {k: v for k, v in r["running"].items() if k.endswith(".mamba")}
        assert len(mixers) == 2 and set(mixers.values()) == {"torch.float32"}, r["running"]
    assert runs["bf16"]["running"]["q_proj output"] == "torch.bfloat16"  # the matmuls do run in bf16
    assert runs["fp32"]["running"]["q_proj output"] == "torch.float32"


def test_fsdp_loss_trajectories_match_one_rank_and_resume(runs):
    assert _close(runs["fp32"]["losses"], runs["none"]["losses"], 1e-5)
    assert _close(runs["bf16"]["losses"], runs["none"]["losses"], 2e-3)
    assert runs["bf16"]["losses"] != runs["fp32"]["losses"]
    assert runs["resumed"]["losses"] == runs["bf16"]["losses"]


def test_distill_command_under_fsdp(tmp_path):
    """Both stages on 2 ranks, training everything in stage kd (the tied head too, which the loss uses outside the
    model's forward). Stage kd's loss curve is one rank's (batch 4) from the same aligned student within 1e-4 (1e-6
    measured). (Stage align's curves differ more: its loss is relative to each micro-batch's own target, so 2 x 2
    rows is not 1 x 4.)"""
    root = make_teacher_and_text(tmp_path)
    base = ["distill", "--teacher", root / "teacher", "--data", root / "text", *FLAGS, "--train", "all"]
    flags = list(base)
    flags[flags.index("--batch-size") + 1] = "2"  # (2 a rank: the rows of one rank's 4)
    _ranks(tmp_path, LAUNCHER, *flags, "--output-dir", tmp_path / "run", "--fsdp")
    result = tmp_path / "run" / "model"
    report = json.loads((result / "distill_report.json").read_text())
    assert report["options"]["fsdp"] and set(report["stages"]) == {"align", "kd"}
    for stage in report["stages"].values():  # (stage align's model is the mixers alone)
        assert stage["ranks"] == 2 and stage["engine"] in ("FSDPReplacedLayers", "FSDPHybridMamba3ForCausalLM"), stage
    curves = json.loads((result / "distill_curves.json").read_text())
    assert all(curves[s][-1]["loss"] < curves[s][0]["loss"] for s in ("align", "kd")), curves
    model = AutoModelForCausalLM.from_pretrained(result)
    assert model.config.mixers == ["attention", "mamba3", "attention", "mamba3"]
    aligned = tmp_path / "run" / "align" / "student"
    one_rank = [*map(str, base), "--student", str(aligned), "--stage", "kd", "--output-dir", str(tmp_path / "one")]
    assert main(one_rank) == 0
    one = json.loads((tmp_path / "one" / "model" / "distill_curves.json").read_text())
    ours, theirs = [c["loss"] for c in curves["kd"]], [c["loss"] for c in one["kd"]]
    assert len(ours) == len(theirs) > 1 and all(abs(x - y) <= 1e-4 * y for x, y in zip(ours, theirs)), (ours, theirs)


def test_shipped_accelerate_config_is_fsdp2_with_the_models_own_units():
    """configs/accelerate_fsdp.yaml as accelerate reads it: FSDP2, bf16, and no wrap class named (a named decoder-layer
    class is not in stage align's model, the mixers alone; the default, the model's _no_split_modules, fits both)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(Path(__file__).resolve().parents[1] / "configs" / "accelerate_fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.mixed_precision == "bf16"
    assert config.fsdp_config["fsdp_version"] == 2 and "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config


def test_the_collective_timeout_reaches_the_process_group(tmp_path):
    """--ddp-timeout sets the timeout of the group the run starts (before any Trainer, which would set it only on a
    group it starts itself): a short one ends a run whose other rank died instead of hanging on it."""
    script = tmp_path / "timeout.py"
    script.write_text(
        "import sys\n"
        "import torch\n"
        "from hybrid_mamba3.distill.options import DistillOptions\n"
        "from hybrid_mamba3.distill.run import process_state\n"
        "process_state(DistillOptions(ddp_timeout=77))\n"
        "group = torch.distributed.distributed_c10d._get_default_group()\n"
        "seconds = group._get_backend(torch.device('cpu')).options._timeout.total_seconds()\n"
        "sys.stdout.write(f'timeout {seconds}\\n')  # (one write a rank: both ranks share the pipe)\n"
        "torch.distributed.destroy_process_group()\n")
    out = _ranks(tmp_path, script).stdout
    assert out.count("timeout 77.0") == 2, out
