#!/usr/bin/env python3
"""Compile report of the Triton scan's kernels for an H100 (sm_90a), made on a machine without a GPU: registers,
spilled bytes, shared memory and the SASS instruction mix (tensor-core ops, global / shared / local memory ops,
barriers, shuffles) of every kernel one forward+backward call of `mamba3_chunked_triton` launches.

    python3 evals/kernel_dev/kernel_sass.py --ranks 4,1 --out out/sass   # CPU only; a few minutes of compiling
    python3 evals/kernel_dev/kernel_sass.py --variants                    # + every other specialisation the layer
                                                                          #   launches (CI's test_kernel_compile.py)

How: the op runs on small CPU tensors with the kernels' launches replaced by compiles (nothing executes, the
outputs are left as allocated). Each launch's arguments give the kernel's signature the way Triton's launcher
specialises it on a GPU (pointer dtypes, integers equal to 1 as constants, integers divisible by 16 marked so,
the constexprs and num_warps / num_stages of the launch), so the compiled code is the code the device would run
for these launch options, as far as integer divisibility goes (the sizes used here keep the device shapes'
divisibility: H, P, N at their defaults, L and chunk counts multiples of 16). Compiled with this machine's Triton
and its bundled ptxas, which may differ from the device's: compare variants with one Triton, and time on the device
(evals/kernel_dev/kernel_report.py), since fewer spills need not mean faster.

The memory-op "bytes" are instruction width x 128 threads per static SASS instruction (these kernels have no
loops except the scans' chunk loop, which counts once): a relative measure of a kernel's traffic through
L1/shared memory, not a measurement.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# compiled, not interpreted: the tests' conftest (imported for its input generator) would switch the interpreter
# on for a machine without a GPU, and it must be decided before triton is first imported
os.environ["TRITON_INTERPRET"] = "0"

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kernel_report, also when run through runpy

_DTYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64",
           torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1"}
_OPS = ("HGMMA", "LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDL", "STL", "REDG", "ATOMG", "BAR", "SHFL")
_MEMORY = ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDL", "STL", "REDG", "ATOMG")


def _signature(fn, args, kwargs):
    """(signature, constexprs, attrs, options) of one launch, specialised as the GPU launcher would."""
    import triton.language as tl

    params = inspect.signature(fn).parameters
    # launch options (num_warps, num_stages, enable_fp_fusion, maxnreg, ...): every keyword that is no parameter
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in params}
    bound = dict(zip(params, args), **kwargs)
    sig, constexprs, attrs = {}, {}, {}
    for i, (name, p) in enumerate(params.items()):
        v = bound[name]
        if p.annotation is tl.constexpr or "constexpr" in str(p.annotation):
            sig[name], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name], attrs[(i,)] = _DTYPES[v.dtype], [["tt.divisibility", 16]]  # allocations are 16-aligned
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], constexprs[(i,)] = "constexpr", 1
            else:
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    return sig, constexprs, attrs, options


def _sass_mix(cubin: bytes, tools: str) -> tuple[dict, dict]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    count, nbytes = collections.Counter(), collections.Counter()
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base not in _OPS:
            continue
        count[base] += 1
        if base in _MEMORY:
            width = 4
            for suffix, w in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
                if suffix in op:
                    width = w
            if base in ("LDSM", "STSM"):  # 8x8 b16 matrices: x1 / x2 / x4 per warp
                width = 16 if ".X4" in op.upper() or ".M88.4" in op.upper() else 8 if ".2" in op else 4
            nbytes[base] += width * 128
    return dict(count), dict(nbytes)


def _ptxas(tools: str) -> str:
    """The ptxas Triton itself assembles sm_90 code with: Triton 3.9 writes PTX 9.x and takes its bundled CUDA 13
    ptxas ("ptxas-blackwell") for sm_90 too, while the plain bundled ptxas (CUDA 12.9) reads PTX up to 8.8."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, TypeError, AttributeError):  # an older Triton: the bundled ptxas it shipped
        return os.path.join(tools, "ptxas")


def _ptxas_spills(ptx: str, tools: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(tools), "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"ptxas failed on the PTX Triton wrote: {r.stderr.strip()[-2000:]}")
    text = r.stdout + r.stderr
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else None  # noqa: E731
    return dict(regs=grab(r"Used (\d+) registers"), spill_store_bytes=grab(r"(\d+) bytes spill stores"),
                spill_load_bytes=grab(r"(\d+) bytes spill loads"))


class _Compiler:
    """Stands in for the launches: compiles each distinct (kernel, signature) once and records its report."""

    def __init__(self, dump: str | None = None):
        import triton

        self.tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        self.reports: dict = {}
        self.dump = dump

    def launch(self, kernel, args, kwargs):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = kernel.fn
        sig, constexprs, attrs, options = _signature(fn, args, dict(kwargs))
        key = (fn.__name__, tuple(sorted((k[0], str(v)) for k, v in constexprs.items())),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        if key in self.reports:
            return
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        if self.dump:
            os.makedirs(self.dump, exist_ok=True)
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(self.dump, f"{fn.__name__}_{len(self.reports)}.{ext}"), "w") as f:
                    f.write(k.asm[ext])
        count, nbytes = _sass_mix(k.asm["cubin"], self.tools)
        rep = dict(kernel=fn.__name__, num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3),
                   fp_fusion=options.get("enable_fp_fusion"), shared=k.metadata.shared,
                   **_ptxas_spills(k.asm["ptx"], self.tools), sass=count,
                   sass_bytes=nbytes, memory_kb=round(sum(nbytes.values()) / 1024, 1),
                   constexprs={sig_name: str(v) for (i,), v in constexprs.items()
                               for j, sig_name in enumerate(sig) if j == i})
        self.reports[key] = rep
        print(f"  {fn.__name__}: {rep['regs']} regs, {rep['spill_store_bytes']} B spilled, "
              f"{rep['memory_kb']} KB memory ops", flush=True)


def _run_op(R: int, B: int, L: int, H: int, P: int, N: int, K: int, variants: bool = False) -> None:
    """One fwd+bwd of the op; variants: also packed sequences with an initial state (the kernels' varlen and
    initial-state specialisations), packed rows (seq_idx), the layer's token activations, both kinds, its B/C norm,
    its decode step, distillation's KL and the split-KV decode attention (compile checks, not tuning)."""
    from conftest import make_op_inputs

    from hybrid_mamba3.kernels import Mamba3State
    from hybrid_mamba3.kernels.triton_chunked import mamba3_chunked_triton

    args, opts = make_op_inputs(B=B, L=L, R=R, G=1, N=N, H=H, P=P, K=K, dtype=torch.float32, mimo=R > 1,
                                gate=True, skip=True, gen=torch.Generator().manual_seed(0))
    cast = lambda t: None if t is None else t.bfloat16().requires_grad_()  # noqa: E731
    y, _ = mamba3_chunked_triton(*[cast(a) for a in args], **{k: cast(v) for k, v in opts.items()},
                                 rope_pairwise=R == 1)  # the SISO layer's rotation layout
    y.backward(torch.ones_like(y))
    if not variants:
        return
    from hybrid_mamba3.kernels.triton_scalars import token_activations_triton

    pack = lambda t: cast(t.reshape(1, B * L, *t.shape[2:]) if t is not None and t.shape[:2] == (B, L) else t)  # noqa: E731
    state = Mamba3State(torch.zeros(2, H, K), torch.zeros(2, H, P, N), torch.zeros(2, R, H, N), torch.zeros(2, H, P))
    cu = torch.tensor([0, L // 2, B * L], dtype=torch.int32)
    y, _ = mamba3_chunked_triton(*map(pack, args), **{k: pack(v) for k, v in opts.items()}, cu_seqlens=cu,
                                 initial_state=state, return_final_state=True)
    y.backward(torch.ones_like(y))
    seq = torch.arange(L).expand(B, L) * 3 // L  # packed rows: three sequences each, reset inside the kernels
    y, _ = mamba3_chunked_triton(*[cast(a) for a in args], **{k: cast(v) for k, v in opts.items()}, seq_idx=seq,
                                 rope_pairwise=R == 1)
    y.backward(torch.ones_like(y))
    raw = torch.randn(B, L, 3 * H, dtype=torch.bfloat16, requires_grad=True)
    for act in ("softplus", "heavy_tail"):
        dt, adt = token_activations_triton(raw[..., :H], raw[..., H:2 * H], torch.zeros(H), act, 1e-4)
        (dt + adt).sum().backward()
    from hybrid_mamba3.kernels.triton_angles import angle_table  # its fp16 table's CUDA-only fast cos / sin

    angle_table(args[8].bfloat16(), args[4].float(), None, torch.float16, fast=True)
    from hybrid_mamba3.kernels.triton_norm import rms_norm_triton  # the B/C norm, on a view of a projection

    proj = torch.randn(B, L, R * N + 8, dtype=torch.bfloat16, requires_grad=True)
    rms_norm_triton(proj[..., 8:].unflatten(-1, (R, 1, N)), torch.ones(N, requires_grad=True), 1e-5).sum().backward()
    # the decode step, on normed inputs and (as the layer's step) on the raw in_proj output
    from hybrid_mamba3.kernels.triton_step import StepActivations, mamba3_step_triton

    one = [(a if i in (6, 7) else a[:, 0]).bfloat16() for i, a in enumerate(args)]  # biases have no L
    kw = {k: None if v is None else (v[:, 0] if k == "z" else v).bfloat16() for k, v in opts.items()}
    step_state = Mamba3State(*(t[:B] for t in state))
    mamba3_step_triton(*one, step_state, **kw, rope_pairwise=R == 1)
    act = StepActivations(torch.zeros(H), torch.ones(N), torch.ones(N), 1e-5, "heavy_tail", 1e-4)
    mamba3_step_triton(*one, step_state, **kw, rope_pairwise=R == 1, activations=act)
    from hybrid_mamba3.kernels.triton_kl import kl_rows_triton  # distillation's per-token KL, with CE and without

    logits = torch.randn(4, 1000, dtype=torch.bfloat16, requires_grad=True)
    kl, ce = kl_rows_triton(logits, torch.randn(4, 1000, dtype=torch.bfloat16), torch.arange(4), 2.0)
    (kl + ce).sum().backward()
    kl_rows_triton(logits.float(), torch.randn(4, 1000)).sum().backward()
    from hybrid_mamba3.kernels.triton_decode_attention import decode_attention_triton  # decode attention, split-KV

    for heads, kv_heads, dtype in ((32, 8, torch.bfloat16), (9, 3, torch.bfloat16), (8, 8, torch.float32)):
        q = torch.randn(2, heads, 64, dtype=dtype)
        k, v = (torch.randn(2, kv_heads, 1000, 64, dtype=dtype) for _ in range(2))
        decode_attention_triton(q, k, v, torch.ones(2, 1000, dtype=torch.bool) if dtype != torch.float32 else None,
                                0.125)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="4,1")
    ap.add_argument("--shape", default="1x256", help="BxL of the (CPU) call; only its divisibility matters")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=INT",
                    help="override an integer constant of hybrid_mamba3.kernels, as in kernel_report.py")
    ap.add_argument("--variants", action="store_true",
                    help="also compile the varlen / initial-state specialisations, the token activations, the B/C "
                         "norm, the decode step and distillation's KL (a compile check of everything the package "
                         "can launch)")
    ap.add_argument("--dump", default=None, help="also write each kernel's TTGIR and PTX to this folder")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args()
    from kernel_report import _apply, _overrides

    sets = _overrides(a.set)
    if len(sets) > 1:
        raise SystemExit("--set: one value per constant here (a compile report is of one variant)")
    _apply(sets[0])
    import triton
    from triton.runtime.jit import JITFunction

    comp = _Compiler(a.dump)
    JITFunction.run = lambda self, *args, grid, warmup, **kw: comp.launch(self, args, kw)  # compile, never launch
    B, L = map(int, a.shape.split("x"))
    results = []
    for R in map(int, a.ranks.split(",")):
        print(f"R{R}:", flush=True)
        comp.reports = {}
        _run_op(R, B, L, H=64, P=64, N=128, K=32, variants=a.variants)
        results += [dict(R=R, **r) for r in comp.reports.values()]
    cols = ("HGMMA", "LDG", "STS", "LDS", "LDSM", "LDL", "STL", "REDG", "BAR", "SHFL")
    lines = [f"triton {triton.__version__}, sm_90a, shape {a.shape} (compile only)",
             f"{'R':>2} {'kernel':<26} {'warps':>5} {'regs':>4} {'spill B':>7} {'smem':>6} {'mem KB':>7} "
             + " ".join(f"{c:>5}" for c in cols)]
    for r in results:
        lines.append(f"{r['R']:>2} {r['kernel']:<26} {r['num_warps']:>5} {r['regs']:>4} "
                     f"{r['spill_store_bytes'] or 0:>7} {r['shared']:>6} {r['memory_kb']:>7} "
                     + " ".join(f"{r['sass'].get(c, 0):>5}" for c in cols))
    table = "\n".join(lines)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kernel_sass.json"), "w") as f:
        json.dump(dict(triton=triton.__version__, shape=a.shape, kernels=results), f, indent=1)
    with open(os.path.join(a.out, "kernel_sass.txt"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
