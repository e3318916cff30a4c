"""backend=megablocks: config mapping, weight layout, and the layer's contract, on CPU against a
reference module written in MegaBlocks' layout; the kernels themselves only where CUDA and
MegaBlocks exist (skipped elsewhere, with the reason)."""

import copy
import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe.balance import load_balancing_loss
from moe.experts import GroupedExperts
from moe.layer import MoEConfig, build_moe_layer
from moe.megablocks_backend import (
    BackendUnavailable,
    MegablocksExperts,
    megablocks_arguments,
    megablocks_to_native,
    native_to_megablocks,
    require_megablocks,
)
from moe.protocols import ExpertBank, RoutedLayer
from moe.routers import RouterConfig
from moe.sizing import layer_size

D = 16
HAS_CUDA = torch.cuda.is_available()
HAS_MEGABLOCKS = HAS_CUDA and importlib.util.find_spec("megablocks") is not None


class ReferenceDroplessMLP(nn.Module):
    """MegaBlocks' ParallelDroplessMLP interface and parameter layout (mlp.w1, mlp.v1, mlp.w2, each
    [E*F, D]) computed by a naive loop over tokens and slots."""

    def __init__(self, num_experts, hidden, d_model, glu=True):
        super().__init__()
        self.num_experts, self.glu = num_experts, glu
        self.mlp = nn.Module()
        for name in ("w1", "v1", "w2") if glu else ("w1", "w2"):
            self.mlp.register_parameter(name, nn.Parameter(torch.randn(num_experts * hidden, d_model)))

    def forward(self, x, scores, expert_weights, top_experts):
        E = self.num_experts
        w1 = self.mlp.w1.view(E, -1, x.shape[-1])
        w2 = self.mlp.w2.view(E, -1, x.shape[-1])
        v1 = self.mlp.v1.view(E, -1, x.shape[-1]) if self.glu else None
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(top_experts.shape[1]):
                e = top_experts[t, j]
                h = F.silu(x[t] @ w1[e].T) * (x[t] @ v1[e].T) if self.glu else F.gelu(x[t] @ w1[e].T)
                out[t] = out[t] + expert_weights[t, j] * (h @ w2[e])
        return out


def layers(activation="swiglu", **moe):
    cfg = MoEConfig(num_experts=4, top_k=2, expert_width=8, activation=activation, **moe)
    torch.manual_seed(0)
    native = build_moe_layer("native", D, cfg, RouterConfig()).double()
    nn.init.normal_(native.router.weight, std=1.0)
    experts = ReferenceDroplessMLP(cfg.routed_experts, cfg.routed_width, D, glu=activation == "swiglu")
    # The same router and shared experts, MegaBlocks' experts: the layer's composition.
    mb = copy.deepcopy(native)
    mb.experts = MegablocksExperts(D, cfg, mlp=experts).double()
    mb.load_state_dict(native.state_dict())
    return native, mb


def test_arguments_map_fine_grained_sizes_and_switch_off_megablocks_losses():
    cfg = MoEConfig(num_experts=8, top_k=2, expert_width=256, granularity=4)
    args = megablocks_arguments(128, cfg, init_std=0.02, out_std=0.005)
    assert (args["hidden_size"], args["ffn_hidden_size"], args["moe_num_experts"], args["moe_top_k"]) == (
        128,
        64,
        32,
        8,
    )
    assert args["mlp_type"] == "glu" and args["mlp_impl"] == "grouped" and args["activation_fn"] is F.silu
    # Its loss lists are never filled: our losses come from the routing record.
    assert args["moe_loss_weight"] == 0 and args["moe_zloss_weight"] == 0
    assert not args["bias"] and not args["bf16"] and not args["fp16"]
    w = torch.empty(2000, 100)
    assert args["init_method"](w).std().item() == pytest.approx(0.02, rel=0.05)
    assert args["output_layer_init_method"](w).std().item() == pytest.approx(0.005, rel=0.05)
    gelu = megablocks_arguments(128, MoEConfig(activation="gelu"), init_std=0.02, out_std=None)
    assert gelu["mlp_type"] == "mlp" and gelu["activation_fn"] is F.gelu


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_weight_layouts_compute_the_same_experts_and_round_trip(activation):
    torch.manual_seed(1)
    native = GroupedExperts(D, 8, 4, activation).double()
    mb = native_to_megablocks(native.w_in, native.w_out, activation)
    assert all(w.shape == (32, D) for w in mb.values())
    assert set(mb) == ({"w1", "v1", "w2"} if activation == "swiglu" else {"w1", "w2"})
    ref = ReferenceDroplessMLP(4, 8, D, glu=activation == "swiglu").double()
    with torch.no_grad():
        for k, v in mb.items():
            getattr(ref.mlp, k).copy_(v)
    x = torch.randn(5, D, dtype=torch.float64)
    for e in range(4):
        idx = torch.full((5, 1), e)
        assert torch.allclose(ref(x, None, torch.ones(5, 1, dtype=torch.float64), idx), native.expert_forward(e, x))
    w_in, w_out = megablocks_to_native(mb, 4)
    assert torch.equal(w_in, native.w_in) and torch.equal(w_out, native.w_out)


@pytest.mark.parametrize("moe", [{}, {"capacity_factor": 0.5}, {"num_shared_experts": 1}, {"activation": "gelu"}])
def test_layer_equals_the_native_layer_with_the_same_weights(moe):
    native, mb = layers(**moe)
    x = torch.randn(2, 6, D, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, routing = native(x)
    y2, routing2 = mb(x2)
    assert torch.equal(routing.indices, routing2.indices) and torch.equal(routing.kept, routing2.kept)
    assert torch.allclose(y, y2, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y2 * g).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-12)
    assert torch.allclose(native.router.weight.grad, mb.router.weight.grad, atol=1e-12)
    w_in_grad, w_out_grad = megablocks_to_native(
        {n.rsplit(".")[-1]: p.grad for n, p in mb.experts.mlp.named_parameters()}, 4
    )
    assert torch.allclose(native.experts.w_in.grad, w_in_grad) and torch.allclose(native.experts.w_out.grad, w_out_grad)


def test_checkpoints_are_in_the_native_layout_both_ways():
    cfg = MoEConfig(num_experts=4, top_k=2, expert_width=8)
    native, mb = layers()
    state = mb.state_dict()
    assert set(state) == set(native.state_dict())
    assert all(torch.equal(state[k], v) for k, v in native.state_dict().items())
    fresh = build_moe_layer("native", D, cfg, RouterConfig()).double()
    fresh.load_state_dict(state)  # a MegaBlocks-trained layer analyzed with the native one
    x = torch.randn(7, D, dtype=torch.float64)
    assert torch.allclose(fresh(x)[0], mb(x)[0], atol=1e-12)
    assert layer_size(mb) == layer_size(native)


def test_knockout_mask_works_through_the_shared_router():
    native, mb = layers()
    for layer in (native, mb):
        layer.router.expert_mask[1] = False
    x = torch.randn(9, D, dtype=torch.float64)
    (y, _), (y2, r2) = native(x), mb(x)
    assert not (r2.indices == 1).any() and torch.allclose(y, y2, atol=1e-12)


def test_both_backends_offer_one_expert_alone_for_the_probes():
    native, mb = layers()
    assert isinstance(mb, RoutedLayer) and isinstance(mb.experts, ExpertBank)
    x = torch.randn(5, D, dtype=torch.float64)
    for e in range(4):
        assert torch.allclose(native.experts.expert_forward(e, x), mb.experts.expert_forward(e, x), atol=1e-12)


def test_the_balancing_loss_reads_the_layer_routing_record():
    _, mb = layers()
    x = torch.randn(32, D, dtype=torch.float64)
    _, routing = mb(x)
    loss = load_balancing_loss(routing.probs, routing.indices, 4)
    loss.backward()
    assert mb.router.weight.grad is not None and torch.isfinite(loss)


@pytest.mark.skipif(HAS_MEGABLOCKS, reason="checks the error where MegaBlocks or CUDA is missing")
def test_without_cuda_or_megablocks_the_error_names_the_fix():
    with pytest.raises(BackendUnavailable, match="backend=native"):
        require_megablocks()
    with pytest.raises(BackendUnavailable, match="backend=native"):
        build_moe_layer("megablocks", D, MoEConfig(), RouterConfig())


def test_megablocks_on_cpu_or_fp32_fails_at_composition(compose_train):
    with pytest.raises(ValueError, match="backend=megablocks runs MegaBlocks' bf16"):
        compose_train("backend=megablocks", "trainer.device=cpu")
    with pytest.raises(ValueError, match="trainer.precision=bf16"):
        compose_train("backend=megablocks", "trainer=gpu", "trainer.precision=fp32")


@pytest.mark.skipif(HAS_MEGABLOCKS, reason="checks the error where MegaBlocks or CUDA is missing")
def test_train_stops_before_any_work_without_the_backend(compose_train, tmp_path):
    from moe.train import run_experiment

    cfg = compose_train("backend=megablocks", "trainer=gpu", "experiment=smoke", "trainer.device=cuda")
    with pytest.raises(BackendUnavailable):
        run_experiment(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend='triton' is unknown"):
        build_moe_layer("triton", D, MoEConfig(), RouterConfig())


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.parametrize(
    "cfg",
    [
        MoEConfig(num_experts=8, top_k=2, expert_width=256),
        MoEConfig(num_experts=8, top_k=2, expert_width=512, granularity=4),
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_MEGABLOCKS, reason="needs CUDA and megablocks")
def test_megablocks_matches_native_at_bf16_tolerance(cfg):
    torch.manual_seed(0)
    d = 256
    native = build_moe_layer("native", d, cfg, RouterConfig()).cuda()
    mb = build_moe_layer("megablocks", d, cfg, RouterConfig()).cuda()
    mb.load_state_dict(native.state_dict())
    x = torch.randn(4, 512, d, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, routing = native(x)
        y2, routing2 = mb(x)
    assert torch.equal(routing.indices, routing2.indices)
    import megablocks.layers.moe as mb_moe

    assert mb.training and len(mb_moe.get_load_balancing_loss()) == 0  # nothing left in its global list
    scale = y.float().abs().mean()
    assert (y.float() - y2.float()).abs().mean() / scale < 2e-2
    g = torch.randn_like(y)
    (y.float() * g).sum().backward()
    (y2.float() * g).sum().backward()
    rel = (native.router.weight.grad - mb.router.weight.grad).norm() / native.router.weight.grad.norm()
    assert rel < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_MEGABLOCKS, reason="needs CUDA and megablocks")
def test_our_balancing_loss_equals_megablocks_own():
    import megablocks.layers.moe as mb_moe
    from megablocks.layers.arguments import Arguments

    torch.manual_seed(0)
    E, k, T = 8, 2, 1024
    probs = torch.softmax(torch.randn(T, E, device="cuda"), -1)
    weights, indices = probs.topk(k, dim=-1)
    args = Arguments(
        hidden_size=64,
        ffn_hidden_size=128,
        moe_num_experts=E,
        moe_top_k=k,
        moe_loss_weight=1.0,
        num_layers=1,
        mlp_impl="grouped",
        bf16=False,
        fp16=False,
    )
    mb_moe.clear_load_balancing_loss()
    mb_moe.save_load_balancing_loss((torch.bincount(indices.flatten(), minlength=E), probs))
    theirs = mb_moe.batched_load_balancing_loss(args)
    mb_moe.clear_load_balancing_loss()
    assert torch.allclose(load_balancing_loss(probs, indices, E), theirs, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_native_cuda_equals_native_cpu_in_float32():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_width=64)
    cpu = build_moe_layer("native", 64, cfg, RouterConfig())
    gpu = build_moe_layer("native", 64, cfg, RouterConfig()).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(300, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, r = cpu(x)
        y2, r2 = gpu(x.cuda())
    assert torch.equal(r.indices, r2.indices.cpu())
    assert torch.allclose(y, y2.cpu(), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_native_cuda_bf16_uses_grouped_mm_and_matches_the_split_loop():
    from moe.experts import grouped_mm

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    torch.manual_seed(0)
    counts = torch.tensor([40, 0, 88, 128], device="cuda")
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = grouped_mm(x, w, counts)
    ref = torch.cat([c @ w[e] for e, c in enumerate(torch.split(x, counts.tolist()))])
    assert torch.allclose(y.float(), ref.float(), atol=1e-1, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad is not None and w.grad is not None
