"""Knockouts: remove one expert (or a group of the dense twin's hidden units) at evaluation and
measure how much each domain's next-token loss rises, with a standard error.

Legend as in `moe/__init__.py`: L MoE layers, G domains, E experts, U units (experts or dense
groups), N evaluated tokens; the dense FFN's width (`hidden`) is spelled out.

One intervention for every router, and its match in the dense control (`INTERVENTIONS`):
- expert (`expert_dropped`): every assignment of a token to expert e in layer l is dropped (marked
  not kept in the layer's `Routing` record by a router forward hook). The token keeps its other
  experts' outputs, with their gates unchanged (not renormalized), and the residual; no token is
  re-routed to another expert. The same for learned, hash, random and expert-choice routers.
- dense group (`hidden_units_zeroed`): a random group of the dense FFN's hidden units is removed
  for every token (its `w_out` rows zeroed, exactly as zeroing those hidden activations). Groups
  are drawn per layer with a seeded rng, in a few sizes around hidden/E units with replicates
  (`dense_groups`), so their damages span the experts'; nothing is pooled across layers.

Damage is paired: the per-token loss with the unit removed minus the intact loss on the same
tokens (random routers draw the same routing in both passes: each pass starts from the same torch
seed), averaged per domain, with a document-cluster-robust standard error
(`analysis.knockout_stats.cluster_mean_se`): damage, damage_se [L, G, U] nats.

- `expert_knockouts`: damage [L, G, E] of dropping each expert.
- `dense_group_knockouts`: the control, damage [L, G, U] of zeroing each of U random groups.
- `top1_knockouts`: drop each token's own highest-gate expert in one layer: damage [L, G].
- Statistics (pure numpy, in `analysis.knockout_stats`; import them from there): `corrected_cv`,
  `cv_lower_bound`, `heterogeneity`, `matched_comparison` (experts against dense groups of the same
  layer at matched damage), `simulate_damage`.

Also here: `expert_masked` (masks the router logit, so learned routers re-route the expert's tokens
and fixed ones drop them; used to check the Hugging Face adapters' masks, not for knockouts) and,
in `analysis.knockout_stats`, the old `selectivity` (max - mean) / mean, which drifts with the size
of the damage and is kept to show that drift in docs/calibration.md.

Every context manager restores the model on exit, also when the forward raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from analysis.knockout_stats import cluster_mean_se
from analysis.progress import progress
from moe.data.batch import Batch
from moe.experts import DenseMLP
from moe.model import LanguageModel, LMOutput
from moe.modes import eval_mode
from moe.protocols import RoutedLayer, RoutedModel, moe_block_indices
from moe.routing import RouteKeys, Routing
from moe.validation import check_choice

__all__ = [
    "CLUSTERS",
    "INTERVENTIONS",
    "KnockoutResult",
    "dense_group_knockouts",
    "dense_groups",
    "domain_losses",
    "expert_dropped",
    "expert_knockouts",
    "expert_masked",
    "hidden_units_zeroed",
    "knockout_cost",
    "token_losses",
    "top1_dropped",
    "top1_knockouts",
]

INTERVENTIONS = {
    "expert": (
        "drop: every assignment of a token to the expert is marked not kept in the layer's routing "
        "record, so the token keeps its other experts (gates not renormalized) and the residual; "
        "no token is re-routed; the same for every router (learned, hash, random, expert choice)"
    ),
    "dense_group": (
        "zero: a random group of the dense FFN's hidden units (seeded, per layer) is removed for "
        "every token (w_out rows zeroed, as zeroing those hidden activations)"
    ),
    "top1": (
        "drop: each token's own highest-gate kept assignment in the layer is marked not kept; the token "
        "keeps its other experts and the residual"
    ),
}

CLUSTERS = ("doc", "row")


@dataclass(frozen=True)
class KnockoutResult:
    """Loss increases from knocking out units, paired on the same tokens.

    base_loss [G]: mean next-token loss per domain (nats) of the intact model on the evaluated tokens.
    damage [L, G, U] (experts, dense groups) or [L, G] (top-1): per-domain mean of the per-token
    loss with the unit removed minus the intact loss (nats; negative when removal helps).
    damage_se: its cluster-robust standard error, same shape (nats; clusters: documents, or rows).
    tokens [G], clusters [G]: evaluated tokens and clusters per domain.
    blocks: the block index of each of the L layers.
    kind: "expert", "dense_group" or "top1"; intervention: the sentence of
    `INTERVENTIONS` saying what was removed (for the report).
    groups: dense groups only, groups[l][g] the hidden-unit indices of group g of layer l (int64);
    group_size [L, U]: their sizes (hidden units), None otherwise.
    """

    base_loss: np.ndarray
    damage: np.ndarray
    damage_se: np.ndarray
    tokens: np.ndarray
    clusters: np.ndarray
    blocks: list[int]
    kind: str
    intervention: str
    groups: list[list[np.ndarray]] | None = None
    group_size: np.ndarray | None = None


# ----------------------------------------------------------------------------- evaluation
def _device(model: RoutedModel) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _caller_rng_kept(device: torch.device) -> Iterator[None]:
    """The torch RNG states (CPU and, on CUDA, every device: manual_seed seeds them all) as they were
    before, restored on exit."""
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Every evaluation pass starts from the same torch RNG state (random routers then draw the
    same routing in the intact and the knocked-out pass); the caller's RNG state is restored."""
    with _caller_rng_kept(device):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def domain_losses(model: RoutedModel, batches: Sequence[Batch], num_domains: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean next-token loss per domain (nats) [G] and tokens per domain [G] of `model` over
    `batches` in eval mode (restored after); a batch may mix domains; nan for domains without tokens."""
    device = _device(model)
    total = torch.zeros(num_domains, dtype=torch.float64, device=device)
    count = torch.zeros(num_domains, dtype=torch.float64, device=device)
    with eval_mode(model):
        for batch in batches:
            batch = batch.to(device)
            loss = _flat_losses(model(batch.tokens, batch.targets, batch.domain))
            dom = batch.domain.reshape(-1)
            total.index_add_(0, dom, loss)
            count.index_add_(0, dom, torch.ones_like(loss))
    total_G, count_G = total.cpu().numpy(), count.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count_G > 0, total_G / np.maximum(count_G, 1), np.nan), count_G.astype(np.int64)


@torch.no_grad()
def token_losses(model: RoutedModel, batches: Sequence[Batch], *, seed: int = 0) -> np.ndarray:
    """Per-token next-token loss (nats) [N] of `model` over `batches`, in batch then row-major
    order, float64; eval mode (restored after), torch RNG seeded with `seed` (restored after)."""
    device = _device(model)
    out = []
    with eval_mode(model), _seeded(seed, device):
        for batch in batches:
            batch = batch.to(device)
            out.append(_flat_losses(model(batch.tokens, batch.targets, batch.domain)))
    return _concat_losses(out)


def _flat_losses(out: LMOutput) -> torch.Tensor:
    """A forward's per-token losses [B, S] as one float64 row [B*S]."""
    return out.require_token_loss().reshape(-1).double()


def _concat_losses(parts: list[torch.Tensor]) -> np.ndarray:
    """Per-batch token losses [B*S] -> one float64 array [N] (empty for no batches)."""
    return torch.cat(parts).cpu().numpy() if parts else np.zeros(0)


def _labels(batches: Sequence[Batch], cluster: str) -> tuple[np.ndarray, np.ndarray]:
    """Domain [N] and cluster id [N] of the evaluated tokens (order of `token_losses`)."""
    check_choice("cluster", cluster, CLUSTERS)
    if not batches:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    domain = np.concatenate([b.domain.reshape(-1).cpu().numpy() for b in batches]).astype(np.int64)
    if cluster == "doc":
        ids = np.concatenate([b.doc.reshape(-1).cpu().numpy() for b in batches]).astype(np.int64)
    else:
        rows_ids, start = [], 0
        for b in batches:
            rows, seq = b.tokens.shape
            rows_ids.append(np.repeat(np.arange(start, start + rows), seq))
            start += rows
        ids = np.concatenate(rows_ids).astype(np.int64)
    return domain, ids


@dataclass(frozen=True)
class _BlockEntry:
    """What one batch carries into block `block` of an intact pass: the hidden state [B, S, D],
    the routing keys, the targets and the torch RNG state(s) at that point."""

    block: int
    x: torch.Tensor
    keys: RouteKeys
    targets: torch.Tensor
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_states(entry: _BlockEntry, device: torch.device) -> None:
    torch.set_rng_state(entry.rng)
    if entry.cuda_rng is not None:
        torch.cuda.set_rng_state(entry.cuda_rng, device)


class _Paired:
    """Intact per-token losses of one evaluation stream, and the damage of interventions on it.

    An intervention in block b leaves blocks before b as they were, so for the package's
    `LanguageModel` the damage pass starts at block b from the hidden states an intact pass carried
    into it (with the RNG state there, so random routers draw what a full pass draws): the same
    operations on the same inputs, a fraction of the cost. Block 0's entries and those of the block
    being knocked out are kept (knockouts go block by block, each block's entries advanced from the
    previous one's). Other models (the Hugging Face adapters) run the whole forward.
    """

    def __init__(self, model: RoutedModel, batches: Sequence[Batch], num_domains: int, cluster: str, seed: int):
        self.model, self.batches, self.num_domains, self.seed = model, batches, num_domains, seed
        self.domain, self.cluster = _labels(batches, cluster)
        self._first: list[_BlockEntry] = []  # entries into block 0 (LanguageModel only)
        if isinstance(model, LanguageModel):
            self.base = self._intact_pass(model)
        else:
            self.base = token_losses(model, batches, seed=seed)
        self._entries = self._first
        intact = cluster_mean_se(self.base, self.domain, self.cluster, num_domains)
        self.base_loss, self.tokens, self.clusters = intact.mean, intact.tokens, intact.clusters

    def damage(self, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(damage [G], se [G]) of the model as it is now against the intact pass; `block`: the
        first block the intervention changes (None: unknown, the whole forward runs)."""
        if block is None or not isinstance(self.model, LanguageModel):
            losses = token_losses(self.model, self.batches, seed=self.seed)
        else:
            losses = self._losses_from(self.model, block)
        res = cluster_mean_se(losses - self.base, self.domain, self.cluster, self.num_domains)
        return res.mean, res.se

    @torch.no_grad()
    def _intact_pass(self, model: LanguageModel) -> np.ndarray:
        """`token_losses` of the intact model, keeping each batch's entry into block 0 (the RNG
        state included: a random router's draws continue from batch to batch within a pass)."""
        device = _device(model)
        out = []
        with eval_mode(model), _seeded(self.seed, device):
            for batch in self.batches:
                batch = batch.to(device)
                x, keys = model.embed_tokens(batch.tokens, batch.domain)
                self._first.append(_BlockEntry(0, x, keys, batch.targets, *_rng_states(device)))
                out.append(_flat_losses(model.forward_from(0, x, keys, batch.targets)))
        return _concat_losses(out)

    @torch.no_grad()
    def _entries_at(self, model: LanguageModel, block: int) -> list[_BlockEntry]:
        """The batches' entries into `block` of the intact pass, advanced from the kept ones (the
        intervention lies in `block` or after it, so the blocks run here are intact)."""
        if not self._entries or self._entries[0].block > block:
            self._entries = self._first
        if self._entries and self._entries[0].block < block:
            device = _device(model)
            with eval_mode(model), _caller_rng_kept(device):
                advanced = []
                for e in self._entries:
                    _set_rng_states(e, device)
                    x, _ = model.run_blocks(e.block, block, e.x, e.keys)
                    advanced.append(_BlockEntry(block, x, e.keys, e.targets, *_rng_states(device)))
            self._entries = advanced
        return self._entries

    @torch.no_grad()
    def _losses_from(self, model: LanguageModel, block: int) -> np.ndarray:
        """Per-token losses [N] (as `token_losses`) of a pass that starts at `block` from the intact entries."""
        device = _device(model)
        entries = self._entries_at(model, block)
        out = []
        with eval_mode(model), _caller_rng_kept(device):
            for e in entries:
                _set_rng_states(e, device)
                out.append(_flat_losses(model.forward_from(block, e.x, e.keys, e.targets)))
        return _concat_losses(out)


def knockout_cost(n_blocks: int, knocked: Sequence[int], units: int, resumes: bool) -> tuple[int, int]:
    """(forward passes, block evaluations) per batch of one knockout table: the intact pass and
    `units` interventions in each block of `knocked` (depth indices, increasing). `resumes`: the
    model is a `LanguageModel`, whose damage passes start at the knocked block (`_Paired`): each
    costs n_blocks - b blocks, plus advancing the intact entries up to the last knocked block once;
    otherwise every pass runs all n_blocks."""
    passes = 1 + units * len(knocked)
    if not resumes:
        return passes, passes * n_blocks
    return passes, n_blocks + sum(units * (n_blocks - b) for b in knocked) + (max(knocked) if knocked else 0)


# ----------------------------------------------------------------------------- interventions
def _without_experts(routing: Routing, experts: torch.Tensor) -> Routing:
    """The routing with every slot assigned to one of `experts` marked not kept."""
    drop = torch.isin(routing.indices, experts.to(routing.indices.device))
    return dataclasses.replace(routing, kept=routing.kept & ~drop)


@contextmanager
def expert_dropped(layer: RoutedLayer, experts: int | Sequence[int]) -> Iterator[None]:
    """Drop every assignment to `experts` in `layer` (a router forward hook marks those slots not
    kept in the `Routing` record): each token keeps its other experts, with unchanged gates, and the
    residual; nothing is re-routed, for every router kind. Removed on exit."""
    ids = torch.as_tensor(experts, dtype=torch.long).reshape(-1)
    handle = layer.router.register_forward_hook(lambda module, args, routing: _without_experts(routing, ids))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def expert_masked(layer: RoutedLayer, experts: int | Sequence[int]) -> Iterator[None]:
    """Legacy: mask `experts` in `layer`'s router (`expert_mask[e] = False`; learned routers
    re-route their tokens, fixed routers drop them) and restore the mask on exit. The knockout
    functions use `expert_dropped`."""
    mask = layer.router.expert_mask
    saved = mask.clone()
    try:
        mask[torch.as_tensor(experts, dtype=torch.long, device=mask.device)] = False
        yield
    finally:
        mask.copy_(saved)


def _unit_index(units: slice | Sequence[int] | np.ndarray | torch.Tensor, device: torch.device):
    if isinstance(units, slice):
        return units
    return torch.as_tensor(np.asarray(units, dtype=np.int64), device=device)


@contextmanager
def hidden_units_zeroed(mlp: DenseMLP, units: slice | Sequence[int] | np.ndarray) -> Iterator[None]:
    """Zero the output rows `w_out[units]` of a dense MLP (a slice or hidden-unit indices), which
    removes exactly those hidden units' contribution (as zeroing h[..., units] would, for SwiGLU
    and GELU alike); restored on exit."""
    w_out = mlp.w_out
    index = _unit_index(units, w_out.device)
    saved = w_out.detach()[index].clone()
    try:
        with torch.no_grad():
            w_out[index] = 0
        yield
    finally:
        with torch.no_grad():
            w_out[index] = saved


def dense_groups(
    hidden: int,
    num_experts: int,
    *,
    size_factors: Sequence[float] = (0.5, 1.0, 2.0),
    replicates: int = 8,
    rng: np.random.Generator | int | None = 0,
) -> list[np.ndarray]:
    """Random groups of hidden units of a dense FFN of width `hidden`.

    For each factor a (in order) `replicates` groups of round(a * hidden / E) units (at least 1, at
    most hidden), each drawn without replacement, independently of the others; returns the sorted
    int64 unit indices of len(size_factors) * replicates groups (a size capped at hidden has one
    possible group, so its replicates are identical: keep factors below E). hidden / E units removed
    from every token match the average FFN width one expert knockout removes per token (k experts of width hidden/k
    serve each token of an active-matched twin, and a token uses a given expert with probability k/E).
    """
    if hidden < 1 or num_experts < 1 or replicates < 1 or not size_factors:
        raise ValueError("hidden, num_experts and replicates must be >= 1 and size_factors non-empty")
    if any(not a > 0 for a in size_factors):
        raise ValueError(f"size_factors {list(size_factors)} must be > 0")
    rng = np.random.default_rng(rng)
    groups = []
    for a in size_factors:
        size = int(min(hidden, max(1, round(a * hidden / num_experts))))
        for _ in range(replicates):
            groups.append(np.sort(rng.choice(hidden, size=size, replace=False)).astype(np.int64))
    return groups


def _drop_top1(routing: Routing) -> Routing:
    """The routing with each token's highest-gate kept slot marked not kept."""
    slot = routing.weights.masked_fill(~routing.kept, float("-inf")).argmax(dim=-1, keepdim=True)
    top1 = torch.zeros_like(routing.kept).scatter_(1, slot, True)
    return dataclasses.replace(routing, kept=routing.kept & ~top1)


@contextmanager
def top1_dropped(layer: RoutedLayer) -> Iterator[None]:
    """Drop each token's own top-1 expert in `layer` (a router forward hook rewrites the `Routing`
    so that slot is not kept: the token keeps its other experts and the residual); removed on exit."""
    handle = layer.router.register_forward_hook(lambda module, args, routing: _drop_top1(routing))
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- damage matrices
def _dense_mlps(dense_model: LanguageModel, blocks: Sequence[int]) -> list[DenseMLP]:
    mlps = []
    for b in blocks:
        mlp = dense_model.blocks[b].ffn
        if not isinstance(mlp, DenseMLP):
            raise TypeError(f"block {b} of the dense twin holds a {type(mlp).__name__}, not a DenseMLP")
        mlps.append(mlp)
    return mlps


def expert_knockouts(
    model: RoutedModel, batches: Sequence[Batch], num_domains: int, *, cluster: str = "doc", seed: int = 0
) -> KnockoutResult:
    """Damage and its se [L, G, E] (nats) of dropping expert e of MoE layer l (`expert_dropped`:
    its assignments are removed, the tokens keep their other experts and the residual, nothing is
    re-routed, for every router kind).

    One evaluation of `batches` per (layer, expert) plus one intact; eval mode, no grad, each pass
    from torch seed `seed`. cluster: "doc" (document ids of `Batch.doc`) or "row" (sequence rows)
    as the clusters of the standard error.
    """
    blocks = moe_block_indices(model)
    with eval_mode(model):
        paired = _Paired(model, batches, num_domains, cluster, seed)
        layers = model.moe_layers
        shape = (len(layers), num_domains, layers[0].router.num_experts)
        damage, se = np.empty(shape), np.empty(shape)
        pairs = [(l, e) for l, layer in enumerate(layers) for e in range(layer.router.num_experts)]
        for l, e in progress(pairs, desc="expert knockouts"):
            with expert_dropped(layers[l], e):
                damage[l, :, e], se[l, :, e] = paired.damage(blocks[l])
    return KnockoutResult(
        paired.base_loss, damage, se, paired.tokens, paired.clusters, blocks, "expert", INTERVENTIONS["expert"]
    )


def dense_group_knockouts(
    dense_model: LanguageModel,
    batches: Sequence[Batch],
    num_domains: int,
    *,
    blocks: Sequence[int],
    num_experts: int,
    size_factors: Sequence[float] = (0.5, 1.0, 2.0),
    replicates: int = 8,
    seed: int = 0,
    cluster: str = "doc",
) -> KnockoutResult:
    """The control: damage and its se [L, G, U] (nats) of zeroing random group u of the hidden
    units of the dense FFN in block `blocks[l]` of the twin, for every token (`hidden_units_zeroed`).

    Groups per layer from `dense_groups(hidden, num_experts, size_factors=..., replicates=...)`, with
    the rng seeded by (seed, block), so U = len(size_factors) * replicates and a layer's groups do
    not depend on which other layers are evaluated. `KnockoutResult.groups` holds the unit indices,
    `group_size` [L, U] their sizes. Compare each layer with the same MoE layer only
    (`matched_comparison`); sizes around hidden/E (`num_experts`: the MoE's routed experts) make the
    damages span the experts'. One evaluation per group plus one intact; cluster, seed as in
    `expert_knockouts`.
    """
    mlps = _dense_mlps(dense_model, blocks)
    groups = [
        dense_groups(
            mlp.w_out.shape[0],
            num_experts,
            size_factors=size_factors,
            replicates=replicates,
            rng=np.random.default_rng([seed, b]),
        )
        for b, mlp in zip(blocks, mlps)
    ]
    with eval_mode(dense_model):
        paired = _Paired(dense_model, batches, num_domains, cluster, seed)
        shape = (len(mlps), num_domains, len(groups[0]) if groups else 0)
        damage, se = np.empty(shape), np.empty(shape)
        pairs = [(l, g) for l in range(len(mlps)) for g in range(len(groups[l]))]
        for l, g in progress(pairs, desc="dense group knockouts"):
            with hidden_units_zeroed(mlps[l], groups[l][g]):
                damage[l, :, g], se[l, :, g] = paired.damage(blocks[l])
    sizes = np.array([[u.size for u in layer] for layer in groups], dtype=np.int64).reshape(len(mlps), -1)
    return KnockoutResult(
        paired.base_loss,
        damage,
        se,
        paired.tokens,
        paired.clusters,
        list(blocks),
        "dense_group",
        INTERVENTIONS["dense_group"],
        groups,
        sizes,
    )


def top1_knockouts(
    model: RoutedModel, batches: Sequence[Batch], num_domains: int, *, cluster: str = "doc", seed: int = 0
) -> KnockoutResult:
    """Damage and se [L, G] (nats) when every token loses its own top-1 expert in layer l
    (`top1_dropped`); cluster, seed as in `expert_knockouts`."""
    blocks = moe_block_indices(model)
    with eval_mode(model):
        paired = _Paired(model, batches, num_domains, cluster, seed)
        damage, se = np.empty((len(blocks), num_domains)), np.empty((len(blocks), num_domains))
        for l, layer in enumerate(progress(model.moe_layers, desc="top-1 knockouts")):
            with top1_dropped(layer):
                damage[l], se[l] = paired.damage(blocks[l])
    return KnockoutResult(
        paired.base_loss, damage, se, paired.tokens, paired.clusters, blocks, "top1", INTERVENTIONS["top1"]
    )
