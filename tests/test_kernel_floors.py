"""evals/kernel_dev/kernel_floors.py, the kernels' floors (FLOPs and fewest bytes per launch), on meta tensors (no
kernel runs).

Its matmul counts are formulas per kernel; they are checked here against the kernels' own source: at R4 with
headdim 64 and d_state 128 every tile dimension is 64 (rows CR, lanes BP, half-state BH), so each tl.dot is one
64 x 64 x 64 product and a kernel's FLOPs per program (per chunk, for the state scans) must be its tl.dot count times
2 * 64^3. A matmul added to a kernel without its formula fails this."""

import importlib.util
import inspect
from pathlib import Path

import pytest

pytest.importorskip("triton")
_PATH = Path(__file__).parents[1] / "evals" / "kernel_dev" / "kernel_floors.py"
_SPEC = importlib.util.spec_from_file_location("kernel_floors", _PATH)
floors_mod = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(floors_mod)

from hybrid_mamba3.kernels import triton_backward, triton_forward, triton_scan  # noqa: E402
from hybrid_mamba3.kernels.triton_setup import kernel_chunk  # noqa: E402

PER_CHUNK = {"_chunk_output_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
SCANS = {"_state_scan_kernel", "_state_scan_bwd_kernel"}


def _dots(name: str) -> int:
    kernel = next(getattr(m, name) for m in (triton_scan, triton_forward, triton_backward) if hasattr(m, name))
    return inspect.getsource(kernel.fn).count("tl.dot(")


def test_matmul_flops_match_the_kernels_dots():
    B, L = 2, 256  # 16 chunks of 16 positions at R4; 2 x 64 heads do not leave SMs idle: no state checkpoints
    launches = floors_mod.record_launches(B, L, 4, sms=132)
    nc, unit = L // kernel_chunk(4), 2.0 * 64 ** 3
    seen = set()
    for ln in launches:
        name = ln["kernel"]
        if name in PER_CHUNK | SCANS:  # a program per chunk; a scan's walk per (batch, head), 64 x 64-pair blocks
            programs = B * floors_mod.H * nc  # (chunks walked, for the scans)
        else:
            assert ln["flops"] == 0, name
            continue
        seen.add(name)
        assert ln["flops"] == pytest.approx(_dots(name) * unit * programs), name
    assert seen == PER_CHUNK | SCANS


def test_floors_per_kernel():
    fb = floors_mod.floors(floors_mod.record_launches(1, 128, 1), gbps=3000.0, tflops=700.0)
    fwd = floors_mod.floors(floors_mod.record_launches(1, 128, 1, backward=False), gbps=3000.0, tflops=700.0)
    assert set(fwd) < set(fb) and {"_chunk_output_kernel", "_state_scan_kernel"} <= set(fwd)
    assert fb["_state_scan_kernel"]["launches"] == 2  # the forward's scan and the backward's recompute
    for r in fb.values():
        assert r["gb"] > 0 and r["floor_ms"] == max(r["flop_ms"], r["byte_ms"])
        assert r["byte_ms"] == pytest.approx(r["gb"] / 3000.0 * 1e3)
    # every tensor handed to the launch once, placeholders included once: the inference forward's state scan gets
    # the entering states' buffer also for its absent initial state and checkpoints (counted each time, the sum
    # would be 4 MB larger)
    B, L, H, P, N, K = 1, 128, floors_mod.H, floors_mod.P, floors_mod.N, floors_mod.K
    nc = L // kernel_chunk(1)
    scan = [ln for ln in floors_mod.record_launches(B, L, 1, backward=False) if ln["kernel"] == "_state_scan_kernel"]
    expected = (B * L * N * 2 + H * N * 4  # k (bf16) and its bias (fp32)
                + B * L * H * 2 * K * 2  # the fp16 cos | sin table
                + B * L * H * P * 2 + H * P * 4  # v and the ones standing in for mimo_x
                + 2 * B * L * H * 4 + B * H * nc * 4  # acs, w per token, atot per chunk
                + B * H * nc * P * N * 2 + B * H * P * N * 4)  # entering states (bf16), final state (fp32)
    assert [ln["bytes"] for ln in scan] == [expected]


def test_sms_reach_the_scan_policy():
    """--sms is what the wrappers plan for (record_launches patches `triton_scan._sm_count`, where the scan's policy
    looks it up): 64 heads on 132 SMs leave SMs idle, so a training forward keeps the state checkpoints (its scan
    writes one segment's fp32 state per head more); on 1 SM it keeps none."""
    def forward_scan_bytes(sms):
        return next(ln["bytes"] for ln in floors_mod.record_launches(1, 256, 4, sms=sms)
                    if ln["kernel"] == "_state_scan_kernel")

    one_segment = floors_mod.H * floors_mod.P * floors_mod.N * 4
    assert forward_scan_bytes(132) == forward_scan_bytes(1) + one_segment
