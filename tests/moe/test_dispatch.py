"""Both dispatch layouts compute the same gated sum as a naive loop, forward and backward."""

import pytest
import torch

from moe.dispatch import combine, cpu_buckets, gather_rows, load_buckets, permute
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
@pytest.mark.parametrize(
    "max_padding, buckets", [(None, 1), (1.0, 1), (100.0, 1), (100.0, 2), (100.0, 4)]
)  # ragged; padded if cheap; padded in 1, 2 (3 experts each) or 4 (2 or 1 each) buckets
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("skew", [False, True])
def test_layouts_match_naive_loop(max_padding, buckets, drop, skew, F):
    torch.manual_seed(1)
    routing = make_routing(drop, skew)
    experts = GroupedExperts(D, F, E).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    dispatch = permute(routing, max_padding=max_padding, buckets=buckets)
    if max_padding is None:
        assert dispatch.buckets is None
    if max_padding == 100.0:
        assert dispatch.buckets is not None and len(dispatch.buckets) == buckets
    assert int(dispatch.counts.sum()) == int(routing.kept.sum())
    y = combine(
        experts.compute_rows(gather_rows(x, dispatch), dispatch.row_gate, dispatch.counts, dispatch.buckets),
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


def test_load_buckets_partition_the_experts_by_load():
    counts = torch.tensor([5, 9, 0, 7, 7, 2, 11, 4])
    buckets = load_buckets(counts, 3)
    ids = torch.cat([b.experts for b in buckets])
    assert sorted(ids.tolist()) == list(range(8))  # every expert exactly once
    loads = [counts[b.experts] for b in buckets]
    assert [b.capacity for b in buckets] == [int(c.max()) for c in loads]
    assert all(int(a.max()) <= int(b.min()) for a, b in zip(loads, loads[1:]))  # consecutive load ranks
    assert all(torch.equal(b.experts, torch.sort(b.experts).values) for b in buckets)
    rows = sum(b.experts.numel() * b.capacity for b in buckets)
    assert rows < 8 * 11  # fewer pad rows than one bucket of the largest load
    (one,) = load_buckets(counts, 1)
    assert torch.equal(one.experts, torch.arange(8)) and one.capacity == 11
    assert cpu_buckets(8) == 1 and cpu_buckets(64) == 4
