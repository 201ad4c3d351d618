#!/usr/bin/env python3
"""Per-kernel report of the Triton scan (a tuning aid, run on the device): for each kernel of one forward+backward
call of `mamba3_chunked_triton` (or, with --forward, of its inference forward), its registers per thread, spilled
registers, shared memory and GPU time (torch.profiler, median over --reps calls), and the call's elapsed GPU time
(CUDA events: the kernels' sum less their overlap), for a grid of kernel chunk lengths,
warp counts, launch options and module constants (--set NAME=A,B: one variant per value).

    python3 evals/kernel_dev/kernel_report.py --out $OUT/kernels   # MIMO R4 and SISO at b8 x 2048 (--shapes)
    python3 evals/kernel_dev/kernel_report.py --forward --set triton_backward.DOUT_BLOCK=32,64
    python3 evals/kernel_dev/kernel_report.py --module --shapes 1x32768   # the whole layer, as the benchmark times it

--module profiles the benchmark's Mamba3 layer (bench_mamba3.mamba_kwargs: d_model 2048, in_proj, norms, scan, gate,
out_proj) on a (B, L, 2048) bf16 input instead of the op alone, so the kernels around the scan show too.

Prints one table per variant and writes kernel_report.json. The variants override the kernels' chunk length
and num_warps for this process only; what the layer runs is `kernel_chunk` / `backward_chunk` and `_Setup`
(`hybrid_mamba3.kernels.triton_setup`, `triton_backward`). Measurements made with it: kernels/NOTES.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))


def _inputs(B: int, L: int, R: int, H: int, P: int, N: int, K: int, seed: int = 0):
    from conftest import make_op_inputs  # the tests' input generator: realistic ranges for dt, adt, trap, angles

    g = torch.Generator().manual_seed(seed)
    args, opts = make_op_inputs(B=B, L=L, R=R, G=1, N=N, H=H, P=P, K=K, dtype=torch.float32, mimo=R > 1, gate=True,
                                skip=True, gen=g)
    cast = lambda t: None if t is None else t.cuda().bfloat16().requires_grad_()  # noqa: E731
    return [cast(a) for a in args], {k: cast(v) for k, v in opts.items()}


def _layer(B: int, L: int, R: int):
    """The benchmark's layer (its config and the oracle tests' non-trivial parameters) and an input for it."""
    from bench_mamba3 import mamba_kwargs
    from oracle import perturb

    from hybrid_mamba3 import Mamba3

    torch.manual_seed(0)
    layer = Mamba3(**dict(mamba_kwargs(R > 1, 2048), mimo_rank=R), device="cuda", dtype=torch.bfloat16)
    perturb(layer)
    return layer, torch.randn(B, L, 2048, device="cuda", dtype=torch.bfloat16).requires_grad_()


_ORIG: dict = {}


def _patch(chunk: int | None, bwd_chunk: int | None, warps: int | None, records: dict, kernel_opts: dict,
           state_block: str | None):
    """Override the kernels' chunk length / warps (all kernels) / launch options (per kernel name, e.g.
    num_warps, maxnreg) / headdim rows per program of the state scans, and record each launched kernel's compile metadata."""
    import triton

    from hybrid_mamba3.kernels import triton_backward as tb
    from hybrid_mamba3.kernels import triton_forward as tf
    from hybrid_mamba3.kernels import triton_scan as ts
    from hybrid_mamba3.kernels import triton_setup

    # each override goes where its caller looks the name up: the forward's chunk length in triton_forward, the
    # backward's in triton_backward, the state block in triton_scan (its `scan_block`, which both scans call)
    orig = _ORIG.setdefault("o", (tf.kernel_chunk, tb.backward_chunk, triton_setup._Setup.__init__,
                                  triton.runtime.jit.JITFunction.run, ts.state_scan_block))
    tf.kernel_chunk, tb.backward_chunk, ts.state_scan_block = orig[0], orig[1], orig[4]
    if state_block is not None:  # "rows" or "rowsxpairs"
        rows, _, pairs = state_block.partition("x")
        ts.state_scan_block = lambda N, *_: (int(rows), int(pairs) if pairs else N // 2)
    if chunk is not None:
        tf.kernel_chunk = lambda rank: chunk
    if bwd_chunk is not None:
        tb.backward_chunk = lambda rank: bwd_chunk
    init, run = orig[2], orig[3]

    def setup_init(self, *a, **kw):
        init(self, *a, **kw)
        if warps is not None:
            self.meta["num_warps"] = warps

    triton_setup._Setup.__init__ = setup_init

    def recording_run(self, *a, **kw):
        kw.update(kernel_opts.get(self.__name__, {}))
        k = run(self, *a, **kw)
        if k is not None and hasattr(k, "n_regs"):
            records[self.__name__] = dict(regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared,
                                          warps=k.metadata.num_warps)
        return k

    triton.runtime.jit.JITFunction.run = recording_run


def _profile(fn, reps: int) -> dict[str, float]:
    """Median GPU ms per kernel name over reps calls."""
    from torch.profiler import ProfilerActivity, profile

    per = collections.defaultdict(list)
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        tot = collections.Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                tot[e.name] += e.device_time_total / 1e3
        for k, v in tot.items():
            per[k].append(v)
    return {k: statistics.median(v) for k, v in per.items()}


def _elapsed(fn, reps: int) -> float:
    """Median ms from the call's first launch to its last kernel's end (CUDA events): less than the kernels' sum
    where they overlap (the backward's side stream), more where the GPU waits for the host."""
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    return statistics.median(times)


def _overrides(items: list[str]) -> list[dict[str, int]]:
    """MODULE.NAME=INT[,INT...] items -> one {MODULE.NAME: INT} variant per combination of their values (checked:
    each names an existing integer constant of a hybrid_mamba3.kernels module)."""
    import importlib
    import itertools

    axes = []
    for item in items:
        target, _, values = item.partition("=")
        mod_name, _, name = target.rpartition(".")
        mod = importlib.import_module(f"hybrid_mamba3.kernels.{mod_name}")
        if not isinstance(getattr(mod, name, None), int):
            raise SystemExit(f"--set {item}: hybrid_mamba3.kernels.{mod_name} has no integer constant {name}")
        axes.append([(target, int(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def _apply(overrides: dict[str, int]) -> None:
    import importlib

    for target, value in overrides.items():
        mod_name, _, name = target.rpartition(".")
        setattr(importlib.import_module(f"hybrid_mamba3.kernels.{mod_name}"), name, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x2048", help="comma list of BxL")
    ap.add_argument("--ranks", default="4,1")
    ap.add_argument("--chunks", default="default", help="comma list of forward kernel chunk lengths, or 'default'")
    ap.add_argument("--bwd-chunks", default="default", help="comma list of backward kernel chunk lengths")
    ap.add_argument("--warps", default="default", help="comma list of num_warps, or 'default'")
    ap.add_argument("--kernel-opts", default="{}",
                    help='JSON list (or one object) of per-kernel launch options, one variant each, e.g. '
                         '\'[{}, {"_bwd_dout_kernel": {"num_warps": 4}}]\'')
    ap.add_argument("--state-blocks", default="default",
                    help="comma list of state blocks per program of the state scans: headdim rows, or ROWSxPAIRS "
                         "(e.g. 64x32: 64 rows, 32 rotation pairs = 64 state columns)")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=INT[,INT...]",
                    help="override an integer constant of hybrid_mamba3.kernels, e.g. triton_backward.DOUT_BLOCK=32, "
                         "triton_scan.CKPT_POSITIONS=0 (the module that defines it; repeatable; a comma list makes "
                         "one variant per value)")
    ap.add_argument("--forward", action="store_true",
                    help="time the inference forward alone (no autograd, no final state) instead of forward+backward")
    ap.add_argument("--module", action="store_true",
                    help="profile the benchmark's whole Mamba3 layer (d_model 2048) instead of the op")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profiler-range", action="store_true",
                    help="for Nsight Compute: after the warm-up call, one more inside cudaProfilerStart/Stop and no "
                         "timing (ncu --profile-from-start off -k regex:NAME python3 "
                         "evals/kernel_dev/kernel_report.py ...)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args()
    sets = _overrides(a.set)
    H, P, N = 64, 64, 128
    from conftest import rel_err

    from hybrid_mamba3.kernels.triton_chunked import mamba3_chunked_triton

    results = []
    grid = lambda arg: [None] if arg == "default" else [int(c) for c in arg.split(",")]  # noqa: E731
    kopts = json.loads(a.kernel_opts)
    kopts = kopts if isinstance(kopts, list) else [kopts]
    variants = [(c, bc, w, ko, sb, ov) for c in grid(a.chunks) for bc in grid(a.bwd_chunks) for w in grid(a.warps)
                for ko in kopts for sb in [None if x == "default" else x for x in a.state_blocks.split(",")]
                for ov in sets]
    for shape, R in [(sh, r) for sh in a.shapes.split(",") for r in map(int, a.ranks.split(","))]:
        B, L = map(int, shape.split("x"))
        args, opts = _inputs(B, L, R, H, P, N, N // 4)
        op = mamba3_chunked_triton
        if a.module:  # the layer on u (B, L, d_model): args / opts become its input and the layer's parameters
            layer, u = _layer(B, L, R)
            op = lambda u, **_: (layer(u), None)  # noqa: E731
            args, opts = [u], dict(layer.named_parameters())
        dy, base = None, None
        for chunk, bwd_chunk, w, ko, sb, ov in variants:
            records: dict = {}
            _patch(chunk, bwd_chunk, w, records, ko, sb)
            _apply(ov)
            tag = dict(shape=shape, R=R, chunk=chunk, bwd_chunk=bwd_chunk, warps=w, kernel_opts=ko, state_block=sb,
                       set=ov)
            y = None

            def call():
                nonlocal dy, y
                if a.forward:
                    with torch.no_grad():
                        y, _ = op(*args, **opts)
                    return
                for t in [*args, *opts.values()]:
                    if t is not None:
                        t.grad = None
                y, _ = op(*args, **opts)
                dy = torch.randn_like(y) if dy is None else dy
                y.backward(dy)

            try:
                call()
                outs = [y] if a.forward else [t.grad for t in [*args, *opts.values()]
                                              if t is not None and t.grad is not None]
                diff = None
                if base is None:
                    base = [o.float().clone() for o in outs]
                else:  # a variant computes the same function: its gradients against the first variant's
                    diff = max(rel_err(o, b) for o, b in zip(outs, base))
                if a.profiler_range:
                    torch.cuda.synchronize()
                    torch.cuda.cudart().cudaProfilerStart()
                    call()
                    torch.cuda.synchronize()
                    torch.cuda.cudart().cudaProfilerStop()
                    continue
                times = _profile(call, a.reps)
                elapsed = _elapsed(call, a.reps)
            except Exception as e:  # an out-of-resources config is a result, not a crash
                err = f"{type(e).__name__}: {e}"[:300]
                results.append(dict(**tag, error=err))
                print(f"{tag}: {err}", flush=True)
                continue
            rows = []
            for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
                short = next((k for k in records if k in name), None)
                rows.append(dict(kernel=name[:60], ms=round(ms, 3), **(records.get(short) or {})))
            total = sum(times.values())
            results.append(dict(**tag, total_ms=round(total, 3), elapsed_ms=round(elapsed, 3), grad_rel_diff=diff,
                                kernels=rows))
            what = "output" if a.forward else "gradients"
            print(f"\n{tag}: total {total:.2f} ms, elapsed {elapsed:.2f} ms"
                  + ("" if diff is None else f", {what} vs first variant: max rel diff {diff:.2e}"))
            print(f"{'kernel':60s} {'ms':>8s} {'regs':>5s} {'spill':>6s} {'smem':>7s} {'warps':>5s}")
            for r in rows[:14]:
                print(f"{r['kernel']:60s} {r['ms']:8.3f} {r.get('regs', ''):>5} {r.get('spills', ''):>6} "
                      f"{r.get('shared', ''):>7} {r.get('warps', ''):>5}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kernel_report.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(0), forward_only=a.forward, results=results), f, indent=1)


if __name__ == "__main__":
    main()
