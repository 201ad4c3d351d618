"""Opt-in backend: the official mamba-ssm kernels (TileLang MIMO, Triton SISO) behind our layer.

Needs mamba-ssm >= 2.3.2 and a GPU. Its package `__init__` imports a CUDA extension that pip may not
have built (MAMBA_SKIP_CUDA_BUILD installs); then its submodules are imported through a stand-in
package object, which loads only the pure-Python/Triton/TileLang parts we call.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from .kernels import Mamba3State


def import_official(module: str):
    """Import `mamba_ssm.<module>` even when the package's compiled extension is missing."""
    try:
        return importlib.import_module(f"mamba_ssm.{module}")
    except ImportError as first:
        if "mamba_ssm" in sys.modules and hasattr(sys.modules["mamba_ssm"], "__path__"):
            raise
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("backend='official' needs the mamba-ssm package (pip install mamba-ssm)") from first
        stub = types.ModuleType("mamba_ssm")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = stub
        return importlib.import_module(f"mamba_ssm.{module}")


def official_scan(layer, q, k, v, adt, dt, trap, q_bias, k_bias, angles, *, mimo_x, mimo_z, mimo_o, D, z,
                  rope_pairwise, chunk_size, initial_state, return_final_state, cu_seqlens):
    if initial_state is not None:
        raise ValueError("the official kernels take no initial state; use backend='auto' to continue from a cache")
    if v.device.type != "cuda":
        raise RuntimeError("backend='official' runs on CUDA only")
    H = v.shape[2]
    to_bhl = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  (B, L, H) -> (B, H, L)
    ang = angles[:, :, None, :].expand(-1, -1, H, -1).float()
    if layer.is_mimo:
        mimo = import_official("ops.tilelang.mamba3.mamba3_mimo").mamba3_mimo
        out = mimo(Q=q, K=k, V=v, ADT=to_bhl(adt), DT=to_bhl(dt), Trap=to_bhl(trap), Q_bias=q_bias, K_bias=k_bias,
                   MIMO_V=mimo_x, MIMO_Z=mimo_z, MIMO_Out=mimo_o, Angles=ang, D=D, Z=z, chunk_size=chunk_size,
                   rotary_dim_divisor=layer.rotary_dim_divisor, dtype=v.dtype, return_state=return_final_state,
                   cu_seqlens=cu_seqlens)
    else:
        siso = import_official("ops.triton.mamba3.mamba3_siso_combined").mamba3_siso_combined
        out = siso(Q=q.squeeze(2), K=k.squeeze(2), V=v, ADT=to_bhl(adt), DT=to_bhl(dt), Trap=to_bhl(trap),
                   Q_bias=q_bias.squeeze(1), K_bias=k_bias.squeeze(1), Angles=ang, D=D, Z=z, chunk_size=chunk_size,
                   Input_States=None, return_final_states=return_final_state, cu_seqlens=cu_seqlens)
    y, state = (out[0], out[1:5]) if return_final_state else (out, None)
    if not layer.is_mimo and mimo_o is None:
        y = y.unsqueeze(2)  # per-rank layout for the out-projection norm path
    if state is None:
        return y, None
    angle, ssm, last_k, last_v = state
    last_k = last_k if last_k.dim() == 4 else last_k.unsqueeze(1)
    return y, Mamba3State(angle.float(), ssm.float(), last_k.float(), last_v.float())
