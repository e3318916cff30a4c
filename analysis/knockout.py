"""Knockouts: remove one expert (or a matched slice of the dense twin) at evaluation and measure
how much each domain's next-token loss rises.

Legend: L MoE layers, D domains, E experts, F hidden units of a dense FFN.

- `expert_knockouts`: for each MoE layer l and expert e, set `router.expert_mask[e] = False`
  (learned routers re-route the expert's tokens to their next choice; fixed routers, hash and
  random, drop those assignments) and record the per-domain loss increase: damage [L, D, E] nats.
- `dense_slice_knockouts`, the control: the same blocks of the dense twin, whose hidden width F is
  cut into E contiguous slices of hidden units; zeroing slice e's output rows (`w_out[slice]`,
  equivalent to zeroing those hidden activations) gives damage [L, D, E] for the twin.
- `top1_knockouts`: drop each token's own highest-gate expert in one layer (its slot marked not
  kept): damage [L, D].
- `selectivity`: how much an expert's damage concentrates on one domain, per expert; a specialist
  hurts one domain (selectivity 1), an ensemble member hurts all alike (0).

Every context manager restores the model on exit, also when the forward raises.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from moe.data.batch import Batch
from moe.experts import DenseMLP
from moe.layer import MoELayer
from moe.routing import Routing

__all__ = [
    "KnockoutResult",
    "dense_slice_knockouts",
    "domain_losses",
    "expert_knockouts",
    "expert_masked",
    "hidden_slice_zeroed",
    "hidden_slices",
    "selectivity",
    "top1_dropped",
    "top1_knockouts",
]


@dataclass(frozen=True)
class KnockoutResult:
    """Loss increases from knocking out units.

    base_loss [D]: mean next-token loss per domain (nats) of the intact model on the evaluated
    tokens; damage: [L, D, E] (experts or slices) or [L, D] (top-1) loss with the unit removed minus
    base_loss (nats; negative when removal helps); tokens [D]: evaluated tokens per domain;
    blocks: the block index of each of the L layers; kind: "expert", "dense_slice" or "top1".
    """

    base_loss: np.ndarray
    damage: np.ndarray
    tokens: np.ndarray
    blocks: list[int]
    kind: str


# ----------------------------------------------------------------------------- evaluation
@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def domain_losses(model: nn.Module, batches: Sequence[Batch], num_domains: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean next-token loss per domain (nats) [D] and tokens per domain [D] of `model` over
    `batches` in eval mode (restored after); a batch may mix domains; nan for domains without tokens."""
    device = next(model.parameters()).device
    total = torch.zeros(num_domains, dtype=torch.float64, device=device)
    count = torch.zeros(num_domains, dtype=torch.float64, device=device)
    with _eval_mode(model):
        for batch in batches:
            batch = batch.to(device)
            loss = model(batch.tokens, batch.targets).token_loss.reshape(-1).double()
            dom = batch.domain.reshape(-1)
            total.index_add_(0, dom, loss)
            count.index_add_(0, dom, torch.ones_like(loss))
    total, count = total.cpu().numpy(), count.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), count.astype(np.int64)


# ----------------------------------------------------------------------------- interventions
@contextmanager
def expert_masked(layer: MoELayer, experts: int | Sequence[int]) -> Iterator[None]:
    """Mask `experts` in `layer`'s router (`expert_mask[e] = False`) and restore the mask on exit."""
    mask = layer.router.expert_mask
    saved = mask.clone()
    try:
        mask[torch.as_tensor(experts, dtype=torch.long, device=mask.device)] = False
        yield
    finally:
        mask.copy_(saved)


def hidden_slices(hidden: int, num_slices: int) -> list[slice]:
    """Cut F hidden units into `num_slices` contiguous, near-equal slices (sizes differ by <= 1)."""
    if not 1 <= num_slices <= hidden:
        raise ValueError(f"cannot cut {hidden} hidden units into {num_slices} non-empty slices")
    edges = np.linspace(0, hidden, num_slices + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@contextmanager
def hidden_slice_zeroed(mlp: DenseMLP, units: slice) -> Iterator[None]:
    """Zero the output rows `w_out[units]` of a dense MLP, which removes exactly those hidden units'
    contribution (as zeroing h[..., units] would, for SwiGLU and GELU alike); restored on exit."""
    w_out = mlp.w_out
    saved = w_out.detach()[units].clone()
    try:
        with torch.no_grad():
            w_out[units] = 0
        yield
    finally:
        with torch.no_grad():
            w_out[units] = saved


def _drop_top1(routing: Routing) -> Routing:
    """The routing with each token's highest-gate kept slot marked not kept."""
    slot = routing.weights.masked_fill(~routing.kept, float("-inf")).argmax(dim=-1, keepdim=True)
    top1 = torch.zeros_like(routing.kept).scatter_(1, slot, True)
    return dataclasses.replace(routing, kept=routing.kept & ~top1)


@contextmanager
def top1_dropped(layer: MoELayer) -> Iterator[None]:
    """Drop each token's own top-1 expert in `layer` (a router forward hook rewrites the `Routing`
    so that slot is not kept: the token keeps its other experts and the residual); removed on exit."""
    handle = layer.router.register_forward_hook(lambda module, args, routing: _drop_top1(routing))
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- damage matrices
def _moe_blocks(model: nn.Module) -> list[int]:
    blocks = [i for i, b in enumerate(model.blocks) if getattr(b, "is_moe", False)]
    if not blocks:
        raise ValueError("the model has no MoE layer")
    return blocks


def expert_knockouts(model: nn.Module, batches: Sequence[Batch], num_domains: int) -> KnockoutResult:
    """Damage [L, D, E]: per-domain loss increase when expert e of MoE layer l is masked.

    One evaluation of `batches` per (layer, expert) plus one intact; eval mode, no grad.
    """
    blocks = _moe_blocks(model)
    with _eval_mode(model):
        base, tokens = domain_losses(model, batches, num_domains)
        layers = model.moe_layers
        damage = np.empty((len(layers), num_domains, layers[0].router.num_experts))
        for l, layer in enumerate(layers):
            for e in range(layer.router.num_experts):
                with expert_masked(layer, e):
                    damage[l, :, e] = domain_losses(model, batches, num_domains)[0] - base
    return KnockoutResult(base, damage, tokens, blocks, "expert")


def dense_slice_knockouts(dense_model: nn.Module, batches: Sequence[Batch], num_domains: int, *,
                          blocks: Sequence[int], num_slices: int) -> KnockoutResult:
    """Control damage [L, D, num_slices]: per-domain loss increase when slice s of the hidden units
    of the dense FFN in block `blocks[l]` of the twin is zeroed (`hidden_slices`)."""
    mlps = [dense_model.blocks[b].ffn for b in blocks]
    for b, mlp in zip(blocks, mlps):
        if not isinstance(mlp, DenseMLP):
            raise TypeError(f"block {b} of the dense twin holds a {type(mlp).__name__}, not a DenseMLP")
    with _eval_mode(dense_model):
        base, tokens = domain_losses(dense_model, batches, num_domains)
        damage = np.empty((len(mlps), num_domains, num_slices))
        for l, mlp in enumerate(mlps):
            for s, units in enumerate(hidden_slices(mlp.w_out.shape[0], num_slices)):
                with hidden_slice_zeroed(mlp, units):
                    damage[l, :, s] = domain_losses(dense_model, batches, num_domains)[0] - base
    return KnockoutResult(base, damage, tokens, list(blocks), "dense_slice")


def top1_knockouts(model: nn.Module, batches: Sequence[Batch], num_domains: int) -> KnockoutResult:
    """Damage [L, D]: per-domain loss increase when every token loses its own top-1 expert in layer l."""
    blocks = _moe_blocks(model)
    with _eval_mode(model):
        base, tokens = domain_losses(model, batches, num_domains)
        damage = np.empty((len(blocks), num_domains))
        for l, layer in enumerate(model.moe_layers):
            with top1_dropped(layer):
                damage[l] = domain_losses(model, batches, num_domains)[0] - base
    return KnockoutResult(base, damage, tokens, blocks, "top1")


def selectivity(damage: np.ndarray, min_damage: float = 1e-6) -> np.ndarray:
    """Domain selectivity of each unit's knockout, [..., E] from damage [..., D, E] (nats).

    With g = max(damage, 0) (a knockout that helps a domain counts as no damage):
    selectivity = (max_d g - mean_d g) / mean_d g / (D - 1), in [0, 1]. 0 when the unit hurts every
    domain equally (an ensemble member), 1 when it hurts a single domain (a specialist). nan when
    the mean damage is below `min_damage` nats (nothing to apportion) or D = 1. Finite-sample
    noise alone makes it positive: compare with the dense twin's slices, not with 0.
    """
    g = np.clip(np.asarray(damage, dtype=np.float64), 0.0, None)
    d = g.shape[-2]
    if d < 2:
        return np.full(g.shape[:-2] + g.shape[-1:], np.nan)
    mean = g.mean(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > min_damage, (g.max(axis=-2) - mean) / mean / (d - 1), np.nan)
