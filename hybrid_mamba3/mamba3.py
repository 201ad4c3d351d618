"""The Mamba-3 mixer: parameters, init and function of the official `mamba_ssm` Mamba3 module.

A state dict moves between this module and `mamba_ssm.modules.mamba3.Mamba3` unchanged. The scan
runs on the best available op: our Triton kernels on CUDA, the chunked torch op elsewhere, or the
official kernels when asked for (`backend="official"`, needs mamba-ssm on a GPU).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn as nn

from .cache import one_cache, read_mamba_state, states_to_record, write_mamba_state
from .kernels import Mamba3State, mamba3_chunked, mamba3_step
from .kernels.common import A_ACTIVATIONS, INT32_LIMIT, at_least_fp32, token_activations
from .kernels.shared_grad import split_shared_grad
from .norms import GatedRMSNorm, KeepFP32Mixin

BACKENDS = ("auto", "torch", "triton", "official")
ROW_ALIGN = 8  # elements: 16 bytes of bf16, the row alignment cuBLAS's fast (tensor-core, vectorised) GEMMs need
ROW_ALIGN_MIN_ROWS = 1024  # below it the weight's padded copy costs more than the slow kernel loses
ROW_ALIGN_DEVICES = ("cuda",)


@functools.lru_cache(maxsize=None)
def _triton_ops():
    """The Triton ops (chunked scan, decode step, token activations), or None without triton / a GPU. Looked up
    once: the imports and CUDA probe cost the host ~20 us per call, three times per layer call."""
    try:
        from .kernels.triton_chunked import mamba3_chunked_triton, triton_available
        from .kernels.triton_scalars import token_activations_triton
        from .kernels.triton_step import mamba3_step_triton
    except ImportError:
        return None
    return (mamba3_chunked_triton, mamba3_step_triton, token_activations_triton) if triton_available() else None


def padding_mask(attention_mask: torch.Tensor | None, length: int, carries_state: bool) -> torch.Tensor | None:
    """The (B, length) bool mask of the real positions of a Mamba-3 layer's call on the last `length` positions of a
    2D (batch, seq) `attention_mask`, or None when no position is padding.

    Left padding is honoured exactly: a padded position leaves the state untouched, and the first real token has no
    previous term, as at a sequence's start. Right padding (transformers' and TRL's collators pad right) is harmless
    where no state is carried on (`carries_state` False: no cache, no final state asked for): a causal layer's outputs
    at real tokens never see the padding after them, so those positions run as if real (their outputs are don't-cares,
    as their labels are). Where the final state is carried on, right padding would be folded into it, and padding
    between real tokens would change what the token after it sees as its previous one: both raise. One host sync."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"Mamba-3 layers take a 2D (batch, seq) padding mask, got a {attention_mask.dim()}D mask: custom 4D "
            "attention masks cannot be honoured by a recurrent layer; pass the 2D mask (or seq_idx / cu_seqlens for "
            "packed sequences)")
    m = attention_mask.bool()
    trailing = m.flip(1).cumsum(1).flip(1) == 0  # no real token at or after the position
    real = m if carries_state else m | trailing
    right, between, none_padded = torch.stack((
        (m[:, :-1] & trailing[:, 1:]).any(),  # a real token followed by trailing padding
        (real[:, :-1] & ~real[:, 1:]).any(), real[:, -length:].all())).tolist()
    if carries_state and right:
        raise ValueError(
            "right padding with a cache (or a final state asked for): the padding would be folded into the state that "
            "the next tokens continue from. Pad on the left (tokenizer.padding_side = 'left') to generate; right "
            "padding is fine for training and scoring (no cache)")
    if between:
        raise ValueError(
            "padding between real tokens: a Mamba-3 layer cannot skip it exactly (the next token's previous-input "
            "term would change). Pad on the left or the right, or pack sequences with seq_idx / cu_seqlens")
    return None if none_padded else real[:, -length:]


@functools.lru_cache(maxsize=256)
def _row_elements(length: int, width: int, R: int, G: int, N: int, H: int, P: int, K: int) -> int:
    """`Mamba3.row_elements`, cached: it runs on every layer call, decode steps included (~7 us uncached)."""
    from .kernels.triton_chunked import elements_per_row

    return max(length * width, elements_per_row(length, R, G, N, H, P, K), H * P * N)


def _partitioned(*params: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 holds any of `params` partitioned right now. Its hooks gather a module's own parameters
    when that module is called; the fused decode step reads the B/C norms' weights without calling the norms, so while
    they are partitioned (generation inside ZeRO-3 training without gathering the whole model) the step goes through
    the norm modules instead."""
    return any(getattr(p, "ds_status", None) is not None and p.ds_status.name != "AVAILABLE" for p in params)


def _rows_joined(outs: list, finals: list, need_state: bool):
    """The outputs and final states of calls on slices of the batch, as one call's."""
    return torch.cat(outs, 0), (Mamba3State(*map(torch.cat, zip(*finals))) if need_state else None)


class RowAlignedLinear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and PEFT targeting) whose output rows lie `ROW_ALIGN` elements apart
    for large inputs on a GPU: the output is the first `out_features` columns of a GEMM against the weight padded
    with zero rows. Mamba-3's in_proj width is odd at most shapes (3 x heads + angles: SmolLM2's is 5803), and on odd
    row strides cuBLAS falls back to align-1 kernels: on an H100 the in_proj GEMMs of a 32k-token SmolLM2 training
    step ran ~2.4 ms each, forward and backward, ~13% of the step (the cutlass_75 ... align1 rows of
    evals/results/bench_distill_profile_trainer_h100_before.txt; padded, 0.36 ms). The padded copy of the weight is
    made inside the module's forward, where ZeRO-3 has gathered it; the layer's kernels read the output's pieces as
    strided views either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = -self.out_features % ROW_ALIGN
        if not pad or x.device.type not in ROW_ALIGN_DEVICES or x.numel() < ROW_ALIGN_MIN_ROWS * self.in_features:
            return super().forward(x)
        weight = nn.functional.pad(self.weight, (0, 0, 0, pad))
        bias = None if self.bias is None else nn.functional.pad(self.bias, (0, pad))
        return nn.functional.linear(x, weight, bias)[..., : self.out_features]


class Mamba3(KeepFP32Mixin, nn.Module):
    """Mamba-3 mixer, MIMO of rank `mimo_rank` (`is_mimo=True`) or SISO.

    Takes the official constructor's keyword arguments. `forward(u)` maps (batch, seqlen, d_model) to
    the same shape; the extras are keyword-only: `cache` (a transformers cache built from a hybrid config;
    `past_key_values` is the same, its name before transformers 5.24), `attention_mask` (2D; left padding, and right
    padding where no state is carried on: `padding_mask`), `seq_idx` (packed sequences, (batch, seqlen): a new
    sequence wherever it changes along a row), `cu_seqlens` (packed sequences along one row, with per-sequence
    states), `initial_state` / `return_final_state` (a `Mamba3State`, for use without a cache). Inputs too large
    for one call of the Triton kernels run in pieces (`max_rows_per_call`), and so do inference calls past
    `inference_elements_per_call`.
    """

    _fp32_params = ("dt_bias", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", "D")
    # At inference (nothing to differentiate), one call of the Triton kernels takes at most this many elements of
    # its widest per-row tensor (`row_elements`: the in_proj output at converted shapes), so that a prefill of many
    # rows, or of one long row, runs in pieces and the layer's transient memory stays bounded instead of growing with
    # batch x length: 2^28 bf16 elements are 0.5 GiB, the layer's other per-call tensors about as much again (the
    # Llama-3.2-1B conversion: ~13k positions a call). Set it on an instance to change it; None: only the kernels'
    # 32-bit limit splits a call.
    inference_elements_per_call: int | None = 2**28

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        rope_fraction: float = 0.5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_floor: float = 1e-4,
        is_outproj_norm: bool = False,
        is_mimo: bool = False,
        mimo_rank: int = 4,
        chunk_size: int = 64,
        dropout: float = 0.0,
        layer_idx: int | None = None,
        n_layer: int | None = None,
        device=None,
        dtype=None,
        a_activation: str = "softplus",
        backend: str = "auto",
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            warnings.warn(f"Mamba3 ignores unknown arguments {sorted(kwargs)}", stacklevel=2)
        d_inner = int(expand * d_model)
        if d_inner % headdim:
            raise ValueError(f"d_inner = expand * d_model = {d_inner} is not divisible by headdim {headdim}: "
                             "choose expand/headdim so that it is")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction must be 0.5 or 1.0 (as in the official layer), got {rope_fraction}")
        if is_mimo and (not isinstance(mimo_rank, int) or mimo_rank < 1):
            raise ValueError(f"mimo_rank must be an integer >= 1, got {mimo_rank!r}")
        nheads = d_inner // headdim
        if ngroups < 1 or nheads % ngroups:
            raise ValueError(f"ngroups ({ngroups}) must divide the number of heads ({nheads})")
        if a_activation not in A_ACTIVATIONS:
            raise ValueError(f"a_activation must be one of {A_ACTIVATIONS}, got {a_activation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        split = int(d_state * rope_fraction)
        split -= split % 2
        if split // 2 < 1:
            raise ValueError(f"d_state {d_state} with rope_fraction {rope_fraction} leaves no rotary angle")

        self.d_model, self.d_state, self.expand, self.headdim = d_model, d_state, expand, headdim
        self.d_inner, self.nheads, self.num_bc_heads = d_inner, nheads, ngroups
        self.chunk_size, self.layer_idx, self.A_floor = chunk_size, layer_idx, A_floor
        self.is_outproj_norm, self.is_mimo = is_outproj_norm, is_mimo
        self.mimo_rank = mimo_rank if is_mimo else 1
        self.rotary_dim_divisor = int(2 / rope_fraction)
        self.num_rope_angles = split // 2
        self.a_activation, self.backend = a_activation, backend
        self.last_backend: str | None = None

        R, H, N, P = self.mimo_rank, nheads, d_state, headdim
        d_in_proj = 2 * d_inner + 2 * N * ngroups * R + 3 * H + self.num_rope_angles
        self.in_proj = RowAlignedLinear(d_model, d_in_proj, bias=False, device=device, dtype=dtype)
        f32 = dict(device=device, dtype=torch.float32)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_bias = nn.Parameter(torch.empty(H, **f32))
        self.dt_bias._no_weight_decay = True
        self.B_bias = nn.Parameter(torch.empty(H, R, N, **f32))
        self.C_bias = nn.Parameter(torch.empty(H, R, N, **f32))
        self.B_norm = GatedRMSNorm(N, eps=1e-5, device=device)
        self.C_norm = GatedRMSNorm(N, eps=1e-5, device=device)
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.empty(H, R, P, **f32))
            self.mimo_z = nn.Parameter(torch.empty(H, R, P, **f32))
            self.mimo_o = nn.Parameter(torch.empty(H, R, P, **f32))
        self.D = nn.Parameter(torch.empty(H, **f32))
        self.D._no_weight_decay = True
        if is_outproj_norm:
            self.norm = GatedRMSNorm(d_inner, eps=1e-5, group_size=headdim, norm_before_gate=True, device=device)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, device=device, dtype=dtype)
        self.reset_mamba_parameters()

    def reset_mamba_parameters(self, copy=None) -> None:
        """The official init of the Mamba-3-specific parameters (projections and norms are left alone).

        dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at dt_init_floor; B/C biases
        and D ones; MIMO x/z/o 1/R, 1, 1/R. `copy(param, value)` lets transformers' init guards decide.
        """
        copy = copy or (lambda t, other: t.copy_(other))
        H, R = self.nheads, self.mimo_rank
        dev = self.dt_bias.device
        with torch.no_grad():
            dt = torch.exp(torch.rand(H, device=dev) * (math.log(self.dt_max) - math.log(self.dt_min))
                           + math.log(self.dt_min)).clamp(min=self.dt_init_floor)
            copy(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            for p, value in ((self.B_bias, 1.0), (self.C_bias, 1.0), (self.D, 1.0)):
                copy(p, torch.full_like(p, value))
            if self.is_mimo:
                for p, value in ((self.mimo_x, 1.0 / R), (self.mimo_z, 1.0), (self.mimo_o, 1.0 / R)):
                    copy(p, torch.full_like(p, value))

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        kind = f"MIMO R={self.mimo_rank}" if self.is_mimo else "SISO"
        return (f"d_model={self.d_model}, d_state={self.d_state}, heads={self.nheads}x{self.headdim}, {kind}, "
                f"angles={self.num_rope_angles}, ngroups={self.num_bc_heads}, backend={self.backend}")

    def _split_sizes(self) -> list[int]:
        H, N, GR = self.nheads, self.d_state, self.num_bc_heads * self.mimo_rank
        return [self.d_inner, self.d_inner, N * GR, N * GR, H, H, H, self.num_rope_angles]

    def _split(self, proj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The in_proj output's parts (views): z, x, B, C, dd_dt, dd_A, trap, angles."""
        return torch.split(proj, self._split_sizes(), dim=-1)

    def _project(self, u: torch.Tensor, fused: bool = False) -> dict:
        """in_proj and the per-token activations, for (..., d_model) inputs; fused (the Triton op): dt and adt by
        the Triton kernels (one launch each way instead of ~8 forward and ~12 backward: the host issues them all),
        the B/C norms by theirs, and the angles left raw (the op's angle kernels read them in place and take tanh
        themselves)."""
        H, P, N, G, R = self.nheads, self.headdim, self.d_state, self.num_bc_heads, self.mimo_rank
        # fused: the Triton kernels write their gradients into one buffer for in_proj (no concatenation)
        z, x, B, C, dd_dt, dd_A, trap, angles = split_shared_grad(
            self.in_proj(u), self._split_sizes(), [(H, P), (H, P), (R, G, N), (R, G, N), None, None, None, None],
            share=fused)
        activations = _triton_ops()[2] if fused else token_activations
        dt, adt = activations(dd_dt, dd_A, self.dt_bias, self.a_activation, self.A_floor)
        halves = fused and not self.is_mimo  # SISO rotates pairs (2j, 2j+1): the norm stores them as the op wants
        return dict(
            q=self.C_norm(C, fused=fused, halves=halves),
            k=self.B_norm(B, fused=fused, halves=halves), qk_halves=halves,
            v=x, z=z, adt=adt, dt=dt, trap=trap,
            angles=angles if fused else at_least_fp32(angles), lead=u.shape[:-1])

    def _op_kwargs(self, z: torch.Tensor) -> dict:
        # SISO (and the out-projection norm) leave the ranks to `_finish`: a rank of one needs no contraction, and
        # a ones mimo_o would cost a fill, a copy and a reduction of its gradient per call
        mimo = self.is_mimo
        return dict(
            mimo_x=self.mimo_x if mimo else None,
            # with the out-projection norm, z and mimo_z gate in `_finish`, after the op
            mimo_z=self.mimo_z if mimo and not self.is_outproj_norm else None,
            mimo_o=self.mimo_o if mimo and not self.is_outproj_norm else None,
            D=self.D, z=None if self.is_outproj_norm else z, rope_pairwise=not mimo)

    def _finish(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Out-projection norm (when configured), rank contraction and out_proj."""
        if self.is_outproj_norm:  # y: (..., R, H, P), gate per rank before the contraction
            zr = at_least_fp32(z).unsqueeze(-3) * (self.mimo_z.transpose(0, 1) if self.is_mimo else 1.0)
            y = self.norm(y.to(zr.dtype).flatten(-2), zr.expand(*y.shape).flatten(-2)).unflatten(-1, (self.nheads, -1))
            y = (y * self.mimo_o.transpose(0, 1)).sum(-3) if self.is_mimo else y.squeeze(-3)
        elif not self.is_mimo:  # y: (..., 1, H, P), see `_op_kwargs`
            y = y.squeeze(-3)
        return self.out_proj(y.flatten(-2).to(dtype))

    def _select_backend(self, device: torch.device) -> str:
        if self.backend == "torch" or (self.backend == "auto" and device.type != "cuda"):
            return "torch"
        if self.backend in ("auto", "triton"):
            if _triton_ops() is not None and device.type == "cuda":
                return "triton"
            if self.backend == "triton":
                raise RuntimeError("backend='triton' needs CUDA and the triton package; use backend='torch' or 'auto'")
            return "torch"
        return "official"

    # ------------------------------------------------------------------ forward / step
    def forward(self, u: torch.Tensor, *, cache=None, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                initial_state: Mamba3State | None = None, return_final_state: bool = False, past_key_values=None,
                mask_checked: bool = False, **kwargs):
        """mask_checked: attention_mask is already the (B, L) mask of real positions that `padding_mask` returns
        (the model checks it once for all its layers), so this layer takes it as it is, without another host sync."""
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba3 expects (batch, seqlen, {self.d_model}), got {tuple(u.shape)}")
        if cu_seqlens is None and seq_idx is None:
            # transformers' packed-sequence (flattening collator) kwarg; where seq_idx comes too (TRL's padding-free
            # collator sends both), they mark the same documents and seq_idx alone is used
            cu_seqlens = kwargs.get("cu_seq_lens_q")
        state = initial_state
        cache = one_cache(cache, past_key_values)
        if cache is not None:
            if self.layer_idx is None:
                raise ValueError("a Mamba3 layer used with a cache needs layer_idx")
            cached = read_mamba_state(cache, self.layer_idx)
            state = cached if cached is not None else state
        carries = return_final_state or cache is not None  # a later call continues from this call's final state
        mask = attention_mask if mask_checked else padding_mask(attention_mask, u.shape[1], carries)
        packed = cu_seqlens is not None or seq_idx is not None
        if mask is not None and packed:
            raise ValueError("pass either an attention_mask with padding or packed sequences (cu_seqlens / seq_idx), "
                             "not both")

        record = 0
        if cache is not None:
            record = states_to_record(cache, self.layer_idx, u.shape[1], continues=state is not None)
            if record and packed:
                raise ValueError("a cache that records its past (assisted generation) cannot take packed sequences")
        if record:
            out, new_state = self._recorded(u, state, mask, record)
        elif state is not None and u.shape[1] == 1 and mask is None and not packed:
            out, new_state = self._one_token(u, state, None, carries)
        else:
            out, new_state = self._in_pieces(
                lambda x, s, m, sq, need: self._scan(x, s, m, cu_seqlens, sq, need), u, state, mask, seq_idx,
                carries, packed=cu_seqlens is not None)
        if cache is not None:
            write_mamba_state(cache, self.layer_idx, new_state)
        return (out, new_state if not isinstance(new_state, list) else new_state[-1]) if return_final_state else out

    def _one_token(self, u, state, mask, need_state):
        """A call on one position: the decode step, or (a padded position somewhere in the batch) a scan of one."""
        if mask is None and state is not None:
            out, new_state = self._in_pieces(lambda x, s, m, sq, need: self.step(x[:, 0], s), u, state, None, None,
                                             need_state)
            return out[:, None], new_state
        return self._in_pieces(lambda x, s, m, sq, need: self._scan(x, s, m, None, sq, need), u, state, mask, None,
                               need_state)

    def _recorded(self, u, state, mask, record: int):
        """The call with the states after each of its last `record` positions, as a list (a cache that rolls back
        rejected draft tokens keeps them): a scan up to those positions, then one position at a time. Those tokens
        take the path a decode step takes, so a verified draft gives what decoding it token by token gives."""
        head = u.shape[1] - record
        outs, states = [], []

        # the scan and every step start from a copy: `state` may be the cache's own tensors (which the slot's history
        # must still see as they are), and the Triton step updates the state it is given in place (the state kept
        # for the position before must stay as it was)
        def copy(st):
            return None if st is None else Mamba3State(*(x.clone() for x in st))
        if head:
            o, state = self._in_pieces(
                lambda x, s, m, sq, need: self._scan(x, s, m, None, sq, need), u[:, :head], copy(state),
                None if mask is None else mask[:, :head], None, True)
            outs.append(o)
        for t in range(head, u.shape[1]):
            o, state = self._one_token(u[:, t:t + 1], copy(state), None if mask is None else mask[:, t:t + 1], True)
            outs.append(o)
            states.append(state)
        return torch.cat(outs, 1), states

    def row_elements(self, length: int) -> int:
        """Elements of the widest per-row tensor a call of the Triton kernels on rows of `length` positions (1: a decode
        step) indexes: the in_proj output (the kernels read views of it), the op's own tensors
        (`triton_chunked.elements_per_row`), or the decode state."""
        return _row_elements(length, self.in_proj.out_features, self.mimo_rank, self.num_bc_heads, self.d_state,
                             self.nheads, self.headdim, self.num_rope_angles)

    def max_rows_per_call(self, length: int, limit: int | None = None) -> int:
        """Batch rows of `length` positions that one call of the Triton kernels takes: their offsets are 32-bit
        (`kernels.common.INT32_LIMIT`), or `limit` elements of the widest per-row tensor when given."""
        return (INT32_LIMIT - 1 if limit is None else limit) // self.row_elements(length)

    def max_length_per_call(self, limit: int | None = None) -> int:
        """The longest row one call of the Triton kernels takes (under `limit`, as `max_rows_per_call`), in whole
        chunks of 64 positions."""
        lo, hi = 1, 1 << 40
        while lo < hi:  # the largest length with max_rows_per_call(length) >= 1
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.max_rows_per_call(mid, limit) >= 1 else (lo, mid - 1)
        return max(64, lo - lo % 64)

    def _differentiable(self, u: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _elements_per_call(self, u: torch.Tensor, split_rows: bool) -> int:
        """The element limit of this call's pieces: the 32-bit one, or at inference `inference_elements_per_call`
        where this call would pass it (packed sequences are not split: their documents share rows)."""
        limit, cap = INT32_LIMIT - 1, self.inference_elements_per_call
        whole = u.shape[0] * self.row_elements(u.shape[1])
        if cap and cap < min(limit, whole) and split_rows and not self._differentiable(u):
            return cap
        return limit

    def _in_pieces(self, run, u, state, mask, seq_idx, need_state, packed=False):
        """run(u, state, mask, seq_idx, need_state) -> (out, final state) over all of u in one call, or, where the
        Triton kernels' 32-bit offsets cannot take that (at inference: where it would pass
        `inference_elements_per_call`), over slices of the batch and, at inference, over stretches of each row, each
        starting from the state the one before left (a chunked prefill)."""
        B, L = u.shape[:2]
        if self._select_backend(u.device) != "triton":  # (the torch op's offsets are torch's own)
            return run(u, state, mask, seq_idx, need_state)
        limit = self._elements_per_call(u, split_rows=not packed and seq_idx is None)
        rows = self.max_rows_per_call(L, limit)
        if rows >= B:
            return run(u, state, mask, seq_idx, need_state)
        if rows == 0 or packed:  # one row is too long (cu_seqlens packs along one row)
            return self._in_stretches(run, u, state, mask, seq_idx, need_state, packed, limit)

        def piece(x, sl):
            return None if x is None else (x if x.shape[0] == 1 and B > 1 else x[sl])

        outs, finals = [], []
        for i in range(0, B, rows):
            sl = slice(i, i + rows)
            o, st = run(u[sl], None if state is None else state.select(sl), piece(mask, sl), piece(seq_idx, sl),
                        need_state)
            outs.append(o)
            finals.append(st)
        return _rows_joined(outs, finals, need_state)

    def _in_stretches(self, run, u, state, mask, seq_idx, need_state, packed, limit: int | None = None):
        span = self.max_length_per_call(limit)
        too_long = (f"a row of {u.shape[1]} positions is more than one call of the Triton kernels takes (their offsets "
                    f"are 32-bit: at most {span} positions for this layer)")
        if packed or seq_idx is not None:
            raise ValueError(f"{too_long}: pack the sequences into more, shorter rows (seq_idx)")
        if self._differentiable(u):
            raise ValueError(f"{too_long}, and training cannot hand the state from one stretch to the next: train on "
                             "shorter rows")
        outs, finals = [], []
        for b in range(u.shape[0]):
            st = None if state is None else state.select(slice(b, b + 1))
            row = []
            for a in range(0, u.shape[1], span):
                m = None if mask is None else mask[b:b + 1, a:a + span]
                o, st = run(u[b:b + 1, a:a + span], st, m, None, True)
                row.append(o)
            outs.append(torch.cat(row, 1))
            finals.append(st)
        return _rows_joined(outs, finals, need_state)

    def _scan(self, u, state, mask, cu_seqlens, seq_idx, need_state):
        backend = self._select_backend(u.device)
        if backend == "official" and (state is not None or seq_idx is not None):
            backend = self._select_backend_default(u.device)  # the official kernels take no initial state or seq_idx
        p = self._project(u, fused=backend == "triton")
        dt, adt, v = p["dt"], p["adt"], p["v"]
        if mask is not None:  # padded tokens: no decay, no input, no angle advance
            dt, adt = dt * mask[..., None], adt * mask[..., None]
            v = v * mask[..., None, None].to(v.dtype)
        self.last_backend = backend
        args = (p["q"], p["k"], v, adt, dt, p["trap"], self.C_bias, self.B_bias, p["angles"])
        kw = dict(self._op_kwargs(p["z"]), chunk_size=self.chunk_size, initial_state=state,
                  return_final_state=need_state, cu_seqlens=cu_seqlens)
        if seq_idx is not None:  # (the official kernels take cu_seqlens only)
            kw["seq_idx"] = seq_idx
        if p["qk_halves"]:
            kw["qk_halves"] = True
        if backend == "official":
            from .official import official_scan
            y, new_state = official_scan(self, *args, **kw)
        elif backend == "triton":
            y, new_state = _triton_ops()[0](*args, **kw)
        else:
            y, new_state = mamba3_chunked(*args, **kw)
        return self._finish(y, p["z"], u.dtype), new_state

    def _select_backend_default(self, device: torch.device) -> str:
        return "triton" if device.type == "cuda" and _triton_ops() is not None else "torch"

    def step(self, u: torch.Tensor, state: Mamba3State) -> tuple[torch.Tensor, Mamba3State]:
        """One token per sequence: u (batch, d_model) -> (batch, d_model), and the new state."""
        if u.dim() != 2 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba3.step expects (batch, {self.d_model}), got {tuple(u.shape)}")
        use_triton = self._select_backend_default(u.device) == "triton" and self.backend != "torch"
        self.last_backend = "triton" if use_triton else "torch"
        if use_triton and not self.is_outproj_norm and not _partitioned(self.B_norm.weight, self.C_norm.weight):
            return self._step_triton(u, state)
        p = self._project(u)
        fn = _triton_ops()[1] if use_triton else mamba3_step
        y, new_state = fn(p["q"], p["k"], p["v"], p["adt"], p["dt"], p["trap"], self.C_bias, self.B_bias,
                          p["angles"], state, **self._op_kwargs(p["z"]))
        return self._finish(y, p["z"], u.dtype), new_state

    def _step_triton(self, u: torch.Tensor, state: Mamba3State) -> tuple[torch.Tensor, Mamba3State]:
        """The decode step as in_proj, one Triton kernel (norms and activations included) and out_proj."""
        from .kernels.triton_step import StepActivations, mamba3_step_triton

        H, P, N, G, R = self.nheads, self.headdim, self.d_state, self.num_bc_heads, self.mimo_rank
        z, x, B, C, dd_dt, dd_A, trap, angles = self._split(self.in_proj(u))
        mimo = self.is_mimo
        # both norms are built with the same eps
        act = StepActivations(self.dt_bias, self.B_norm.weight, self.C_norm.weight, self.B_norm.eps,
                              self.a_activation, self.A_floor)
        y, new_state = mamba3_step_triton(
            C.unflatten(-1, (R, G, N)), B.unflatten(-1, (R, G, N)), x.unflatten(-1, (H, P)), dd_A, dd_dt, trap,
            self.C_bias, self.B_bias, angles, state, mimo_x=self.mimo_x if mimo else None,
            mimo_z=self.mimo_z if mimo else None, mimo_o=self.mimo_o if mimo else None, D=self.D,
            z=z.unflatten(-1, (H, P)), rope_pairwise=not mimo, activations=act, check=False)
        return self.out_proj(y.reshape(u.shape[0], -1).to(u.dtype)), new_state

    def allocate_state(self, batch_size: int, device=None) -> Mamba3State:
        """A zero state (what a sequence starts from)."""
        return Mamba3State.zeros(batch_size, self.nheads, self.headdim, self.d_state, self.mimo_rank,
                                 self.num_rope_angles, device=device or self.in_proj.weight.device)
