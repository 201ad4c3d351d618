#!/usr/bin/env python3
"""The split-KV decode attention's launch settings (kernels/triton_decode_attention.py `Launch`), each timed at a
set of decode cells, beside torch's sdpa on the same step: which setting to make the default.

    python3 evals/kernel_dev/sweep_decode_attention.py             # on the device: 8 cells x 192 settings, ~3 min
    python3 evals/kernel_dev/sweep_decode_attention.py --cells llama:16x16429 --grid block_n=64,128
    python3 evals/kernel_dev/sweep_decode_attention.py --smoke     # tiny, on the CPU (Triton's interpreter)

A cell is a shape (heads / key/value heads / head size: llama = Llama-3.2-1B's 32/8/64, smollm2 = SmolLM2-135M's
9/3/64) at batch x cache length, bf16, the last 7 slots masked as a static cache's unwritten ones. Each call is
captured once in a CUDA graph and its replays timed by CUDA events (median of --reps): a decode step runs inside a
graph when it is fast (static cache + torch.compile), and there the host's launch cost, which eager timing of a
~0.01-0.3 ms call would mostly measure, is gone. sdpa: torch's default kernel choice on the query heads packed onto
their key/value heads with the boolean mask (what attn_implementation="sdpa_gqa" calls). Each setting's output is
checked against sdpa in fp32 (max abs error kept). The ranking: geometric mean over the cells of each setting's time
over that cell's best, and its worst cell. Writes sweep_decode_attention.json to --out (default $OUT, else ./out)
after every cell (so a run cut short keeps what it measured) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics

import torch
import torch.nn.functional as F

from hybrid_mamba3.evals.bench_model import Clock
from hybrid_mamba3.kernels import triton_decode_attention as tk

SHAPES = {"llama": (32, 8, 64), "smollm2": (9, 3, 64)}
CELLS = ("llama:16x16384,smollm2:16x16384,llama:16x16429,llama:1x2048,llama:16x32768,llama:64x16384,"
         "smollm2:64x16384,smollm2:1x2048")
GRID = "programs_per_sm=2,4,8,16;block_n=64,128;num_warps=4,8;num_stages=2,3,4;skip_masked=1,0"
UNWRITTEN = 7


def parse_cells(spec: str) -> list[tuple[str, int, int]]:
    cells = []
    for item in spec.split(","):
        name, _, size = item.partition(":")
        batch, _, length = size.partition("x")
        if name not in SHAPES or not batch.isdigit() or not length.isdigit():
            raise SystemExit(f"cell {item!r}: write SHAPE:BATCHxLENGTH with SHAPE one of {sorted(SHAPES)}, "
                             "e.g. llama:16x16384")
        cells.append((name, int(batch), int(length)))
    return cells


def parse_grid(spec: str) -> list[tk.Launch]:
    """'field=a,b;field=c' over `Launch`'s fields (bools as 1/0) -> every combination."""
    kinds = {f.name: f.type for f in dataclasses.fields(tk.Launch)}
    axes = {}
    for part in spec.split(";"):
        key, _, values = part.partition("=")
        if key not in kinds or not values:
            raise SystemExit(f"grid axis {part!r}: write FIELD=V1,V2 with FIELD one of {list(kinds)}")
        axes[key] = [bool(int(v)) if kinds[key] in (bool, "bool") else int(v) for v in values.split(",")]
    return [tk.Launch(**dict(zip(axes, combo))) for combo in itertools.product(*axes.values())]


def timer(fn, device: torch.device, reps: int):
    """Median ms of fn: replays of its CUDA graph by events on a GPU; plain calls by the wall clock elsewhere."""
    clock = Clock(device)
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compilation, allocations) off the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    fn()
    times = [clock.time(fn) for _ in range(reps)]
    return statistics.median(g if g is not None else w for g, w in times)


def run_cell(name: str, batch: int, length: int, launches: list[tk.Launch], device, dtype, reps: int) -> list[dict]:
    heads, kv_heads, dim = SHAPES[name]
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, dim, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(batch, kv_heads, length, dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask[:, length - UNWRITTEN:] = False
    packed, mask4 = q.reshape(batch, kv_heads, heads // kv_heads, dim), mask[:, None, None, :]
    reference = F.scaled_dot_product_attention(packed.float(), k.float(), v.float(), attn_mask=mask4)
    reference = reference.reshape(batch, heads, dim)
    gb = 2 * k.numel() * k.element_size() / 1e9
    base = dict(shape=name, batch=batch, length=length)
    ms = timer(lambda: F.scaled_dot_product_attention(packed, k, v, attn_mask=mask4), device, reps)
    rows = [dict(base, variant="sdpa", ms=ms, gb_per_s=gb / ms * 1e3)]
    for launch in launches:
        row = dict(base, variant="split_kv", **dataclasses.asdict(launch))
        call = lambda launch=launch: tk.decode_attention_triton(q, k, v, mask, dim ** -0.5, launch)  # noqa: E731
        try:
            row["max_abs_err"] = (call().float() - reference).abs().max().item()
            row["ms"] = timer(call, device, reps)
            row["gb_per_s"] = gb / row["ms"] * 1e3
        except Exception as e:  # noqa: BLE001 (a setting the card cannot launch, out of shared memory say, is a result)
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        rows.append(row)
    return rows


FIELDS = [f.name for f in dataclasses.fields(tk.Launch)]


def key(row: dict) -> tuple:
    return tuple(row[name] for name in FIELDS)


def ranking(rows: list[dict]) -> list[dict]:
    """Settings timed at every cell, best first: geometric mean and worst of time over the cell's best."""
    cell = lambda r: (r["shape"], r["batch"], r["length"])  # noqa: E731
    timed = [r for r in rows if r["variant"] == "split_kv" and "ms" in r]
    cells = {cell(r) for r in rows}
    best = {c: min(r["ms"] for r in timed if cell(r) == c) for c in cells if any(cell(r) == c for r in timed)}
    ratios: dict[tuple, list[float]] = {}
    for r in timed:
        ratios.setdefault(key(r), []).append(r["ms"] / best[cell(r)])
    ranked = [dict(launch=dict(zip(FIELDS, k)),
                   geo_mean=math.exp(sum(map(math.log, v)) / len(v)), worst=max(v))
              for k, v in ratios.items() if len(v) == len(best)]
    return sorted(ranked, key=lambda r: r["geo_mean"])


def table(rows: list[dict], ranked: list[dict]) -> str:
    default = key(dataclasses.asdict(tk.LAUNCH))
    lines = [f"{'cell':20} {'sdpa ms':>9} {'GB/s':>6} {'default ms':>11} {'GB/s':>6} {'best ms':>9} {'GB/s':>6}  best"]
    for c in dict.fromkeys((r["shape"], r["batch"], r["length"]) for r in rows):
        mine = [r for r in rows if (r["shape"], r["batch"], r["length"]) == c]
        sdpa = next(r for r in mine if r["variant"] == "sdpa")
        timed = [r for r in mine if r["variant"] == "split_kv" and "ms" in r]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["ms"])
        dflt = next((r for r in timed if key(r) == default), None)
        d = f"{dflt['ms']:11.4f} {dflt['gb_per_s']:6.0f}" if dflt else f"{'-':>11} {'-':>6}"
        name = f"{c[0]}:{c[1]}x{c[2]}"
        lines.append(f"{name:20} {sdpa['ms']:9.4f} {sdpa['gb_per_s']:6.0f} {d} "
                     f"{best['ms']:9.4f} {best['gb_per_s']:6.0f}  {dict(zip(FIELDS, key(best)))}")
    lines.append("settings by geometric mean of time over each cell's best (worst cell):")
    for r in ranked[:6]:
        mark = "  <- the default" if key(r["launch"]) == default else ""
        lines.append(f"  {r['geo_mean']:.3f} ({r['worst']:.3f})  {r['launch']}{mark}")
    dflt = [r for r in ranked if key(r["launch"]) == default]
    if dflt and dflt[0] not in ranked[:6]:
        lines.append(f"  {dflt[0]['geo_mean']:.3f} ({dflt[0]['worst']:.3f})  {dflt[0]['launch']}  <- the default")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=None, help=f"SHAPE:BATCHxLENGTH, comma-separated (default {CELLS})")
    ap.add_argument("--grid", default=None, help=f"Launch fields and their values (default {GRID})")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="two tiny cells, four settings, fp32, on the CPU")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args(argv)
    if a.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        device, dtype = torch.device("cpu"), torch.float32
        a.cells, a.reps = a.cells or "smollm2:2x300,llama:1x40", 2
        a.grid = a.grid or "programs_per_sm=2,16;block_n=64;skip_masked=1,0"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("sweep_decode_attention.py times CUDA graphs; --smoke runs tiny cells on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    cells, launches = parse_cells(a.cells or CELLS), parse_grid(a.grid or GRID)
    os.makedirs(a.out, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", torch=torch.__version__,
                  dtype=str(dtype), reps=a.reps, rows=[])
    for name, batch, length in cells:
        rows = run_cell(name, batch, length, launches, device, dtype, a.reps)
        print(table(rows, ranking(rows)).splitlines()[1], flush=True)  # this cell's line
        result["rows"] += rows
        result["ranking"] = ranking(result["rows"])
        result["table"] = table(result["rows"], result["ranking"])
        with open(os.path.join(a.out, "sweep_decode_attention.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{result['device']}, torch {result['torch']}, {result['dtype']}\n{result['table']}")
    return result


if __name__ == "__main__":
    main()
