"""Both dispatch layouts compute the same gated sum as a naive loop, forward and backward."""

import pytest
import torch

from moe.dispatch import combine, gather_rows, permute
from moe.experts import GroupedExperts, activate
from moe.routing import Routing

T, K, E, D = 40, 3, 6, 8


def make_routing(drop: bool, skew: bool):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(T, E, generator=g)
    if skew:
        scores[:, 0] += 1.0  # expert 0 in every token's top-k: heavy padding
    indices = scores.topk(K).indices
    weights = torch.rand(T, K, generator=g, dtype=torch.float64).requires_grad_(True)
    kept = torch.rand(T, K, generator=g) > 0.3 if drop else torch.ones(T, K, dtype=torch.bool)
    probs = torch.full((T, E), 1 / E)
    return Routing(indices, weights, probs.log(), probs, kept)


@pytest.mark.parametrize("F", [4, 10])  # gate applied on the hidden (F < D) or on the output
@pytest.mark.parametrize("max_padding", [None, 1.0, 100.0])
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("skew", [False, True])
def test_layouts_match_naive_loop(max_padding, drop, skew, F):
    torch.manual_seed(1)
    routing = make_routing(drop, skew)
    experts = GroupedExperts(D, F, E).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    dispatch = permute(routing, max_padding=max_padding)
    if max_padding is None:
        assert dispatch.capacity is None
    if max_padding == 100.0:
        assert dispatch.capacity is not None
    assert int(dispatch.counts.sum()) == int(routing.kept.sum())
    y = combine(
        experts.compute_rows(gather_rows(x, dispatch), dispatch.row_gate, dispatch.counts, dispatch.capacity),
        dispatch,
        T,
    )

    ref = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            if routing.kept[t, j]:
                e = routing.indices[t, j]
                h = activate(x[t] @ experts.w_in[e], "swiglu") @ experts.w_out[e]
                ref[t] = ref[t] + routing.weights[t, j] * h
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    inputs = [x, routing.weights, experts.w_in, experts.w_out]
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("max_padding", [None, 100.0])
def test_gather_combine_without_scatter_equal_the_scatter_add_path(max_padding):
    """Dropless routing takes the gather-only path; forcing the index_add path gives the same
    values and gradients (the only difference is the order of a K-term sum)."""
    import dataclasses

    routing = make_routing(drop=False, skew=False)
    fast = permute(routing, max_padding=max_padding)
    assert fast.slot_row is not None and permute(make_routing(drop=True, skew=False)).slot_row is None
    slow = dataclasses.replace(fast, slot_row=None)
    outs = []
    for dispatch in (fast, slow):
        x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        rows = gather_rows(x, dispatch)
        y = combine(rows * dispatch.row_gate.detach()[:, None], dispatch, T)  # pad rows: gate 0, as in the experts
        (y * torch.linspace(-1, 1, T * D, dtype=torch.float64).view(T, D)).sum().backward()
        outs.append((y.detach(), x.grad))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-12) and torch.allclose(outs[0][1], outs[1][1], rtol=1e-12)


def test_no_tokens():
    probs = torch.full((0, E), 1 / E)
    routing = Routing(
        torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K), probs, probs, torch.ones(0, K, dtype=torch.bool)
    )
    dispatch = permute(routing)
    assert combine(gather_rows(torch.zeros(0, D), dispatch), dispatch, 0).shape == (0, D)


def test_grouped_mm_loop_gradients_with_an_empty_expert():
    """The CPU grouped matmul's hand-written backward against finite differences; the expert
    without rows gets an exactly zero weight gradient."""
    from moe.experts import grouped_mm

    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, counts), (x, w))
    grouped_mm(x, w, counts).sum().backward()
    assert torch.equal(w.grad[1], torch.zeros(4, 2, dtype=torch.float64))
