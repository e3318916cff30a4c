"""DeepSeek-V3 gating: sigmoid scores, top-k of scores + a selection bias that aux-loss-free
balancing moves after each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe.routers.base import LearnedRouter, finite_at_least
from moe.routers.registry import register_router
from moe.routers.topk import TopKRouterConfig
from moe.routing import RouteKeys, Routing


@dataclass
class SigmoidRouterConfig(TopKRouterConfig):
    # Aux-loss-free balancing (DeepSeek-V3): step size u of `b += u * sign(mean_load - load)`,
    # applied under balance=aux_free.
    bias_update_rate: float = 1e-3

    def validate(self) -> None:
        super().validate()
        finite_at_least("router.bias_update_rate", self.bias_update_rate, 0)


class SigmoidBiasRouter(LearnedRouter):
    """Scores s = sigmoid(logits); select top-k of s + b, weight by s.

    The bias b [E] is a buffer, not a parameter: it changes only in `after_step` (aux-loss-free
    balancing), and it never changes a weight's value, only which experts are selected. `probs`
    is s normalized over experts (the form DeepSeek-V3's complementary sequence-wise loss uses).
    """

    expert_bias: Tensor  # [E] buffer

    def __init__(self, *args, renormalize: bool = True, bias_update_rate: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        self.renormalize = renormalize
        self.bias_update_rate = bias_update_rate
        self.register_buffer("expert_bias", torch.zeros(self.num_experts))

    def route(self, x_TD: Tensor, keys_T: RouteKeys | None) -> Routing:
        logits = self.compute_logits(x_TD)
        scores = torch.sigmoid(logits)
        indices = torch.topk(self._masked(scores + self.expert_bias), self.top_k, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        return Routing(indices, weights, logits, probs, torch.ones_like(indices, dtype=torch.bool))

    @torch.no_grad()
    def after_step(self, load_E: Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): `b += u * sign(mean_load - load)`. Overloaded
        experts become less likely to be selected; the gate weights are untouched."""
        load = load_E.to(self.expert_bias)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)


@register_router(
    "sigmoid",
    SigmoidRouterConfig,
    adapts_to_load=True,
    summary="sigmoid scores, top-k of scores + an aux-loss-free selection bias (DeepSeek-V3)",
)
def build_sigmoid(
    cfg: SigmoidRouterConfig, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> SigmoidBiasRouter:
    return SigmoidBiasRouter(
        d_model,
        num_experts,
        top_k,
        capacity_factor,
        jitter=cfg.jitter,
        renormalize=cfg.renormalize,
        bias_update_rate=cfg.bias_update_rate,
    )
