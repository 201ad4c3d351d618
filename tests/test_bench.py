"""The benchmark's trace arithmetic (evals/kernel_dev/bench_trace.py), on synthetic profiler traces: per-call GPU time,
launch count and GPU idle inside a call, which the issue's wall-time target is read against. The GPU runs are
evals/kernel_dev/bench_mamba3.py's."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("bench_trace",
                                               Path(__file__).parents[1] / "evals" / "kernel_dev" / "bench_trace.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _trace(calls: list[list[tuple[float, float]]]) -> dict:
    """A chrome trace: each call's kernels (start us, duration us), every call followed by a spin kernel, plus a CPU
    event that must be ignored."""
    evs = [dict(ph="X", cat="cpu_op", name="aten::mm", ts=0.0, dur=1e6)]
    for i, call in enumerate(calls):
        for j, (ts, dur) in enumerate(call):
            evs.append(dict(ph="X", cat="kernel" if j else "gpu_memset", name=f"k{j}", ts=ts, dur=dur))
        end = max(ts + dur for ts, dur in call)
        evs.append(dict(ph="X", cat="kernel", name="void at::cuda::spin_kernel(long)", ts=end + 5, dur=50.0))
    return dict(traceEvents=evs[::-1])  # unsorted: the split sorts by start


def test_busy_and_idle():
    assert bench.busy_and_idle_us([]) == (0.0, 0.0)
    # overlapping kernels count once; the gap 15 -> 30 is idle
    assert bench.busy_and_idle_us([(30.0, 5.0), (0.0, 10.0), (5.0, 10.0)]) == (20.0, 15.0)
    assert bench.busy_and_idle_us([(0.0, 10.0), (2.0, 3.0), (10.0, 4.0)]) == (14.0, 0.0)  # nested, then adjacent


def test_split_trace_per_call():
    calls = [[(100.0, 10.0), (115.0, 20.0)], [(1000.0, 10.0), (1010.0, 22.0)], [(2000.0, 10.0), (2050.0, 20.0)]]
    res = bench.split_trace(_trace(calls), reps=3)
    assert res["gpu_split"] == "per-call split" and res["launches_per_call"] == 2
    assert res["gpu_ms"] == pytest.approx(0.030)  # medians of 30, 32, 30 us
    assert res["gpu_ms_all"] == [0.03, 0.032, 0.03]
    assert res["gpu_idle_ms"] == pytest.approx(0.005)  # idle 5, 0, 40 us: median 5
    assert res["top_kernels"][0]["name"] == "k1"


def test_split_trace_falls_back_to_the_mean():
    """Calls not separated as expected (a missing spin kernel): the mean over reps, and no idle figure."""
    tr = _trace([[(0.0, 10.0)], [(100.0, 30.0)]])
    tr["traceEvents"] = [e for e in tr["traceEvents"] if not (e["name"].endswith("spin_kernel(long)") and e["ts"] < 50)]
    res = bench.split_trace(tr, reps=2)
    assert res["gpu_split"].startswith("mean") and res["gpu_idle_ms"] is None
    assert res["gpu_ms"] == pytest.approx(0.020)


def test_distillation_step_benchmark_runs_its_three_modes(tmp_path):
    """evals/bench_distill.py --smoke on the CPU: every mode runs a few steps of a tiny shape and is reported, with the
    attention implementation asked for and one more step of each under the profiler."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hybrid_mamba3.evals.bench_distill", "--smoke", "--profile", "--attn",
                           "eager", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_distill.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"naive", "trainer", "trainer+ckpt"} and result["attn"] == "eager"
    assert all(r["steps"] == 2 and r["tokens_per_s"] > 0 for r in rows.values())
    for mode in rows:  # the profiled step ran the model: its matmuls are in the table
        assert "aten::mm" in (tmp_path / f"bench_distill_profile_{mode}.txt").read_text()


def test_distillation_step_benchmark_compiles_the_student(tmp_path):
    """--compile BACKEND: the trainer mode's student runs under torch.compile (dynamo's eager backend here: inductor
    needs a compiler toolchain), through TrainingArguments' torch_compile; dynamo captured graphs of it."""
    import torch

    from hybrid_mamba3.evals import bench_distill

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = bench_distill.main(["--smoke", "--modes", "trainer", "--compile", "eager", "--out", str(tmp_path)])
    assert result["compile"] == "eager" and result["rows"]["trainer"]["steps"] == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()


def test_report_rerenders_the_stored_results(tmp_path):
    """bench_mamba3.py --from-json (no GPU, no torch) finds its pieces beside it and renders the stored run's JSON into
    the stored table, line for line."""
    import subprocess
    import sys

    results = Path(__file__).parents[1] / "evals" / "results"
    script = Path(__file__).parents[1] / "evals" / "kernel_dev" / "bench_mamba3.py"
    proc = subprocess.run([sys.executable, str(script), "--from-json", str(results / "bench_mamba3.json"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "bench_mamba3_table.txt").read_text() == (results / "bench_mamba3_table.txt").read_text()
