"""What every router shares: the config base class, the `Router` module (knockout mask, capacity,
the after-step hook) and the linear gate of the learned routers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.routing import RouteKeys, Routing, as_route_keys, capacity_mask, expert_capacity


@dataclass
class RouterConfig:
    """How tokens pick experts (Hydra group `router`). Each router kind subclasses it with the fields
    it reads (`moe.routers.router_config(kind, ...)` builds one); `kind` selects the router."""

    kind: str = "topk"

    def validate(self) -> None:
        """Raise ValueError naming a field out of range and what it must be."""


@dataclass
class LearnedRouterConfig(RouterConfig):
    """A router with a trained linear gate."""

    # Multiplicative input noise U(1-eps, 1+eps) during training (Switch Transformer); 0 = off.
    jitter: float = 0.0

    def validate(self) -> None:
        if not 0 <= self.jitter < 1:  # also catches nan
            raise ValueError(
                f"router.jitter={self.jitter} is out of range: it must be in [0, 1) (the router's input is "
                "scaled by a factor drawn from [1 - jitter, 1 + jitter])"
            )


class Router(nn.Module):
    """Base class: subclasses implement `route(x_TD, keys_T) -> Routing` (keys flattened to [T]).

    Holds what every router shares: the expert mask used by knockouts (a masked expert is never
    selected; learned routers re-route its tokens), the optional capacity, and `after_step`, the
    hook the trainer calls after each optimizer step with that step's expert loads.
    """

    kind: str = ""  # set by `moe.routers.build_router` to the registered kind
    expert_mask: Tensor  # [E] bool buffer

    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None):
        super().__init__()
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.capacity_factor = capacity_factor
        # Knockout mask: True = expert available. Not saved in checkpoints.
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool), persistent=False)

    def forward(self, x_TD: Tensor, keys: RouteKeys | Tensor | None = None) -> Routing:
        """x_TD [T, D]; keys: `RouteKeys` or token ids, any shape with T elements (fixed routers)."""
        keys = as_route_keys(keys)
        routing = self.route(x_TD, None if keys is None else keys.flat())
        if self.capacity_factor is not None and routing.top_k < self.num_experts:
            capacity = expert_capacity(x_TD.shape[0], routing.top_k, self.num_experts, self.capacity_factor)
            kept = routing.kept & capacity_mask(routing.indices, routing.weights, self.num_experts, capacity)
            routing = Routing(routing.indices, routing.weights, routing.logits, routing.probs, kept)
        return routing

    def route(self, x_TD: Tensor, keys_T: RouteKeys | None) -> Routing:  # pragma: no cover
        raise NotImplementedError

    def after_step(self, load_E: Tensor) -> None:
        """Called after each optimizer step with the step's assignments per expert [E] (summed over
        micro-steps and ranks) when the balance scope adapts routers (balance=aux_free). Most
        routers ignore it."""

    def _masked(self, scores_TE: Tensor) -> Tensor:
        if bool(self.expert_mask.all()):
            return scores_TE
        return scores_TE.masked_fill(~self.expert_mask, float("-inf"))


class LearnedRouter(Router):
    """A linear gate W [E, D] computed in float32 even under bf16 autocast."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, capacity_factor)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.jitter = jitter

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        """[T, E] float32 logits; the matmul runs in float32 whatever the ambient autocast."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(x, self.weight.float())


def finite_at_least(name: str, value: float, low: float) -> None:
    """ValueError unless `value` is a finite number >= low (nan fails too)."""
    if not (math.isfinite(value) and value >= low):
        raise ValueError(f"{name}={value} is out of range: it must be a finite number >= {low:g}")
