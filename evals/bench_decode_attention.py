#!/usr/bin/env python3
"""One decode step's attention over a static cache: which way of calling it reads the keys and values at the
bandwidth, eager and inside a compiled CUDA graph.

    python3 evals/bench_decode_attention.py               # on the device: the Llama-3.2-1B shape, 16 x 16k and 1 x 2k
    python3 evals/bench_decode_attention.py --shape smollm2-135m   # 9 query heads on 3 key/value heads
    python3 evals/bench_decode_attention.py --smoke       # tiny, on the CPU (tests/test_bench_decode_attention.py)

The step as a static cache makes it: one query per head (Llama-3.2-1B: 32 query heads on 8 key/value heads, head
size 64, bf16), L cache slots, a boolean mask (B, 1, 1, L) whose last slots are not yet written. Variants:
- repeat: every key/value head repeated for its query heads (transformers' sdpa under torch.compile);
- packed: the query heads packed onto their key/value head, (B, H_kv, H / H_kv, D), masked sdpa;
- enable_gqa: sdpa's own grouped-query flag with the mask;
- manual: matmul, masked softmax in fp32, matmul;
- flex: torch's flex_attention with a block mask (compiled only);
- split_kv: the split-KV Triton kernels of kernels/decode_attn.py (attn_implementation="sdpa_splitkv").
Each eager, and compiled (inductor, mode reduce-overhead: CUDA graphs), on torch's default choice of sdpa kernel.
The compiled rows read keys, values and mask in place, as from a static cache (`torch._dynamo.mark_static_address`):
a CUDA graph copies every other input into its own buffers on each replay. A first draft of this script left them
unmarked; its compiled rows ran 0.36 ms over the eager ones at 16 x 16k on an H100, what a copy of the keys and
values takes at that card's bandwidth (results/bench_decode_attention_h100.json).
The sdpa variants also run eager on each sdpa backend of --backends alone (`torch.nn.attention.sdpa_kernel`), over
a static cache (the same shapes every call) and a growing one (one slot more each call, as a dynamic cache grows:
a backend that builds a plan per shape, as cuDNN's does, pays for it on every step there).
GPU ms by CUDA events, the median of the timed calls after warmup (wall ms too, the host's clock, synchronized:
a per-call host cost shows there); GB/s = the keys' and values' bytes over the GPU time. Writes
bench_decode_attention.json to --out (default $OUT, else ./out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F

from hybrid_mamba3.evals.bench_model import SDPA_BACKENDS, Clock, parse_settings, sdpa_backends
from hybrid_mamba3.kernels.decode_attn import decode_attention

SHAPES = {"llama-3.2-1b": dict(heads=32, kv_heads=8, head_dim=64),
          "smollm2-135m": dict(heads=9, kv_heads=3, head_dim=64)}
SETTINGS = "16x16384,1x2048"
UNWRITTEN = 7  # cache slots past the current position, masked out
SDPA_VARIANTS = ("packed", "enable_gqa")  # the variants that call sdpa, run on each backend too


def variants(groups: int) -> dict:
    def repeat(q, k, v, mask):
        b, hk, length, d = k.shape
        kk = k[:, :, None].expand(b, hk, groups, length, d).reshape(b, hk * groups, length, d)
        vv = v[:, :, None].expand(b, hk, groups, length, d).reshape(b, hk * groups, length, d)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    def packed(q, k, v, mask):
        return F.scaled_dot_product_attention(q.reshape(k.shape[0], k.shape[1], groups, -1), k, v, attn_mask=mask)

    def enable_gqa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def manual(q, k, v, mask):
        s = torch.matmul(q.reshape(k.shape[0], k.shape[1], groups, -1), k.transpose(-1, -2)).float()
        p = torch.softmax((s * k.shape[-1] ** -0.5).masked_fill(~mask, float("-inf")), -1)
        return torch.matmul(p.to(v.dtype), v)

    def split_kv(q, k, v, mask):  # attn_implementation="sdpa_splitkv"'s one-token step
        return decode_attention(q[:, :, 0], k, v, mask[:, 0, 0])

    return dict(repeat=repeat, packed=packed, enable_gqa=enable_gqa, manual=manual, split_kv=split_kv)


def timed(fn, warmup: int, reps: int, clock: Clock) -> tuple[float, float]:
    """(median GPU ms, median wall ms) of fn(i) for i in range(reps), each call synchronized (bench_model's Clock),
    after `warmup` calls of fn(0). On the CPU both are the wall clock."""
    for _ in range(warmup):
        fn(0)
    times = [clock.time(lambda i=i: fn(i)) for i in range(reps)]
    wall = statistics.median(w for _, w in times)
    return (wall if times[0][0] is None else statistics.median(g for g, _ in times)), wall


def run_setting(batch: int, length: int, a, device, dtype) -> list[dict]:
    h, hk, d = (SHAPES[a.shape][key] for key in ("heads", "kv_heads", "head_dim"))
    if a.smoke:
        h, hk, d = 4, 2, 16
    q = torch.randn(batch, h, 1, d, device=device, dtype=dtype)
    k, v = (torch.randn(batch, hk, length, d, device=device, dtype=dtype) for _ in range(2))
    mask = torch.ones(batch, 1, 1, length, device=device, dtype=torch.bool)
    mask[..., length - UNWRITTEN:] = False
    for t in (k, v, mask):  # a static cache's tensors: a CUDA graph reads them in place
        torch._dynamo.mark_static_address(t)
    moved = 2 * k.numel() * k.element_size()
    fns = variants(h // hk)
    reference = fns["manual"](q, k, v, mask).float()
    if not a.smoke:  # flex_attention's compiled kernels need a GPU
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        valid = length - UNWRITTEN
        block = create_block_mask(lambda b, hh, qi, kv: kv < valid, None, None, 1, length, device=device)
        flex = torch.compile(flex_attention)
        fns["flex"] = lambda q, k, v, mask: flex(q, k, v, block_mask=block, enable_gqa=True)
    runs = [(name, mode, "default", "static") for name in fns for mode in ("eager", "compiled")
            if not (name == "flex" and mode == "eager")]
    runs += [(name, "eager", backend, cache) for name in SDPA_VARIANTS for backend in a.backends.split(",")
             for cache in ("static", "growing") if (backend, cache) != ("default", "static")]
    rows = []
    for name, mode, backend, cache in runs:
        row = dict(batch=batch, cache_len=length, variant=name, mode=mode, backend=backend, cache=cache)
        try:
            f = fns[name]
            if mode == "compiled" and name != "flex":
                torch._dynamo.reset()
                f = torch.compile(f, fullgraph=True, backend=a.compile_backend,
                                  mode="reduce-overhead" if a.compile_backend == "inductor" else None)
            # growing: call i reads the first length - reps + i slots (a fresh shape each call)
            grow = (lambda i: length - a.reps + i) if cache == "growing" else (lambda i: length)
            call = lambda i: f(q, k[:, :, :grow(i)], v[:, :, :grow(i)], mask[..., :grow(i)])  # noqa: E731
            with sdpa_backends(None if backend == "default" else backend):
                out = f(q, k, v, mask).float().reshape(reference.shape)
                row["max_abs_err"] = (out - reference).abs().max().item()  # against manual, the plain definition
                row["ms"], row["wall_ms"] = timed(call, a.warmup, a.reps, Clock(device))
            row["gb_per_s"] = moved / row["ms"] / 1e6
        except Exception as e:  # noqa: BLE001 (a variant or backend this torch cannot run is a result)
            if a.smoke:
                raise
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'batch x cache':>14}  {'variant':11} {'mode':9} {'backend':10} {'cache':8} {'gpu ms':>9} "
             f"{'wall ms':>9} {'GB/s':>7} {'max err':>9}"]
    for r in rows:
        head = (f"{r['batch']:>6}x{r['cache_len']:<7}  {r['variant']:11} {r['mode']:9} {r['backend']:10} "
                f"{r['cache']:8}")
        if "error" in r:
            lines.append(f"{head} {r['error'][:60]}")
            continue
        lines.append(f"{head} {r['ms']:9.4f} {r['wall_ms']:9.4f} {r['gb_per_s']:7.0f} {r['max_abs_err']:9.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=None, help=f"batch x cache length pairs (default {SETTINGS}; smoke 2x40)")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES), help="heads, key/value heads, head size")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--backends", default="default,flash,efficient,cudnn,math",
                    help=f"sdpa backends the sdpa variants also run on alone, of default,{','.join(SDPA_BACKENDS)} "
                         "(smoke: default,math)")
    ap.add_argument("--smoke", action="store_true", help="tiny, fp32, on the CPU, compile backend eager")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args(argv)
    unknown = set(a.backends.split(",")) - {"default", *SDPA_BACKENDS}
    if unknown:
        raise SystemExit(f"unknown sdpa backend(s) {sorted(unknown)}: choose from default,{','.join(SDPA_BACKENDS)}")
    if a.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        a.settings, a.warmup, a.reps, a.compile_backend = a.settings or "2x40", 1, 2, "eager"
        a.backends = ",".join(b for b in a.backends.split(",") if b in ("default", "math"))  # the others need CUDA
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_decode_attention.py measures on CUDA; --smoke runs tiny shapes on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for batch, length in parse_settings(a.settings or SETTINGS):
        rows += run_setting(batch, length, a, device, dtype)
    result = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", torch=torch.__version__,
                  dtype=str(dtype), shape=dict(name=a.shape, **SHAPES[a.shape]), rows=rows, table=table(rows))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_decode_attention.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}, torch {result['torch']}, {result['dtype']}\n{result['table']}")
    return result


if __name__ == "__main__":
    main()
