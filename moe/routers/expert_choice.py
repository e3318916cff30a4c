"""Expert choice (Zhou et al. 2022): each expert picks its tokens."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from moe.routers.base import LearnedRouter, LearnedRouterConfig
from moe.routers.registry import register_router
from moe.routing import RouteKeys, Routing, expert_capacity


class ExpertChoiceRouter(LearnedRouter):
    """Each expert picks its top-C tokens, C = T*k*cf/E.

    A token may get 0..E experts, so the record has K = E slots (slot e = expert e) and `kept`
    marks the experts that chose the token. Selection looks across the whole batch, so in a causal
    LM a token's routing depends on future tokens: a leak, warned about at construction.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None, jitter: float = 0.0):
        super().__init__(d_model, num_experts, top_k, None, jitter)
        self.choice_capacity_factor = 1.0 if capacity_factor is None else capacity_factor
        warnings.warn(
            "router=expert_choice selects tokens across the whole batch, so a causal LM's routing "
            "sees future tokens (information leak); use it as a comparison, not for generation.",
            stacklevel=2,
        )

    def route(self, x_TD: Tensor, keys_T: RouteKeys | None) -> Routing:
        logits = self.compute_logits(x_TD)
        probs = torch.softmax(self._masked(logits), dim=-1)
        num_tokens = x_TD.shape[0]
        capacity = min(
            num_tokens, expert_capacity(num_tokens, self.top_k, self.num_experts, self.choice_capacity_factor)
        )
        chosen_EC = torch.topk(probs.t(), capacity, dim=-1).indices
        kept = torch.zeros(num_tokens, self.num_experts, dtype=torch.bool, device=x_TD.device)
        kept[chosen_EC, torch.arange(self.num_experts, device=x_TD.device)[:, None]] = True
        kept &= self.expert_mask
        indices = torch.arange(self.num_experts, device=x_TD.device).expand(num_tokens, -1)
        weights = torch.where(kept, probs, torch.zeros_like(probs))
        return Routing(indices.contiguous(), weights, logits, probs, kept)


@register_router(
    "expert_choice",
    LearnedRouterConfig,
    summary="experts pick their top-C tokens (Zhou et al. 2022); sees future tokens",
)
def build_expert_choice(
    cfg: LearnedRouterConfig, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> ExpertChoiceRouter:
    return ExpertChoiceRouter(d_model, num_experts, top_k, capacity_factor, jitter=cfg.jitter)
