#!/usr/bin/env python3
"""Model-level speed: a Llama against its 50% and 75% Mamba-3 hybrids, prefill and decode, eager and static cache.

    python3 evals/bench_model.py                        # on the device: every shape, model, cache and setting
    python3 evals/bench_model.py --shapes llama-3.2-1b --settings 1x2048,16x16384 --caches static,static+compile
    python3 evals/bench_model.py --smoke                # tiny shapes on the CPU in seconds (tests/test_bench_model.py)
    python3 evals/bench_model.py ... --append ~/grid.json   # add this call's cells to a grid spread over several calls

Writes bench_model.json (rewritten after every cell, so a run cut short keeps its figures) and bench_model.png when
matplotlib is importable to --out (default $OUT, else ./out), and prints a table.

- Shapes (random weights, bf16, sdpa attention unless --attn names another): Llama-3.2-1B and SmolLM2-135M.
  Hybrids replace 25% / 50% / 75% of the layers (hybrid-50-siso: 50%, SISO), evenly spread, by Mamba-3 MIMO R4
  layers of the shape conversion gives them (`convert.attention_shapes`: d_state = headdim = the attention head
  size, one B/C group per head; "-gkv": one group per key/value head instead, the smaller shape).
- Settings: batch x context. Prefill: one forward over the context that fills a fresh cache (logits for the last
  position only, as generate() asks), `--prefill-chunk` positions per call when given. Decode: after that prefill,
  one token per sequence per step, as generate()'s loop calls the model (sampling and stopping left out).
- Caches: "dynamic" (transformers' DynamicCache, eager: what generate() uses by default), "static" (StaticCache,
  eager), "static+compile" (the decode step under torch.compile, mode reduce-overhead: CUDA graphs; prefill eager,
  as generate() does). By default compiled for the Llama only; --compile-hybrid compiles the hybrids' decode too.
  "train": forward + backward with labels (no optimizer), tokens/s and peak memory. --compile-mode max-autotune
  compiles the decode step with inductor's GEMM autotuning instead (cells labelled "static+max-autotune").
- The floor beside each decode figure: the bytes a step must move (every parameter read, the attention layers' keys
  and values of the context read, each Mamba-3 state read and written) over the copy bandwidth measured at the start
  (a large device-to-device copy): the tokens/s no implementation of that step can pass, and the share reached.
- Figures, medians over the timed repetitions after untimed warmups: gpu ms (CUDA events around each call, on the
  stream: launch gaps included) and wall ms (host clock, synchronized; for decode the wall clock over all timed steps
  with one synchronize at the end, divided by the steps, so the host's lead over the GPU counts as it does in
  generate()). tokens/s = batch x positions / wall. Peak GiB: max_memory_allocated over the cell (weights, cache and
  activations). A cell that runs out of memory or fails records the error and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time

import torch

SHAPES = {  # LlamaConfig fields of the released models
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
}
SMOKE_SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)
# fraction of layers that become Mamba-3, and its options (MIMO R4 unless said)
# ("-gkv": as many B/C groups as key/value heads, the smaller conversion shape; see convert's "Fewer B/C groups")
MODELS = {"llama": (0.0, {}), "hybrid-25": (0.25, {}), "hybrid-50": (0.5, {}), "hybrid-75": (0.75, {}),
          "hybrid-50-siso": (0.5, dict(is_mimo=False, mimo_rank=1)), "hybrid-50-gkv": (0.5, dict(ngroups="kv")),
          "hybrid-75-gkv": (0.75, dict(ngroups="kv")),
          "hybrid-50-siso-gkv": (0.5, dict(is_mimo=False, mimo_rank=1, ngroups="kv"))}
DEFAULT_MODELS = "llama,hybrid-50,hybrid-75"
CACHES = ("dynamic", "static", "static+compile", "train")
COMPILE_MODES = ("reduce-overhead", "max-autotune")  # the first is generate()'s default; cells record the other
SETTINGS = "1x2048,16x16384,64x16384,16x32768"
SDPA_BACKENDS = dict(flash="FLASH_ATTENTION", efficient="EFFICIENT_ATTENTION", cudnn="CUDNN_ATTENTION", math="MATH")


def build(shape: dict, fraction: float, device, dtype, attn: str = "sdpa", **mamba) -> torch.nn.Module:
    """The Llama (fraction 0) or its hybrid, random weights, eval mode, attention `attn` (an attn_implementation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_mamba3 import HybridMamba3Config, HybridMamba3ForCausalLM
    from hybrid_mamba3.convert import attention_shapes

    torch.manual_seed(0)
    llama = LlamaConfig(**shape, attn_implementation=attn)
    if fraction == 0:
        model = LlamaForCausalLM(llama)
    else:
        groups = llama.num_key_value_heads if mamba.get("ngroups") == "kv" else mamba.get("ngroups")
        cfg = HybridMamba3Config.from_llama(llama, fraction, **{"mimo_rank": 4, "chunk_size": 16, **mamba,
                                                                **attention_shapes(llama, groups)})
        cfg._attn_implementation = attn
        model = HybridMamba3ForCausalLM(cfg)
    return model.to(device, dtype).eval()


def make_cache(model, kind: str, max_len: int):
    from transformers import DynamicCache, StaticCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=max_len)


def cache_kwarg(model) -> str:
    """`cache` from transformers 5.24, `past_key_values` before (the device's release is older than this one)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Clock:
    """GPU time by CUDA events (None on the CPU) and wall time, per call."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> tuple[float | None, float]:
        """(gpu ms, wall ms) of one synchronized call of fn."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            end.record()
        self.sync()
        wall = (time.perf_counter() - t0) * 1e3
        return (start.elapsed_time(end) if self.cuda else None), wall

    def steps(self, fn, n: int) -> tuple[float | None, float]:
        """(median gpu ms per call, wall ms per call) of n back-to-back calls, one synchronize at the end."""
        self.sync()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)] \
            if self.cuda else []
        t0 = time.perf_counter()
        for i in range(n):
            if self.cuda:
                events[i][0].record()
            fn()
            if self.cuda:
                events[i][1].record()
        self.sync()
        wall = (time.perf_counter() - t0) * 1e3 / n
        return (statistics.median(a.elapsed_time(b) for a, b in events) if self.cuda else None), wall


def copy_bandwidth(device, gib: float = 2.0) -> float:
    """Bytes/s of memory traffic (read + write) of a large device-to-device copy, the median of 5: the rate a decode
    step's reads of weights, KV and state can reach at best."""
    n = int(gib * 2**30) // 4 if device.type == "cuda" else 2**22
    x, y = torch.empty(n, device=device), torch.empty(n, device=device)
    clock, times = Clock(device), []
    for _ in range(6):
        times.append(clock.time(lambda: y.copy_(x))[1])
    return 2 * 4 * n / (statistics.median(times[1:]) / 1e3)


def step_bytes(model, cache, batch: int, context: int) -> dict:
    """Bytes one decode step must move at least: every parameter read once, the attention layers' keys and values of
    the context read, each Mamba-3 state read and written (taken from the cache after the prefill)."""
    from hybrid_mamba3.cache import kv_bytes_per_token

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg, state = model.config, 0
    kv = batch * context * kv_bytes_per_token(cfg, next(model.parameters()).element_size())
    for layer in getattr(cache, "layers", []):  # the Mamba-3 slots' states (the attention slots hold none)
        states = getattr(layer, "recurrent_states", None) or []
        values = states.values() if isinstance(states, dict) else states
        state += sum(2 * t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))
    return dict(params=params, kv=kv, state=state, total=params + kv + state)


def run_train(model, batch: int, context: int, a, clock: Clock, device) -> dict:
    """Training figures: forward + backward with labels on batch x context (no optimizer), tokens/s and peak."""
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device=device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        model(ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        for _ in range(a.prefill_warmup):
            step()
        times = [clock.time(step) for _ in range(a.prefill_reps)]
    finally:
        model.eval()
    wall = statistics.median(w for _, w in times)
    out = dict(train_wall_ms=wall, train_gpu_ms=statistics.median(g for g, _ in times) if times[0][0] is not None
               else None, train_tokens_per_s=batch * context / wall * 1e3)
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_cell(model, kind: str, batch: int, context: int, a, clock: Clock, device) -> dict:
    """Prefill and decode figures of one model, cache kind and setting (training figures for kind "train")."""
    if kind == "train":
        return run_train(model, batch, context, a, clock, device)
    key = cache_kwarg(model)
    compiled = kind == "static+compile"
    max_len = context + a.decode_warmup + a.decode_steps + a.profile + 1  # a static cache holds every step run
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device=device)
    chunk = a.prefill_chunk or context

    def prefill(cache):
        for s in range(0, context, chunk):
            pos = torch.arange(s, min(s + chunk, context), device=device)[None].expand(batch, -1)
            model(ids[:, s:s + chunk], position_ids=pos, use_cache=True, logits_to_keep=1, **{key: cache})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        prefill_times = []
        for rep in range(a.prefill_warmup + a.prefill_reps):
            cache = make_cache(model, kind, max_len)
            gpu, wall = clock.time(lambda: prefill(cache))
            if rep >= a.prefill_warmup:
                prefill_times.append((gpu, wall))
            if rep < a.prefill_warmup + a.prefill_reps - 1:
                del cache
        step = model
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(model, mode=None if a.compile_backend != "inductor" else a.compile_mode,
                                 backend=a.compile_backend, fullgraph=True)
        tok = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)
        at = [context]

        def decode():
            pos = torch.full((batch, 1), at[0], device=device, dtype=torch.long)
            step(tok, position_ids=pos, use_cache=True, **{key: cache})
            at[0] += 1

        t0 = time.perf_counter()
        for _ in range(a.decode_warmup):
            decode()
        clock.sync()
        warmup_s = time.perf_counter() - t0
        decode_gpu, decode_wall = clock.steps(decode, a.decode_steps)
        kernels, launches = profile_steps(decode, a.profile, device) if a.profile else (None, None)
    pre_gpu = [g for g, _ in prefill_times]
    pre_wall = statistics.median(w for _, w in prefill_times)
    moved = step_bytes(model, cache, batch, context + a.decode_warmup + a.decode_steps // 2)
    floor_ms = moved["total"] / a.bandwidth * 1e3
    out = dict(prefill_wall_ms=pre_wall, prefill_gpu_ms=statistics.median(pre_gpu) if pre_gpu[0] is not None else None,
               prefill_tokens_per_s=batch * context / pre_wall * 1e3, decode_wall_ms=decode_wall,
               decode_gpu_ms=decode_gpu, decode_tokens_per_s=batch / decode_wall * 1e3,
               decode_warmup_s=warmup_s, step_bytes=moved,
               decode_floor_ms=floor_ms, decode_floor_tokens_per_s=batch / floor_ms * 1e3,
               decode_of_floor=floor_ms / decode_wall)
    if kernels is not None:
        out["decode_kernels"], out["decode_launches_per_step"] = kernels, launches
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def profile_steps(fn, n: int, device: torch.device, top: int = 8) -> tuple[list[dict], float]:
    """The kernels that take a decode step's GPU time (CPU ops on the CPU): n steps under torch.profiler, the top
    kernels by their own time, in ms per step and as a share of the step's total kernel time; and the launches a step
    makes (at batch 1 a step is short enough that their count, not the bytes, can set its time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total if cuda else e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows) or 1.0
    kernels = [dict(name=name[:90], ms_per_step=t / n / 1e3, share=t / total) for name, t, _ in rows[:top]]
    return kernels, sum(count for _, _, count in rows) / n


def sdpa_backends(names: str | None):
    """A context holding torch's sdpa to the named backends (None: no restriction)."""
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[n]) for n in names.split(",")])


def parse_settings(text: str) -> list[tuple[int, int]]:
    pairs = [item.lower().split("x") for item in text.split(",") if item]
    if not pairs or any(len(p) != 2 or not all(x.isdigit() and int(x) > 0 for x in p) for p in pairs):
        raise SystemExit(f"--settings takes batch x context pairs such as 1x2048,16x16384, got {text!r}")
    return [(int(b), int(c)) for b, c in pairs]


def _setting(cell: dict) -> str:
    """batch x context, and /chunk where the prefill went in chunks of that many positions."""
    chunk = f"/{cell['prefill_chunk']}" if cell.get("prefill_chunk") else ""
    return f"{cell['batch']}x{cell['context']}{chunk}"


def attn_label(cell: dict) -> str:
    """The attention implementation, and the sdpa backends it was held to when --sdpa-backends was given."""
    backends = cell.get("sdpa_backends")
    return cell.get("attn", "sdpa") + (f"[{backends}]" if backends else "")


def cache_label(cell: dict) -> str:
    """The cache kind, and the compile mode where it was not generate()'s default."""
    mode = cell.get("compile_mode")
    return cell["cache"].replace("compile", mode) if mode else cell["cache"]


def table(results: dict) -> str:
    """One line a cell; train cells give their fwd+bwd tokens/s under "prefill tok/s"; "floor" is the decode tokens/s
    the step's bytes allow at the measured copy bandwidth, "of floor" the measured share of it."""
    lines = [f"{'shape':<14} {'model':<22} {'cache':<19} {'batch x ctx':>14} {'prefill tok/s':>14} "
             f"{'decode tok/s':>13} {'decode ms':>10} {'floor tok/s':>12} {'of floor':>9} {'peak GiB':>9} "
             f"{'params M':>9}"]
    for cell in results["cells"]:
        model = cell["model"] + ("" if attn_label(cell) == "sdpa" else f" ({attn_label(cell)})")
        head = f"{cell['shape']:<14} {model:<22} {cache_label(cell):<19} {_setting(cell):>14}"
        if "error" in cell:
            lines.append(f"{head} {cell['error'][:60]}")
            continue
        peak = f"{cell['peak_gib']:>9.1f}" if cell.get("peak_gib") is not None else f"{'-':>9}"
        params = f"{cell['params'] / 1e6:>9.0f}" if cell.get("params") else f"{'-':>9}"
        if cell["cache"] == "train":
            lines.append(f"{head} {cell['train_tokens_per_s']:>14.0f} {'-':>13} {'-':>10} {'-':>12} {'-':>9} {peak} "
                         f"{params}")
            continue
        lines.append(f"{head} {cell['prefill_tokens_per_s']:>14.0f} {cell['decode_tokens_per_s']:>13.0f} "
                     f"{cell['decode_wall_ms']:>10.2f} {cell['decode_floor_tokens_per_s']:>12.0f} "
                     f"{cell['decode_of_floor']:>9.2f} {peak} {params}")
    return "\n".join(lines)


def plot(results: dict, path: str) -> str:
    """Decode and prefill tokens/s per cell, one panel each; a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no PNG: matplotlib not importable ({e})"
    cells = [c for c in results["cells"] if "error" not in c and c["cache"] != "train"]
    if not cells:
        return "no PNG: no cell ran"
    labels = [f"{c['shape']} {c['model']} {attn_label(c)} {cache_label(c)} {_setting(c)}" for c in cells]
    fig, axes = plt.subplots(1, 2, figsize=(16, max(4, 0.28 * len(cells))))
    for ax, key, title in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s"), ("prefill", "decode")):
        ax.barh(range(len(cells)), [c[key] for c in cells])
        ax.set_yticks(range(len(cells)), labels if ax is axes[0] else [""] * len(cells), fontsize=7)
        ax.set_xscale("log")
        ax.set_title(f"{title} tokens/s ({results['device']})")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, of {list(MODELS)}")
    ap.add_argument("--caches", default="dynamic,static,static+compile",
                    help=f"comma-separated, of {list(CACHES)} (train: forward + backward tokens/s)")
    ap.add_argument("--settings", help=f"batch x context pairs, comma-separated (default {SETTINGS}; smoke 2x12)")
    ap.add_argument("--prefill-chunk", type=int, default=0, help="positions per prefill call (0: the whole context)")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation of every model (hybrid_mamba3's: sdpa_gqa, "
                    "grouped-query decode steps packed under compile too; sdpa_splitkv, decode steps on its split-KV "
                    "Triton kernels)")
    ap.add_argument("--sdpa-backends", default=None,
                    help=f"hold torch's sdpa to these backends, comma-separated, of {list(SDPA_BACKENDS)} (default: "
                         "torch's own choice); e.g. flash,efficient,math leaves out cuDNN's, which builds a plan for "
                         "every new shape, so for every step of a growing cache")
    ap.add_argument("--prefill-warmup", type=int, default=1)
    ap.add_argument("--prefill-reps", type=int, default=2)
    ap.add_argument("--decode-warmup", type=int, default=8, help="untimed steps (compilation and graph capture)")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--profile", type=int, default=0, help="after timing, profile this many decode steps and keep "
                    "each cell's top kernels and its launches a step (decode_kernels, decode_launches_per_step in the "
                    "JSON, printed under the cell's row)")
    ap.add_argument("--compile-hybrid", action="store_true", help="compile the hybrids' decode step too")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-mode", default="reduce-overhead", choices=COMPILE_MODES,
                    help="inductor's mode for static+compile (generate()'s CompileConfig default: reduce-overhead; "
                         "max-autotune also times Triton matmul templates against cuBLAS for each GEMM shape)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, fp32, a few steps")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--append", default=None,
                    help="a JSON of earlier runs to add this run's cells to (a cell measured again replaces its old "
                         "row, unless it failed this time), so a grid can be spread over several calls; written back, "
                         "and to --out")
    a = ap.parse_args(argv)
    if a.smoke:
        device, dtype, shapes = torch.device("cpu"), torch.float32, {"smoke": SMOKE_SHAPE}
        a.settings = a.settings or "2x12"
        a.prefill_warmup, a.prefill_reps, a.decode_warmup, a.decode_steps = 0, 1, 1, 2
        a.compile_backend = "eager"  # traces the decode step whole; code generation needs a compiler and minutes
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_model.py measures on CUDA; --smoke runs tiny shapes on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = {}
        for name in a.shapes.split(","):
            if name not in SHAPES:
                raise SystemExit(f"unknown shape {name!r}: choose from {list(SHAPES)}")
            shapes[name] = SHAPES[name]
    settings = parse_settings(a.settings or SETTINGS)
    for name in a.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}: choose from {list(MODELS)}")
    for name in a.caches.split(","):
        if name not in CACHES:
            raise SystemExit(f"unknown cache {name!r}: choose from {list(CACHES)}")
    for name in a.sdpa_backends.split(",") if a.sdpa_backends else []:
        if name not in SDPA_BACKENDS:
            raise SystemExit(f"unknown sdpa backend {name!r}: choose from {list(SDPA_BACKENDS)}")
    import transformers

    a.bandwidth = copy_bandwidth(device)
    results = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", dtype=str(dtype),
                   torch=torch.__version__, transformers=transformers.__version__, copy_bandwidth=a.bandwidth,
                   cells=[])
    earlier = []
    if a.append and os.path.exists(a.append):
        with open(a.append) as f:
            grid = json.load(f)
        if grid.get("device") != results["device"]:  # figures of two cards in one table would compare nothing
            raise SystemExit(f"--append {a.append} holds cells measured on {grid.get('device')!r}, this run is on "
                             f"{results['device']!r}: name another file for this card's grid")
        earlier = grid["cells"]
    os.makedirs(a.out, exist_ok=True)
    paths = [os.path.join(a.out, "bench_model.json")] + ([a.append] if a.append else [])
    clock = Clock(device)

    def save():
        merged = dict(results, cells=merge_cells(earlier, results["cells"]))
        for path in paths:
            with open(path, "w") as f:
                json.dump(merged, f, indent=1)
        return merged
    for shape_name, shape in shapes.items():
        for model_name in a.models.split(","):
            fraction, mamba = MODELS[model_name]
            model = build(shape, fraction, device, dtype, a.attn, **mamba)
            for kind in a.caches.split(","):
                if kind == "static+compile" and model_name != "llama" and not a.compile_hybrid:
                    continue
                for batch, context in settings:
                    cell = dict(shape=shape_name, model=model_name, cache=kind, batch=batch, context=context,
                                prefill_chunk=a.prefill_chunk or None, attn=a.attn, sdpa_backends=a.sdpa_backends,
                                compile_mode=a.compile_mode if kind == "static+compile" and
                                a.compile_mode != COMPILE_MODES[0] else None,
                                params=sum(p.numel() for p in model.parameters()))
                    try:
                        with sdpa_backends(a.sdpa_backends):
                            cell.update(run_cell(model, kind, batch, context, a, clock, device))
                    except Exception as e:  # noqa: BLE001 (an OOM or a failed compile is a result, the run goes on)
                        if a.smoke:
                            raise
                        cell["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
                    results["cells"].append(cell)
                    print(table(dict(cells=[cell])).splitlines()[-1], flush=True)
                    if cell.get("decode_launches_per_step"):
                        print(f"    {cell['decode_launches_per_step']:.0f} kernels a step; the top ones:", flush=True)
                    for k in cell.get("decode_kernels", []):
                        print(f"    {k['ms_per_step']:8.3f} ms {k['share']:6.1%}  {k['name']}", flush=True)
                    save()
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            del model
    results["table"] = table(results)
    print(f"\n{results['device']}, {results['dtype']}, torch {results['torch']}, transformers "
          f"{results['transformers']}, copy bandwidth {a.bandwidth / 1e9:.0f} GB/s\n{results['table']}")
    merged = save()
    with contextlib.suppress(Exception):
        print(plot(merged, os.path.join(a.out, "bench_model.png")))
    return results


def merge_cells(earlier: list[dict], new: list[dict]) -> list[dict]:
    """A grid's cells with this run's added: a cell measured again replaces its old row, unless this time it failed
    and the old row holds figures (a failed rerun loses nothing measured)."""
    old = {_key(c): c for c in earlier}
    failed = [c for c in new if "error" in c and "error" not in old.get(_key(c), c)]  # ... where figures were
    for c in failed:
        print(f"kept the earlier figures of {_key(c)}: this run failed ({c['error']})", flush=True)
    kept = {_key(c) for c in failed}
    replaced = {_key(c) for c in new} - kept
    return [c for c in earlier if _key(c) not in replaced] + [c for c in new if _key(c) not in kept]


def _key(cell: dict) -> tuple:
    return (cell["shape"], cell["model"], cell["cache"], cell["batch"], cell["context"], cell.get("prefill_chunk"),
            cell.get("attn", "sdpa"), cell.get("sdpa_backends"), cell.get("compile_mode"))


if __name__ == "__main__":
    main()
