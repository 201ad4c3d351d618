"""Distillation under DeepSpeed on the CPU (its CPU accelerator, gloo): ZeRO-2 and ZeRO-3 with the shipped configs,
and two "nodes" of one process each on localhost (torchrun --nnodes 2 --node_rank), each run in its own processes
(tests/distill_worker.py: 4 steps of stage kd on the tiny teacher).

- The Mamba-3 fp32 parameters (dt_bias, B/C biases, MIMO projections, D, B/C norms) stay fp32 under DeepSpeed's
  bf16 training: the configs use its torch_autocast mode (the parameters and ZeRO's partitions stay fp32, the
  matmuls run in bf16), rather than its bf16 mode, which casts every parameter.
- Under ZeRO-3 the teacher is partitioned too.
- Loss trajectories: ZeRO-2 == ZeRO-3 within 1e-4 (the same arithmetic but for the order of the gradient reductions:
  5e-5 measured); both within 2e-3 of the plain fp32 run (bf16
  autocast rounding); 2 ranks x batch 2 within 2e-3 of 1 rank x batch 4 (the same rows: each rank averages over its
  own tokens, the gradient sync over ranks, where one rank averages over all of them; rows hold 1-3 document starts,
  so their token counts differ by a few in 24).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (the dev extra brings it: the test must run, not skip)
import pytest

WORKER = Path(__file__).with_name("distill_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})
    return env


def _single(tmp_path, config: str, batch: int) -> dict:
    out = tmp_path / f"{config}.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(out), config, str(batch)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path,
                          env=_env(WORLD_SIZE=1, RANK=0, LOCAL_RANK=0, MASTER_PORT=_port()))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    results = {name: _single(tmp, name, 4) for name in ("none", "ds_zero2", "ds_zero3")}
    port, out = _port(), tmp / "two_nodes.json"
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(WORKER), str(out), "ds_zero2", "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp, env=_env()) for r in (0, 1)]
    logs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][1][-3000:] + logs[1][1][-3000:]
    results["two_nodes"] = json.loads(out.read_text())
    return results


def _close(a: list, b: list, rel: float) -> bool:
    return len(a) == len(b) == 4 and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


def test_mamba_fp32_parameters_stay_fp32_under_deepspeed(runs):
    for name in ("ds_zero2", "ds_zero3", "two_nodes"):
        r = runs[name]
        assert r["engine"] == "DeepSpeedEngine" and len(r["fp32"]) == 18, name  # 9 kinds x 2 Mamba-3 layers
        assert all(v == ["torch.float32", "torch.float32"] for v in r["fp32"].values()), (name, r["fp32"])
    assert runs["ds_zero3"]["teacher_partitioned"] and not runs["ds_zero2"]["teacher_partitioned"]


def test_loss_trajectories_agree_across_engines_and_ranks(runs):
    assert _close(runs["ds_zero3"]["losses"], runs["ds_zero2"]["losses"], 1e-4)
    assert _close(runs["ds_zero2"]["losses"], runs["none"]["losses"], 2e-3)
    assert runs["two_nodes"]["world"] == 2
    assert _close(runs["two_nodes"]["losses"], runs["ds_zero2"]["losses"], 2e-3)


@pytest.mark.parametrize("train", ["mamba", "lora"])
def test_distill_command_on_two_ranks_with_zero3(tmp_path, train):
    """`torchrun --nproc_per_node 2 -m hybrid_mamba3.cli distill ... --deepspeed configs/ds_zero3.json`: the first rank
    builds the shards and converts, both train both stages (the new layers and then the student partitioned across
    them), the first writes a result that loads, with the stages' parameters gathered from the partitions. With
    --train lora the adapters, gathered from the partitions, are merged into the kept layers on the first rank."""
    import torch
    from test_distill_run import FLAGS, make_teacher_and_text
    from transformers import AutoModelForCausalLM

    make_teacher_and_text(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "ds_zero3.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()), "-m",
           "hybrid_mamba3.cli", "distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "text"),
           "--output-dir", str(tmp_path / "run"), "--deepspeed", str(config), *FLAGS, "--batch-size", "2",
           "--train", train, "--lora-rank", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = tmp_path / "run" / "model"
    report = json.loads((result / "distill_report.json").read_text())
    assert set(report["stages"]) == {"align", "kd"} and report["eval_after"]["ratio"] > 0
    student = AutoModelForCausalLM.from_pretrained(result)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "converted")
    changed = {n for n, p in student.state_dict().items() if not torch.equal(p, converted.state_dict()[n])}
    assert changed and any(".mamba." in n for n in changed)  # trained (gathered, not empty partitions)
    if train == "mamba":  # nothing else
        assert all(".mamba." in n for n in changed)
    else:  # and the kept layers' adapted projections; embeddings and norms never
        assert any(".self_attn." in n for n in changed) and any(".mlp." in n for n in changed)
        assert all(".mamba." in n or n.endswith("_proj.weight") for n in changed)
