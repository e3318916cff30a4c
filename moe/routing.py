"""The routing record: what every router returns, and what a fixed router may key on.

Every router (`moe.routers`) returns a `Routing`. Experts, losses and the analysis recorder consume
that record; nothing downstream re-derives routing decisions from logits. Fixed routers key on
`RouteKeys` (the token id, the previous token, the domain label) instead of the hidden state.
Shapes follow the legend of `moe/__init__.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RouteKeys:
    """What a fixed router may key on, aligned element for element (shape [B, S], or [T] flattened).

    token_ids:    the input token ids.
    previous_ids: the previous token of each in its sequence, -1 at a sequence start.
    domain:       the domain label of each token (index into the corpus' domains), or None when the
                  caller has none; only `router=domain` (the positive control) reads it.
    """

    token_ids: Tensor
    previous_ids: Tensor
    domain: Tensor | None = None

    @classmethod
    def from_tokens(cls, token_ids: Tensor, domain: Tensor | None = None) -> RouteKeys:
        """Keys of token ids [B, S] (or one sequence [S]); previous tokens shift along the last dim."""
        previous = torch.full_like(token_ids, -1)
        previous[..., 1:] = token_ids[..., :-1]
        return cls(token_ids, previous, domain)

    def flat(self) -> RouteKeys:
        """The keys flattened to [T], the layout of the router's input x_TD."""
        return RouteKeys(
            self.token_ids.reshape(-1),
            self.previous_ids.reshape(-1),
            None if self.domain is None else self.domain.reshape(-1),
        )


def as_route_keys(keys: RouteKeys | Tensor | None) -> RouteKeys | None:
    """`RouteKeys`, or token ids [B, S] / [T] taken as such (previous tokens along the last dim)."""
    return RouteKeys.from_tokens(keys) if isinstance(keys, Tensor) else keys


@dataclass(frozen=True)
class Routing:
    """One router's decisions for T tokens.

    Attributes:
        indices: [T, K] int64, the experts each token is sent to, distinct within a token.
        weights: [T, K] float32 gate weights (>= 0) used to combine expert outputs.
        logits:  [T, E] float32 raw router scores (input of the z-loss).
        probs:   [T, E] float32 router distribution used by the load-balancing loss.
        kept:    [T, K] bool, False where an assignment was dropped by expert capacity or a
                 knocked-out expert; dropped assignments contribute nothing (the token passes
                 through the residual for that slot). All True for dropless routing.
    """

    indices: Tensor
    weights: Tensor
    logits: Tensor
    probs: Tensor
    kept: Tensor

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]

    def selected_counts(self) -> Tensor:
        """[E] int64 assignments per expert as the router selected them, over all K slots (before
        capacity or knockout drops): an expert's *load*, what the balancing losses and the
        aux-loss-free bias see."""
        return torch.bincount(self.indices.reshape(-1), minlength=self.num_experts)

    def kept_counts(self) -> Tensor:
        """[E] int64 kept assignments per expert: the rows each expert actually computes."""
        return torch.bincount(self.indices[self.kept], minlength=self.num_experts)

    def num_dropped(self) -> int:
        return int((~self.kept).sum())


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * T * K / E)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_mask(indices: Tensor, weights: Tensor, num_experts: int, capacity: int) -> Tensor:
    """[T, K] bool: keep at most `capacity` assignments per expert, dropping the lowest gates first.

    Ties are broken by token position (earlier tokens win) so the result is deterministic.
    """
    flat_e = indices.reshape(-1)
    flat_w = weights.reshape(-1).detach()
    # Stable sorts: by descending weight first, then by expert, so within one expert the
    # assignments are ordered by weight and, among equal weights, by position.
    by_weight = torch.sort(-flat_w, stable=True).indices
    by_expert = torch.sort(flat_e[by_weight], stable=True).indices
    order = by_weight[by_expert]
    counts = torch.bincount(flat_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
    kept = torch.empty_like(flat_e, dtype=torch.bool)
    kept[order] = rank_in_expert < capacity
    return kept.view_as(indices)
