"""One gradient buffer for the pieces of a split tensor: the backward of the Mamba-3 layer's in_proj split without
the concatenation.

The layer splits its in_proj output (B, L, W) into eight views (z, x, B, C, dd_dt, dd_A, trap, angles). Through
`torch.split`, autograd gives each piece's gradient its own tensor and the split's backward concatenates them, one
more pass over a (B, L, W) tensor each way, for nothing (kernels/NOTES.md "Shared gradient buffer").

Here the split is `split_shared_grad`: each piece carries a slot (`grad_slot`), and the Triton kernels that make a
piece's gradient (the scan's dz and dv, the B/C norm's, the activations', the trapezoid's and the angles') ask it
for their output (`take`): a view of one (B, L, W) buffer. The split's backward then finds its pieces' gradients
already in place and hands the buffer on. It never relies on them being there: a piece's gradient that is not its
slot (a producer without slots, a sum autograd made of two uses of the piece, a mask applied in between) is copied
in, and a piece without one is zeroed, so the result is always the concatenation.

The cost is memory at the backward's peak: the buffer is allocated when the scan's backward writes dz, while its
recomputed states are alive, where before only dz was (dv and the concatenation came after the states were freed):
~4% more peak memory in a layer's forward+backward, for a little less GPU time (kernels/NOTES.md "Shared gradient
buffer").
"""

from __future__ import annotations

import itertools

import torch

from .common import in_rows_layout

SHARE = 1  # 0: the plain split, gradients concatenated (evals/kernel_dev/kernel_report.py --set shared_grad.SHARE=0,1)


class SharedGrad:
    """The gradient buffer of one split: allocated at the first `take` of the backward, handed on (and forgotten,
    so a second backward through a retained graph starts afresh) by the split's backward."""

    def __init__(self, like: torch.Tensor, sizes: list[int]):
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.sizes = list(sizes)
        self.offsets = [0, *itertools.accumulate(self.sizes)][:-1]
        self.buffer: torch.Tensor | None = None
        self.taken: set[int] = set()

    def _part(self, buffer: torch.Tensor, index: int) -> torch.Tensor:
        return buffer.narrow(-1, self.offsets[index], self.sizes[index])

    def take(self, index: int, shape: torch.Size) -> torch.Tensor | None:
        """Piece `index`'s place in the buffer, viewed as `shape`; None once taken (a second producer for the same
        piece writes its own tensor, which autograd then sums)."""
        if index in self.taken:
            return None
        self.taken.add(index)
        if self.buffer is None:
            self.buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._part(self.buffer, index).view(shape)

    def assemble(self, grads: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        """The split input's gradient from its pieces' gradients (None: zero)."""
        buffer = self.buffer if self.buffer is not None else torch.empty(self.shape, dtype=self.dtype,
                                                                           device=self.device)
        self.buffer, self.taken = None, set()
        for index, g in enumerate(grads):
            part = self._part(buffer, index)
            if g is None:
                part.zero_()
            elif not self.in_place(buffer, index, g):
                part.copy_(g)
        return buffer

    def in_place(self, buffer: torch.Tensor, index: int, g: torch.Tensor) -> bool:
        """Whether g is piece `index`'s place in buffer (the same elements, so nothing to copy)."""
        part = self._part(buffer, index)
        return (g.data_ptr() == part.data_ptr() and g.shape == part.shape and g.stride() == part.stride()
                and g.dtype == part.dtype)


class _SplitSharedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, shared):
        ctx.set_materialize_grads(False)  # an unused piece's gradient stays None (zeroed in place, not allocated)
        ctx.shared = shared
        return tuple(x.split(sizes, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        return ctx.shared.assemble(grads), None, None


Slot = tuple[SharedGrad, int]


def split_shared_grad(x: torch.Tensor, sizes: list[int], shapes: list[tuple[int, ...] | None],
                      share: bool = True) -> list[torch.Tensor]:
    """`x.split(sizes, -1)`, each piece's last dim unflattened to `shapes[i]` (None: kept), with one gradient
    buffer shared by the pieces (module docstring). Without autograd, or without `share` (pieces whose gradients
    no kernel writes in place: the torch path), the plain split."""
    pieces = x.split(sizes, dim=-1)
    shared = None
    if share and SHARE and torch.is_grad_enabled() and x.requires_grad:
        shared = SharedGrad(x, sizes)
        pieces = _SplitSharedGrad.apply(x, list(sizes), shared)
    out = []
    for index, (piece, shape) in enumerate(zip(pieces, shapes)):
        piece = piece if shape is None else piece.unflatten(-1, shape)
        if shared is not None:
            piece._shared_grad_slot = (shared, index)
        out.append(piece)
    return out


def grad_slot(t: torch.Tensor | None) -> Slot | None:
    """The slot of a `split_shared_grad` piece (taken by the forward of the function it is passed to, used by its
    backward), else None."""
    return getattr(t, "_shared_grad_slot", None)


def grad_output(slot: Slot | None, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                lead: int = 2) -> torch.Tensor:
    """Where a kernel writes a piece's gradient: its place in the shared buffer when it has a free one of this
    shape and dtype (a strided view, its first `lead` dims rows: the kernel takes their stride, `common.row_stride`),
    else a new contiguous tensor."""
    if slot is not None:
        shared, index = slot
        if shared.dtype == dtype and shared.device == device:
            out = shared.take(index, shape)
            if out is not None and in_rows_layout(out, lead):  # else (offsets past 32 bits) its gradient is copied in
                return out
    return torch.empty(shape, dtype=dtype, device=device)
