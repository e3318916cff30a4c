"""The MoE layer: router -> permute -> grouped experts -> combine (+ shared experts).

It takes the dense MLP's place in a transformer block; only this module differs between an MoE
model and its dense twin.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from moe.dispatch import CPU_MAX_PADDING, combine, gather_rows, permute
from moe.experts import ACTIVATIONS, DenseMLP, GroupedExperts
from moe.routing import RouteKeys, Router, RouterConfig, Routing, build_router


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
        if self.activation not in ACTIVATIONS:
            fail("activation", self.activation, f"allowed values: {', '.join(ACTIVATIONS)}")
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


class MoELayer(nn.Module):
    """x [..., D] (+ `RouteKeys` or token ids [...]) -> (y [..., D], Routing over the T flattened tokens)."""

    def __init__(self, d_model: int, cfg: MoEConfig, router_cfg: RouterConfig, init_std: float = 0.02,
                 out_std: float | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.router: Router = build_router(router_cfg, d_model, cfg.routed_experts, cfg.routed_top_k,
                                           cfg.capacity_factor)
        self.experts = GroupedExperts(d_model, cfg.routed_width, cfg.routed_experts, cfg.activation,
                                      init_std, out_std)
        self.shared = (DenseMLP(d_model, cfg.num_shared_experts * cfg.routed_width, cfg.activation, init_std, out_std)
                       if cfg.num_shared_experts else None)

    def forward(self, x: Tensor, keys: RouteKeys | Tensor | None = None) -> tuple[Tensor, Routing]:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD, keys)
        # Grouped matmul kernels on CUDA want the ragged layout; on the CPU padding is cheaper while small.
        dispatch = permute(routing, max_padding=None if x_TD.is_cuda else CPU_MAX_PADDING)
        y_PD = self.experts(gather_rows(x_TD, dispatch), dispatch.row_gate, dispatch.counts, dispatch.capacity)
        y_TD = combine(y_PD, dispatch, x_TD.shape[0])
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view_as(x), routing


BACKENDS = ("native", "megablocks")


def build_moe_layer(backend: str, d_model: int, cfg: MoEConfig, router_cfg: RouterConfig, init_std: float = 0.02,
                    out_std: float | None = None) -> nn.Module:
    """The MoE layer of `backend`: `MoELayer` (native) or `MegablocksMoELayer` (CUDA; MegaBlocks
    imported only here, only when asked for)."""
    if backend == "native":
        return MoELayer(d_model, cfg, router_cfg, init_std, out_std)
    if backend == "megablocks":
        from moe.megablocks_backend import MegablocksMoELayer
        return MegablocksMoELayer(d_model, cfg, router_cfg, init_std, out_std)
    raise ValueError(f"backend={backend!r} is unknown; allowed values: {', '.join(BACKENDS)}")
