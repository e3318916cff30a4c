"""The MoE layer against independent references: a naive per-token loop, the dense MLP."""

import warnings

import pytest
import torch

from moe.experts import DenseMLP, activate
from moe.layer import MoEConfig, MoELayer, build_moe_layer
from moe.routers import RouterConfig, router_kinds
from moe.routing import RouteKeys
from moe.sizing import dense_twin_width, layer_size

ROUTER_KINDS = router_kinds()

D = 16


def make_layer(kind="topk", num_experts=4, top_k=2, capacity_factor=None, seed=0, **moe):
    torch.manual_seed(seed)
    cfg = MoEConfig(
        num_experts=num_experts,
        top_k=1 if kind == "switch" else top_k,
        expert_width=24,
        capacity_factor=capacity_factor,
        **moe,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = build_moe_layer("native", D, cfg, RouterConfig(kind=kind)).double()
    if hasattr(layer.router, "weight"):  # spread the router so routing is not a near-tie everywhere
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    return layer


def naive_moe(layer: MoELayer, x_TD, routing):
    """Reference: loop over tokens and their kept slots; float64."""
    out = torch.zeros_like(x_TD)
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    for t in range(x_TD.shape[0]):
        for j in range(routing.indices.shape[1]):
            if routing.kept[t, j]:
                e = routing.indices[t, j]
                h = activate(x_TD[t] @ w_in[e], layer.experts.activation) @ w_out[e]
                out[t] = out[t] + routing.weights[t, j].to(x_TD.dtype) * h
    if layer.shared is not None:
        out = out + layer.shared(x_TD)
    return out


CASES = [(kind, None) for kind in ROUTER_KINDS] + [("topk", 0.75), ("sigmoid", 0.5), ("switch", 1.0)]


@pytest.mark.parametrize("kind,capacity_factor", CASES)
def test_grouped_compute_matches_naive_loop_forward_and_backward(kind, capacity_factor):
    layer = make_layer(kind, capacity_factor=capacity_factor, num_shared_experts=1)
    x = torch.randn(2, 10, D, dtype=torch.float64, requires_grad=True)
    keys = RouteKeys.from_tokens(torch.randint(0, 50, (2, 10)), torch.randint(0, 3, (2, 10)))
    torch.manual_seed(5)
    y, routing = layer(x, keys)
    if capacity_factor is not None:
        assert routing.num_dropped() > 0  # the case really exercises dropping
    x_ref = x.detach().clone().requires_grad_(True)
    ref = naive_moe(layer, x_ref.view(-1, D), routing)  # same routing decisions, recomputed gates below
    torch.testing.assert_close(y.view(-1, D), ref)

    grad = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    g_layer = torch.autograd.grad(y, [x] + params, grad, allow_unused=True)
    # Reference gradient: recompute routing through the same router so the gates carry gradient.
    torch.manual_seed(5)
    routing_ref = layer.router(x_ref.view(-1, D), keys)
    ref = naive_moe(layer, x_ref.view(-1, D), routing_ref).view_as(y)
    g_ref = torch.autograd.grad(ref, [x_ref] + params, grad, allow_unused=True)
    for a, b in zip(g_layer, g_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)


def test_dropped_tokens_pass_through_unchanged():
    layer = make_layer("topk", num_experts=2, top_k=1, capacity_factor=0.25)
    x = torch.randn(16, D, dtype=torch.float64)
    y, routing = layer(x)
    all_dropped = ~routing.kept.any(-1)
    assert all_dropped.any()
    assert (y[all_dropped] == 0).all()  # contributes nothing; the block's residual carries x


def test_one_expert_moe_equals_dense_twin_outputs_and_gradients():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=1, top_k=1, expert_width=24)
    moe = build_moe_layer("native", D, cfg, RouterConfig(kind="topk")).double()
    dense = DenseMLP(D, dense_twin_width(cfg, "active")).double()
    with torch.no_grad():
        dense.w_in.copy_(moe.experts.w_in[0])
        dense.w_out.copy_(moe.experts.w_out[0])
    x = torch.randn(3, 7, D, dtype=torch.float64, requires_grad=True)
    y_moe, _ = moe(x)
    y_dense = dense(x)
    torch.testing.assert_close(y_moe, y_dense, rtol=0, atol=0)
    g = torch.randn_like(y_dense)
    gx_m, gin_m, gout_m = torch.autograd.grad(y_moe, [x, moe.experts.w_in, moe.experts.w_out], g)
    gx_d, gin_d, gout_d = torch.autograd.grad(y_dense, [x, dense.w_in, dense.w_out], g)
    torch.testing.assert_close(gx_m, gx_d)
    torch.testing.assert_close(gin_m[0], gin_d)
    torch.testing.assert_close(gout_m[0], gout_d)


@pytest.mark.parametrize("kind", ["topk", "sigmoid", "expert_choice"])
def test_relabelling_experts_leaves_output_unchanged(kind):
    layer = make_layer(kind)
    x = torch.randn(20, D, dtype=torch.float64)
    y, _ = layer(x)
    perm = torch.randperm(layer.experts.num_experts)
    with torch.no_grad():
        layer.router.weight.copy_(layer.router.weight[perm])
        layer.experts.w_in.copy_(layer.experts.w_in[perm])
        layer.experts.w_out.copy_(layer.experts.w_out[perm])
    y_perm, _ = layer(x)
    torch.testing.assert_close(y_perm, y)


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_same_seed_same_output_bit_for_bit(kind):
    outs = []
    for _ in range(2):
        layer = make_layer(kind, seed=3).float()
        torch.manual_seed(7)
        x = torch.randn(64, D)
        keys = RouteKeys.from_tokens(torch.randint(0, 50, (64,)), torch.randint(0, 4, (64,)))
        outs.append(layer(x, keys)[0])
    assert torch.equal(outs[0], outs[1])


def test_fine_grained_and_shared_sizes():
    cfg = MoEConfig(num_experts=4, top_k=2, expert_width=32, granularity=4, num_shared_experts=1)
    layer = build_moe_layer("native", D, cfg, RouterConfig())
    assert layer.experts.num_experts == 16 and layer.router.top_k == 8
    assert layer.experts.w_out.shape == (16, 8, D)
    size = layer_size(layer)
    per_expert = 3 * D * 8  # swiglu: 2 input projections + 1 output
    assert size.total_params == 16 * per_expert + 16 * D + 3 * D * 8
    assert size.active_params == 8 * per_expert + 16 * D + 3 * D * 8
    assert size.flops_per_token == 2 * size.active_params
    # the active-matched dense twin has the same expert FLOPs per token (router aside)
    dense = DenseMLP(D, dense_twin_width(cfg, "active"))
    assert layer_size(dense).active_params == size.active_params - 16 * D
    assert dense_twin_width(cfg, "total") == 16 * 8 + 8


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("top_k", 9, "top_k=9.*num_experts=8"),
        ("top_k", 0, "top_k=0"),
        ("capacity_factor", 0.0, "capacity_factor"),
        ("granularity", 3, "granularity=3.*divide expert_width"),
        ("activation", "relu", "activation.*swiglu"),
    ],
)
def test_bad_config_raises_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        build_moe_layer("native", D, MoEConfig(**{field: value}), RouterConfig())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_silu_gate_times_up_bit_for_bit(dtype):
    """`activate`'s SwiGLU writes its gradient halves in place; values and gradients must be those of
    the textbook silu(gate) * up under autograd, to the bit (training numerics do not move)."""
    torch.manual_seed(0)
    h = torch.randn(37, 2 * 24, dtype=dtype)
    grad = torch.randn(37, 24, dtype=dtype)
    ours = h.clone().requires_grad_()
    ref = h.clone().requires_grad_()
    y = activate(ours, "swiglu")
    gate, up = ref.chunk(2, dim=-1)
    y_ref = torch.nn.functional.silu(gate) * up
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(y, y_ref) and torch.equal(ours.grad, ref.grad)


def test_swiglu_gradient_on_strided_input_matches_finite_differences():
    h = torch.randn(6, 4, 10, dtype=torch.float64).transpose(0, 1).requires_grad_()  # not contiguous
    assert torch.autograd.gradcheck(lambda v: activate(v, "swiglu"), (h,))


def test_gelu_experts():
    layer = make_layer("topk", activation="gelu")
    x = torch.randn(10, D, dtype=torch.float64)
    y, routing = layer(x)
    torch.testing.assert_close(y, naive_moe(layer, x, routing))


def test_experts_compute_in_the_autocast_dtype_and_train_float32_weights():
    """Grouped kernels are not autocast ops: the experts cast operands themselves (on CUDA this
    selects torch._grouped_mm), and the float32 master weights still get gradients."""
    layer = build_moe_layer("native", D, MoEConfig(num_experts=4, top_k=2, expert_width=8), RouterConfig())
    x = torch.randn(10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, routing = layer(x)
    assert y.dtype == torch.bfloat16 and routing.probs.dtype == torch.float32
    y.float().sum().backward()
    assert layer.experts.w_in.grad.dtype == torch.float32 and layer.experts.w_in.grad.abs().sum() > 0
