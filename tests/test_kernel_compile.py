"""Every Triton kernel the layer can launch compiles for an H100 (sm_90a), on a machine without a GPU.

The interpreter tests run the kernels' source with numpy, which is looser than the compiler: a helper returning
int64 from one constexpr branch and int32 from the other ran there and failed to compile on the GPU. This runs
`evals/kernel_dev/kernel_sass.py --variants` (one fwd+bwd of the op for MIMO and SISO, packed sequences with an
initial state and packed rows (seq_idx), the token activations of both kinds, the fp16 angle table's fast cos / sin
that only CUDA tensors select; launches replaced by compiles with Triton's bundled ptxas) in a subprocess without
TRITON_INTERPRET, and checks that every kernel defined in the package was compiled.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _jit_kernels() -> set[str]:
    """Names of the @triton.jit functions that are launched (kernels end in _kernel by the package's convention)."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def test_every_kernel_compiles_for_sm90(tmp_path):
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton install has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(ROOT / "evals" / "kernel_dev" / "kernel_sass.py"), "--ranks", "4,1",
                           "--variants", "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reports = json.loads((tmp_path / "kernel_sass.json").read_text())["kernels"]
    compiled = {k["kernel"] for k in reports}
    expected = _jit_kernels()
    assert expected and expected <= compiled, f"not compiled: {sorted(expected - compiled)}"
    # every launch asks for FP contraction itself (kernels.common.FMA): Triton 3.10 turns it off by default
    assert all(k["fp_fusion"] is True for k in reports), sorted({k["kernel"] for k in reports if not k["fp_fusion"]})
