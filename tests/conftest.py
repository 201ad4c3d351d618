import os
import sys
from pathlib import Path

# The repo's kernels/ folder is installed as `hybrid_mamba3.kernels`; with the repo root on sys.path (`python -m
# pytest` puts the working directory there) it would also be a top-level `kernels` and shadow Hugging Face's package
# of that name, which transformers (>= 5.25) imports. Drop the root before anything imports transformers.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]

import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter (tests/test_triton_interpret.py). The switch
# must be on before triton is first imported (transformers imports it), or triton's own library functions
# are built for compilation and cannot be interpreted; so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest_plugins = ("pytester", "failure_log")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_op_inputs(B=2, L=37, R=4, G=1, N=16, H=4, P=8, K=4, dtype=torch.float64, mimo=True, gate=True, skip=True,
                   requires_grad=False, gen=None):
    """Random, non-trivial op inputs (no zeros, decays spread over a realistic range)."""
    def f(*s, scale=1.0):
        return (torch.randn(*s, dtype=dtype, generator=gen) * scale).requires_grad_(requires_grad)
    dt = F.softplus(torch.randn(B, L, H, dtype=dtype, generator=gen) - 1.0)
    A = -F.softplus(torch.randn(B, L, H, dtype=dtype, generator=gen))
    adt, dt = (A * dt).requires_grad_(requires_grad), dt.requires_grad_(requires_grad)
    args = (f(B, L, R, G, N), f(B, L, R, G, N), f(B, L, H, P), adt, dt, f(B, L, H), f(H, R, N, scale=0.5),
            f(H, R, N, scale=0.5), f(B, L, K))
    opts = dict(mimo_x=f(H, R, P) if mimo else None, mimo_z=f(H, R, P) if mimo and gate else None,
                mimo_o=f(H, R, P) if mimo else None, D=f(H) if skip else None, z=f(B, L, H, P) if gate else None)
    return args, opts


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-norm relative error of a against reference b."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def in_place_record(monkeypatch):
    """For `kernels.shared_grad`: per split backward, the set of pieces whose gradient arrived in its place in the
    shared buffer; the buffer NaN-poisoned when allocated, so a part nobody wrote (and assemble did not fill) shows."""
    from hybrid_mamba3.kernels import shared_grad

    record = []
    assemble, take = shared_grad.SharedGrad.assemble, shared_grad.SharedGrad.take

    def poisoned_take(self, index, shape):
        fresh = self.buffer is None
        out = take(self, index, shape)
        if fresh and self.buffer is not None:
            self.buffer.fill_(float("nan"))
        return out

    def recording_assemble(self, grads):
        buf = self.buffer
        record.append({i for i, g in enumerate(grads) if g is not None and buf is not None
                       and self.in_place(buf, i, g)})
        return assemble(self, grads)

    monkeypatch.setattr(shared_grad.SharedGrad, "take", poisoned_take)
    monkeypatch.setattr(shared_grad.SharedGrad, "assemble", recording_assemble)
    return record


@pytest.fixture
def kept_checkpoints(monkeypatch):
    """For `triton_scan.CKPT_POSITIONS`: per training forward of the Triton op, how many state checkpoints it kept
    (None: none). Patched where the forward and the backward look it up (`triton_forward` and `triton_backward` call
    `triton_scan.entering_states` through the module)."""
    from hybrid_mamba3.kernels import triton_scan

    record, entering = [], triton_scan.entering_states

    def recording(*args, **kwargs):
        out = entering(*args, **kwargs)
        if kwargs.get("keep_ckpt"):
            record.append(None if out[2] is None else out[2].shape[2])
        return out

    monkeypatch.setattr(triton_scan, "entering_states", recording)
    return record


class _RecordingKernel:
    """Stands in for a Triton kernel in its module: each launch's keyword arguments (constexprs and launch options)
    are appended to `record`, then the kernel runs as before."""

    def __init__(self, kernel, record: list):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.record.append(kwargs)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def kernel_launches(monkeypatch):
    """watch(module, name) -> the list of keyword arguments of every later launch of that Triton kernel: a test that
    patches a kernel setting asserts from it that the setting reached the launch."""

    def watch(module, name: str) -> list[dict]:
        record: list[dict] = []
        monkeypatch.setattr(module, name, _RecordingKernel(getattr(module, name), record))
        return record

    return watch
