"""The routing counts of a recording: what `analysis.recorder` aggregates while a model runs.

Legend as in `moe/__init__.py`: L MoE layers, T tokens of one forward pass, N recorded tokens, K
slots per token (top-k; E for expert choice), E experts, G domains, V vocabulary, M documents.

`RoutingAccumulator` takes the L `Routing` records of one forward pass with the labels of its
tokens (`BatchContext`) and updates, per layer, the tables `LayerCounts` holds in the end. Only
*kept* assignments count (a capacity drop, a knocked-out hash expert, or an expert-choice slot the
expert did not choose is not a routing decision): the sparse token x domain x expert cube (token x
expert follows from it, and V = 50k never allocates V*G*E), the domain x expert table,
per-document expert counts (the unit of the document-level nulls), expert x expert co-selection,
top-1 load, consecutive-token agreement, router entropy and per-forward-pass loads; with
`keep_records`, also the raw per-token records (`analysis.records`).

Cost: the counts live on the routing's device and are updated once per forward pass, for all L
layers together, by fixed-shape tensor ops (`KeyCounter` for the keyed tables); nothing waits for
the device until they are read. `benchmarks/bench_recorder.py` measures the overhead over a plain
eval forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from analysis.information import DocCounts, TokenDomainExpertCounts
from analysis.records import LayerRecords
from moe.data.batch import Batch
from moe.routing import Routing

__all__ = ["BatchContext", "KeyCounter", "LayerCounts", "RoutingAccumulator"]

# Dense accumulators up to 2^22 cells (32 MiB of float64); beyond, only the observed keys are kept.
_DENSE_KEYS = 1 << 22
# The sparse accumulator merges its buffered keys once they exceed this many (or twice the table):
# 4M buffered keys hold 64 MiB and spare the device a sort (and a synchronization) per forward.
_SPARSE_FLUSH = 1 << 22


# ----------------------------------------------------------------------------- keyed sums
class KeyCounter:
    """Running sums of weights per non-negative int64 key, kept on one torch device.

    Dense (`index_add_` into a [size] vector) when `size` is known and at most 2^22, otherwise
    sparse: keys are buffered and merged with `torch.unique` once the buffer outgrows the table, so
    memory follows the number of distinct keys observed, not the key space (token x domain x expert
    with V = 50k), and the sorts cost O(N log N) in all. `add` never waits for the device (no
    data-dependent shapes); only a merge and `items` synchronize.
    """

    def __init__(self, size: int | None = None, device: torch.device | str = "cpu"):
        self.size = size
        self.device = torch.device(device)
        f64: dict[str, Any] = dict(dtype=torch.float64, device=self.device)  # torch factory kwargs
        self._dense = torch.zeros(size, **f64) if size is not None and size <= _DENSE_KEYS else None
        self._keys = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._sums = torch.zeros(0, **f64)
        self._buffer: list[tuple[Tensor, Tensor]] = []
        self._buffered = 0

    def add(self, keys: Tensor | np.ndarray, weights: Tensor | np.ndarray | None = None) -> None:
        """Add `weights` [n] (1 each when None) to `keys` [n] (int64 >= 0, < size when known)."""
        keys = torch.as_tensor(keys).reshape(-1).to(self.device, torch.int64)
        w = (
            torch.ones(keys.numel(), dtype=torch.float64, device=self.device)
            if weights is None
            else torch.as_tensor(weights).reshape(-1).to(self.device, torch.float64)
        )
        if self._dense is not None:
            self._dense.index_add_(0, keys, w)
            return
        self._buffer.append((keys, w))
        self._buffered += keys.numel()
        if self._buffered > max(_SPARSE_FLUSH, 2 * self._keys.numel()):
            self._merge()

    def _merge(self) -> None:
        if not self._buffer:
            return
        keys = torch.cat([self._keys] + [k for k, _ in self._buffer])
        sums = torch.cat([self._sums] + [w for _, w in self._buffer])
        self._keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        self._sums = torch.zeros(self._keys.numel(), dtype=torch.float64, device=self.device).index_add_(
            0, inverse, sums
        )
        self._buffer, self._buffered = [], 0

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys [C] sorted int64, sums [C] float64) over the keys with a nonzero sum, on the host."""
        if self._dense is not None:
            keys, sums = torch.arange(self._dense.numel(), device=self.device), self._dense
        else:
            self._merge()
            keys, sums = self._keys, self._sums
        keep = sums != 0
        return keys[keep].cpu().numpy(), sums[keep].cpu().numpy()


# ----------------------------------------------------------------------------- per-layer counts
@dataclass
class LayerCounts:
    """Aggregated routing of one MoE layer over N recorded tokens.

    Attributes:
        num_experts, top_k: E and the router's k (K slots may exceed k: expert choice has K = E).
        num_domains, vocab_size: G and V.
        weighting: "count" (1 per kept assignment) or "gate" (its gate weight): the weighting of
            `cube` and `docs`, the inputs of the information measures.
        tokens: N; tokens_per_domain [G].
        assignments: kept (token, expert) assignments A; slots: N*K (A < N*K with drops).
        domain_expert: [G, E] kept assignments per domain and expert (unweighted, always).
        cube: sparse [V, G, E] (weighted per `weighting`); cube_counts: the same, unweighted.
        docs: per-document [M, E] expert counts (weighted per `weighting`) with each doc's domain.
        pairs: [E, E] tokens that selected both i and j (unweighted); diagonal = expert load.
        top1: [E] tokens whose highest-gate kept expert is e.
        consecutive_same / consecutive_pairs: adjacent positions of one sequence and one document
            whose top-1 experts agree / all such pairs (both tokens routed).
        entropy_bits_sum: sum over tokens of the router distribution's entropy (bits).
        batch_loads: [forward passes, E] kept assignments per expert in each forward pass.
    """

    num_experts: int
    top_k: int
    num_domains: int
    vocab_size: int
    weighting: str
    tokens: int
    tokens_per_domain: np.ndarray
    assignments: int
    slots: int
    domain_expert: np.ndarray
    cube: TokenDomainExpertCounts
    cube_counts: TokenDomainExpertCounts
    docs: DocCounts
    pairs: np.ndarray
    top1: np.ndarray
    consecutive_same: int
    consecutive_pairs: int
    entropy_bits_sum: float
    batch_loads: np.ndarray

    @property
    def load(self) -> np.ndarray:
        """[E] kept assignments per expert."""
        return np.diag(self.pairs).copy()

    def token_expert(self, weighted: bool = False) -> np.ndarray:
        """Dense [V, E] token x expert table (unweighted counts unless `weighted`)."""
        cube = self.cube if weighted else self.cube_counts
        v, _, e = cube.shape
        return np.bincount(cube.token * e + cube.expert, weights=cube.count, minlength=v * e).reshape(v, e)


# ----------------------------------------------------------------------------- the accumulator
class BatchContext:
    """Labels of the tokens the next forward routes, flattened to [T] like the router's input:
    host arrays for the records, and copies on the routing's device made on first use."""

    def __init__(self, batch: Batch):
        self.shape = tuple(batch.tokens.shape)
        self.batch = batch
        self.token, self.domain, self.doc = (
            t.detach().reshape(-1).cpu().numpy().astype(np.int64) for t in (batch.tokens, batch.domain, batch.doc)
        )
        self.position = np.broadcast_to(np.arange(self.shape[1], dtype=np.int64), self.shape).ravel()
        self._on: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(token, domain, doc) [T] int64 on `device`."""
        if device not in self._on:
            token, domain, doc = (
                t.detach().reshape(-1).to(device, torch.int64, non_blocking=True)
                for t in (self.batch.tokens, self.batch.domain, self.batch.doc)
            )
            self._on[device] = (token, domain, doc)
        return self._on[device]


class RoutingAccumulator:
    """On-the-fly counts of the L MoE layers, kept on the routing's device.

    The router hooks only stash their `Routing`; once all L layers of a forward are in, `add`
    stacks them ([L, T, K], [L, T, E]) and updates every table with a fixed number of tensor ops
    (matmuls, `index_add_`, `scatter_`), whatever L: no per-layer kernel launches and no host
    synchronization per forward. Dropped slots enter the key tables with weight 0 instead of being
    masked out (masking would synchronize). Every MoE layer of a model shares E and K (one MoEConfig).
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        num_domains: int,
        vocab_size: int,
        gate_weighted: bool,
        keep_records: bool,
        device: torch.device,
    ):
        n, e, d = num_layers, num_experts, num_domains
        self.num_layers, self.num_experts, self.top_k, self.num_domains = n, e, top_k, d
        self.vocab_size, self.gate_weighted = vocab_size, gate_weighted
        self.keep_records, self.device = keep_records, device
        f64: dict[str, Any] = dict(dtype=torch.float64, device=device)  # torch factory kwargs
        # Keys: cube ((l*V + token)*G + domain)*E + expert; docs (doc*L + l)*E + expert.
        self.cube = KeyCounter(n * vocab_size * d * e, device)
        self.cube_counts = KeyCounter(n * vocab_size * d * e, device) if gate_weighted else None
        self.docs = KeyCounter(None, device)  # document ids are corpus-wide: sparse
        self.domain_expert = torch.zeros(n, d, e, **f64)
        self.tokens_per_domain = torch.zeros(d, **f64)
        self.pairs = torch.zeros(n, e, e, **f64)
        self.top1 = torch.zeros(n * e, **f64)
        self.consecutive = torch.zeros(n, 2, **f64)  # (same top-1, pairs) per layer
        self.entropy_nats = torch.zeros(n, **f64)
        self.batch_loads: list[Tensor] = []
        self.slots = 0
        self.records: list[tuple[Tensor, Tensor, Tensor]] = []

    @torch.no_grad()
    def add(self, routings: list[Routing], ctx: BatchContext) -> None:
        n, e, d, v = self.num_layers, self.num_experts, self.num_domains, self.vocab_size
        token, domain, doc = ctx.on(self.device)
        idx = torch.stack([r.indices for r in routings])  # [L, T, K]
        kept = torch.stack([r.kept for r in routings])
        gates = torch.stack([r.weights for r in routings]).float()
        probs = torch.stack([r.probs for r in routings])  # [L, T, E]
        layer = torch.arange(n, device=self.device)[:, None, None]
        count_w = kept.to(torch.float64)  # 1 per kept assignment, 0 per dropped slot
        table_w = gates.double() * count_w if self.gate_weighted else count_w

        cube_keys = ((layer * v + token[:, None]) * d + domain[:, None]) * e + idx
        self.cube.add(cube_keys, table_w)
        if self.cube_counts is not None:
            self.cube_counts.add(cube_keys, count_w)
        self.docs.add((doc[:, None] * n + layer) * e + idx, table_w)

        selected = torch.zeros(n, idx.shape[1], e, device=self.device).scatter_(2, idx, kept.float())
        one_hot = torch.nn.functional.one_hot(domain, d).float()  # [T, G]
        # float32 products are exact here: every entry counts at most T < 2^24 tokens.
        self.domain_expert += (one_hot.t() @ selected).double()
        self.tokens_per_domain += one_hot.sum(dim=0).double()
        pairs = (selected.transpose(1, 2) @ selected).double()
        self.pairs += pairs
        self.batch_loads.append(pairs.diagonal(dim1=1, dim2=2).clone())
        # Top-1 = highest-gate kept slot; a token with no kept slot has none (-1).
        slot = gates.masked_fill(~kept, -1.0).argmax(dim=-1, keepdim=True)
        has = kept.any(dim=-1)
        top1 = torch.where(has, idx.gather(2, slot).squeeze(2), -1)  # [L, T]
        self.top1.index_add_(0, (layer[:, :, 0] * e + top1.clamp(min=0)).reshape(-1), has.double().reshape(-1))
        # Consecutive tokens: adjacent positions of one row (one context) in one document.
        t1, d2 = top1.view(n, *ctx.shape), doc.view(ctx.shape)
        valid = (d2[:, 1:] == d2[:, :-1]) & (t1[:, :, 1:] >= 0) & (t1[:, :, :-1] >= 0)
        same = valid & (t1[:, :, 1:] == t1[:, :, :-1])
        self.consecutive += torch.stack([same.sum(dim=(1, 2)), valid.sum(dim=(1, 2))], dim=1).double()
        self.entropy_nats += torch.special.entr(probs.double()).sum(dim=(1, 2))
        self.slots += idx[0].numel()
        if self.keep_records:
            small = torch.int16 if e <= torch.iinfo(torch.int16).max else torch.int32
            # Asynchronous copies: the host reads them only after `RoutingRecorder.result` synchronizes.
            idx_c, gates_c, kept_c = (t.to("cpu", non_blocking=True) for t in (idx.to(small), gates, kept))
            self.records.append((idx_c, gates_c, kept_c))

    def counts(self, doc_ids: np.ndarray, doc_domain: np.ndarray) -> list[LayerCounts]:
        n, e, d, v = self.num_layers, self.num_experts, self.num_domains, self.vocab_size
        cube = _split_cube(self.cube, n, v, d, e)
        cube_counts = cube if self.cube_counts is None else _split_cube(self.cube_counts, n, v, d, e)
        keys, sums = self.docs.items()
        rest, expert_of = np.divmod(keys, e)
        doc_of, layer_of = np.divmod(rest, n)
        doc_counts = np.zeros((n, doc_ids.size, e))
        doc_counts[layer_of, np.searchsorted(doc_ids, doc_of), expert_of] = sums
        pairs = self.pairs.cpu().numpy()
        top1 = self.top1.view(n, e).cpu().numpy()
        consecutive = self.consecutive.cpu().numpy().astype(np.int64)
        entropy = self.entropy_nats.cpu().numpy() / math.log(2.0)
        loads = torch.stack(self.batch_loads, dim=1).cpu().numpy() if self.batch_loads else np.zeros((n, 0, e))
        domain_expert = self.domain_expert.cpu().numpy()
        tokens_per_domain = self.tokens_per_domain.cpu().numpy().astype(np.int64)
        return [
            LayerCounts(
                num_experts=e,
                top_k=self.top_k,
                num_domains=d,
                vocab_size=v,
                weighting="gate" if self.gate_weighted else "count",
                tokens=int(tokens_per_domain.sum()),
                tokens_per_domain=tokens_per_domain.copy(),
                assignments=int(round(np.trace(pairs[l]))),
                slots=self.slots,
                domain_expert=domain_expert[l],
                cube=cube[l],
                cube_counts=cube_counts[l],
                docs=DocCounts(doc_ids, doc_domain, doc_counts[l]),
                pairs=pairs[l],
                top1=top1[l],
                consecutive_same=int(consecutive[l, 0]),
                consecutive_pairs=int(consecutive[l, 1]),
                entropy_bits_sum=float(entropy[l]),
                batch_loads=loads[l],
            )
            for l in range(n)
        ]

    def layer_records(self) -> list[LayerRecords]:
        stacked = [torch.cat([r[i] for r in self.records], dim=1).numpy() for i in range(3)]  # [L, N, K]
        return [LayerRecords(*(a[l] for a in stacked)) for l in range(self.num_layers)]


def _split_cube(counter: KeyCounter, n: int, v: int, d: int, e: int) -> list[TokenDomainExpertCounts]:
    """The L per-layer sparse [V, G, E] tables of a counter keyed ((l*V + t)*G + g)*E + e."""
    keys, sums = counter.items()
    rest, expert = np.divmod(keys, e)
    rest, domain = np.divmod(rest, d)
    layer, token = np.divmod(rest, v)
    bounds = np.searchsorted(layer, np.arange(n + 1))  # keys are sorted, so layers are contiguous
    layers = (slice(bounds[l], bounds[l + 1]) for l in range(n))
    return [TokenDomainExpertCounts(token[s], domain[s], expert[s], sums[s], (v, d, e)) for s in layers]
