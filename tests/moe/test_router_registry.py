"""The router registry: a new router is one module; configs are the kind's own; the trainer's
after-step hook replaces any check of a router's class."""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moe.checkpoint import check_fingerprint
from moe.config import TrainConfig, as_plain_dict, to_train_config
from moe.layer import MoEConfig, build_moe_layer
from moe.model import LanguageModel, ModelConfig
from moe.protocols import RoutedLayer, RoutedModel, moe_block_indices
from moe.routers import (
    Router,
    RouterConfig,
    build_router,
    register_router,
    registry,
    resolve_router_config,
    router_config,
    router_kinds,
    router_spec,
)
from moe.routing import RouteKeys, Routing

D, E, K = 8, 4, 2


@dataclass
class _FirstConfig(RouterConfig):
    offset: int = 0


class _FirstExperts(Router):
    """Every token to experts offset, offset+1, ...: the smallest router a user could add."""

    def __init__(self, *args, offset: int = 0):
        super().__init__(*args)
        self.offset = offset
        self.steps = 0

    def route(self, x_TD: torch.Tensor, keys_T: RouteKeys | None) -> Routing:
        T = x_TD.shape[0]
        indices = (torch.arange(self.top_k) + self.offset).expand(T, -1) % self.num_experts
        weights = torch.full((T, self.top_k), 1.0 / self.top_k)
        logits = torch.zeros(T, self.num_experts)
        return Routing(indices.contiguous(), weights, logits, torch.softmax(logits, -1), self.expert_mask[indices])

    def after_step(self, load_E: torch.Tensor) -> None:
        self.steps += 1


@pytest.fixture
def first_router():
    """Registers the test router as kind `first` for one test."""
    register_router("first", _FirstConfig, summary="test router")(
        lambda cfg, d, e, k, cf: _FirstExperts(d, e, k, cf, offset=cfg.offset)
    )
    yield "first"
    registry._REGISTRY.pop("first")


def test_every_builtin_kind_builds_from_its_own_config_and_carries_its_kind():
    assert router_kinds() == ("topk", "switch", "expert_choice", "sigmoid", "hash", "random", "prev_hash", "domain")
    for kind in router_kinds():
        cfg = router_config(kind)
        assert isinstance(cfg, router_spec(kind).config) and cfg.kind == kind
        with pytest.warns(UserWarning) if kind == "expert_choice" else torch.no_grad():
            router = build_router(cfg, D, E, 1 if kind == "switch" else K, None)
        assert router.kind == kind


def test_a_router_registered_in_one_place_trains_in_a_model(first_router):
    cfg = router_config(first_router, offset=1)
    model = LanguageModel(
        ModelConfig(d_model=D, n_layers=1, n_heads=2, moe=MoEConfig(num_experts=E, top_k=K, expert_width=8)), 11, cfg
    )
    out = model(torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5)))
    assert out.routings[0].indices.tolist()[0] == [1, 2]
    out.loss.backward()


def test_a_kind_cannot_be_registered_twice_and_fields_belong_to_their_kind(first_router):
    with pytest.raises(ValueError, match="registered twice"):
        register_router("first", _FirstConfig)(lambda *a: None)
    with pytest.raises(ValueError, match="router 'topk' has no field 'hash_seed'; its fields: jitter, renormalize"):
        router_config("topk", hash_seed=3)
    with pytest.raises(ValueError, match="router.kind='nope' is unknown; allowed values: topk, .*first"):
        router_spec("nope")


def test_stored_flat_router_configs_of_earlier_versions_still_load():
    legacy = {"kind": "hash", "renormalize": True, "jitter": 0.0, "bias_update_rate": 0.001, "hash_seed": 4}
    cfg = resolve_router_config(legacy, stored=True)
    assert cfg == router_config("hash", hash_seed=4)
    with pytest.raises(ValueError, match="router 'hash' has no field 'renormalize'"):
        resolve_router_config(legacy)  # the same keys as fresh input: refused


def test_an_old_checkpoint_fingerprint_with_every_router_field_still_resumes(tmp_path):
    cfg = to_train_config(TrainConfig(router=router_config("topk")))
    now = {"router": as_plain_dict(cfg)["router"], "seed": 0}
    old = {"router": {**now["router"], "bias_update_rate": 0.001, "hash_seed": 0}, "seed": 0}
    check_fingerprint(old, now, tmp_path / "step_1.pt")  # fields topk never read: not compared
    with pytest.raises(Exception, match="router.kind"):
        check_fingerprint({**old, "router": {**old["router"], "kind": "hash"}}, now, tmp_path / "step_1.pt")


def test_composition_type_checks_each_routers_own_fields(compose_train):
    assert compose_train("router=sigmoid", "router.bias_update_rate=0.1").router.bias_update_rate == 0.1
    assert compose_train("router=prev_hash", "router.hash_seed=3").router == router_config("prev_hash", hash_seed=3)
    with pytest.raises(Exception, match="bias_update_rate"):
        compose_train("router=topk", "router.bias_update_rate=0.1")  # sigmoid's field, not topk's
    with pytest.raises(ValueError, match="router 'prev_hash' has no field 'jitter'"):
        compose_train("router=prev_hash", "+router.jitter=0.5")  # added with '+': still refused
    with pytest.raises(ValueError, match="router.jitter=1.5 is out of range"):
        compose_train("router.jitter=1.5")


def test_a_saved_config_yaml_with_the_flat_router_reads_back(compose_train, tmp_path):
    plain = as_plain_dict(compose_train("router=hash"))
    plain["router"].update(renormalize=True, jitter=0.0, bias_update_rate=0.001)  # as earlier versions wrote it
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(plain))
    cfg = to_train_config(OmegaConf.load(tmp_path / "config.yaml"), stored=True)
    assert cfg.router == router_config("hash")


def test_aux_free_needs_a_router_that_adapts_to_the_load(compose_train):
    with pytest.raises(ValueError, match="routers that do: router=sigmoid"):
        compose_train("balance=aux_free")
    assert [k for k in router_kinds() if router_spec(k).adapts_to_load] == ["sigmoid"]


def test_the_sigmoid_router_adapts_in_after_step_and_the_others_ignore_it():
    for kind in ("topk", "hash", "sigmoid"):
        router = build_router(router_config(kind), D, E, K, None)
        before = {k: v.clone() for k, v in router.state_dict().items()}
        router.after_step(torch.tensor([10.0, 0.0, 0.0, 0.0]))
        changed = [k for k, v in router.state_dict().items() if not torch.equal(v, before[k])]
        assert changed == (["expert_bias"] if kind == "sigmoid" else [])
    assert router.expert_bias.tolist() == pytest.approx([-1e-3, 1e-3, 1e-3, 1e-3])


def test_models_and_layers_satisfy_the_protocols_the_analysis_reads():
    model = LanguageModel(
        ModelConfig(d_model=D, n_layers=2, n_heads=2, moe=MoEConfig(num_experts=E, top_k=K, expert_width=8)), 11
    )
    assert isinstance(model, RoutedModel)
    assert all(isinstance(layer, RoutedLayer) for layer in model.moe_layers)
    assert moe_block_indices(model) == [0, 1]
    layer = build_moe_layer("native", D, MoEConfig(num_experts=E, top_k=K, expert_width=8), RouterConfig())
    assert isinstance(layer, RoutedLayer)


def test_moe_never_imports_analysis():
    """One-way layering: the analysis reads models, the models know nothing of the analysis."""
    offenders = []
    for path in Path(__file__).resolve().parents[2].joinpath("moe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n == "analysis" or n.startswith("analysis.")]
    assert offenders == []


def test_router_configs_hold_only_their_own_fields():
    fields = {kind: sorted(f.name for f in dataclasses.fields(router_spec(kind).config)) for kind in router_kinds()}
    assert fields["hash"] == ["hash_seed", "kind"] and fields["random"] == ["kind"]
    assert fields["sigmoid"] == ["bias_update_rate", "jitter", "kind", "renormalize"]
