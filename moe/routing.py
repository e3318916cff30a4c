"""Routers: score experts for each token and return one typed routing record.

Shape legend (shared by every module in `moe/`):
    T tokens (batch x sequence, flattened)   D model dim   F expert hidden dim
    E experts   K experts per token (top-k)  A kept (token, expert) assignments
    L MoE layers (recorder)

Every router returns a `Routing`. Experts, losses and the analysis recorder consume that record;
nothing downstream re-derives routing decisions from logits. Fixed routers key on `RouteKeys` (the
token id, the previous token, the domain label) instead of the hidden state.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUTER_KINDS = ("topk", "switch", "expert_choice", "sigmoid", "hash", "random", "prev_hash", "domain")


@dataclass
class RouterConfig:
    """How tokens pick experts (Hydra group `router`)."""

    kind: str = "topk"
    # Renormalize the k selected weights to sum to 1 (Mixtral/Qwen); off in OLMoE and Switch.
    renormalize: bool = True
    # Multiplicative input noise U(1-eps, 1+eps) during training (Switch Transformer); 0 = off.
    jitter: float = 0.0
    # Aux-loss-free balancing (DeepSeek-V3): step size u of `b += u * sign(mean_load - load)`.
    bias_update_rate: float = 1e-3
    # Seed of the fixed `hash` / `prev_hash` routing tables (a pure function of the key for a given seed).
    hash_seed: int = 0


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
    def from_tokens(cls, token_ids: Tensor, domain: Tensor | None = None) -> "RouteKeys":
        """Keys of token ids [B, S] (or one sequence [S]); previous tokens shift along the last dim."""
        previous = torch.full_like(token_ids, -1)
        previous[..., 1:] = token_ids[..., :-1]
        return cls(token_ids, previous, domain)

    def flat(self) -> "RouteKeys":
        """The keys flattened to [T], the layout of the router's input x_TD."""
        return RouteKeys(self.token_ids.reshape(-1), self.previous_ids.reshape(-1),
                         None if self.domain is None else self.domain.reshape(-1))


def as_route_keys(keys: "RouteKeys | Tensor | None") -> "RouteKeys | None":
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

    def expert_counts(self) -> Tensor:
        """[E] int64 number of kept assignments per expert."""
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


class Router(nn.Module):
    """Base class: subclasses implement `route(x_TD, keys_T) -> Routing` (keys flattened to [T]).

    Holds what every router shares: the expert mask used by knockouts (a masked expert is never
    selected; learned routers re-route its tokens) and the optional capacity.
    """

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

    def _masked(self, scores_TE: Tensor) -> Tensor:
        if bool(self.expert_mask.all()):
            return scores_TE
        return scores_TE.masked_fill(~self.expert_mask, float("-inf"))


class LearnedRouter(Router):
    """A linear gate W [E, D] computed in float32 even under bf16 autocast."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None,
                 jitter: float = 0.0):
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


class TopKRouter(LearnedRouter):
    """Softmax over experts, then top-k (Mixtral, OLMoE, Qwen-MoE). With k=1 and no
    renormalization this is the Switch router: the weight is the chosen expert's probability."""

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


class SigmoidBiasRouter(LearnedRouter):
    """DeepSeek-V3 gating: scores s = sigmoid(logits); select top-k of s + b, weight by s.

    The bias b [E] is a buffer, not a parameter: it changes only through
    `moe.balance.update_expert_bias` after each optimizer step (aux-loss-free balancing), and it
    never changes a weight's value, only which experts are selected. `probs` is s normalized over
    experts (the form DeepSeek-V3's complementary sequence-wise loss uses).
    """

    def __init__(self, *args, renormalize: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.renormalize = renormalize
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


class ExpertChoiceRouter(LearnedRouter):
    """Expert choice (Zhou et al. 2022): each expert picks its top-C tokens, C = T*k*cf/E.

    A token may get 0..E experts, so the record has K = E slots (slot e = expert e) and `kept`
    marks the experts that chose the token. Selection looks across the whole batch, so in a causal
    LM a token's routing depends on future tokens: a leak, warned about at construction.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None,
                 jitter: float = 0.0):
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
        capacity = min(num_tokens, expert_capacity(num_tokens, self.top_k, self.num_experts,
                                                   self.choice_capacity_factor))
        chosen_EC = torch.topk(probs.t(), capacity, dim=-1).indices
        kept = torch.zeros(num_tokens, self.num_experts, dtype=torch.bool, device=x_TD.device)
        kept[chosen_EC, torch.arange(self.num_experts, device=x_TD.device)[:, None]] = True
        kept &= self.expert_mask
        indices = torch.arange(self.num_experts, device=x_TD.device).expand(num_tokens, -1)
        weights = torch.where(kept, probs, torch.zeros_like(probs))
        return Routing(indices.contiguous(), weights, logits, probs, kept)


class FixedRouter(Router):
    """Base of the two controls: routing that cannot depend on the domain through learning.

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


class HashRouter(FixedRouter):
    """Hash layers (Roller et al. 2021): expert j of token v is (h(v) + j) mod E, h a fixed
    integer hash; a pure function of the token id, so I(D;E|token) = 0 by construction.

    With `key="previous"` (router=prev_hash) the hash is of the previous token instead (a fixed
    value at a sequence start): a domain-blind router that uses the context, the sweep's control
    that the held-out I(D;E|token) must not mistake for domain specialization."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None,
                 seed: int = 0, key: str = "token"):
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


class DomainRouter(FixedRouter):
    """The positive control (DEMix layers, Gururangan et al. 2022): domain d's tokens go to its own
    fixed experts, expert j of a domain-d token being (d * k + j) mod E, so with D * k <= E every
    domain owns k experts no other domain uses. Reads the domain label at training and evaluation
    time; a router that cannot be anything but a domain specialist."""

    def route(self, x_TD: Tensor, keys_T: RouteKeys | None) -> Routing:
        if keys_T is None or keys_T.domain is None:
            raise ValueError("router=domain routes by the domain label: call the model with the batch's "
                             "domain labels (model(tokens, targets, domain))")
        offsets = torch.arange(self.top_k, device=keys_T.domain.device)
        return self._record((keys_T.domain.long()[:, None] * self.top_k + offsets) % self.num_experts)


def hash_token_ids(token_ids: Tensor, seed: int = 0) -> Tensor:
    """[T] int64 -> [T] int64 in [0, 2^32): a fixed integer mix (xorshift-multiply) of the id."""
    mask = 0xFFFFFFFF
    h = (token_ids.long() + seed * 0x9E3779B1) & mask
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    return h ^ (h >> 16)


class RandomRouter(FixedRouter):
    """Uniform random routing: each token gets k distinct experts drawn uniformly, every forward.
    Balanced in expectation (each expert receives T*k/E assignments on average)."""

    def route(self, x_TD: Tensor, keys_T: RouteKeys | None) -> Routing:
        noise = torch.rand(x_TD.shape[0], self.num_experts, device=x_TD.device)
        return self._record(torch.topk(noise, self.top_k, dim=-1).indices)


def build_router(cfg: RouterConfig, d_model: int, num_experts: int, top_k: int,
                 capacity_factor: float | None) -> Router:
    """Instantiate the router named by `cfg.kind` (one of ROUTER_KINDS)."""
    common = (d_model, num_experts, top_k, capacity_factor)
    if cfg.kind == "topk":
        return TopKRouter(*common, jitter=cfg.jitter, renormalize=cfg.renormalize)
    if cfg.kind == "switch":
        if top_k != 1:
            raise ValueError(f"router=switch routes each token to one expert; got model.moe.top_k={top_k}. "
                             "Set model.moe.top_k=1 or use router=topk.")
        return TopKRouter(*common, jitter=cfg.jitter, renormalize=False)
    if cfg.kind == "expert_choice":
        return ExpertChoiceRouter(*common, jitter=cfg.jitter)
    if cfg.kind == "sigmoid":
        return SigmoidBiasRouter(*common, jitter=cfg.jitter, renormalize=cfg.renormalize)
    if cfg.kind == "hash":
        return HashRouter(*common, seed=cfg.hash_seed)
    if cfg.kind == "prev_hash":
        return HashRouter(*common, seed=cfg.hash_seed, key="previous")
    if cfg.kind == "domain":
        return DomainRouter(*common)
    if cfg.kind == "random":
        return RandomRouter(*common)
    raise ValueError(f"router.kind={cfg.kind!r} is unknown; allowed values: {', '.join(ROUTER_KINDS)}")
