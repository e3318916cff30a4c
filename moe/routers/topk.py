"""Softmax top-k routing (Mixtral, OLMoE, Qwen-MoE) and its top-1 special case, Switch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe.routers.base import LearnedRouter, LearnedRouterConfig
from moe.routers.registry import register_router
from moe.routing import RouteKeys, Routing


@dataclass
class TopKRouterConfig(LearnedRouterConfig):
    # Renormalize the k selected weights to sum to 1 (Mixtral/Qwen); off in OLMoE and Switch.
    renormalize: bool = True


class TopKRouter(LearnedRouter):
    """Softmax over experts, then top-k. With k=1 and no renormalization this is the Switch router:
    the weight is the chosen expert's probability."""

    def __init__(self, *args, renormalize: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.renormalize = renormalize

    def route(self, x_TD: Tensor, keys_T: RouteKeys | None) -> Routing:
        logits = self.compute_logits(x_TD)
        probs = torch.softmax(self._masked(logits), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        return Routing(indices, weights, logits, probs, torch.ones_like(indices, dtype=torch.bool))


@register_router("topk", TopKRouterConfig, summary="softmax then top-k (Mixtral, OLMoE, Qwen-MoE)")
def build_topk(
    cfg: TopKRouterConfig, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> TopKRouter:
    return TopKRouter(d_model, num_experts, top_k, capacity_factor, jitter=cfg.jitter, renormalize=cfg.renormalize)


@register_router("switch", LearnedRouterConfig, summary="top-1, weighted by the chosen expert's probability (Switch)")
def build_switch(
    cfg: LearnedRouterConfig, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> TopKRouter:
    if top_k != 1:
        raise ValueError(
            f"router=switch routes each token to one expert; got model.moe.top_k={top_k}. "
            "Set model.moe.top_k=1 or use router=topk."
        )
    return TopKRouter(d_model, num_experts, top_k, capacity_factor, jitter=cfg.jitter, renormalize=False)
