"""The oracle: the official `Mamba3` module of mamba-ssm 2.3.2.post1, loaded for comparison tests.

On the device the package comes from `.whl/oracle.tar.xz` (tests/device/install_oracle.sh unpacks it to
/tmp/oracle_site): the sdist's python files, its CUDA extension not built. The package `__init__` imports that
extension, so `mamba_ssm` is put in sys.modules as an empty stand-in package and only the submodules we need
are imported (the Mamba3 module, its Triton/TileLang kernels, InferenceParams). Nothing here is mamba-ssm code.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
import types

import pytest

ORACLE_SITE = os.environ.get("HM3_ORACLE_SITE", "/tmp/oracle_site")


def import_oracle(module: str):
    """`mamba_ssm.<module>` through a stand-in package object (the real `__init__` is never run)."""
    if "mamba_ssm" not in sys.modules:
        if os.path.isdir(os.path.join(ORACLE_SITE, "mamba_ssm")) and ORACLE_SITE not in sys.path:
            sys.path.insert(0, ORACLE_SITE)
        spec = importlib.util.find_spec("mamba_ssm")  # locates the package without executing it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("mamba_ssm not found (run tests/device/install_oracle.sh, or set HM3_ORACLE_SITE)")
        stub = types.ModuleType("mamba_ssm")
        stub.__path__ = list(spec.submodule_search_locations)
        stub.__version__ = "2.3.2.post1"
        sys.modules["mamba_ssm"] = stub
    return importlib.import_module(f"mamba_ssm.{module}")


def _trim_autotune(mod) -> None:
    """Cut the official Triton kernels' autotuning to 1-2 configs (num_warps 4, <= 2 stages).

    Its SISO forward autotunes 27 configs for every new key (~5 minutes on a fresh machine, more than one device
    call may take); the configs change speed, not the arithmetic being compared. HM3_ORACLE_FULL_AUTOTUNE=1 keeps all.
    """
    if os.environ.get("HM3_ORACLE_FULL_AUTOTUNE") == "1":
        return
    from triton.runtime.autotuner import Autotuner
    for obj in vars(mod).values():
        if isinstance(obj, Autotuner) and len(obj.configs) > 2:
            keep = [c for c in obj.configs if c.num_warps == 4 and c.num_stages <= 2
                    and getattr(c, "maxnreg", None) is None]
            obj.configs = keep or obj.configs[:2]


# the official Triton kernels whose autotuning is trimmed (the SISO backward alone has 54+27+27+81 configs)
TRIMMED = ("ops.triton.mamba3.mamba3_siso_fwd", "ops.triton.mamba3.mamba3_siso_bwd",
           "ops.triton.mamba3.mamba3_siso_step", "ops.triton.mamba3.mamba3_mimo_utils", "ops.triton.mamba3.angle_dt")


def load_official_mamba3(mimo: bool = False):
    """The official `Mamba3` class, or pytest.skip with the reason. mimo=True also needs its TileLang kernels."""
    try:
        t0 = time.perf_counter()
        mod = import_oracle("modules.mamba3")
        for name in TRIMMED:
            try:
                _trim_autotune(import_oracle(name))
            except ImportError:  # a module that is not there is not run either
                pass
        record_timing("oracle_import_s", time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - any failure to import means: no oracle here
        pytest.skip(f"official mamba-ssm Mamba3 not importable: {type(e).__name__}: {e}")
    if mimo and mod.mamba3_mimo_combined is None:
        try:
            import_oracle("ops.tilelang.mamba3.mamba3_mimo")
            why = "unknown"
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {e}"
        pytest.skip(f"official MIMO (TileLang) kernels not importable: {why}")
    return mod.Mamba3


def perturb(layer) -> None:
    """Non-trivial Mamba-3 parameters for a comparison (never compare or time a layer on its constant init):
    in_proj / out_proj keep their random init, the parameters initialised to constants get random values."""
    import torch

    with torch.no_grad():
        R = layer.mimo_rank
        layer.dt_bias.add_(0.5 * torch.randn_like(layer.dt_bias))
        for p in (layer.B_bias, layer.C_bias, layer.D):
            p.copy_(1 + 0.5 * torch.randn_like(p))
        for norm in (layer.B_norm, layer.C_norm) + ((layer.norm,) if layer.is_outproj_norm else ()):
            norm.weight.copy_(1 + 0.2 * torch.randn_like(norm.weight))
        if layer.is_mimo:
            layer.mimo_x.copy_(1 / R + 0.2 * torch.randn_like(layer.mimo_x))
            layer.mimo_z.copy_(1 + 0.3 * torch.randn_like(layer.mimo_z))
            layer.mimo_o.copy_(1 / R + 0.2 * torch.randn_like(layer.mimo_o))


def official_and_ours(cfg: dict, seed: int = 0):
    """The official module (bf16, non-trivial random parameters) and our Mamba3 layer holding its state dict.

    cfg: the keyword arguments of both constructors (d_model, d_state, is_mimo, mimo_rank, chunk_size, ...).
    """
    import torch

    from hybrid_mamba3 import Mamba3

    Official = load_official_mamba3(mimo=cfg["is_mimo"])
    torch.manual_seed(seed)
    off = Official(**cfg, layer_idx=0, device="cuda", dtype=torch.bfloat16)
    perturb(off)
    ours = Mamba3(**cfg, layer_idx=0, device="cuda", dtype=torch.bfloat16, backend="auto")
    ours.load_state_dict(off.state_dict())
    return off, ours


def layer_grads(layer, u, dy, split) -> dict:
    """fp32 copies of the output, the input's gradient, each parameter's gradient and the in_proj output's
    gradient per part ("proj.z", "proj.x", ... "proj.angles": per-token gradients, before the sums over tokens
    that the parameter gradients are) for the loss sum(y * dy). `split` cuts in_proj's output into its parts
    (our Mamba3._split; the official layout is the same)."""
    layer.zero_grad(set_to_none=True)
    u = u.detach().clone().requires_grad_()
    proj = []

    def keep(module, inputs, output) -> None:  # (a hook that returns something replaces the output)
        output.retain_grad()
        proj.append(output)

    hook = layer.in_proj.register_forward_hook(keep)
    try:
        y = layer(u)
    finally:
        hook.remove()
    (y.float() * dy).sum().backward()
    names = ("z", "x", "B", "C", "dd_dt", "dd_A", "trap", "angles")
    out = dict(output=y.detach().float(), input=u.grad.float())
    out.update({f"proj.{n}": g.float() for n, g in zip(names, split(proj[0].grad))})
    out.update({n: p.grad.float() for n, p in layer.named_parameters() if p.grad is not None})
    return out


def pair_grads(off, ours, B: int, L: int, seed: int = 1) -> tuple[dict, dict, dict, float]:
    """`layer_grads` of the official module and ours in bf16 and of an fp32 copy of ours, for one random bf16 input
    (B, L, d_model) and fp32 dy drawn from `seed`; and the official's fwd+bwd seconds (its first call JIT-compiles)."""
    import copy

    import torch

    ours32 = copy.deepcopy(ours).float()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    u = torch.randn(B, L, ours.d_model, device="cuda", generator=gen).bfloat16()
    dy = torch.randn(B, L, ours.d_model, device="cuda", generator=gen)
    t0 = time.perf_counter()
    g_off = layer_grads(off, u, dy, ours._split)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return g_off, layer_grads(ours, u, dy, ours._split), layer_grads(ours32, u.float(), dy, ours._split), seconds


def official_step_available() -> bool:
    """Whether the official decode step (CuTe DSL: nvidia-cutlass-dsl, quack-kernels) can run."""
    try:
        return import_oracle("modules.mamba3").mamba3_step_fn is not None
    except Exception:  # noqa: BLE001
        return False


def inference_params(max_seqlen: int, max_batch_size: int):
    """mamba_ssm.utils.generation.InferenceParams; a plain stand-in with the fields Mamba3 reads if that fails."""
    try:
        return import_oracle("utils.generation").InferenceParams(max_seqlen=max_seqlen, max_batch_size=max_batch_size)
    except Exception:  # noqa: BLE001 - e.g. a transformers version it does not import under
        return types.SimpleNamespace(max_seqlen=max_seqlen, max_batch_size=max_batch_size, seqlen_offset=0,
                                     batch_size_offset=0, key_value_memory_dict={}, lengths_per_sample=None)


# ---------------------------------------------------------------- figures for the issue note
_REPORT: dict = {"comparisons": [], "timings": {}, "notes": []}


def _write_report() -> None:
    out = os.environ.get("HM3_REPORT_DIR")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "oracle_report.json"), "w") as f:
            json.dump(_REPORT, f, indent=1)


def record(config: str, what: str, max_rel: float, mean_rel: float | None = None, max_abs: float | None = None,
           **extra) -> None:
    """One compared figure; written (whole report rewritten) to $HM3_REPORT_DIR/oracle_report.json at once."""
    row = dict(config=config, what=what, max_rel_err=max_rel, mean_rel_err=mean_rel, max_abs_err=max_abs, **extra)
    _REPORT["comparisons"].append(row)
    print(f"[oracle] {config:<34} {what:<38} max_rel={max_rel:.3e}"
          + (f" mean_rel={mean_rel:.3e}" if mean_rel is not None else "")
          + (f" max_abs={max_abs:.3e}" if max_abs is not None else "")
          + "".join(f" {k}={v}" for k, v in extra.items()))
    _write_report()


def note(text: str) -> None:
    if text not in _REPORT["notes"]:
        _REPORT["notes"].append(text)
        print(f"[oracle] note: {text}")
        _write_report()


def record_timing(name: str, seconds: float) -> None:
    _REPORT["timings"].setdefault(name, round(seconds, 3))
    _write_report()
