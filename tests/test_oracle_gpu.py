"""Our Mamba3 layer against the official mamba-ssm 2.3.2.post1 module (the oracle), on CUDA.

Run on the device: tests/device/run_gpu_tests.sh (installs the oracle bundle, then pytest -m gpu). Each test
builds the official module in bf16, gives it non-trivial random parameters, moves its state dict into our layer
unchanged and compares outputs, final decode states and decode steps. Figures go to
$HM3_REPORT_DIR/oracle_report.json (see tests/oracle.py) before any assertion, so a failing test still reports.

Tolerances: max relative error ||ours - official||_inf / ||official||_inf <= 2e-2 in bf16. Both sides round
their operands to bf16 (8 significant bits, ~4e-3 relative each) and the errors add over in_proj, the scan
and out_proj; the official kernels also use bf16 operands inside the scan (K scaled by the trapezoid weights,
the state cast to bf16 for the inter-chunk product) and fast approximations (tanh.approx for the angles and the
SiLU gate, sigmoid/sin/cos approximations in the Triton SISO kernel). The spec measured the oracle itself at
4.5e-3 to 7.3e-3 against float64 in bf16, and its own tests accept 0.10 against fp32 references.
"""

import copy
import time

import pytest
import torch
from oracle import (inference_params, note, official_and_ours, official_step_available, pair_grads, record,
                    record_timing)

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

BF16_TOL = 2e-2
# Final angles are cumulative sums of tanh(.)*dt*pi over the sequence (tens of radians after 256 tokens); the
# official kernel's tanh.approx (relative error ~5e-4) can drift them by ~1e-2 rad, compared through cos/sin.
ANGLE_TOL = 3e-2
# Gradients, two checks per quantity. (1) Ours in bf16 against ours in fp32 on the same weights (the fp32 kernels
# match the chunked torch op to ~1e-6): GRAD_TOL, the bf16 rounding of the forward's size. (2) Ours in fp32 against
# the official bf16 module, i.e. the same function up to the official's own rounding: OFFICIAL_GRAD_TOL. Its B/C bias
# gradients (sums over every token of its bf16 per-token terms) came out 1.9e-2 and 2.7e-2 from our fp32 layer at
# SISO L=256 (H200, 2026-11-26), so the bound is twice the forward's. The angles' per-token gradient is a suffix sum
# over the sequence of terms that cancel (scores depend on angle differences only), so rounding moves it far more
# relative to its size: the official bf16 one is 2.5e-2 from our fp32 layer here and 7.3e-2 at b8 x 2048 (ours
# bf16: 2.3e-2 there, evals/kernel_dev/grad_precision.py --layers); both checks give it ANGLE_GRAD_TOL.
GRAD_TOL = 2e-2
OFFICIAL_GRAD_TOL = 4e-2
ANGLE_GRAD_TOL = 6e-2

COMMON = dict(d_model=256, expand=2, headdim=64)
MIMO = dict(is_mimo=True, mimo_rank=4, chunk_size=16)
SISO = dict(is_mimo=False, chunk_size=64)
CONFIGS = {
    "mimo_r4_rope0.5_n128": dict(MIMO, d_state=128, rope_fraction=0.5),
    "mimo_r4_rope1.0_n64": dict(MIMO, d_state=64, rope_fraction=1.0),
    "mimo_r4_rope0.5_n128_outnorm": dict(MIMO, d_state=128, rope_fraction=0.5, is_outproj_norm=True),
    "mimo_r4_rope0.5_n128_g2": dict(MIMO, d_state=128, rope_fraction=0.5, ngroups=2),  # shares the first's kernel
    "siso_rope0.5_n128": dict(SISO, d_state=128, rope_fraction=0.5),
    "siso_rope1.0_n64": dict(SISO, d_state=64, rope_fraction=1.0),
    "siso_rope0.5_n128_outnorm": dict(SISO, d_state=128, rope_fraction=0.5, is_outproj_norm=True),
}
BATCH = 2


def errs(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(max relative, mean relative, max absolute) error of a against the reference b."""
    a, b = a.double(), b.double()
    d = (a - b).abs()
    return ((d.max() / b.abs().max().clamp_min(1e-30)).item(), (d.mean() / b.abs().mean().clamp_min(1e-30)).item(),
            d.max().item())


def build(name: str, seed: int = 0):
    """The official module (bf16, randomised) and our layer holding the same state dict."""
    return official_and_ours(dict(COMMON, **CONFIGS[name]), seed)


def official_prefill(off, u: torch.Tensor, label: str):
    """The official forward with InferenceParams: output and final decode states (angle, ssm, k, v)."""
    ip = inference_params(u.shape[1], u.shape[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = off(u, inference_params=ip)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    # the first call of each kernel variant includes TileLang's JIT compile (MIMO) / Triton compile (SISO)
    record_timing(f"official_first_call_s[{label}]", first)
    record_timing("official_first_mimo_call_s (TileLang JIT compile included)" if off.is_mimo else
                  "official_first_siso_call_s (Triton compile + trimmed autotune included)", first)
    t0 = time.perf_counter()
    off(u, inference_params=inference_params(u.shape[1], u.shape[0]))
    torch.cuda.synchronize()
    record_timing(f"official_warm_call_s[{label}]", time.perf_counter() - t0)
    return y, ip.key_value_memory_dict[0], ip


def compare_states(name: str, what: str, st, st_off) -> list[tuple[str, float, float]]:
    """Record ours-vs-official for each state; returns (label, max error, tolerance) triples."""
    out = []
    a, a_off = st.angle.double(), st_off[0].double()
    ang = max((a.cos() - a_off.cos()).abs().max().item(), (a.sin() - a_off.sin()).abs().max().item())
    record(name, f"{what} state angle (max |dcos|,|dsin|)", ang, None, ang, shape=list(a_off.shape))
    out.append(("angle", ang, ANGLE_TOL))
    for label, ours_t, off_t in (("ssm", st.ssm, st_off[1]), ("k", st.k, st_off[2]), ("v", st.v, st_off[3])):
        assert ours_t.shape == off_t.shape, (label, ours_t.shape, off_t.shape)
        mx, mean, mabs = errs(ours_t, off_t)
        record(name, f"{what} state {label}", mx, mean, mabs, shape=list(off_t.shape))
        out.append((label, mx, BF16_TOL))
    return out


@pytest.mark.parametrize("L", [256, 200])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_and_final_state_match_official(name, L):
    off, ours = build(name)
    cfg = f"{name} L={L}"
    u = torch.randn(BATCH, L, COMMON["d_model"], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y_off, st_off, _ = official_prefill(off, u, cfg)
        y, st = ours(u, return_final_state=True)
        backend = ours.last_backend
        ours32 = copy.deepcopy(ours).float()
        y32, st32 = ours32(u.float(), return_final_state=True)
    assert not torch.isnan(y_off).any(), "the official output has NaN"
    bf = errs(y, y_off)
    f32 = errs(y32, y_off)
    record(cfg, "output bf16 vs official bf16", *bf, backend=backend)
    record(cfg, "output fp32 vs official bf16", *f32, backend=ours32.last_backend)
    checks = compare_states(cfg, "bf16", st, st_off)
    compare_states(cfg, "fp32", st32, st_off)

    assert not torch.isnan(y).any() and not torch.isnan(y32).any()
    assert bf[0] <= BF16_TOL, f"{cfg}: bf16 output max rel err {bf[0]:.3e} > {BF16_TOL}"
    assert f32[0] <= BF16_TOL, f"{cfg}: fp32 output max rel err {f32[0]:.3e} against the bf16 oracle > {BF16_TOL}"
    for label, err, tol in checks:
        assert err <= tol, f"{cfg}: final {label} state error {err:.3e} > {tol}"


# Not g2: the official MIMO backward has none for ngroups 2 (mamba_ssm 2.3.2.post1, mamba3_mimo_bwd.py raises "G value
# of 2 is not currently supported!", H100 2026-11-26); our ngroups-2 gradients are checked against the chunked torch
# op (tests/test_triton_gpu.py, test_triton_interpret.py), its forward against the official above.
@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.endswith("_g2")])
def test_layer_gradients_match_official(name):
    """Backward through the official module and ours (bf16, and fp32 on the same weights) for one random dy: the
    input's gradient, every parameter's gradient and the per-token gradient of each in_proj output part (checks
    and their bounds: GRAD_TOL above).

    The official MIMO backward's first call JIT-compiles its TileLang kernels: ~130 s per config on an H200."""
    L = 256
    off, ours = build(name)
    g_off, g, g32, seconds = pair_grads(off, ours, BATCH, L)
    record_timing(f"official_first_fwd_bwd_s[{name} L={L}]", seconds)
    assert g.keys() == g_off.keys() == g32.keys(), (sorted(g_off), sorted(g))
    bad = []
    for key, ref in g_off.items():
        assert not torch.isnan(ref).any(), f"official gradient {key} has NaN"
        assert not torch.isnan(g[key]).any() and not torch.isnan(g32[key]).any(), key
        checks = (("bf16 vs ours fp32", errs(g[key], g32[key]), GRAD_TOL),
                  ("fp32 vs official", errs(g32[key], ref), OFFICIAL_GRAD_TOL),
                  ("bf16 vs official", errs(g[key], ref), None))  # (recorded only: the sum of the two above)
        for label, e, tol in checks:
            record(f"{name} L={L} grad", f"{key} {label}", *e, backend=ours.last_backend)
            tol = ANGLE_GRAD_TOL if tol is not None and key == "proj.angles" else tol
            if tol is not None and e[0] > tol:
                bad.append(f"{key} {label} {e[0]:.3e} > {tol}")
    assert not bad, f"{name}: gradient checks failed: {bad}"


@pytest.mark.parametrize("name", ["mimo_r4_rope0.5_n128", "siso_rope0.5_n128"])
def test_plain_forward_matches_official(name):
    """The official forward without inference_params (the kernels' no-state variant) equals ours too."""
    off, ours = build(name)
    u = torch.randn(BATCH, 200, COMMON["d_model"], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y_off = off(u)
        torch.cuda.synchronize()
        record_timing(f"official_first_call_s[{name} L=200 no state]", time.perf_counter() - t0)
        y = ours(u)
    e = errs(y, y_off)
    record(f"{name} L=200", "output bf16 vs official bf16 (no inference_params)", *e, backend=ours.last_backend)
    assert not torch.isnan(y).any()
    assert e[0] <= BF16_TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_steps_match_official(name):
    """Prefill L-T tokens, then T single-token steps: each step's output against the official full forward.

    The official `step` needs the CuTe DSL (nvidia-cutlass-dsl + quack-kernels, too large for the device bundle);
    when it is importable its steps are compared too, output by output, and its states after the steps.
    """
    L, T = 200, 8
    off, ours = build(name)
    u = torch.randn(BATCH, L, COMMON["d_model"], device="cuda", dtype=torch.bfloat16)
    cfg = f"{name} L={L - T}+{T} steps"
    with torch.no_grad():
        y_full, _, _ = official_prefill(off, u, f"{name} L={L}")
        _, st = ours(u[:, :L - T], return_final_state=True)
        steps = []
        for i in range(L - T, L):
            y_t, st = ours.step(u[:, i], st)
            steps.append(y_t)
        y_steps = torch.stack(steps, 1)
        ours32 = copy.deepcopy(ours).float()
        _, st32 = ours32(u[:, :L - T].float(), return_final_state=True)
        steps32 = []
        for i in range(L - T, L):
            y_t, st32 = ours32.step(u[:, i].float(), st32)
            steps32.append(y_t)
        y_steps32 = torch.stack(steps32, 1)
    e = errs(y_steps, y_full[:, L - T:])
    e32 = errs(y_steps32, y_full[:, L - T:])
    record(cfg, "ours step bf16 vs official forward", *e, backend=ours.last_backend)
    record(cfg, "ours step fp32 vs official forward", *e32, backend=ours32.last_backend)

    official_steps = official_step_available() and CONFIGS[name].get("ngroups", 1) == 1
    if official_steps:  # (its step expands B/C from one group to all heads: ngroups 1 only)
        with torch.no_grad():
            _, st_off, _ = official_prefill(off, u[:, :L - T].contiguous(), f"{name} L={L - T}")
            outs = [off.step(u[:, i], *st_off)[0] for i in range(L - T, L)]
        y_off_steps = torch.stack(outs, 1)
        e_off = errs(y_steps, y_off_steps)
        record(cfg, "ours step bf16 vs official step (CuTe)", *e_off)
        record(cfg, "official step vs official forward", *errs(y_off_steps, y_full[:, L - T:]))
        state_checks = compare_states(cfg, "after steps bf16", st, st_off)
    else:
        note("official decode step not compared (CuTe DSL not importable, or ngroups > 1): decode steps were "
             "compared against the official full forward, and final states after the official prefill")

    assert not torch.isnan(y_steps).any() and not torch.isnan(y_steps32).any()
    assert e[0] <= BF16_TOL, f"{cfg}: bf16 decode max rel err {e[0]:.3e} > {BF16_TOL}"
    assert e32[0] <= BF16_TOL, f"{cfg}: fp32 decode max rel err {e32[0]:.3e} > {BF16_TOL}"
    if official_steps:
        assert e_off[0] <= BF16_TOL
        for label, err, tol in state_checks:
            assert err <= tol, f"{cfg}: {label} state after steps {err:.3e} > {tol}"
