"""The in_proj split's shared gradient buffer (`kernels.shared_grad`): whatever the pieces' producers do, the split
input's gradient is the concatenation of the pieces' gradients, and a producer writing through `grad_output` lands
in place (nothing copied). Plain torch on CPU; the layer's Triton producers are checked in test_triton_interpret."""

import torch

from hybrid_mamba3.kernels.shared_grad import grad_output, grad_slot, split_shared_grad


class _Double(torch.autograd.Function):
    """Stands in for a Triton producer: y = 2x, its gradient written where `grad_output` says."""

    @staticmethod
    def forward(ctx, x):
        ctx.slot = grad_slot(x)
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        out = grad_output(ctx.slot, g.shape, g.dtype, g.device)
        torch.mul(g, 2, out=out)
        return out


def _loss(pieces, mask):
    a, b, c, d, e = pieces
    # a: through the producer; b: through the producer after a mask (a new tensor: no slot); c: producer and a
    # second use (autograd sums the two); d: unused; e: plain torch
    return ((_Double.apply(a) ** 2).sum() + (_Double.apply(b * mask) * 3).sum()
            + (_Double.apply(c) * c).sum() + e.sin().sum())


def test_gradient_is_the_concatenation(in_place_record):
    torch.manual_seed(0)
    sizes, shapes = [6, 4, 8, 2, 3], [(2, 3), None, (4, 2), None, (3,)]
    x0 = torch.randn(2, 5, sum(sizes))
    mask = (torch.rand(2, 5, 1) > 0.3).float()
    want = x0.clone().requires_grad_()
    _loss([p if s is None else p.unflatten(-1, s) for p, s in zip(want.split(sizes, -1), shapes)],
          mask.squeeze(-1)[..., None]).backward()
    got = x0.clone().requires_grad_()
    pieces = split_shared_grad(got, sizes, shapes)
    assert [p.shape for p in pieces] == [(2, 5, 2, 3), (2, 5, 4), (2, 5, 4, 2), (2, 5, 2), (2, 5, 3)]
    loss = _loss(pieces, mask.squeeze(-1)[..., None])
    loss.backward(retain_graph=True)
    assert torch.equal(got.grad, want.grad)  # same ops, same order: exactly
    assert in_place_record[-1] == {0}  # the masked and the twice-used pieces were copied, the unused one zeroed
    loss.backward()  # a second backward through the retained graph starts from a fresh buffer
    assert torch.allclose(got.grad, 2 * want.grad)
    assert in_place_record[-1] == {0}


def test_without_autograd_the_plain_split():
    x = torch.randn(3, 7)
    with torch.no_grad():
        pieces = split_shared_grad(x.requires_grad_(), [3, 4], [None, (2, 2)])
    assert grad_slot(pieces[0]) is None and pieces[1].shape == (3, 2, 2)
    assert pieces[0].data_ptr() == x.data_ptr()  # views, no copies


def test_grad_output_without_a_free_slot_is_a_new_tensor():
    x = torch.randn(2, 3, 4, requires_grad=True)
    a, _ = split_shared_grad(x, [2, 2], [None, None])
    slot = grad_slot(a)
    first = grad_output(slot, a.shape, a.dtype, a.device)
    assert first.shape == (2, 3, 2) and first.stride() == (12, 4, 1)  # a view of the (2, 3, 4) buffer
    second = grad_output(slot, a.shape, a.dtype, a.device)  # taken: a second producer gets its own tensor
    assert second.is_contiguous() and second.data_ptr() != first.data_ptr()
    assert grad_output(slot, a.shape, torch.float64, a.device).dtype == torch.float64  # no slot of another dtype
