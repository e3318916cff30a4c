"""Expert paths through the MoE layers and the domain information they carry, I(D; path)
(pure numpy; bits throughout).

A token's *path* is the tuple, over the chosen MoE layers, of its routing decision in each layer
("Polysemantic Experts, Monosemantic Paths", arXiv 2604.17837: the path, not one layer's expert, is
the interpretable unit):

    mode="top1"   the layer's top-1 expert: the highest-gate kept slot (ties: the first slot); a
                  token with no kept slot in a layer (capacity drop, expert choice) gets that
                  layer's "none" symbol, so every token has a path
    mode="topk"   the layer's *set* of kept experts (order-free: permuting the K slots changes
                  nothing; the empty set is a symbol of its own)

`path_ids` maps the tuples to dense ids over the paths that occur (the alphabet of all possible
paths, 64^16 for OLMoE's 16 layers of 64 experts in top-1 mode, never materialises), and
`path_information` measures I(D; path) as the package measures each layer's I(D;E): NMI =
I(D; path) / H(D) of the domain x path table against its document-permutation null, with the
domain-stratified document-bootstrap interval (`analysis.statistics.summarize_specialization`),
next to the same numbers for each layer alone, plus the held-out I(D; path | token) share
(`analysis.heldout`) when the number of distinct paths is small enough.

How the estimator copes with the huge alphabet
----------------------------------------------
- Only observed paths enter: P distinct paths among N tokens (P <= N whatever the alphabet).
- The plug-in I(D; path) is biased upward by about (P - 1)(G - 1) / (2 N ln 2) bits (Miller-Madow's
  leading term), which grows with P: with many layers almost every token takes its own path, each
  path is then seen in one document only, H(D | path) is 0 and the plug-in NMI is ~1 for any router.
  The headline number is therefore NMI minus the mean of its document-permutation null, which is
  computed on the same table (same P, same N, same document clustering) and carries the same bias;
  a domain-blind router scores ~0 on it however many paths there are, as for the per-layer NMI. The
  Miller-Madow value is reported too, but it assumes independent tokens and under-corrects.
- A reader sees when the estimate is sample-starved from `n_paths` (P), `singletons` (paths seen
  once) and `tokens_per_path` (N / P): with N / P near 1 the null mean is near the plug-in value and
  the excess has little room, so a ~0 excess there means "not measurable", not "no information".
  (A domain coded in two layers' pair, 480 tokens: excess 0.96 over those two layers (N/P = 30),
  0.21 with two random 8-expert layers added (N/P = 1.3), 0.00 with four (N/P = 1.0); choose
  `layers` so that N/P stays well above 1.)
- The document x path table is stored exactly but compactly: the paths that occur in one document
  only are merged into one column per document. Under every relabelling or reweighting of documents
  (the null and the bootstrap) such a column keeps a single domain, so H(D), H(D | path), the NMI,
  I(D; path) and the Miller-Madow cell count K_DP - K_D - K_P + 1 are all unchanged, while the table
  has at most (paths shared by >= 2 documents) + M columns instead of P. The cost of the null and the
  bootstrap is O((n_permutations + n_bootstrap) * G * M * columns).

Legend as in `moe/__init__.py`: N tokens (rows of the records), K slots, E experts, G domains,
L MoE layers, M documents, R resamples; P (distinct paths) is spelled out where used. In I(D; path)
and H(D), D names the domain variable, not a shape.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from analysis.heldout import HeldoutInformation, TooFewRecords, context_keys, heldout_conditional_information
from analysis.information import (
    DocCounts,
    dense_index,
    doc_index,
    entropy,
    joint_from_docs,
    mutual_information,
    mutual_information_mm,
)
from analysis.records import LayerRecords, RoutingRecords
from analysis.registry import Measure, MeasureResult
from analysis.statistics import SpecializationResult, summarize_specialization
from analysis.validation import RngLike, as_doc_ids, as_labels, as_rng, positive_int
from moe.validation import check_choice

__all__ = [
    "MODES",
    "PATH_MEASURES",
    "LayerInformation",
    "PathInformation",
    "PathMode",
    "doc_path_counts",
    "path_ids",
    "path_information",
]

PathMode = Literal["top1", "topk"]
CONTEXTS: tuple[str, ...] = ("token", "bigram")
_LN2 = math.log(2.0)
_NONE = -1  # the "no kept expert" symbol (top1) and the padding of a kept set (topk)

# The measure of each path mode, for the report's tables (and the names of its columns). Not
# registered here: they are computed over the layers together (not by a per-layer `compute`), and
# where they are registered and printed is the report's decision.
PATH_MEASURES: dict[str, Measure] = {
    "top1": Measure(
        "path_nmi",
        "path NMI − null",
        "NMI = I(D;path)/H(D) of the tokens' top-1 expert paths through the layers, minus its document-null mean",
        "share of H(D)",
        None,
        "specialist",
    ),
    "topk": Measure(
        "path_nmi_topk",
        "path NMI − null (top-k sets)",
        "NMI = I(D;path)/H(D) of the tokens' kept-expert-set paths through the layers, minus its document-null mean",
        "share of H(D)",
        None,
        "specialist",
    ),
}
MODES: tuple[str, ...] = tuple(PATH_MEASURES)  # "top1", "topk"


# ----------------------------------------------------------------------------- path ids
def _check_layers(records: RoutingRecords, layers: Sequence[int] | None) -> tuple[int, ...]:
    n_layers = len(records.layers)
    chosen = tuple(range(n_layers)) if layers is None else tuple(int(i) for i in layers)
    if not chosen:
        raise ValueError(f"layers must name at least one of the {n_layers} MoE layers")
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the records hold {n_layers} MoE layers (0..{n_layers - 1})")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers {list(chosen)} repeat a layer")
    return chosen


def _layer_symbols(layer: LayerRecords, n_tokens: int, n_experts: int, mode: str, index: int) -> np.ndarray:
    """A layer's routing decision per token as int64 columns in [-1, E): [N, 1] for top1 (the top-1
    expert, -1 without a kept slot); [N, K] for topk (the distinct kept experts in ascending order,
    padded with -1 at the end, so equal sets give equal rows and the rows sort as Python sorts the
    tuples of the sets)."""
    experts = np.asarray(layer.experts)
    kept = np.asarray(layer.kept, dtype=bool)
    if experts.ndim != 2 or experts.shape[0] != n_tokens or kept.shape != experts.shape:
        raise ValueError(
            f"layer {index}: experts and kept must be [N={n_tokens}, K], got {experts.shape} and {kept.shape}"
        )
    if not np.issubdtype(experts.dtype, np.integer):
        raise TypeError(f"layer {index}: experts must hold integer ids, got dtype {experts.dtype}")
    ex = experts.astype(np.int64, copy=False)
    n_slots = ex.shape[1]
    if n_slots == 0:
        return np.full((n_tokens, 1), _NONE, dtype=np.int64)
    # Column by column: numpy's reductions along a short axis 1 are several times slower than K
    # elementwise passes over [N] columns, and these run on every token of every layer.
    all_kept = bool(kept.all())
    checked = ex if all_kept else np.where(kept, ex, 0)
    if kept.any():
        lo, hi = int(checked.min()), int(checked.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"layer {index}: kept experts must lie in [0, {n_experts}), got range [{lo}, {hi}]")
    if mode == "top1":
        gates = np.asarray(layer.gates)
        if gates.shape != ex.shape:
            raise ValueError(f"layer {index}: gates must be [N={n_tokens}, K={n_slots}], got {gates.shape}")
        if not np.isfinite(gates).all() and not np.all(np.isfinite(gates[kept])):
            raise ValueError(f"layer {index}: gates of kept slots must be finite")
        # The kept slot with the largest gate, the first one on ties (as `nmi_top1`); -1 without one.
        top = np.where(kept[:, 0], ex[:, 0], _NONE)
        best = np.where(kept[:, 0], gates[:, 0], -np.inf)
        for j in range(1, n_slots):
            better = kept[:, j] & ((gates[:, j] > best) | (top == _NONE))
            top = np.where(better, ex[:, j], top)
            best = np.where(better, gates[:, j], best)
        return top[:, None]
    big = n_experts  # sorts after every expert; becomes -1 at the end
    columns = [ex[:, j] if all_kept else np.where(kept[:, j], ex[:, j], big) for j in range(n_slots)]
    _sort_columns(columns)
    for j in range(n_slots - 1, 0, -1):  # an expert kept in two slots counts once (a set)
        columns[j] = np.where(columns[j] == columns[j - 1], big, columns[j])
    _sort_columns(columns)
    v = np.stack(columns, axis=1)
    v[v == big] = _NONE
    return v


def _sort_columns(columns: list[np.ndarray]) -> None:
    """Sort each row across the list of K equal-length columns in place (ascending along the
    list), by odd-even transposition: K passes of elementwise min/max, faster than np.sort along a
    short axis 1 for the K <= 16 slots of a routing record."""
    k = len(columns)
    for step in range(k):
        for j in range(step % 2, k - 1, 2):
            a, b = columns[j], columns[j + 1]
            columns[j], columns[j + 1] = np.minimum(a, b), np.maximum(a, b)


def path_ids(
    records: RoutingRecords, *, layers: Sequence[int] | None = None, mode: PathMode | str = "top1"
) -> tuple[np.ndarray, int]:
    """Each token's path id over the MoE layers `layers` (default: all, in order): (ids [N] int64 in
    [0, n_paths), n_paths).

    The path is the tuple over the layers, in the order given, of the token's top-1 expert
    (mode="top1"; the "none" symbol where the token has no kept slot) or of its set of kept experts
    (mode="topk"; order-free). Ids are dense over the *observed* paths and number them in the
    lexicographic order of the tuples (the "none" symbol and a shorter set sort first), as
    `np.unique(rows, axis=0, return_inverse=True)` would; they are built as mixed-radix keys
    (id * (E + 1) + symbol), renumbered densely whenever another column would take the key past
    4N, so no key ever exceeds 4N * (E + 1).
    """
    check_choice("mode", mode, MODES)
    chosen = _check_layers(records, layers)
    n, n_experts = _record_sizes(records)
    return _ids_from_symbols([_layer_symbols(records.layers[i], n, n_experts, mode, i) for i in chosen], n_experts)


def _record_sizes(records: RoutingRecords) -> tuple[int, int]:
    """(N tokens, E experts) of non-empty records."""
    n = int(np.asarray(records.domain).shape[0])
    if n == 0:
        raise ValueError("no routing records")
    return n, positive_int("num_experts", records.num_experts)


def _ids_from_symbols(layer_symbols: Sequence[np.ndarray], n_experts: int) -> tuple[np.ndarray, int]:
    """(path ids [N], n_paths) of the layers' symbol columns (`_layer_symbols`, in path order): see
    `path_ids`."""
    n = layer_symbols[0].shape[0]
    radix = n_experts + 1
    limit = 4 * n + 1024  # keys up to here are renumbered by `dense_index` in O(N), without a sort
    ids = np.zeros(n, dtype=np.int64)
    span = 1  # ids lie in [0, span)
    for symbols in layer_symbols:
        for j in range(symbols.shape[1]):
            column = symbols[:, j]
            if j > 0 and not np.any(column != _NONE):
                break  # a padding column only: it splits no path (topk sets are padded at the end)
            if span * radix > limit:
                uniq, ids = dense_index(ids)
                span = int(uniq.size)
            if span == 1:
                ids = column + 1
            else:
                ids *= radix
                ids += column
                ids += 1
            span *= radix
    uniq, ids = dense_index(ids)
    return ids.reshape(-1).astype(np.int64, copy=False), int(uniq.size)


# ----------------------------------------------------------------------------- the document x path table
def doc_path_counts(
    ids: np.ndarray, n_paths: int, doc: np.ndarray, domain: np.ndarray, n_domains: int
) -> tuple[DocCounts, int]:
    """The document x path table as `DocCounts` (counts [M, columns]) and its number of columns.

    ids [N] path ids in [0, n_paths), doc [N] document ids, domain [N] in [0, G). Each path seen in
    two or more documents is a column; the paths seen in one document only are merged into one
    column per document. Exact for every statistic of `analysis.statistics` on the NMI and for
    I(D; path) and its Miller-Madow value, under every document permutation and bootstrap
    replicate (such a column always holds one domain; see the module docstring), and it keeps the
    table small when most paths are unique (many layers, few tokens).
    """
    p = np.asarray(ids, dtype=np.int64)
    docs = _checked_doc_index(doc, domain, n_domains)
    if p.shape != docs[1].shape:
        raise ValueError(f"ids, doc and domain must all be [N], got {p.shape} ids for {docs[1].shape[0]} records")
    if p.size and (p.min() < 0 or p.max() >= n_paths):
        raise ValueError(f"path ids must lie in [0, {n_paths})")
    return _doc_path_table(p, n_paths, docs)


def _checked_doc_index(
    doc: np.ndarray, domain: np.ndarray, n_domains: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`doc_index` of integer document ids [N] and domain labels [N] in [0, G), both checked."""
    d = as_labels("domain", domain, n_domains)
    return doc_index(as_doc_ids(doc, d.shape[0]), d)


def _doc_path_table(
    ids: np.ndarray, n_paths: int, docs: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[DocCounts, int]:
    """`doc_path_counts` of checked path ids [N] given the records' `doc_index` (doc ids [M],
    each record's document [N], each document's domain [M]), which every table of one set of
    records shares."""
    doc_ids, doc_of, doc_domain = docs
    m = doc_ids.size
    if m * n_paths <= ids.size:  # the whole [M, P] table is no larger than the records: one pass
        full = np.bincount(doc_of * n_paths + ids, minlength=m * n_paths).reshape(m, n_paths)
        shared_paths = np.count_nonzero(full, axis=0) >= 2
        private_total = full[:, ~shared_paths].sum(axis=1)  # [M] each document's private paths, merged
        private_docs = np.flatnonzero(private_total)
        n_shared = int(shared_paths.sum())
        table = np.zeros((m, n_shared + private_docs.size))
        table[:, :n_shared] = full[:, shared_paths]
        table[private_docs, n_shared + np.arange(private_docs.size)] = private_total[private_docs]
        return DocCounts(doc_ids, doc_domain, table), table.shape[1]
    pairs, _ = dense_index(ids * m + doc_of)  # distinct (path, document) pairs
    docs_per_path = np.bincount(pairs // m, minlength=n_paths)
    shared = docs_per_path >= 2
    column_of_path = np.full(n_paths, -1, dtype=np.int64)
    column_of_path[shared] = np.arange(int(shared.sum()))
    column = column_of_path[ids]
    private = column < 0
    n_shared = int(shared.sum())
    if private.any():
        _, rank = dense_index(doc_of[private])
        column[private] = n_shared + rank.reshape(-1)
    n_columns = int(column.max()) + 1
    counts = np.bincount(doc_of * n_columns + column, minlength=m * n_columns).astype(np.float64)
    return DocCounts(doc_ids, doc_domain, counts.reshape(m, n_columns)), n_columns


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LayerInformation:
    """One layer alone, measured as the path is (a one-layer path): its top-1 expert (top1) or its
    kept-expert set (topk). nmi: NMI against the document null with its interval; bits /
    bits_mm: plug-in and Miller-Madow I(D; E) in bits; n_symbols: distinct symbols observed."""

    layer: int
    nmi: SpecializationResult
    bits: float
    bits_mm: float
    n_symbols: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "value": _finite(self.nmi.excess),
            "ci_low": _finite(self.nmi.excess_ci_low),
            "ci_high": _finite(self.nmi.excess_ci_high),
            "null_mean": _finite(self.nmi.null_mean),
            "p_value": _finite(self.nmi.p_value),
            "plugin": _finite(self.nmi.observed),
            "corrected": _finite(self.nmi.corrected),
            "bits": _finite(self.bits),
            "bits_mm": _finite(self.bits_mm),
            "n_symbols": self.n_symbols,
        }


@dataclass(frozen=True)
class PathInformation:
    """I(D; path) over the MoE layers `layers`, next to each layer's I(D; E).

    mode: "top1" or "topk"; nmi: the plug-in NMI = I(D; path) / H(D) of the document x path table
    with its document-permutation null (null_mean, null_q95, p_value), Miller-Madow value and
    bias-corrected domain-stratified document-bootstrap interval (`SpecializationResult`; its
    `excess` = NMI - null mean is the headline); bits / bits_mm: plug-in and Miller-Madow
    I(D; path) in bits; entropy_domain_bits: H(D); n_tokens: N; n_paths: P, distinct paths
    observed; singletons: paths seen once; table_columns: columns of the merged document x path
    table (`doc_path_counts`); per_layer: each chosen layer alone (empty when not asked for);
    heldout: held-out I(D; path | C) with C = the token (`context="token"`) or token and previous
    token ("bigram"), the path id taken as a single-slot expert, or None, with the reason in
    heldout_note.
    """

    mode: str
    layers: tuple[int, ...]
    nmi: SpecializationResult
    bits: float
    bits_mm: float
    entropy_domain_bits: float
    n_tokens: int
    n_paths: int
    singletons: int
    table_columns: int
    per_layer: tuple[LayerInformation, ...]
    heldout: HeldoutInformation | None
    heldout_note: str | None
    context: str

    @property
    def excess(self) -> float:
        """NMI minus its document-permutation null mean (bias and document clustering removed)."""
        return self.nmi.excess

    @property
    def tokens_per_path(self) -> float:
        """N / P: tokens per distinct path; near 1 the estimate is sample-starved."""
        return self.n_tokens / self.n_paths

    @property
    def plugin_bias_bits(self) -> float:
        """The leading plug-in bias of I(D; path) for independent tokens, (P - 1)(G - 1) / (2 N ln 2)
        bits, G = domains present: how much of `bits` the alphabet alone can explain."""
        g = len([c for c in self.nmi.docs_per_domain if c > 0])
        return (self.n_paths - 1) * max(g - 1, 0) / (2.0 * self.n_tokens * _LN2)

    @property
    def name(self) -> str:
        return PATH_MEASURES[self.mode].name

    def as_measure_result(self) -> MeasureResult:
        """The registry's result: value = NMI - null mean, its interval, null mean and p-value, and
        every other number in details (JSON-ready; nan becomes None)."""
        s = self.nmi
        held = self.heldout
        details: dict[str, Any] = {
            "mode": self.mode,
            "layers": list(self.layers),
            "plugin": _finite(s.observed),
            "corrected": _finite(s.corrected),
            "plugin_ci_low": _finite(s.ci_low),
            "plugin_ci_high": _finite(s.ci_high),
            "confidence": s.confidence,
            "null_q95": _finite(s.null_q95),
            "bits": _finite(self.bits),
            "bits_mm": _finite(self.bits_mm),
            "plugin_bias_bits": _finite(self.plugin_bias_bits),
            "entropy_domain_bits": _finite(self.entropy_domain_bits),
            "n_tokens": self.n_tokens,
            "n_paths": self.n_paths,
            "singletons": self.singletons,
            "tokens_per_path": _finite(self.tokens_per_path),
            "table_columns": self.table_columns,
            "n_docs": s.n_docs,
            "docs_per_domain": list(s.docs_per_domain),
            "n_permutations": s.n_permutations,
            "n_bootstrap": s.n_resamples,
            "per_layer_nmi": [_finite(layer.nmi.excess) for layer in self.per_layer],
            "per_layer": [layer.as_dict() for layer in self.per_layer],
            "context": self.context,
            "heldout_share": None if held is None else _finite(held.share),
            "heldout_ci_low": None if held is None else _finite(held.share_ci_low),
            "heldout_ci_high": None if held is None else _finite(held.share_ci_high),
            "heldout_p": None if held is None else _finite(held.p_value),
            "heldout_bits": None if held is None else _finite(held.estimate),
            "heldout_h_domain_given_context_bits": None if held is None else _finite(held.h_domain_given_context),
            "heldout_note": self.heldout_note,
        }
        return MeasureResult(
            self.name,
            _finite(s.excess),
            _finite(s.excess_ci_low),
            _finite(s.excess_ci_high),
            _finite(s.null_mean),
            _finite(s.p_value),
            details,
        )


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# ----------------------------------------------------------------------------- the measure
def _table_information(
    ids: np.ndarray,
    n_paths: int,
    docs_index: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_domains: int,
    n_permutations: int,
    n_bootstrap: int,
    confidence: float,
    rng: np.random.Generator,
) -> tuple[SpecializationResult, float, float, float, int]:
    """(NMI summary, plug-in bits, Miller-Madow bits, H(D) bits, table columns) of one path table;
    docs_index: the records' `doc_index`."""
    docs, n_columns = _doc_path_table(ids, n_paths, docs_index)
    spec = summarize_specialization(
        docs, n_domains, n_permutations=n_permutations, n_resamples=n_bootstrap, confidence=confidence, rng=rng
    )
    joint = joint_from_docs(docs.doc_domain, docs.counts, n_domains)
    return spec, mutual_information(joint), mutual_information_mm(joint), entropy(joint.sum(axis=1)), n_columns


def path_information(
    records: RoutingRecords,
    n_domains: int,
    *,
    layers: Sequence[int] | None = None,
    mode: PathMode | str = "top1",
    n_permutations: int = 200,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    rng: RngLike,
    per_layer: bool = True,
    heldout: bool = True,
    context: str = "token",
    max_heldout_paths: int = 256,
) -> PathInformation:
    """I(D; path) of the tokens' expert paths through the MoE layers `layers` (default: all), with
    the package's document-aware null and interval, next to each layer's own I(D; E).

    records: per-token `RoutingRecords` (N tokens, one domain per document); n_domains: G; mode:
    "top1" (the top-1 expert per layer) or "topk" (the set of kept experts per layer), see
    `path_ids`. The document x path table (`doc_path_counts`) goes through
    `summarize_specialization`: the plug-in NMI, its document-permutation null (`n_permutations`),
    Miller-Madow NMI and the bias-corrected domain-stratified document-bootstrap interval
    (`n_bootstrap`, `confidence`); plus I(D; path) in bits, plug-in and Miller-Madow. Read the
    excess NMI - null mean: the plug-in bias of a large path alphabet, ~(P - 1)(G - 1)/(2 N ln 2)
    bits, is in the null mean too (see the module docstring), and n_paths, singletons and
    tokens_per_path say how starved of samples the table is.

    per_layer: also measure each chosen layer alone the same way (its top-1 expert, or its kept set
    in topk mode), with the same document permutations and bootstrap draws as the path (common
    random numbers, so path - layer differences are not blurred by different draws); for top1 and
    fully routed records this is the package's `nmi_top1` of that layer with the same seed. By the
    data-processing inequality the population I(D; path) is at least every layer's; a path can
    carry domain information that no single layer does (the domain coded in a combination).

    heldout: the held-out I(D; path | C) share of `analysis.heldout` with the path id as a
    single-slot expert and C the token id (context="token") or token and previous token
    ("bigram"), `max(n_bootstrap, 200)` bootstrap replicates. It fits n_folds x contexts x P counts
    and a G x P offset table, so it is skipped above `max_heldout_paths` distinct paths: `heldout` is
    then None and `heldout_note` says so (likewise when no context is seen often enough,
    `TooFewRecords`). Its memory grows linearly with the paths: the whole measure on 1e5 tokens with
    2,000 token contexts (2-core CPU) took 0.17 s at 64 paths, 0.34 s (process peak 0.26 GB) at 256 and
    1.2 s (0.69 GB) at 784. rng: a Generator or int seed; the result is deterministic given it.
    """
    check_choice("mode", mode, MODES)
    check_choice("context", context, CONTEXTS)
    n_permutations = positive_int("n_permutations", n_permutations)
    n_bootstrap = positive_int("n_bootstrap", n_bootstrap)
    chosen = _check_layers(records, layers)
    nmi_rng, cmi_rng = as_rng(rng).spawn(2)  # as `analysis.measures.routing_evidence`

    n, n_experts = _record_sizes(records)
    symbols = {i: _layer_symbols(records.layers[i], n, n_experts, mode, i) for i in chosen}  # once per layer
    ids, n_paths = _ids_from_symbols([symbols[i] for i in chosen], n_experts)
    docs_index = _checked_doc_index(records.doc, records.domain, n_domains)  # shared by every table
    spec, bits, bits_mm, h_d, n_columns = _table_information(
        ids, n_paths, docs_index, n_domains, n_permutations, n_bootstrap, confidence, copy.deepcopy(nmi_rng)
    )
    singletons = int(np.count_nonzero(np.bincount(ids, minlength=n_paths) == 1))

    layer_results: list[LayerInformation] = []
    if per_layer:
        for i in chosen:
            lid, n_sym = _ids_from_symbols([symbols.pop(i)], n_experts)
            lspec, lbits, lbits_mm, _, _ = _table_information(
                lid, n_sym, docs_index, n_domains, n_permutations, n_bootstrap, confidence, copy.deepcopy(nmi_rng)
            )
            layer_results.append(LayerInformation(i, lspec, lbits, lbits_mm, n_sym))
            del lid
    # Every [N] array the held-out fit below does not read is dropped first: it needs the memory more.
    del symbols

    held: HeldoutInformation | None = None
    note: str | None = None
    if not heldout:
        note = "not asked for (heldout=False)"
    elif n_paths > max_heldout_paths:
        note = (
            f"{n_paths} distinct paths > max_heldout_paths={max_heldout_paths}: the held-out fit keeps "
            "n_folds x contexts x paths counts and a domains x paths offset table; not estimated "
            "(use fewer layers, or raise max_heldout_paths)"
        )
    else:
        prev = None
        if context == "bigram":
            from analysis.measures import previous_tokens  # lazy: analysis.measures may import this module

            prev = previous_tokens(records.token, records.position)
        try:
            held = heldout_conditional_information(
                context_keys(records.token, prev),
                records.domain,
                records.doc,
                ids[:, None],
                n_domains,
                n_paths,
                None,
                n_resamples=max(n_bootstrap, 200),
                confidence=confidence,
                rng=cmi_rng,
                docs=docs_index,
            )
        except TooFewRecords as exc:  # not measurable here: report None with the reason
            note = str(exc)

    return PathInformation(
        mode=str(mode),
        layers=chosen,
        nmi=spec,
        bits=bits,
        bits_mm=bits_mm,
        entropy_domain_bits=h_d,
        n_tokens=int(ids.size),
        n_paths=n_paths,
        singletons=singletons,
        table_columns=n_columns,
        per_layer=tuple(layer_results),
        heldout=held,
        heldout_note=note,
        context=context,
    )
