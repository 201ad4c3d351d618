#!/usr/bin/env python3
"""Speed benchmark: our Mamba-3 layer (Triton) vs the official mamba-ssm module vs SDPA flash attention.

One command on the device prints a table and writes `bench_mamba3.json` (+ `bench_mamba3.png` when matplotlib
is importable) to --out (default $OUT, else ./out):

    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
    source tests/device/install_oracle.sh          # official module from the offline bundle (optional)
    python3 evals/kernel_dev/bench_mamba3.py        # --quick for a smoke test, --help for the flags

Rows (prefill / training, d_model 2048, 64 heads x P64, N128, bf16; shapes b8x2048, b2x8192, b1x32768):
  ours_mimo_r4 / ours_siso      hybrid_mamba3.Mamba3(backend="triton"): whatever forward/backward the layer runs
  official_mimo_r4 / official_siso   mamba_ssm.modules.mamba3.Mamba3 2.3.2.post1 (TileLang MIMO, Triton SISO),
                                loaded through tests/oracle.py (Triton autotuning trimmed, see official_class)
  sdpa_layer                    Llama-style attention layer without rotary: q/k/v/o projections + causal
                                scaled_dot_product_attention on the flash backend, 16 q heads / 4 kv heads x 128
                                (the attention shape of the anchor figures in shared/DESIGN.md)
  sdpa_core                     the causal flash SDPA call alone on (B, 16, L, 128) q and (B, 4, L, 128) k, v
Every Mamba-3 row is the whole module (in_proj, norms, scan, gate, out_proj), like the anchors.

How each figure is measured (all medians over --reps timed calls after --warmup untimed calls):
  gpu_ms    sum of the durations of all GPU kernels (and memcpy/memset) one call launched, read from a
            torch.profiler trace (CUDA activity); the calls are separated in the trace by a spin kernel
            launched after a synchronize, so each call's sum is its own. Host gaps between kernels are NOT in it.
  event_ms  CUDA events recorded before and after the call on the current stream (includes launch gaps).
  wall_ms   time.perf_counter() around the call, with torch.cuda.synchronize() before and after.
  host_ms   time.perf_counter() around the call while the GPU is still busy with a ~50 ms spin kernel launched
            just before it: the host's own cost of issuing the call (Python, dispatch, launches), none of it
            hidden behind GPU work. wall_ms ~ max(GPU, host) + the first and last kernels' latency.
  peak_mib  torch.cuda.max_memory_allocated() during one call minus memory_allocated() before it (inputs,
            parameters and the module's weights are outside it; outputs, saved activations and gradients in it).
  fwd       the module under torch.no_grad() (inference prefill); fwd_bwd: grads set to None, y = module(u) with
            u.requires_grad, y.backward(random dy) (all parameter and input gradients).
  cold start  a fresh subprocess per row with empty Triton and TileLang cache directories (a fresh machine's
            state): seconds to import, build, and first forward, then first forward+backward (compiles the
            backward kernels), at the first shape. The main process then reuses those caches, so its own first
            calls (first_call_s) load compiled kernels rather than compile them.
Decode (one token per call, batch 1 and 64, MIMO R4 and SISO):
  layer.step(u_t, state) of our layer, and the raw step kernel `mamba3_step_triton` on pre-projected inputs;
  the official module's step when its CuTe DSL kernel imports (else n/a), and the official SISO Triton step
  kernel alone. Figures: kernel_us (profiler kernel sum per call), graph_us (CUDA-graph replay, events over
  many replays: the step without launch gaps), wall_us (host clock over back-to-back calls with the state
  chained, synchronize at the end). Memory floor = bytes that must cross HBM / the bandwidth measured in the
  same run by a 1 GiB device-to-device copy (bytes read + written): floor_state_us counts the fp32 decode
  state (angle, ssm, k, v) read once and written once; floor_layer_us adds the bf16 in_proj and out_proj
  weights read once (what layer.step must also move). At batch 1 the state (2 MiB) sits in L2 between
  repeated calls, so a figure below the floor there is L2, not a bug.

Each measurement runs in try/except: an OOM or import failure is recorded in the row (error) and the rest
continues. The JSON is rewritten after every row, so a run cut short still leaves its figures.

Files: this one measures (timing helpers, the rows' modules and inputs, the runner, the cold-start child, the CLI);
bench_trace.py splits a profiler trace into calls; bench_report.py renders the table, the targets and the PNG, and
merges runs (`--from-json`). The measuring code stays in one file because it shares the process's torch, imported
only after the compile cache directories are set, and the device and dtype chosen on the command line.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# the benchmark's other pieces sit beside it (imported by path: the package's import would bring torch before the
# cache directories are set)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_report import ALL_ROWS, fmt, merge, report, safe_plot, short_error  # noqa: E402
from bench_trace import median, split_trace  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
D_MODEL, D_STATE, HEADDIM, EXPAND, MIMO_RANK = 2048, 128, 64, 2, 4
ATTN_HEADS, ATTN_KV_HEADS, ATTN_HEADDIM = 16, 4, 128
DEFAULT_SHAPES = "b8x2048,b2x8192,b1x32768"
QUICK_SHAPES = "b2x128,b1x256"
COLD_PREFIX = "COLD_JSON: "

torch = None  # imported in main() after the cache directories are set


def _quiet_tilelang():
    """TileLang 0.1.8 logs a warning on every official MIMO call ('Found kernel ... in memory cache'); its
    KernelCache resets that logger's level to DEBUG, so a filter (which it keeps) drops those lines."""
    import logging
    logging.getLogger("tilelang.cache.kernel_cache").addFilter(lambda rec: "in memory cache" not in rec.getMessage())


def _import_torch():
    global torch
    _quiet_tilelang()
    import torch as _t
    torch = _t
    return _t


# ----------------------------------------------------------------------------------------------- helpers
def parse_shape(s: str) -> tuple[int, int]:
    b, l = s.lower().strip().lstrip("b").split("x")
    return int(b), int(l)


def cuda() -> bool:
    return torch.cuda.is_available() and DEV.type == "cuda"


def sync():
    if cuda():
        torch.cuda.synchronize()


def free_memory():
    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class NotAvailable(RuntimeError):
    """A row that cannot run here (its message is the reason, recorded as is)."""


# ----------------------------------------------------------------------------------------------- timing
SPIN_CYCLES = 2000


def profile_kernel_ms(fn, reps: int) -> dict:
    """Per-call GPU kernel time (ms) from a torch.profiler trace: kernels + memcpy + memset of each call.

    Calls are separated by a spin kernel (torch.cuda._sleep) launched after a synchronize; the trace's device
    events sorted by start time are split at those. Falls back to total/reps when the split fails.
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
            torch.cuda.synchronize()
            torch.cuda._sleep(SPIN_CYCLES)
            torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    return split_trace(trace, reps)


def measure_memory(fn) -> float | None:
    if not cuda():
        return None
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def spin(ms: float) -> None:
    """Keep the GPU busy for about ms milliseconds (a spin kernel), so the host's next calls only enqueue."""
    khz = getattr(torch.cuda.get_device_properties(DEV), "clock_rate", 0) or 2_000_000  # not in every build
    torch.cuda._sleep(int(ms * khz))


def host_enqueue_ms(fn, reps: int, spin_ms: float = 50.0) -> float:
    """Median host time of fn() issued behind a spin kernel, so no call waits on the GPU (see host_ms above).
    The spin is sized from the clock rate and checked: a call longer than it would read too short."""
    times = []
    for _ in range(reps):
        sync()
        spin(spin_ms)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
        sync()
    if max(times) > 0.8 * spin_ms and spin_ms < 2000:
        return host_enqueue_ms(fn, reps, 4 * spin_ms)
    return median(times)


def host_profile_text(fn, spin_ms: float = 200.0) -> str:
    """cProfile of one fn() issued behind a spin kernel (as for host_ms): where the host's time goes, by the
    functions' own time and by cumulative time."""
    import cProfile
    import io
    import pstats

    sync()
    spin(spin_ms)
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    sync()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(40)
    return out.getvalue()


def time_call(fn, reps: int, warmup: int, budget_s: float, profile: bool = True) -> dict:
    """Warm up, then wall/event timing loop, profiler kernel sums, and peak memory of one call."""
    res = {}
    t_warm = []
    for _ in range(max(warmup, 1)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        t_warm.append(time.perf_counter() - t0)
    res["warmup_s"] = [round(t, 4) for t in t_warm]
    per_call = t_warm[-1]
    n = max(3, min(reps, int(budget_s / max(2 * per_call, 1e-6))))
    res["reps"] = n
    wall, ev = [], []
    for _ in range(n):
        if cuda():
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync()
        t0 = time.perf_counter()
        if cuda():
            e0.record()
        fn()
        if cuda():
            e1.record()
        sync()
        wall.append((time.perf_counter() - t0) * 1000)
        if cuda():
            ev.append(e0.elapsed_time(e1))
    res["wall_ms"] = median(wall)
    res["wall_ms_all"] = [round(x, 4) for x in wall]
    res["event_ms"] = median(ev)
    if cuda():
        res["host_ms"] = host_enqueue_ms(fn, n)
    if profile and cuda():
        try:
            res.update(profile_kernel_ms(fn, n))
        except Exception as e:  # noqa: BLE001
            res["gpu_error"] = short_error(e)
    try:
        res["peak_mib"] = measure_memory(fn)
    except Exception as e:  # noqa: BLE001
        res["peak_error"] = short_error(e)
    return res


# ----------------------------------------------------------------------------------------------- modules
def load_oracle_module():
    """tests/oracle.py loaded by path (it is a test helper, not a package)."""
    name = "hm3_bench_oracle"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "oracle.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def official_class(mimo: bool):
    """(class, None) or (None, reason). The oracle helper raises pytest's Skipped (a BaseException).

    tests/oracle.py trims the official Triton autotuning (SISO forward, backward and step, MIMO utilities, angle
    kernels; the SISO backward alone has 54+27+27+81 configs: minutes per kernel on a fresh machine) to the configs
    with num_warps 4, num_stages <= 2 (no maxnreg), unless HM3_ORACLE_FULL_AUTOTUNE=1 (--official-full-autotune).
    """
    try:
        return load_oracle_module().load_official_mamba3(mimo=mimo), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - pytest.skip, ImportError, anything: official unavailable
        return None, short_error(e)


def mamba_kwargs(mimo: bool, d_model: int) -> dict:
    return dict(d_model=d_model, d_state=D_STATE, expand=EXPAND, headdim=HEADDIM, rope_fraction=0.5,
                is_mimo=mimo, mimo_rank=MIMO_RANK if mimo else 1, chunk_size=16 if mimo else 64)


def build_mamba(row: str, d_model: int):
    """(module, info) for a Mamba-3 row; raises when unavailable."""
    mimo = row.endswith("mimo_r4")
    kw = mamba_kwargs(mimo, d_model)
    info = {}
    if row.startswith("ours"):
        from hybrid_mamba3 import Mamba3
        backend = "triton" if cuda() else "torch"
        info["backend_requested"] = backend
        mod = Mamba3(**kw, layer_idx=0, device=DEV, dtype=DTYPE, backend=backend)
    else:
        cls, why = official_class(mimo)
        if cls is None:
            raise NotAvailable(f"official module unavailable: {why}")
        mod = cls(**kw, layer_idx=0, device=DEV, dtype=DTYPE)
    torch.manual_seed(0)
    load_oracle_module().perturb(mod)  # the oracle tests' non-trivial parameters
    info["params_m"] = round(sum(p.numel() for p in mod.parameters()) / 1e6, 3)
    return mod, info


def make_attn_layer(d_model: int, gqa_native: bool):
    nn = torch.nn
    H, KV, Dh = ATTN_HEADS, ATTN_KV_HEADS, ATTN_HEADDIM

    class _Attn(nn.Module):
        def __init__(self):
            super().__init__()
            kw = dict(bias=False, device=DEV, dtype=DTYPE)
            self.q_proj = nn.Linear(d_model, H * Dh, **kw)
            self.k_proj = nn.Linear(d_model, KV * Dh, **kw)
            self.v_proj = nn.Linear(d_model, KV * Dh, **kw)
            self.o_proj = nn.Linear(H * Dh, d_model, **kw)

        def forward(self, x):
            B, L, _ = x.shape
            q = self.q_proj(x).view(B, L, H, Dh).transpose(1, 2)
            k = self.k_proj(x).view(B, L, KV, Dh).transpose(1, 2)
            v = self.v_proj(x).view(B, L, KV, Dh).transpose(1, 2)
            o = sdpa(q, k, v, gqa_native)
            return self.o_proj(o.transpose(1, 2).reshape(B, L, H * Dh))

    return _Attn()


def sdpa(q, k, v, gqa_native: bool):
    F = torch.nn.functional
    if not gqa_native:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    ctx = _flash_ctx()
    with ctx:
        if gqa_native:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _flash_ctx():
    import contextlib
    if not cuda():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


_GQA = None


def gqa_native() -> tuple[bool, str]:
    """Whether flash SDPA takes 16 q / 4 kv heads directly (enable_gqa); else k/v are repeated per call."""
    global _GQA
    if _GQA is None:
        q = torch.randn(1, ATTN_HEADS, 64, ATTN_HEADDIM, device=DEV, dtype=DTYPE)
        k = torch.randn(1, ATTN_KV_HEADS, 64, ATTN_HEADDIM, device=DEV, dtype=DTYPE)
        try:
            sdpa(q, k, k, True)
            _GQA = (True, "enable_gqa=True on the flash backend")
        except Exception as e:  # noqa: BLE001
            _GQA = (False, f"flash + enable_gqa failed ({short_error(e)}); k/v repeated to 16 heads in each call")
    return _GQA


def make_case(row: str, B: int, L: int, d_model: int):
    """(fwd, fwd_bwd, info, keepalive) for one row at one shape."""
    gen = torch.Generator(device=DEV).manual_seed(1234)
    info = {}
    if row == "sdpa_core":
        native, note = gqa_native()
        info["gqa"] = note
        H, KV, Dh = ATTN_HEADS, ATTN_KV_HEADS, ATTN_HEADDIM
        q = torch.randn(B, H, L, Dh, device=DEV, dtype=DTYPE, generator=gen)
        k = torch.randn(B, KV, L, Dh, device=DEV, dtype=DTYPE, generator=gen)
        v = torch.randn(B, KV, L, Dh, device=DEV, dtype=DTYPE, generator=gen)
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        dy = torch.randn(B, H, L, Dh, device=DEV, dtype=DTYPE, generator=gen)

        def fwd():
            with torch.no_grad():
                return sdpa(q, k, v, native)

        def fwd_bwd():
            for t in (qg, kg, vg):
                t.grad = None
            sdpa(qg, kg, vg, native).backward(dy)

        return fwd, fwd_bwd, info, (q, k, v, qg, kg, vg, dy)

    if row == "sdpa_layer":
        native, note = gqa_native()
        info["gqa"] = note
        mod = make_attn_layer(d_model, native)
        info["params_m"] = round(sum(p.numel() for p in mod.parameters()) / 1e6, 3)
    else:
        mod, minfo = build_mamba(row, d_model)
        info.update(minfo)
    u = torch.randn(B, L, d_model, device=DEV, dtype=DTYPE, generator=gen)
    ug = u.clone().requires_grad_(True)
    dy = torch.randn(B, L, d_model, device=DEV, dtype=DTYPE, generator=gen)

    def fwd():
        with torch.no_grad():
            return mod(u)

    def fwd_bwd():
        mod.zero_grad(set_to_none=True)
        ug.grad = None
        mod(ug).backward(dy)

    return fwd, fwd_bwd, info, (mod, u, ug, dy)


# ----------------------------------------------------------------------------------------------- runner
class Bench:
    def __init__(self, args):
        self.args = args
        self.t_start = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.res = dict(meta={}, method=__doc__.split("How each figure is measured")[1].strip()
                        if "How each figure is measured" in __doc__ else "", forward=[], decode=[],
                        cold_start=[], unavailable={}, errors=[])
        self.json_path = self.out / "bench_mamba3.json"

    def left(self) -> float:
        if not self.args.deadline_s:
            return float("inf")
        return self.args.deadline_s - (time.perf_counter() - self.t_start)

    def save(self):
        self.res["meta"]["elapsed_s"] = round(time.perf_counter() - self.t_start, 1)
        tmp = self.json_path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.res, f, indent=1)
        tmp.replace(self.json_path)

    def log(self, msg):
        print(f"[bench {time.perf_counter() - self.t_start:7.1f}s] {msg}", flush=True)

    # ---- environment
    def meta(self):
        m = self.res["meta"]
        m.update(args=vars(self.args), python=sys.version.split()[0], torch=torch.__version__,
                 host=platform.node(), dtype=str(DTYPE), device_type=DEV.type,
                 config=dict(d_model=self.args.d_model, d_state=D_STATE, headdim=HEADDIM, expand=EXPAND,
                             nheads=EXPAND * self.args.d_model // HEADDIM, mimo_rank=MIMO_RANK,
                             attn=f"{ATTN_HEADS}h/{ATTN_KV_HEADS}kv x {ATTN_HEADDIM}"))
        try:
            import triton
            m["triton"] = triton.__version__
        except ImportError:
            m["triton"] = None
        if cuda():
            p = torch.cuda.get_device_properties(0)
            m.update(gpu=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                     gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
            try:
                m["hbm_copy_gbps"] = self.bandwidth()
            except Exception as e:  # noqa: BLE001
                m["hbm_copy_error"] = short_error(e)
        m["official_autotune"] = ("full" if os.environ.get("HM3_ORACLE_FULL_AUTOTUNE") == "1" else
                                  "trimmed to num_warps 4, num_stages <= 2, no maxnreg (tests/oracle.py for the SISO "
                                  "fwd, MIMO utils, angle kernels; this bench for the SISO bwd and step)")
        m["caches"] = dict(TRITON_CACHE_DIR=os.environ.get("TRITON_CACHE_DIR"),
                           TILELANG_CACHE_DIR=os.environ.get("TILELANG_CACHE_DIR"))
        self.save()

    def bandwidth(self) -> float:
        """Device-to-device copy, bytes read + written per second (GB/s), median of 10."""
        n = (1 << 28) if not self.args.quick else (1 << 24)  # fp32 elements: 1 GiB (quick: 64 MiB)
        x = torch.randn(n, device=DEV)
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        ts = []
        for _ in range(10):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            y.copy_(x)
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / 1000)
        bw = 2 * x.numel() * 4 / statistics.median(ts) / 1e9
        del x, y
        free_memory()
        self.log(f"HBM copy bandwidth {bw:.0f} GB/s (read+write)")
        return round(bw, 1)

    # ---- prefill / training rows
    def run_forward_rows(self, rows, shapes):
        for row in rows:
            for si, shape in enumerate(shapes):
                if row.startswith("official") and shape not in self.official_shapes:
                    continue
                if self.left() < 15:
                    self.res["forward"].append(dict(row=row, shape=shape, error="skipped: deadline"))
                    continue
                if row in self.res["unavailable"]:
                    self.res["forward"].append(dict(row=row, shape=shape, error=self.res["unavailable"][row]))
                    continue
                self.one_forward_row(row, shape, first=si == 0)
                self.save()

    def one_forward_row(self, row, shape, first):
        B, L = parse_shape(shape)
        rec = dict(row=row, shape=shape, batch=B, seqlen=L, tokens=B * L)
        self.log(f"{row} {shape} ...")
        case = None
        try:
            free_memory()
            t0 = time.perf_counter()
            case = make_case(row, B, L, self.args.d_model)
            rec["build_s"] = round(time.perf_counter() - t0, 3)
            fwd, fwd_bwd, info, _keep = case
            rec.update(info)
            for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                if self.left() < 10:
                    rec[mode] = dict(error="skipped: deadline")
                    continue
                try:
                    if first:  # first call of this row in this process
                        sync()
                        t1 = time.perf_counter()
                        fn()
                        sync()
                        rec[f"first_call_s_{mode}"] = round(time.perf_counter() - t1, 3)
                        rec["first_call_caches"] = (
                            "filled by this run's cold-start process (compiled kernels loaded, autotuning redone)"
                            if any(c["row"] == row and "error" not in c for c in self.res["cold_start"]) else
                            "this run's fresh cache dirs (compile and autotune included, for this row's own "
                            "kernels; kernels shared with rows run before it were already compiled)"
                            if self.args.cache_dir is None else f"cache dir {self.args.cache_dir}")
                    budget = min(self.args.row_budget_s, max(5.0, self.left() - 20))
                    rec[mode] = time_call(fn, self.args.reps, self.args.warmup, budget)
                    if self.args.host_profile and first and row.startswith("ours") and cuda():
                        path = self.out / f"host_profile_{row}_{mode}.txt"
                        path.write_text(host_profile_text(fn))
                        rec[mode]["host_profile"] = path.name
                    mod = _keep[0] if row not in ("sdpa_core",) else None
                    if getattr(mod, "last_backend", None) is not None:
                        rec["last_backend"] = mod.last_backend
                except Exception as e:  # noqa: BLE001
                    rec[mode] = dict(error=short_error(e))
                    rec[mode]["trace"] = traceback.format_exc()[-2000:]
                    self.log(f"  {mode} failed: {short_error(e)}")
                free_memory()
        except NotAvailable as e:
            rec["error"] = str(e)
            self.res["unavailable"][row] = str(e)
            self.log(f"  not available: {e}")
        except Exception as e:  # noqa: BLE001
            rec["error"] = short_error(e)
            rec["trace"] = traceback.format_exc()[-2000:]
            self.log(f"  failed: {short_error(e)}")
        case = _keep = fwd = fwd_bwd = None  # noqa: F841
        free_memory()
        f, fb = rec.get("fwd", {}), rec.get("fwd_bwd", {})
        self.log(f"  {row} {shape}: fwd gpu {fmt(f.get('gpu_ms'))} ms wall {fmt(f.get('wall_ms'))} ms | "
                 f"fwd+bwd gpu {fmt(fb.get('gpu_ms'))} ms wall {fmt(fb.get('wall_ms'))} ms | "
                 f"peak {fmt(f.get('peak_mib'))}/{fmt(fb.get('peak_mib'))} MiB")
        self.res["forward"].append(rec)

    # ---- cold start (fresh subprocess per row)
    def run_cold(self, rows, shape):
        for row in rows:
            if row.startswith("sdpa"):
                continue
            if row.startswith("official") and self.args.skip_official:
                continue
            timeout = self.args.cold_timeout_s * (2 if row == "official_mimo_r4" else 1)
            timeout = min(timeout, self.left() - 30)
            if timeout < 20:
                self.res["cold_start"].append(dict(row=row, shape=shape, error="skipped: deadline"))
                continue
            self.log(f"cold start {row} at {shape} (fresh process, empty compile caches; timeout {timeout:.0f} s)")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--cold-child", row, "--cold-shape", shape,
                   "--d-model", str(self.args.d_model), "--device", DEV.type]
            t0 = time.perf_counter()
            rec = dict(row=row, shape=shape)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
                rec["process_s"] = round(time.perf_counter() - t0, 2)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith(COLD_PREFIX)]
                if line:
                    rec.update(json.loads(line[-1][len(COLD_PREFIX):]))
                else:  # the process died (e.g. a native crash in an import): keep the main process away from it
                    rec["error"] = f"cold process died, rc={p.returncode}: " + (p.stderr or p.stdout)[-1500:]
                    if row.startswith("official"):
                        self.res["unavailable"][row] = rec["error"][:600]
            except subprocess.TimeoutExpired:
                rec["error"] = f"timed out after {timeout:.0f} s (compile still running)"
                rec["process_s"] = round(time.perf_counter() - t0, 2)
                if row.startswith("official"):  # the main process would pay the same compile again
                    self.res["unavailable"][row] = "cold start " + rec["error"] + "; not measured in this run"
            if row.startswith("official") and "unavailable" in str(rec.get("error", "")):
                self.res["unavailable"][row] = rec["error"]
            self.log(f"  {row}: " + ", ".join(f"{k}={v}" for k, v in rec.items() if k.endswith("_s"))
                     + (f" error: {rec['error'][:300]}" if "error" in rec else ""))
            self.res["cold_start"].append(rec)
            self.save()

    # ---- decode
    def run_decode(self, rows, batches):
        for row in rows:
            if not row.startswith(("ours", "official")):
                continue
            mimo = row.endswith("mimo_r4")
            variants = ["layer_step", "step_kernel"] if row.startswith("ours") else \
                ["layer_step"] + (["siso_step_kernel_triton"] if not mimo else [])
            for variant in variants:
                for b in batches:
                    if self.left() < 10:
                        self.res["decode"].append(dict(row=row, variant=variant, batch=b, error="skipped: deadline"))
                        continue
                    rec = dict(row=row, variant=variant, batch=b)
                    self.log(f"decode {row} {variant} batch {b} ...")
                    try:
                        free_memory()
                        self.one_decode(rec, row, mimo, variant, b)
                    except NotAvailable as e:
                        rec["error"] = str(e)
                    except Exception as e:  # noqa: BLE001
                        rec["error"] = short_error(e)
                        rec["trace"] = traceback.format_exc()[-2000:]
                    free_memory()
                    self.log("  " + ", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in rec.items()
                                              if k.endswith(("_us", "ratio")) or k == "error"))
                    self.res["decode"].append(rec)
                    self.save()

    def one_decode(self, rec, row, mimo, variant, b):
        d_model = self.args.d_model
        H, P, N, R = EXPAND * d_model // HEADDIM, HEADDIM, D_STATE, (MIMO_RANK if mimo else 1)
        K = int(N * 0.5) // 2
        # bytes the step must move: fp32 state (angle, ssm, k, v) read + written once
        state_bytes = 2 * 4 * b * (H * K + H * P * N + R * H * N + H * P)
        rec["state_bytes"] = state_bytes
        bw = self.res["meta"].get("hbm_copy_gbps")
        if row in self.res["unavailable"]:
            raise NotAvailable("n/a: " + self.res["unavailable"][row])
        gen = torch.Generator(device=DEV).manual_seed(99)
        keep = None
        if row.startswith("ours"):
            mod, _ = build_mamba(row, d_model)
            state = mod.allocate_state(b)
            for t in state:
                t.normal_(0, 0.1, generator=gen)
            u = torch.randn(b, d_model, device=DEV, dtype=DTYPE, generator=gen)
            weight_bytes = sum(p.numel() * p.element_size() for p in (mod.in_proj.weight, mod.out_proj.weight))
            if variant == "layer_step":
                def fn():
                    return mod.step(u, state)

                def chained(n):
                    st = state
                    for _ in range(n):
                        _, st = mod.step(u, st)
            else:
                from hybrid_mamba3.kernels.triton_step import mamba3_step_triton
                step_fn = mamba3_step_triton if cuda() else None
                if step_fn is None:
                    from hybrid_mamba3.kernels import mamba3_step as step_fn
                with torch.no_grad():
                    p = mod._project(u)
                    kw = mod._op_kwargs(p["z"])
                args = (p["q"], p["k"], p["v"], p["adt"], p["dt"], p["trap"], mod.C_bias.detach(),
                        mod.B_bias.detach(), p["angles"])
                kw = {k: (v.detach() if hasattr(v, "detach") else v) for k, v in kw.items()}
                weight_bytes = 0

                def fn():
                    return step_fn(*args, state, **kw)

                def chained(n):
                    st = state
                    for _ in range(n):
                        _, st = step_fn(*args, st, **kw)
            keep = (mod, state, u)
        elif variant == "layer_step":
            cls, why = official_class(mimo)
            if cls is None:
                raise NotAvailable("n/a: " + why)
            oracle = load_oracle_module()
            if not oracle.official_step_available():
                raise NotAvailable("n/a: the official step needs its CuTe DSL kernel (nvidia-cutlass-dsl, "
                                   "quack-kernels), not in the offline bundle")
            mod, _ = build_mamba(row, d_model)
            st = mod.allocate_inference_cache(b, 1)
            for t in st:
                t.normal_(0, 0.1, generator=gen)
            u = torch.randn(b, d_model, device=DEV, dtype=DTYPE, generator=gen)
            weight_bytes = sum(p.numel() * p.element_size() for p in (mod.in_proj.weight, mod.out_proj.weight))

            def fn():
                return mod.step(u, *st)

            def chained(n):
                for _ in range(n):
                    mod.step(u, *st)  # updates its states in place
            keep = (mod, st, u)
        else:  # official SISO Triton step kernel, raw
            oracle = load_oracle_module()
            smod = oracle.import_oracle("ops.triton.mamba3.mamba3_siso_step")
            oracle._trim_autotune(smod)
            f32 = torch.float32
            rn = lambda *s, dt=DTYPE: torch.randn(*s, device=DEV, dtype=dt, generator=gen)  # noqa: E731
            Q, Kk, V, Z = rn(b, H, N), rn(b, H, N), rn(b, H, P), rn(b, H, P)
            DT = torch.rand(b, H, device=DEV, generator=gen) * 0.1
            ADT = -DT * torch.rand(b, H, device=DEV, generator=gen)
            Trap = torch.rand(b, H, device=DEV, generator=gen)
            qb, kb, Ang = rn(H, N, dt=f32), rn(H, N, dt=f32), rn(b, H, K, dt=f32)
            Dp = torch.ones(H, device=DEV)
            sts = (rn(b, H, K, dt=f32), rn(b, H, P, N, dt=f32) * 0.1, rn(b, H, N, dt=f32), rn(b, H, P))
            weight_bytes = 0

            def fn():
                return smod.mamba3_siso_step(Q, Kk, V, ADT, DT, Trap, qb, kb, Ang, D=Dp, Z=Z, Input_States=sts)

            def chained(n):
                st = sts
                for _ in range(n):
                    _, st = smod.mamba3_siso_step(Q, Kk, V, ADT, DT, Trap, qb, kb, Ang, D=Dp, Z=Z,
                                                  Input_States=(st[0], st[1], st[2], sts[3]))
            keep = (Q,)
        rec["weight_bytes"] = weight_bytes
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            rec["first_call_s"] = round(time.perf_counter() - t0, 3)
            for _ in range(5):
                fn()
            n = self.args.decode_steps
            chained(3)
            sync()
            t0 = time.perf_counter()
            chained(n)
            sync()
            rec["wall_us"] = (time.perf_counter() - t0) / n * 1e6
            if cuda():
                try:
                    kp = profile_kernel_ms(fn, min(30, n))
                    rec["kernel_us"] = kp["gpu_ms"] * 1000
                    rec["launches_per_call"] = kp["launches_per_call"]
                    rec["top_kernels"] = kp["top_kernels"][:4]
                    if kp["top_kernels"]:
                        rec["top_kernel_us"] = kp["top_kernels"][0]["ms_per_call"] * 1000
                        rec["top_kernel"] = kp["top_kernels"][0]["name"][:60]
                except Exception as e:  # noqa: BLE001
                    rec["kernel_error"] = short_error(e)
                try:
                    rec["graph_us"] = self.graph_time_us(fn, n)
                except Exception as e:  # noqa: BLE001
                    rec["graph_error"] = short_error(e)
        if bw:
            rec["floor_state_us"] = state_bytes / (bw * 1e9) * 1e6
            rec["floor_layer_us"] = (state_bytes + weight_bytes) / (bw * 1e9) * 1e6
            floor = rec["floor_layer_us"] if variant == "layer_step" else rec["floor_state_us"]
            best = min([x for x in (rec.get("kernel_us"), rec.get("graph_us")) if x is not None], default=None)
            if best is not None:
                rec["kernel_over_floor_ratio"] = (rec.get("kernel_us") or best) / floor
                rec["graph_over_floor_ratio"] = (rec.get("graph_us") or best) / floor
        del keep

    @staticmethod
    def graph_time_us(fn, n) -> float:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        for _ in range(3):
            g.replay()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        e0.record()
        for _ in range(n):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        us = e0.elapsed_time(e1) / n * 1000
        del g
        return us


# ----------------------------------------------------------------------------------------------- cold child
def cold_child(args):
    """Runs in a fresh process: import, build, first fwd, second fwd, first fwd+bwd, second fwd+bwd."""
    out = {}
    t0 = time.perf_counter()
    _import_torch()
    global DEV, DTYPE
    DEV = torch.device(args.device)
    DTYPE = torch.bfloat16
    out["import_torch_s"] = round(time.perf_counter() - t0, 3)
    if cuda():
        torch.zeros(1, device=DEV)
        torch.cuda.synchronize()
    out["cuda_init_s"] = round(time.perf_counter() - t0 - out["import_torch_s"], 3)
    try:
        B, L = parse_shape(args.cold_shape)
        t1 = time.perf_counter()
        if args.cold_child.startswith("ours"):
            importlib.import_module("hybrid_mamba3")
        else:
            cls, why = official_class(args.cold_child.endswith("mimo_r4"))
            if cls is None:
                raise NotAvailable("official module unavailable: " + why)
        out["import_impl_s"] = round(time.perf_counter() - t1, 3)
        t1 = time.perf_counter()
        fwd, fwd_bwd, info, keep = make_case(args.cold_child, B, L, args.d_model)
        sync()
        out["build_s"] = round(time.perf_counter() - t1, 3)
        for name, fn in (("first_fwd_s", fwd), ("second_fwd_s", fwd), ("first_fwd_bwd_s", fwd_bwd),
                         ("second_fwd_bwd_s", fwd_bwd)):
            t1 = time.perf_counter()
            fn()
            sync()
            out[name] = round(time.perf_counter() - t1, 3)
        out["total_to_first_fwd_bwd_s"] = round(time.perf_counter() - t0, 3)
        mod = keep[0]
        if getattr(mod, "last_backend", None):
            out["last_backend"] = mod.last_backend
    except NotAvailable as e:
        out["error"] = str(e)
    except Exception as e:  # noqa: BLE001
        out["error"] = short_error(e)
        out["trace"] = traceback.format_exc()[-1500:]
    print(COLD_PREFIX + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------- main
DEV = None
DTYPE = None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Method: see the module docstring of evals/kernel_dev/bench_mamba3.py.")
    ap.add_argument("--shapes", default=None, help=f"comma list of bBATCHxLEN (default {DEFAULT_SHAPES})")
    ap.add_argument("--official-shapes", default=None,
                    help="shapes for the official rows (default: all of --shapes); e.g. b8x2048 to limit them")
    ap.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma list from {','.join(ALL_ROWS)}")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per measurement (median); reduced for slow "
                    "calls so one measurement stays within --row-budget-s (at least 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    ap.add_argument("--row-budget-s", type=float, default=25.0, help="seconds of timed calls per row and mode")
    ap.add_argument("--decode-batches", default="1,64")
    ap.add_argument("--decode-steps", type=int, default=200, help="steps per decode timing loop")
    ap.add_argument("--skip-official", action="store_true", help="no official rows (they are recorded as skipped)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--host-profile", action="store_true",
                    help="also write a cProfile of one call per mode of our rows at the first shape "
                         "(host_profile_<row>_<mode>.txt)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-start subprocesses")
    ap.add_argument("--cold-shape", default=None, help="shape of the cold-start runs (default: the first shape)")
    ap.add_argument("--cold-timeout-s", type=float, default=200.0, help="per cold run (official MIMO: twice this)")
    ap.add_argument("--official-full-autotune", action="store_true",
                    help="keep the official Triton kernels' full autotuning (SISO: ~5 min per kernel family cold)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and d_model 256: a smoke test")
    ap.add_argument("--d-model", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./out)")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="stop starting new measurements this many seconds after the start (0: none)")
    ap.add_argument("--cache-dir", default=None, help="Triton/TileLang cache root (default: a fresh temp dir, so "
                    "the cold-start runs see empty caches); 'default' keeps the tools' own cache dirs")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke test: ours on "
                    "the torch backend, no GPU figures)")
    ap.add_argument("--from-json", default=None, help="only re-render the table and PNG from a JSON written before")
    ap.add_argument("--note", action="append", default=[], help="with --from-json: a note for meta.notes")
    ap.add_argument("--cold-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.d_model is None:
        args.d_model = 256 if args.quick else D_MODEL
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    if args.quick:
        args.decode_batches = "1,4" if args.decode_batches == "1,64" else args.decode_batches
        args.decode_steps = min(args.decode_steps, 20)
        args.reps = min(args.reps, 3)
    args.out = args.out or os.environ.get("OUT") or "out"
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        res = merge([json.loads(Path(x).read_text()) for x in args.from_json.split(",") if x.strip()],
                    args.from_json.split(","))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        res["meta"].setdefault("notes", []).extend(n for n in args.note if n not in res["meta"].get("notes", []))
        text = report(res)
        for n in res["meta"]["notes"]:
            text += f"\nnote: {n}"
        (out / "bench_mamba3_table.txt").write_text(text + "\n")
        if "," in args.from_json or args.note:
            (out / "bench_mamba3.json").write_text(json.dumps(res, indent=1))
        print(text)
        print(safe_plot(res, out / "bench_mamba3.png"))
        return 0
    if args.official_full_autotune:
        os.environ["HM3_ORACLE_FULL_AUTOTUNE"] = "1"
    if args.cold_child:
        return cold_child(args)
    if args.cache_dir != "default":
        root = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="hm3_bench_cache_"))
        os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
        os.environ["TILELANG_CACHE_DIR"] = str(root / "tilelang")
        os.environ["TILELANG_TMP_DIR"] = str(root / "tilelang" / "tmp")
    _import_torch()
    global DEV, DTYPE
    DEV = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = DEV.type
    DTYPE = torch.bfloat16
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        parse_shape(s)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ALL_ROWS]
    if bad:
        raise SystemExit(f"unknown rows {bad}; choose from {ALL_ROWS}")
    bench = Bench(args)
    bench.official_shapes = set(s.strip() for s in (args.official_shapes or args.shapes).split(","))
    if args.skip_official:
        for r in rows:
            if r.startswith("official"):
                bench.res["unavailable"][r] = "skipped (--skip-official)"
    bench.log(f"device {DEV}, shapes {shapes}, rows {rows}, out {bench.out}")
    bench.meta()
    cold_shape = args.cold_shape or shapes[0]
    ours = [r for r in rows if r.startswith("ours")]
    official = [r for r in rows if r.startswith("official")]
    attn = [r for r in rows if r.startswith("sdpa")]
    decode_batches = [int(x) for x in args.decode_batches.split(",") if x.strip()]
    # ours first (cold runs fill the caches the main process then uses), attention, decode, then official
    # (its TileLang compile is the slow part: last, so a deadline cuts it rather than our figures).
    if not args.no_cold:
        bench.run_cold(ours, cold_shape)
    bench.run_forward_rows(ours, shapes)
    bench.run_forward_rows(attn, shapes)
    if not args.skip_decode:
        bench.run_decode(ours, decode_batches)
    if official and not args.skip_official:
        if not args.no_cold:
            bench.run_cold(official, cold_shape)
        bench.run_forward_rows(official, shapes)
        if not args.skip_decode:
            bench.run_decode(official, decode_batches)
    text = report(bench.res)
    bench.save()
    print("\n" + text, flush=True)
    (bench.out / "bench_mamba3_table.txt").write_text(text + "\n")
    print(safe_plot(bench.res, bench.out / "bench_mamba3.png"))
    print(f"wrote {bench.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
