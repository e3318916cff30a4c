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

What is counted, per layer (`LayerCounts`), and how, is `analysis.counts`; the raw per-token records
(`analysis.records.RoutingRecords`, saved as `.npz`) are kept too unless `keep_records=False` (the
held-out I(D;E|C) needs them). Nothing waits for the device until `result()`.

Hooks return None, so recording cannot change the model's outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from analysis.counts import BatchContext, KeyCounter, LayerCounts, RoutingAccumulator
from analysis.progress import progress
from analysis.records import RoutingRecords
from moe.data.batch import Batch
from moe.modes import eval_mode
from moe.protocols import RoutedModel, moe_block_indices
from moe.routing import Routing

__all__ = [
    "RoutingRecorder",
    "RoutingRecording",
    "interleave_domains",
    "record_routing",
    "take_tokens",
]


# ----------------------------------------------------------------------------- the recording
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
        self._acc = RoutingAccumulator(
            len(layers), num_experts, top_k, num_domains, model.vocab_size, gate_weighted, keep_records, self.device
        )
        self._pending: list[Routing | None] = [None] * len(layers)
        self._handles: list = []
        self._ctx: BatchContext | None = None
        self._fresh = [False] * len(layers)
        self._doc_domain = KeyCounter(None, self.device)
        self._labels: list[BatchContext] = []

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
        ctx = BatchContext(batch)
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
