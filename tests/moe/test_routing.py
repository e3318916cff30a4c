"""Router invariants: one routing record, valid for every router kind."""

from contextlib import nullcontext

import pytest
import torch

from moe.routers import RouterConfig, build_router, router_config, router_kinds
from moe.routers.fixed import hash_token_ids
from moe.routing import RouteKeys, Routing, capacity_mask

ROUTER_KINDS = router_kinds()

E, K, D, T = 8, 2, 16, 64


def make_router(kind: str, capacity_factor=None, top_k=K, **cfg):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="future") if kind == "expert_choice" else nullcontext():
        return build_router(router_config(kind, **cfg), D, E, 1 if kind == "switch" else top_k, capacity_factor)


def route(kind, capacity_factor=None, seed=1, **cfg):
    router = make_router(kind, capacity_factor, **cfg)
    torch.manual_seed(seed)
    x = torch.randn(T, D)
    tokens = torch.randint(0, 100, (T,))
    domain = torch.randint(0, 4, (T,))
    return router, router(x, RouteKeys.from_tokens(tokens, domain))


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_record_is_valid(kind, capacity_factor):
    _, r = route(kind, capacity_factor)
    assert isinstance(r, Routing)
    Tn, k = r.indices.shape
    assert Tn == T and r.indices.dtype == torch.int64
    assert r.weights.shape == (T, k) and r.weights.dtype == torch.float32
    assert r.logits.shape == (T, E) and r.probs.shape == (T, E)
    assert r.logits.dtype == r.probs.dtype == torch.float32
    assert r.kept.shape == (T, k) and r.kept.dtype == torch.bool
    assert ((r.indices >= 0) & (r.indices < E)).all()
    # distinct experts within a token
    assert (r.indices.sort(-1).values.diff(dim=-1) > 0).all()
    assert (r.weights >= 0).all()
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(T))
    # counts account for every kept assignment; dropped ones are counted separately
    counts = r.kept_counts()
    if kind != "expert_choice":
        assert int(counts.sum()) + r.num_dropped() == T * k
        assert int(r.selected_counts().sum()) == T * k  # the load: every slot, dropped or not
    if capacity_factor is not None:
        capacity = -(-int(capacity_factor * T * k) // E)
        assert int(counts.max()) <= capacity


@pytest.mark.parametrize("kind", ["topk", "sigmoid", "hash", "random", "prev_hash", "domain"])
def test_renormalized_weights_sum_to_one(kind):
    # The fixed routers weigh each of the k experts 1/k: they have no renormalize switch.
    _, r = route(kind, **({"renormalize": True} if kind in ("topk", "sigmoid") else {}))
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(T))


def test_topk_weights_are_the_top_probabilities_without_renormalization():
    _, r = route("topk", renormalize=False)
    torch.testing.assert_close(r.weights, r.probs.gather(-1, r.indices))
    assert (r.probs.gather(-1, r.indices).min(-1).values >= r.probs.topk(K).values.min(-1).values).all()


def test_switch_routes_to_argmax_with_probability_weight():
    _, r = route("switch")
    assert r.indices.shape == (T, 1)
    assert torch.equal(r.indices[:, 0], r.probs.argmax(-1))
    torch.testing.assert_close(r.weights[:, 0], r.probs.max(-1).values)


def test_switch_rejects_top_k_above_one():
    with pytest.raises(ValueError, match="top_k"):
        build_router(router_config("switch"), D, E, 2, None)


def test_expert_choice_each_expert_takes_capacity_tokens():
    _, r = route("expert_choice")
    per_expert = r.kept.sum(0)
    assert (per_expert == T * K // E).all()
    assert torch.equal(r.weights, torch.where(r.kept, r.probs, torch.zeros(())))


def test_unknown_router_names_allowed_values():
    with pytest.raises(ValueError, match="router.kind='nope'.*topk"):
        build_router(RouterConfig(kind="nope"), D, E, K, None)


def test_capacity_drops_lowest_gates_first():
    # 4 tokens all to expert 0, capacity 2 -> keep the two largest weights.
    indices = torch.zeros(4, 1, dtype=torch.long)
    weights = torch.tensor([[0.1], [0.9], [0.5], [0.9]])
    kept = capacity_mask(indices, weights, num_experts=2, capacity=2)
    assert kept[:, 0].tolist() == [False, True, False, True]
    # ties are broken by position
    kept = capacity_mask(indices, torch.ones(4, 1), num_experts=2, capacity=3)
    assert kept[:, 0].tolist() == [True, True, True, False]


def test_hash_router_is_a_pure_function_of_token_id():
    router = make_router("hash")
    tokens = torch.randint(0, 1000, (T,))
    a = router(torch.randn(T, D), tokens)
    b = router(torch.randn(T, D) * 5, tokens)
    assert torch.equal(a.indices, b.indices)
    same = tokens[:, None] == tokens[None, :]
    rows_equal = (a.indices[:, None, :] == a.indices[None, :, :]).all(-1)
    assert (rows_equal | ~same).all()
    assert torch.equal(hash_token_ids(tokens), hash_token_ids(tokens.clone()))
    with pytest.raises(ValueError, match="token ids"):
        router(torch.randn(T, D), None)


def test_prev_hash_router_is_a_pure_function_of_the_previous_token():
    router = make_router("prev_hash")
    tokens = torch.randint(0, 50, (4, 32))
    keys = RouteKeys.from_tokens(tokens)
    r = router(torch.randn(tokens.numel(), D), keys)
    # Reference: a naive loop over positions; the previous token of position 0 is -1 in every row.
    prev = [-1 if s == 0 else int(tokens[b, s - 1]) for b in range(4) for s in range(32)]
    h = hash_token_ids(torch.tensor(prev))
    expected = torch.stack([(h + j) % E for j in range(K)], dim=-1)
    assert torch.equal(r.indices, expected)
    # Same token, different previous token: the routing follows the context, not the token.
    assert not torch.equal(r.indices, make_router("hash")(torch.randn(tokens.numel(), D), keys).indices)


def test_domain_router_gives_each_domain_its_own_experts():
    router = make_router("domain")
    domain = torch.arange(4).repeat_interleave(16)
    keys = RouteKeys.from_tokens(torch.randint(0, 100, (64,)), domain)
    r = router(torch.randn(64, D), keys)
    experts = [set(r.indices[domain == d].flatten().tolist()) for d in range(4)]
    assert all(len(e) == K for e in experts)  # k fixed experts per domain, whatever the token
    assert all(experts[a].isdisjoint(experts[b]) for a in range(4) for b in range(a + 1, 4))  # D * k <= E
    with pytest.raises(ValueError, match="domain label"):
        router(torch.randn(64, D), RouteKeys.from_tokens(torch.zeros(64, dtype=torch.long)))


def test_random_router_is_balanced_in_expectation():
    router = make_router("random")
    torch.manual_seed(0)
    n = 20000
    counts = router(torch.randn(n, D)).kept_counts().double()
    expected = n * K / E
    # binomial std per expert ~ sqrt(n*K/E); allow 5 sigma
    assert (counts - expected).abs().max() < 5 * expected**0.5


def test_knocked_out_expert_is_never_selected_and_learned_routers_reroute():
    for kind in ["topk", "sigmoid", "expert_choice"]:
        router = make_router(kind)
        router.expert_mask[3] = False
        r = router(torch.randn(T, D))
        assert not ((r.indices == 3) & r.kept).any()
        if kind != "expert_choice":
            assert r.kept.all()  # tokens re-routed to other experts, none dropped


def test_router_runs_in_float32_under_bf16_autocast_and_gets_gradient():
    router = make_router("topk")
    x = torch.randn(T, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x.to(torch.bfloat16))
    assert r.logits.dtype == torch.float32 and r.weights.dtype == torch.float32
    (r.weights * torch.randn(T, K)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_jitter_only_in_training():
    router = make_router("topk", jitter=0.5)
    x = torch.randn(T, D)
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    router.train()
    torch.manual_seed(0)
    assert not torch.equal(router(x).logits, router(x).logits)
