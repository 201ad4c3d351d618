#!/usr/bin/env python3
"""How far the 16-bit Triton op's output and gradients are from its fp32 path, per input, at long sequences (run on
the device; the GPU tests check short ones against the chunked torch op).

    python3 evals/kernel_dev/grad_precision.py --out $OUT/precision            # R4 and SISO, b8 x 2048, b1 x 32768
    python3 evals/kernel_dev/grad_precision.py --layers --out $OUT/precision   # whole layers, ours and the official

Same random inputs (tests' generator, d_model 2048 sizes: 64 heads x P64, N128, 32 angles) through
`mamba3_chunked_triton` twice: in fp32 (exact fp32 matmuls) and in bf16 (tensor cores, fp32 state); for the output
and each gradient, the max-norm relative error max|bf16 - fp32| / max|fp32|. Prints a line per shape and writes
grad_precision.json.

First run (H100, 2026-11-26, kernels of 21dce80), max-norm relative error of the bf16 gradients:
  R4 b1 x 32768: angles 4.5e-2, dt 2.2e-2, adt 1.5e-2, q 1.4e-2, others 0.5-1.0e-2, output 8.1e-3
  R4 b8 x 2048:  angles 1.4e-2, dt 1.0e-2, others 0.5-0.9e-2
  SISO b1 x 32768: angles 2.3e-2, dt 1.7e-2, others 0.3-1.0e-2
Rerun after the 16-bit table's hardware sin/cos (H100, kernels of 30ae190; evals/results/grad_precision_h100.json):
  R4 b1 x 32768: angles 4.4e-2, dt 2.2e-2, adt 1.5e-2, q 1.4e-2, others 0.5-1.0e-2; R4 b8 x 2048: angles 1.4e-2, dt
  1.0e-2; SISO b1 x 32768: angles 2.3e-2, dt 1.7e-2 -- unchanged.
The angles' gradient is a suffix sum over the sequence of per-position terms that mostly cancel (the scores depend
on angle differences only), so its relative error grows with the length.

--layers: the whole layer (in_proj, norms, op, out_proj), ours and the official mamba-ssm module in bf16 against our
fp32 layer on the same weights; the in_proj output's per-token gradients ("proj.*") are taken with a hook, so both
modules are compared at the op's inputs too. First run (H200, 2026-11-26), R4 b8 x 2048, max-norm relative error:
  proj.angles: ours 2.3e-2, official 7.3e-2 -- the drift is bf16's, and the official's is three times ours
  everything else: ours 4.1e-3 - 1.1e-2, official 4.5e-3 - 1.1e-2
R4 b1 x 32768 (H100, 2026-11-26, kernels of 64f3335):
  proj.angles: ours 7.1e-2, official 1.6e-1; in_proj.weight (which sums the angles' part): ours 1.9e-2, official 3.8e-2
  dt_bias: ours 1.1e-2, official 2.9e-2; everything else: ours 3.7e-3 - 7.9e-3, official 4.3e-3 - 1.6e-2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

NAMES = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "mimo_x", "mimo_z", "mimo_o", "D", "z")


def errors(B: int, L: int, R: int, H: int, P: int, N: int, K: int, device: str, low: torch.dtype) -> dict[str, float]:
    """{name: max-norm relative error of the `low`-precision op against its fp32 path} for y and every gradient."""
    from conftest import make_op_inputs, rel_err

    from hybrid_mamba3.kernels.triton_chunked import mamba3_chunked_triton

    args, opts = make_op_inputs(B=B, L=L, R=R, G=1, N=N, H=H, P=P, K=K, dtype=torch.float32, mimo=R > 1, gate=True,
                                skip=True, gen=torch.Generator().manual_seed(0))
    dy = None
    res = {}
    for dt in (torch.float32, low):
        a = [t.detach().to(device, dt).requires_grad_() for t in args]
        o = {k: None if v is None else v.detach().to(device, dt).requires_grad_() for k, v in opts.items()}
        y, _ = mamba3_chunked_triton(*a, **o, rope_pairwise=R == 1)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device) if dy is None else dy
        (y.float() * dy).sum().backward()
        res[dt] = dict(y=y.detach().float(), **{n: t.grad.float() for n, t in zip(NAMES, a + list(o.values()))
                                                if t is not None and t.grad is not None})
    ref, got = res[torch.float32], res[low]
    return {n: rel_err(got[n], r) for n, r in ref.items()}


def layer_errors(B: int, L: int, R: int, d_model: int) -> dict[str, dict[str, float]]:
    """The whole layer, ours in bf16 and the official module in bf16, each against our fp32 layer on the same
    weights: {"ours": {name: error}, "official": {...}} over the output, the input's gradient, every parameter's
    gradient and the per-token gradients of the in_proj output parts (tests/oracle.py: layer_grads)."""
    from bench_mamba3 import mamba_kwargs
    from conftest import rel_err
    from oracle import official_and_ours, pair_grads

    off, ours = official_and_ours(dict(mamba_kwargs(R > 1, d_model), mimo_rank=R))  # the benchmark's layers
    g_off, g_ours, ref, _ = pair_grads(off, ours, B, L)
    return {label: {n: rel_err(got[n], r) for n, r in ref.items()} for label, got in (("ours", g_ours),
                                                                                         ("official", g_off))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x2048,1x32768", help="comma list of BxL")
    ap.add_argument("--ranks", default="4,1")
    ap.add_argument("--sizes", default="64,64,128,32", help="H,P,N,K (d_model 2048 by default)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", action="store_true",
                    help="instead: the whole layer (d_model 2048), ours and the official module (mamba-ssm, "
                         "tests/device/install_oracle.sh) in bf16, each against our fp32 layer")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args()
    H, P, N, K = map(int, a.sizes.split(","))
    rows = []
    for shape in a.shapes.split(","):
        B, L = map(int, shape.split("x"))
        for R in map(int, a.ranks.split(",")):
            if a.layers:
                err = layer_errors(B, L, R, H * P // 2)
                for label, e in err.items():
                    print(f"layer R{R} b{B} x {L} {label} bf16: " + ", ".join(f"{n} {v:.1e}" for n, v in e.items()),
                          flush=True)
            else:
                err = errors(B, L, R, H, P, N, K, a.device, getattr(torch, a.dtype))
                print(f"R{R} b{B} x {L}: " + ", ".join(f"{n} {e:.1e}" for n, e in err.items()), flush=True)
            rows.append(dict(shape=shape, R=R, max_rel_err=err))
            if a.device == "cuda":
                torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else a.device
    with open(os.path.join(a.out, "grad_precision_layers.json" if a.layers else "grad_precision.json"), "w") as f:
        json.dump(dict(gpu=gpu, dtype=a.dtype, sizes=dict(H=H, P=P, N=N, K=K), layers=a.layers, results=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
