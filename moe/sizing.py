"""Parameter and FLOP accounting for FFN layers, and the dense twin of an MoE layer.

FLOPs count multiply-adds as 2 and cover the forward pass only (x3 for forward + backward);
activations and softmaxes are ignored, as in Kaplan et al. (2020).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe.experts import DenseMLP
from moe.layer import ExpertsBackend, MoEConfig, MoELayer
from moe.validation import check_choice

TWIN_MATCHES = ("active", "total")


@dataclass(frozen=True)
class LayerSize:
    total_params: int
    active_params: int  # parameters a single token's forward touches
    flops_per_token: int  # forward FLOPs per token


def dense_twin_width(cfg: MoEConfig, match: str) -> int:
    """Hidden width of the dense MLP matched to an MoE layer.

    `active`: k*f + shared width (same per-token compute as the MoE);
    `total`:  E*f + shared width (same parameter count as the MoE, router aside).
    """
    check_choice("twin.match", match, TWIN_MATCHES)
    shared = cfg.num_shared_experts * cfg.routed_width
    experts = cfg.routed_top_k if match == "active" else cfg.routed_experts
    return experts * cfg.routed_width + shared


def _count(module: nn.Module | ExpertsBackend | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def layer_size(layer: nn.Module) -> LayerSize:
    """Total and active parameters and forward FLOPs/token of a DenseMLP or an MoE layer (any experts backend)."""
    if isinstance(layer, DenseMLP):
        n = _count(layer)
        return LayerSize(n, n, 2 * n)
    if isinstance(layer, MoELayer):
        experts = _count(layer.experts)
        per_expert = experts // layer.num_experts
        # Expert choice gives each token k experts on average (capacity factor 1).
        routed_active = layer.top_k * per_expert
        always = _count(layer.router) + _count(layer.shared)
        return LayerSize(experts + always, routed_active + always, 2 * (routed_active + always))
    raise TypeError(f"layer_size expects a DenseMLP or MoELayer, got {type(layer).__name__}")
