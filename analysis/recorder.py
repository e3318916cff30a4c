"""Record every routing decision of a model over a validation stream, with each token's labels.

Legend as in `moe/__init__.py`: L MoE layers, B sequences, S positions, T tokens of one forward
pass (B*S), N recorded tokens (= sum of B*S over batches), K slots per token (top-k; E for expert
choice), E experts, G domains, V vocabulary, M documents; forward passes are spelled out.

Forward hooks on each MoE layer's `router` module receive its `Routing` record (the same object the
layer dispatches with, so every router kind and the knockout masks are seen as they act). The hook
does not know which tokens it routes, so the batch context is set before each forward:

    with RoutingRecorder(model, num_domains=G) as rec:
        for batch in batches:
            rec.observe(batch)
            model(batch.tokens)
    recording = rec.result()       # routing only: recording.loss_sum is None

or simply `recording = record_routing(model, batches, num_domains=G)`, which does the same in eval
mode under `torch.no_grad` and also computes the per-domain loss (`recording.domain_loss`).

Only *kept* assignments count (a capacity drop, a knocked-out hash expert, or an expert-choice slot
the expert did not choose is not a routing decision). Counts are aggregated on the fly, per layer
(`LayerCounts`): the sparse token x domain x expert cube (token x expert follows from it, and V = 50k
never allocates V*G*E), the domain x expert table, per-document expert counts (the unit of the
document-level nulls), expert x expert co-selection, top-1 load, consecutive-token agreement, router
entropy and per-forward-pass loads. The raw per-token records (`analysis.records.RoutingRecords`,
saved as `.npz`) are kept too unless `keep_records=False`; the held-out I(D;E|C) needs them.

Cost: the counts live on the model's device and are updated once per forward pass, for all L layers
together, by fixed-shape tensor ops; nothing waits for the device until `result()`.
`benchmarks/bench_recorder.py` measures the overhead over a plain eval forward pass.

Hooks return None, so recording cannot change the model's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from analysis.information import DocCounts, TokenDomainExpertCounts
from analysis.progress import progress
from analysis.records import LayerRecords, RoutingRecords
from moe.data.batch import Batch
from moe.modes import eval_mode
from moe.protocols import RoutedModel, moe_block_indices
from moe.routing import Routing

__all__ = [
    "KeyCounter",
    "LayerCounts",
    "RoutingRecorder",
    "RoutingRecording",
    "interleave_domains",
    "record_routing",
    "take_tokens",
]

# Dense accumulators up to 2^22 cells (32 MiB of float64); beyond, only the observed keys are kept.
_DENSE_KEYS = 1 << 22
# The sparse accumulator merges its buffered keys once they exceed this many (or twice the table):
# 4M buffered keys hold 64 MiB and spare the device a sort (and a synchronization) per forward.
_SPARSE_FLUSH = 1 << 22


# ----------------------------------------------------------------------------- accumulators
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


# ----------------------------------------------------------------------------- results
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


@dataclass
class RoutingRecording:
    """What `record_routing` and `RoutingRecorder.result` return.

    layers: `LayerCounts` per MoE layer (depth order); blocks: the block index of each;
    records: raw records, or None when not kept; loss_sum / loss_tokens: [G] summed next-token loss
    (nats) and token counts per domain, computed by `record_routing`; None when the recording has
    no losses (`RoutingRecorder` used directly sees the routing only, not the model's loss).
    """

    layers: list[LayerCounts]
    blocks: list[int]
    records: RoutingRecords | None
    loss_sum: np.ndarray | None = None
    loss_tokens: np.ndarray | None = None

    @property
    def domain_loss(self) -> np.ndarray:
        """[G] mean next-token loss per domain (nats); nan for domains without tokens. ValueError
        when the recording has no losses (`loss_sum` None)."""
        if self.loss_sum is None or self.loss_tokens is None:
            raise ValueError(
                "this recording has no losses: RoutingRecorder records routing only; "
                "record_routing(model, batches, ...) also computes the per-domain loss"
            )
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.loss_tokens > 0, self.loss_sum / np.maximum(self.loss_tokens, 1), np.nan)


# ----------------------------------------------------------------------------- per-layer accumulator
class _BatchContext:
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


class _Accumulator:
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
    def add(self, routings: list[Routing], ctx: _BatchContext) -> None:
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


# ----------------------------------------------------------------------------- the recorder
def _model_device(model: RoutedModel) -> torch.device:
    return next(model.parameters()).device


class RoutingRecorder:
    """Context manager that attaches forward hooks to every MoE router of `model`.

    Args:
        model: a `moe.model.LanguageModel` (anything with `.moe_layers`, `.blocks`, `.vocab_size`).
        num_domains: G; batch domain ids must lie in [0, G).
        gate_weighted: weight the information tables (`cube`, `docs`) by gate values instead of 1
            per kept assignment.
        keep_records: also keep the raw per-token records (`RoutingRecords`).
        domains: names of the G domain ids, stored with the records (default "0".."G-1").

    Call `observe(batch)` before each forward, with the batch as the data loader yields it (on the
    host; its labels are copied to the model's device once). A router that fires without a fresh
    context (a second forward for one observe, or a forward before the first) raises RuntimeError,
    so no decision is counted twice or without its labels. Counts stay on the model's device until
    `result()`.
    """

    def __init__(
        self,
        model: RoutedModel,
        num_domains: int,
        *,
        gate_weighted: bool = False,
        keep_records: bool = True,
        domains: list[str] | None = None,
    ):
        self.blocks = moe_block_indices(model)  # ValueError for a model without MoE layers
        layers = list(model.moe_layers)
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        if domains is not None and len(domains) != num_domains:
            raise ValueError(f"{len(domains)} domain names for num_domains={num_domains}")
        self.domains = [str(i) for i in range(num_domains)] if domains is None else list(domains)
        self.model = model
        self.num_domains = num_domains
        self.keep_records = keep_records
        self.device = layers[0].router.expert_mask.device
        shapes = {(layer.router.num_experts, layer.router.top_k) for layer in layers}
        if len(shapes) > 1:
            raise ValueError(f"MoE layers with different (experts, top_k): {sorted(shapes)}")
        ((num_experts, top_k),) = shapes
        self._layers = layers
        self._acc = _Accumulator(
            len(layers), num_experts, top_k, num_domains, model.vocab_size, gate_weighted, keep_records, self.device
        )
        self._pending: list[Routing | None] = [None] * len(layers)
        self._handles: list = []
        self._ctx: _BatchContext | None = None
        self._fresh = [False] * len(layers)
        self._doc_domain = KeyCounter(None, self.device)
        self._labels: list[_BatchContext] = []

    def __enter__(self) -> RoutingRecorder:
        for i, layer in enumerate(self._layers):
            self._handles.append(layer.router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def observe(self, batch: Batch) -> None:
        """Set the labels of the tokens the next forward routes (batch: [B, S] tensors)."""
        ctx = _BatchContext(batch)
        if ctx.domain.size and (ctx.domain.min() < 0 or ctx.domain.max() >= self.num_domains):
            raise ValueError(
                f"batch domain ids span [{ctx.domain.min()}, {ctx.domain.max()}], outside [0, {self.num_domains})"
            )
        if ctx.token.size and (ctx.token.min() < 0 or ctx.token.max() >= self.model.vocab_size):
            raise ValueError(f"token ids outside [0, {self.model.vocab_size})")
        if ctx.doc.size and ctx.doc.min() < 0:
            raise ValueError("document ids must be non-negative")
        self._ctx = ctx
        self._fresh = [True] * len(self._layers)
        # One key per (document, domain): a document seen with two domains is caught in `result`.
        _, domain, doc = ctx.on(self.device)
        self._doc_domain.add(doc * self.num_domains + domain)
        if self.keep_records:
            self._labels.append(ctx)

    def _hook(self, index: int):
        def hook(module: nn.Module, args, routing: Routing) -> None:
            ctx = self._ctx
            if ctx is None or not self._fresh[index]:
                raise RuntimeError(
                    "RoutingRecorder: a router fired without a fresh batch context; call "
                    "rec.observe(batch) before every forward (or use record_routing)"
                )
            if routing.indices.shape[0] != ctx.token.size:
                raise RuntimeError(
                    f"router routed {routing.indices.shape[0]} tokens but the observed batch has {ctx.token.size}"
                )
            self._fresh[index] = False
            self._pending[index] = routing
            if not any(self._fresh):  # the forward's last MoE layer: count all L at once
                self._acc.add([r for r in self._pending if r is not None], ctx)  # all L layers fired
                self._pending = [None] * len(self._layers)

        return hook

    def result(self) -> RoutingRecording:
        """The counts so far (and the raw records if kept), copied to the host; no losses (the
        recording's `loss_sum` is None: `record_routing` computes them)."""
        if any(self._fresh):
            raise RuntimeError("the last observed batch was not run through the model")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the records' asynchronous copies have landed
        keys, _ = self._doc_domain.items()
        docs, doms = np.divmod(keys, self.num_domains)
        if np.any(docs[1:] == docs[:-1]):
            bad = int(docs[1:][docs[1:] == docs[:-1]][0])
            raise ValueError(f"document {bad} carries more than one domain; one domain per document")
        layers = self._acc.counts(docs, doms)
        records = None
        if self.keep_records and self._labels:
            cat = lambda name: np.concatenate([getattr(c, name) for c in self._labels])  # noqa: E731
            records = RoutingRecords(
                domains=list(self.domains),
                token=cat("token"),
                domain=cat("domain"),
                doc=cat("doc"),
                position=cat("position"),
                layers=self._acc.layer_records(),
                num_experts=self._acc.num_experts,
                top_k=self._acc.top_k,
            )
        return RoutingRecording(layers, list(self.blocks), records)


def record_routing(
    model: RoutedModel,
    batches: Iterable[Batch],
    *,
    num_domains: int,
    domains: list[str] | None = None,
    gate_weighted: bool = False,
    keep_records: bool = True,
    max_tokens: int | None = None,
) -> RoutingRecording:
    """Run `model` over `batches` in eval mode (no grad) and record its routing.

    Also accumulates each domain's next-token loss. Stops after the batch that reaches
    `max_tokens` tokens (None: all batches). `domains` names the G domain ids in the saved records.
    The model's train/eval mode is restored afterwards.
    """
    device = _model_device(model)
    # Loss sums stay on the device: no host synchronization per batch.
    loss_sum = torch.zeros(num_domains, dtype=torch.float64, device=device)
    loss_tokens = torch.zeros(num_domains, dtype=torch.float64, device=device)
    seen = 0
    with (
        eval_mode(model),
        torch.no_grad(),
        RoutingRecorder(
            model, num_domains, gate_weighted=gate_weighted, keep_records=keep_records, domains=domains
        ) as rec,
    ):
        total = len(batches) if isinstance(batches, Sized) else None
        for batch in progress(batches, desc="recording routing", total=total):
            rec.observe(batch)
            on_device = batch.to(device, non_blocking=True)
            out = model(on_device.tokens, on_device.targets, on_device.domain)
            dom = on_device.domain.reshape(-1)
            loss_sum.index_add_(0, dom, out.require_token_loss().reshape(-1).double())
            loss_tokens.index_add_(0, dom, torch.ones_like(dom, dtype=torch.float64))
            seen += batch.num_tokens
            if max_tokens is not None and seen >= max_tokens:
                break
        recording = rec.result()
    recording.loss_sum = loss_sum.cpu().numpy()
    recording.loss_tokens = loss_tokens.cpu().numpy().astype(np.int64)
    return recording


# ----------------------------------------------------------------------------- evaluation streams
def take_tokens(batches: Iterable[Batch], max_tokens: int) -> list[Batch]:
    """The leading batches holding `max_tokens` tokens; the last one cut to whole rows (>= 1 row)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    out, seen = [], 0
    for batch in batches:
        b, s = batch.tokens.shape
        rows = min(b, max(1, -(-(max_tokens - seen) // s)))
        out.append(
            batch
            if rows == b
            else Batch(batch.tokens[:rows], batch.targets[:rows], batch.domain[:rows], batch.doc[:rows])
        )
        seen += rows * s
        if seen >= max_tokens:
            break
    return out


def interleave_domains(batches_by_domain: dict[str, list[Batch]], batch_size: int | None = None) -> list[Batch]:
    """Re-batch per-domain validation batches so each batch mixes the domains' rows round-robin.

    The training stream mixes domains in every batch; routers whose decisions depend on the batch
    (expert choice picks the top tokens of the batch; capacity limits drop the overflow of a batch)
    must see the same mix at evaluation, or a single-domain batch forces, e.g., expert choice to give
    every domain the same expert loads. Rows are whole sequences, so no token changes its context.
    batch_size: rows per batch (default: the largest input batch).
    """
    rows = [[(b, i) for b in batches for i in range(b.tokens.shape[0])] for batches in batches_by_domain.values()]
    if not any(rows):
        raise ValueError("no validation batches")
    seq = {b.tokens.shape[1] for batches in batches_by_domain.values() for b in batches}
    if len(seq) != 1:
        raise ValueError(f"validation batches have different sequence lengths {sorted(seq)}")
    size = batch_size or max(b.tokens.shape[0] for batches in batches_by_domain.values() for b in batches)
    order = [r[j] for j in range(max(len(r) for r in rows)) for r in rows if j < len(r)]
    out = []
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        out.append(
            Batch(*(torch.stack([getattr(b, f)[i] for b, i in chunk]) for f in ("tokens", "targets", "domain", "doc")))
        )
    return out
