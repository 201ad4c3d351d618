#!/usr/bin/env python3
"""Floors of the Triton scan's kernels: the time no version of each kernel could beat (a tuning aid, runs on the CPU).

For every kernel that one forward+backward call of `mamba3_chunked_triton` launches at a shape (the benchmark's
layer: 64 heads x 64, d_state 128, 32 angles, one B/C group, gate and D; MIMO with its projections), two times:

  bytes  the distinct tensors the launch is handed, each read or written once (the fewest bytes it must move
         through device memory), over the memory bandwidth (--gbps; default the H100 copy bandwidth the benchmark
         measured, `hbm_copy_gbps` in evals/results/bench_mamba3.json);
  flops  its matmuls at the kernels' padded tile sizes (from the launch's grid and constexprs), over the tensor
         cores' bf16 rate (--tflops: ~70% of the H100 SXM's 989 dense peak, what large cuBLAS GEMMs reach).

The larger of the two is the kernel's floor. With --report (a kernel_report.json at the same shape), the measured GPU
time beside it and the ratio: how far each kernel is from what its design allows.

    python3 evals/kernel_dev/kernel_floors.py                             # MIMO R4 and SISO at b8 x 2048
    python3 evals/kernel_dev/kernel_floors.py --shapes 8x2048,1x32768 --report out/kernels/kernel_report.json

How: the op runs on meta tensors (shapes, no data) with the kernel launches recorded instead of run, so the wrappers'
own choices (chunk length, tiles, state checkpoints for --sms multiprocessors) are those of a call on the GPU.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0")  # launches are recorded, never run: no interpreter needed

H, P, N, K = 64, 64, 128, 32  # the benchmark layer's heads, headdim, d_state and rotation angles (d_model 2048)


def _matmul_flops(name: str, a: dict, programs: int) -> float:
    """Tensor-core FLOPs of one launch of `name` (2 per multiply-add), from its bound arguments `a` and program count.
    Per-chunk kernels: rows CR (positions x padded ranks), lanes BP (headdim) and 2 BH (d_state, two halves). The state
    scans walk nc chunks per (head, state block), whatever their grid's segments."""
    if "CR" not in a:  # elementwise kernels (angles, token scalars, dO): no matmuls
        return 0.0
    cr, bp, n2 = a["CR"], a["BP"], 2 * a["BH"]
    if name in ("_state_scan_kernel", "_state_scan_bwd_kernel"):  # E += V^T K (forward) / dE += dO^T Q per chunk
        walks = programs // a["nseg"] if a.get("FROM_CKPT") else programs  # (head, state block) pairs
        return 2.0 * cr * a["BPB"] * 2 * a["BJ"] * walks * a["nc"]
    per_chunk = {
        # q E^T, S = q k^T, S V
        "_chunk_output_kernel": cr * bp * n2 + cr * cr * n2 + cr * bp * cr,
        # dA = dO V^T, S, dO E, (dA o M) K
        "_bwd_dq_kernel": cr * cr * bp + cr * cr * n2 + cr * n2 * bp + cr * n2 * cr,
        # S, dA, (S o M)^T dO, (dA o M)^T Q, K dOwn^T, V dOwn
        "_bwd_dkdv_kernel": cr * cr * n2 + cr * cr * bp + cr * bp * cr + cr * n2 * cr + cr * bp * n2 + cr * n2 * bp,
    }.get(name, 0)
    return 2.0 * per_chunk * programs


def record_launches(B: int, L: int, R: int, sms: int = 132, backward: bool = True) -> list[dict]:
    """One forward+backward (or, backward False, inference forward) of the op on meta tensors: per kernel launch, its
    name, matmul FLOPs and distinct bytes."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from hybrid_mamba3.kernels import triton_chunked, triton_scan

    launches = []

    def record(self, *args, grid, warmup, **kw):
        params = list(inspect.signature(self.fn).parameters)
        a = dict(zip(params, args), **kw)
        g = grid(a) if callable(grid) else grid
        programs = 1
        for x in g:
            programs *= x
        # a tensor handed twice (a placeholder for an absent input or output) counts once
        tensors = {id(t): t for t in a.values() if isinstance(t, torch.Tensor)}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        launches.append(dict(kernel=self.fn.__name__, flops=_matmul_flops(self.fn.__name__, a, programs),
                             bytes=nbytes))

    # the kernels are JITFunctions, or InterpretedFunctions where the interpreter was on when they were defined
    saved = JITFunction.run, InterpretedFunction.run, triton_scan._sm_count
    JITFunction.run = InterpretedFunction.run = record
    triton_scan._sm_count = lambda device: sms  # where the state scans' policy looks it up
    try:
        def t(*shape):
            return torch.empty(*shape, device="meta", dtype=torch.bfloat16).requires_grad_(backward)
        mimo = R > 1
        args = (t(B, L, R, 1, N), t(B, L, R, 1, N), t(B, L, H, P), t(B, L, H), t(B, L, H), t(B, L, H),
                t(H, R, N), t(H, R, N), t(B, L, K))
        opts = dict(mimo_x=t(H, R, P) if mimo else None, mimo_z=t(H, R, P) if mimo else None,
                    mimo_o=t(H, R, P) if mimo else None, D=t(H), z=t(B, L, H, P))
        y, _ = triton_chunked.mamba3_chunked_triton(*args, **opts, rope_pairwise=not mimo)
        if backward:
            y.backward(torch.ones_like(y))
    finally:
        JITFunction.run, InterpretedFunction.run, triton_scan._sm_count = saved
    return launches


def floors(launches: list[dict], gbps: float, tflops: float) -> dict[str, dict]:
    """Per kernel name (launches summed, as the profiler's per-name times are): GFLOP, GB and the three times in ms."""
    out: dict[str, dict] = collections.defaultdict(lambda: dict(launches=0, gflop=0.0, gb=0.0))
    for ln in launches:
        r = out[ln["kernel"]]
        r["launches"] += 1
        r["gflop"] += ln["flops"] / 1e9
        r["gb"] += ln["bytes"] / 1e9
    for r in out.values():
        r["flop_ms"] = r["gflop"] / tflops
        r["byte_ms"] = r["gb"] / gbps * 1e3
        r["floor_ms"] = max(r["flop_ms"], r["byte_ms"])
    return dict(out)


def _measured(report: dict | None, shape: str, R: int) -> dict[str, float]:
    """Per kernel name, the GPU ms of the first variant of kernel_report.json at this shape and rank (op or
    --module: the layer's other kernels have no floor here and are left out)."""
    for res in (report or {}).get("results", []):
        if res.get("shape") == shape and res.get("R") == R and "kernels" in res:
            return {k["kernel"]: k["ms"] for k in res["kernels"]}
    return {}


def _default_gbps() -> float:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "bench_mamba3.json")
    try:
        with open(path) as f:
            return float(json.load(f)["meta"]["hbm_copy_gbps"])
    except (OSError, KeyError, TypeError, ValueError):
        return 2961.0  # H100 80GB HBM3, measured by the benchmark (2026-11-26)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x2048", help="comma list of BxL")
    ap.add_argument("--ranks", default="4,1")
    ap.add_argument("--gbps", type=float, default=None, help="memory bandwidth, GB/s (default: the benchmark's)")
    ap.add_argument("--tflops", type=float, default=700.0, help="tensor-core bf16 rate, TFLOP/s")
    ap.add_argument("--sms", type=int, default=132, help="multiprocessors the wrappers plan for (H100 SXM: 132)")
    ap.add_argument("--forward", action="store_true", help="the inference forward alone (as kernel_report --forward)")
    ap.add_argument("--report", default=None,
                    help="a kernel_report.json at the same shapes (op or --module; its --forward decides ours)")
    ap.add_argument("--out", default=None, help="also write kernel_floors.json to this folder")
    a = ap.parse_args()
    gbps = a.gbps or _default_gbps()
    report, backward = None, not a.forward
    if a.report:
        with open(a.report) as f:
            report = json.load(f)
        backward = not report.get("forward_only")
    results = []
    for shape in a.shapes.split(","):
        B, L = map(int, shape.split("x"))
        for R in map(int, a.ranks.split(",")):
            rows = floors(record_launches(B, L, R, a.sms, backward), gbps, a.tflops)
            meas = _measured(report, shape, R)
            what = "forward+backward" if backward else "inference forward"
            print(f"\nR{R} b{B} x {L}, {what} (H {H}, P {P}, N {N}; {gbps:.0f} GB/s, {a.tflops:.0f} TFLOP/s)")
            print(f"{'kernel':28s} {'n':>2s} {'GFLOP':>7s} {'GB':>6s} {'flop ms':>8s} {'byte ms':>8s} {'floor':>7s}"
                  f" {'measured':>8s} {'x floor':>7s}")
            total = dict(floor_ms=0.0, measured=0.0)
            for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["floor_ms"]):
                m = meas.get(name)
                r["measured_ms"] = m
                total["floor_ms"] += r["floor_ms"]
                total["measured"] += m or 0.0
                ms = "-" if m is None else f"{m:.3f}"
                ratio = "-" if not m else f"{m / r['floor_ms']:.1f}"
                print(f"{name:28s} {r['launches']:>2d} {r['gflop']:7.1f} {r['gb']:6.2f} {r['flop_ms']:8.3f} "
                      f"{r['byte_ms']:8.3f} {r['floor_ms']:7.3f} {ms:>8s} {ratio:>7s}")
            ms = f"{total['measured']:.3f}" if total["measured"] else "-"
            print(f"{'all':28s} {'':>2s} {'':>7s} {'':>6s} {'':>8s} {'':>8s} {total['floor_ms']:7.3f} {ms:>8s}")
            results.append(dict(shape=shape, R=R, backward=backward, gbps=gbps, tflops=a.tflops, kernels=rows))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "kernel_floors.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
