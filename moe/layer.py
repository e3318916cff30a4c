"""The MoE layer: a router, routed experts and optional shared experts, composed.

It takes the dense MLP's place in a transformer block; only this module differs between an MoE
model and its dense twin. The router (`moe.routers`) and the experts backend are siblings that
can each be swapped: the experts are the native grouped experts with their dispatch
(`moe.experts.GroupedExperts`) or MegaBlocks' dropless kernels (`moe.megablocks_backend`); both
take (x_TD, Routing) and return y_TD, so the router, the routing record and the shared experts
exist once, here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from moe.experts import ACTIVATIONS, DenseMLP, GroupedExperts
from moe.routers import Router, RouterConfig, build_router
from moe.routing import RouteKeys, Routing
from moe.validation import check_choice


@dataclass
class MoEConfig:
    """Sizes of one MoE layer (Hydra: `model.moe`)."""

    num_experts: int = 8
    top_k: int = 2
    # Hidden width f of one expert (before fine-graining).
    expert_width: int = 256
    # Fine-grained experts (DeepSeekMoE): g*E experts of width f/g, each token picks g*k of them;
    # active compute per token stays that of k experts of width f.
    granularity: int = 1
    # Always-active experts (DeepSeekMoE) of width f/g each, added to the routed output.
    num_shared_experts: int = 0
    activation: str = "swiglu"
    # None = dropless (default). Otherwise each expert takes at most ceil(cf*T*k/E) tokens per
    # forward and overflow assignments, lowest gate first, pass through the residual.
    capacity_factor: float | None = None

    def validate(self) -> None:
        """Raise ValueError naming the offending field and the allowed values."""

        def fail(field: str, value, allowed: str):
            raise ValueError(f"model.moe.{field}={value!r} is invalid: {allowed}")

        if self.num_experts < 1:
            fail("num_experts", self.num_experts, "must be >= 1")
        if self.top_k < 1:
            fail("top_k", self.top_k, "must be >= 1")
        if self.top_k > self.num_experts:
            fail("top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        if self.expert_width < 1:
            fail("expert_width", self.expert_width, "must be >= 1")
        if self.granularity < 1 or self.expert_width % self.granularity:
            fail("granularity", self.granularity, f"must be >= 1 and divide expert_width={self.expert_width}")
        if self.num_shared_experts < 0:
            fail("num_shared_experts", self.num_shared_experts, "must be >= 0")
        check_choice("model.moe.activation", self.activation, ACTIVATIONS)
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail("capacity_factor", self.capacity_factor, "must be > 0, or null for dropless routing")

    @property
    def routed_experts(self) -> int:
        """Experts the router chooses among: g * E."""
        return self.granularity * self.num_experts

    @property
    def routed_top_k(self) -> int:
        """Experts per token: g * k."""
        return self.granularity * self.top_k

    @property
    def routed_width(self) -> int:
        """Hidden width of one routed (possibly fine-grained) expert: f / g."""
        return self.expert_width // self.granularity


class ExpertsBackend(Protocol):
    """The routed experts of one layer: all of them on the kept assignments of a routing record
    (an nn.Module)."""

    @property
    def num_experts(self) -> int: ...

    def __call__(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """x_TD [T, D] -> sum over each token's kept slots of gate * expert(x) [T, D]."""
        ...

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """One expert, ungated, on any rows [N, D] -> [N, D] (probes)."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class MoELayer(nn.Module):
    """x [..., D] (+ `RouteKeys` or token ids [...]) -> (y [..., D], Routing over the T flattened tokens).

    `router` decides, `experts` (any `ExpertsBackend` module) computes, `shared` (always-active
    experts, DeepSeekMoE) is added to every token. State dict keys: `router.*`, `experts.w_in`,
    `experts.w_out` (every backend saves the native layout), `shared.*`.
    """

    router: Router
    experts: ExpertsBackend  # an nn.Module
    shared: DenseMLP | None

    def __init__(self, router: Router, experts: ExpertsBackend, shared: DenseMLP | None = None):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared = shared

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, x: Tensor, keys: RouteKeys | Tensor | None = None) -> tuple[Tensor, Routing]:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD, keys)
        y_TD = self.experts(x_TD, routing)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view_as(x), routing


def _native_experts(d_model: int, cfg: MoEConfig, init_std: float, out_std: float | None) -> ExpertsBackend:
    return GroupedExperts(d_model, cfg.routed_width, cfg.routed_experts, cfg.activation, init_std, out_std)


def _megablocks_experts(d_model: int, cfg: MoEConfig, init_std: float, out_std: float | None) -> ExpertsBackend:
    from moe.megablocks_backend import MegablocksExperts  # MegaBlocks imported only when asked for

    return MegablocksExperts(d_model, cfg, init_std=init_std, out_std=out_std)


# backend.name -> builder of the routed experts (d_model, MoEConfig, init_std, out_std) -> module.
EXPERT_BACKENDS: dict[str, Callable[[int, MoEConfig, float, float | None], ExpertsBackend]] = {
    "native": _native_experts,
    "megablocks": _megablocks_experts,
}
BACKENDS = tuple(EXPERT_BACKENDS)


def build_moe_layer(
    backend: str,
    d_model: int,
    cfg: MoEConfig,
    router_cfg: RouterConfig,
    init_std: float = 0.02,
    out_std: float | None = None,
) -> MoELayer:
    """An MoE layer of `cfg`'s sizes: the router `router_cfg` names over the g*E routed experts
    (g*k per token), the experts of `backend` (native | megablocks, the latter CUDA only) and the
    shared experts. Output projections (experts' and shared) are initialized with `out_std`."""
    cfg.validate()
    if backend not in EXPERT_BACKENDS:
        check_choice("backend", backend, EXPERT_BACKENDS)
    router = build_router(router_cfg, d_model, cfg.routed_experts, cfg.routed_top_k, cfg.capacity_factor)
    experts = EXPERT_BACKENDS[backend](d_model, cfg, init_std, out_std)
    shared = (
        DenseMLP(d_model, cfg.num_shared_experts * cfg.routed_width, cfg.activation, init_std, out_std)
        if cfg.num_shared_experts
        else None
    )
    return MoELayer(router, experts, shared)
