"""LoRA fine-tuning under DeepSpeed on the CPU (its CPU accelerator, gloo), with the configs distillation uses, each run
in its own process (tests/sft_worker.py: `sft` for 3 steps), the three at once:

- SFT (packed rows, assistant-only loss) under ZeRO-2 and ZeRO-3: the same loss trajectory within 1e-4 (the same
  arithmetic but for the order of the gradient reductions), falling held-out loss, and an adapter saved whole (every
  LoRA B trained away from its zero start: gathered from the partitions, not empty) that merges into a loadable hybrid.
- On-policy distillation (GKD, every step generating) under ZeRO-3 with every parameter partitioned: training runs;
  after it, the Mamba-3 B/C norm weights are partitioned, and greedy generation through the partitioned model (each
  module's parameters gathered by ZeRO-3's hooks as it is called) gives the tokens and scores (within 1e-5: the same
  arithmetic) of generation with the whole model gathered, as TRL's generation does by default.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (the dev extra brings it: the test must run, not skip)
import pytest

WORKER = Path(__file__).with_name("sft_worker.py")
RUNS = (("ds_zero2", "sft"), ("ds_zero3", "sft"), ("ds_zero3", "gkd"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for config, mode in RUNS:
        extra = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
                     OMP_NUM_THREADS="1")
        procs[config, mode] = subprocess.Popen([sys.executable, str(WORKER), str(tmp / f"{config}-{mode}.json"),
                                                config, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               text=True, cwd=tmp, env={**env, **extra})
    logs = {key: p.communicate(timeout=600) for key, p in procs.items()}
    for key, p in procs.items():
        assert p.returncode == 0, (key, logs[key][1][-4000:])
    return {key: json.loads((tmp / f"{key[0]}-{key[1]}.json").read_text()) for key in RUNS}


def test_lora_sft_under_zero2_and_zero3(runs):
    z2, z3 = runs["ds_zero2", "sft"], runs["ds_zero3", "sft"]
    assert len(z2["losses"]) == len(z3["losses"]) == 3
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(z3["losses"], z2["losses"]))
    for r in (z2, z3):
        assert r["eval"][1] < r["eval"][0]
        assert r["n_adapter"] == 2 * 24 and all(b > 0 for b in r["lora_b"])  # (A, B) x 24 linear layers
        assert r["merged"] == "HybridMamba3ForCausalLM"


def test_gkd_generation_under_zero3_through_partitioned_parameters(runs):
    r = runs["ds_zero3", "gkd"]
    assert len(r["losses"]) == 3 and all(abs(x) < 10 for x in r["losses"])
    assert r["norms_partitioned"] and r["same_generation"] and r["scores_diff"] < 1e-5
    assert all(b > 0 for b in r["lora_b"]) and r["merged"] == "HybridMamba3ForCausalLM"
