"""The controls: routers fixed by construction, whose specialization is known.

`hash` and `prev_hash` are domain-blind (a fixed hash of the token, or of the previous token),
`random` cannot specialize, and `domain` (the positive control) cannot be anything but a domain
specialist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe.routers.base import Router, RouterConfig
from moe.routers.registry import register_router
from moe.routing import RouteKeys, Routing


@dataclass
class HashRouterConfig(RouterConfig):
    # Seed of the fixed routing table (a pure function of the key for a given seed).
    hash_seed: int = 0

    def validate(self) -> None:
        if self.hash_seed < 0:
            raise ValueError(f"router.hash_seed={self.hash_seed} is out of range: it must be an integer >= 0")


class FixedRouter(Router):
    """Base of the controls: routing that cannot depend on the domain through learning.

    Weights are 1/k; logits are zero and probs uniform, so balancing losses are constant.
    A knocked-out expert's assignments are dropped (there is nothing to re-route by).
    """

    def _record(self, indices: Tensor) -> Routing:
        num_tokens = indices.shape[0]
        weights = torch.full(indices.shape, 1.0 / self.top_k, device=indices.device)
        logits = torch.zeros(num_tokens, self.num_experts, device=indices.device)
        probs = torch.full_like(logits, 1.0 / self.num_experts)
        kept = self.expert_mask[indices]
        return Routing(indices, weights, logits, probs, kept)


def hash_token_ids(token_ids: Tensor, seed: int = 0) -> Tensor:
    """[T] int64 -> [T] int64 in [0, 2^32): a fixed integer mix (xorshift-multiply) of the id."""
    mask = 0xFFFFFFFF
    h = (token_ids.long() + seed * 0x9E3779B1) & mask
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    return h ^ (h >> 16)


class HashRouter(FixedRouter):
    """Hash layers (Roller et al. 2021): expert j of token v is (h(v) + j) mod E, h a fixed
    integer hash; a pure function of the token id, so I(D;E|token) = 0 by construction.

    With `key="previous"` (router=prev_hash) the hash is of the previous token instead (a fixed
    value at a sequence start): a domain-blind router that uses the context, the sweep's control
    that the held-out I(D;E|token) must not mistake for domain specialization."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None,
        seed: int = 0,
        key: str = "token",
    ):
        super().__init__(d_model, num_experts, top_k, capacity_factor)
        if key not in ("token", "previous"):
            raise ValueError(f"HashRouter key must be 'token' or 'previous', got {key!r}")
        self.seed, self.key = seed, key

    def route(self, x_TD: Tensor, keys_T: RouteKeys | None) -> Routing:
        if keys_T is None:
            raise ValueError("a hash router needs the token ids; call the MoE layer with token ids or RouteKeys")
        ids = keys_T.token_ids if self.key == "token" else keys_T.previous_ids
        h = hash_token_ids(ids, self.seed)
        offsets = torch.arange(self.top_k, device=h.device)
        return self._record((h[:, None] + offsets) % self.num_experts)


class RandomRouter(FixedRouter):
    """Uniform random routing: each token gets k distinct experts drawn uniformly, every forward.
    Balanced in expectation (each expert receives T*k/E assignments on average)."""

    def route(self, x_TD: Tensor, keys_T: RouteKeys | None) -> Routing:
        noise = torch.rand(x_TD.shape[0], self.num_experts, device=x_TD.device)
        return self._record(torch.topk(noise, self.top_k, dim=-1).indices)


class DomainRouter(FixedRouter):
    """The positive control (DEMix layers, Gururangan et al. 2022): domain d's tokens go to its own
    fixed experts, expert j of a domain-d token being (d * k + j) mod E, so with D * k <= E every
    domain owns k experts no other domain uses. Reads the domain label at training and evaluation
    time; a router that cannot be anything but a domain specialist."""

    def route(self, x_TD: Tensor, keys_T: RouteKeys | None) -> Routing:
        if keys_T is None or keys_T.domain is None:
            raise ValueError(
                "router=domain routes by the domain label: call the model with the batch's "
                "domain labels (model(tokens, targets, domain))"
            )
        offsets = torch.arange(self.top_k, device=keys_T.domain.device)
        return self._record((keys_T.domain.long()[:, None] * self.top_k + offsets) % self.num_experts)


@register_router(
    "hash", HashRouterConfig, role="control", summary="a fixed hash of the token id (Hash Layers, Roller et al. 2021)"
)
def build_hash(
    cfg: HashRouterConfig, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> HashRouter:
    return HashRouter(d_model, num_experts, top_k, capacity_factor, seed=cfg.hash_seed)


@register_router("random", RouterConfig, role="control", summary="uniformly random experts on every forward")
def build_random(
    cfg: RouterConfig, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> RandomRouter:
    return RandomRouter(d_model, num_experts, top_k, capacity_factor)


@register_router(
    "prev_hash",
    HashRouterConfig,
    role="control",
    summary="a fixed hash of the previous token id (domain-blind, context-using)",
)
def build_prev_hash(
    cfg: HashRouterConfig, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> HashRouter:
    return HashRouter(d_model, num_experts, top_k, capacity_factor, seed=cfg.hash_seed, key="previous")


@register_router(
    "domain",
    RouterConfig,
    role="control",
    summary="each domain's own fixed experts, read from the domain label (DEMix; positive control)",
)
def build_domain(
    cfg: RouterConfig, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> DomainRouter:
    return DomainRouter(d_model, num_experts, top_k, capacity_factor)
