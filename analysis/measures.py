"""Every specialization measure of one MoE layer, registered as units (bits throughout).

The measures (`analysis.registry`), in report order:

    nmi            NMI = I(D;E)/H(D) minus its document-permutation null mean, with the bias-corrected
                   domain-stratified document-bootstrap interval and the permutation p-value
    cmi            held-out I(D;E|C) / H(D|C): domain information beyond the context (`analysis.heldout`)
    nmi_top1       nmi counting each token's top-1 expert only (OLMoE publishes top-1 and top-k)
    cmi_top1       cmi counting each token's top-1 expert only
    mi_domain      I(D;E) in bits (plug-in; Miller-Madow in details)
    mi_token       I(T;E) in bits: routing explained by the token id
    vocabulary     OLMoE vocabulary specialization
    consecutive    top-1 agreement of adjacent tokens of one document, against sum_e p_e^2
    maxvio         load imbalance on the validation tokens
    committee_overlap  mean pairwise Jaccard overlap across domains of the smallest expert sets that
                   carry half of each domain's routing mass, against its document null
                   (`analysis.committees`; low and below the null: disjoint committees, specialist)
    knockout       (model) median over experts of the percentile among damage-matched dense groups
    cka            (model) mean off-diagonal linear CKA between experts
    probe_info     (model) domain information in the router's input, bits per token, from a held-out
                   linear probe (`analysis.probe_information`), with routing_use = I(D;E) / it

Across the layers, `analysis.paths` measures I(D; path) of each token's sequence of experts
(`analysis.report` puts it in summary["paths"], not per layer).

`measure_layer` takes a layer's `LayerCounts` (and the raw records, for the held-out I(D;E|C)) and
returns the layer's descriptive tables plus `measures: {name: result}`; the knockout and CKA
results are added by `analysis.report`, which has the model. The formulas live in
`analysis.information`, `analysis.statistics`, `analysis.heldout` and `analysis.metrics`.

Legend as in `moe/__init__.py`: N tokens, K slots, E experts, G domains, V vocabulary, M documents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from analysis.committees import committee_evidence
from analysis.heldout import HeldoutInformation, TooFewRecords, context_keys, heldout_conditional_information
from analysis.information import (
    DocCounts,
    conditional_mutual_information,
    conditional_mutual_information_mm,
    doc_expert_counts,
    entropy,
    joint_from_docs,
    mutual_information,
    mutual_information_mm,
)
from analysis.metrics import (
    coactivation_null,
    load_entropy,
    max_violation,
    vocabulary_specialization,
)
from analysis.records import RoutingRecords
from analysis.registry import MEASURES, Measure, MeasureResult, register
from analysis.statistics import SpecializationResult, summarize_specialization
from moe.validation import check_choice

if TYPE_CHECKING:  # the counts import torch; this module stays pure numpy
    from analysis.counts import LayerCounts

CONTEXTS = ("token", "bigram")

__all__ = [
    "CONTEXTS",
    "MEASURES",
    "LayerInputs",
    "RoutingEvidence",
    "cka_result",
    "coactivation_from_pairs",
    "domain_shares",
    "knockout_result",
    "layer_inputs",
    "measure_layer",
    "previous_tokens",
    "routing_evidence",
]


def domain_shares(domain_expert: np.ndarray, tokens_per_domain: np.ndarray) -> np.ndarray:
    """OLMoE domain specialization [G, E]: the fraction of domain d's tokens sent to expert e.

    domain_expert [G, E] kept assignments; tokens_per_domain [G]. Equal to
    `analysis.metrics.domain_specialization(joint, k)` for dropless top-k routing (rows sum to k),
    but divides by the true token count, so it stays right with capacity drops and for expert
    choice (where a token has 0..E experts). Uniform routing gives k/E; nan rows for absent domains.
    """
    t = np.asarray(tokens_per_domain, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(t > 0, np.asarray(domain_expert, dtype=np.float64) / t, np.nan)


def coactivation_from_pairs(pairs: np.ndarray) -> np.ndarray:
    """OLMoE co-activation [E, E], C[i, j] = P(j selected | i selected), from co-selection counts
    pairs [E, E] (diagonal = tokens selecting i). Diagonal 0, rows of unused experts nan: the
    convention of `analysis.metrics.coactivation`, which needs a fixed K per token; counting pairs
    also covers expert choice and capacity drops."""
    p = np.asarray(pairs, dtype=np.float64)
    load = np.diag(p).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(load[:, None] > 0, p / load[:, None], np.nan)
    np.fill_diagonal(c, np.where(load > 0, 0.0, np.nan))
    return c


def _offdiag(m: np.ndarray) -> np.ndarray:
    return m[~np.eye(m.shape[0], dtype=bool)]


def _nanstat(fn, a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(fn(a)) if a.size else float("nan")


@dataclass(frozen=True)
class RoutingEvidence:
    """The two routing measures the verdict reads: NMI above its document null (`nmi`) and the
    held-out domain information beyond the context (`cmi`; None without per-token records)."""

    nmi: SpecializationResult
    cmi: HeldoutInformation | None
    context: str
    cmi_note: str | None = None  # why cmi is None although per-token records were given


def routing_evidence(
    docs: DocCounts,
    n_domains: int,
    n_experts: int,
    *,
    token: np.ndarray | None = None,
    prev_token: np.ndarray | None = None,
    domain: np.ndarray | None = None,
    doc: np.ndarray | None = None,
    experts: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    context: str = "token",
    n_permutations: int = 200,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    rng: np.random.Generator | int,
) -> RoutingEvidence:
    """NMI of the per-document table `docs` against its document-permutation null, and (given the
    per-token arrays token, domain, doc [N], experts [N, K], weights [N, K] or None) the held-out
    I(D;E|C) with C = the token id (`context="token"`) or the token and the previous token
    (`"bigram"`, prev_token [N], -1 at a sequence start). One function for a trained model's
    records and for the calibration battery, so both are judged by the same numbers."""
    check_choice("context", context, CONTEXTS)
    nmi_rng, cmi_rng = np.random.default_rng(rng).spawn(2)
    nmi = summarize_specialization(
        docs, n_domains, n_permutations=n_permutations, n_resamples=n_bootstrap, confidence=confidence, rng=nmi_rng
    )
    cmi, note = None, None
    if token is not None:
        if domain is None or doc is None or experts is None:
            raise ValueError("routing_evidence: token needs domain, doc and experts too (for the held-out I(D;E|C))")
        keys = context_keys(token, prev_token if context == "bigram" else None)
        try:
            cmi = heldout_conditional_information(
                keys,
                domain,
                doc,
                experts,
                n_domains,
                n_experts,
                weights,
                n_resamples=max(n_bootstrap, 200),
                confidence=confidence,
                rng=cmi_rng,
            )
        except TooFewRecords as exc:  # not measurable here: the verdict abstains instead of the run failing
            note = str(exc)
    return RoutingEvidence(nmi, cmi, context, note)


def previous_tokens(token: np.ndarray, position: np.ndarray) -> np.ndarray:
    """The previous token of each record in stream order [N], -1 at position 0 of a sequence."""
    prev = np.empty_like(np.asarray(token, dtype=np.int64))
    prev[1:] = token[:-1]
    prev[0] = -1
    prev[np.asarray(position) == 0] = -1
    return prev


@dataclass(frozen=True)
class LayerInputs:
    """What a routing measure reads: the layer's counts, the per-token arrays (None without records)
    and the analysis settings. `evidence` (NMI null and held-out I(D;E|C)) is computed once, on
    first use, and shared by the measures that read it."""

    counts: LayerCounts
    arrays: Mapping[str, Any] | None
    n_permutations: int
    n_bootstrap: int
    confidence: float
    context: str
    seed: Any

    @cached_property
    def evidence(self) -> RoutingEvidence:
        return routing_evidence(
            self.counts.docs,
            self.counts.num_domains,
            self.counts.num_experts,
            context=self.context,
            n_permutations=self.n_permutations,
            n_bootstrap=self.n_bootstrap,
            confidence=self.confidence,
            rng=self.seed,
            **{k: v for k, v in (self.arrays or {}).items() if k not in ("gates", "kept")},
        )

    @cached_property
    def evidence_top1(self) -> RoutingEvidence | None:
        """The same evidence counting one expert per token, its highest-gate kept one (ties: the
        first slot); tokens with no kept slot are left out. None without per-token records."""
        if self.arrays is None:
            return None
        a = self.arrays
        experts = np.asarray(a["experts"])
        gates = np.asarray(a["gates"], dtype=np.float64)
        kept = np.ones(experts.shape, dtype=bool) if a.get("kept") is None else np.asarray(a["kept"])
        scored = np.where(kept, gates, -np.inf)
        slot = np.argmax(scored, axis=1)
        routed = kept.any(axis=1)
        top1 = experts[np.arange(len(slot)), slot][routed][:, None]
        d, e = self.counts.num_domains, self.counts.num_experts
        docs = doc_expert_counts(a["doc"][routed], a["domain"][routed], top1, d, e)
        return routing_evidence(
            docs,
            d,
            e,
            token=a["token"][routed],
            prev_token=a["prev_token"][routed],
            domain=a["domain"][routed],
            doc=a["doc"][routed],
            experts=top1,
            context=self.context,
            n_permutations=self.n_permutations,
            n_bootstrap=self.n_bootstrap,
            confidence=self.confidence,
            rng=self.seed,
        )

    @property
    def joint(self) -> np.ndarray:
        return joint_from_docs(self.counts.docs.doc_domain, self.counts.docs.counts, self.counts.num_domains)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _nmi_result(name: str, spec: SpecializationResult) -> MeasureResult:
    return MeasureResult(
        name,
        spec.excess,
        spec.excess_ci_low,
        spec.excess_ci_high,
        spec.null_mean,
        spec.p_value,
        {
            "plugin": spec.observed,
            "corrected": spec.corrected,
            "plugin_ci_low": spec.ci_low,
            "plugin_ci_high": spec.ci_high,
            "confidence": spec.confidence,
            "null_q95": spec.null_q95,
            "n_docs": spec.n_docs,
            "docs_per_domain": list(spec.docs_per_domain),
            "n_permutations": spec.n_permutations,
            "n_bootstrap": spec.n_resamples,
        },
    )


def _nmi(inputs: LayerInputs) -> MeasureResult:
    return _nmi_result("nmi", inputs.evidence.nmi)


def _nmi_top1(inputs: LayerInputs) -> MeasureResult:
    evidence = inputs.evidence_top1
    return MeasureResult("nmi_top1", None) if evidence is None else _nmi_result("nmi_top1", evidence.nmi)


def _cmi(inputs: LayerInputs) -> MeasureResult:
    cube = inputs.counts.cube
    return _cmi_result(
        "cmi",
        inputs.evidence,
        inputs.context,
        {
            "plugin_token_bits": conditional_mutual_information(cube),
            "plugin_token_corrected_bits": conditional_mutual_information_mm(cube),
        },
    )


def _cmi_top1(inputs: LayerInputs) -> MeasureResult:
    return _cmi_result("cmi_top1", inputs.evidence_top1, inputs.context, {})


def _cmi_result(name: str, evidence: RoutingEvidence | None, context: str, extra: Mapping[str, Any]) -> MeasureResult:
    details: dict[str, Any] = {"context": context, **extra}
    held = None if evidence is None else evidence.cmi
    if held is None:
        if evidence is not None and evidence.cmi_note:
            details["note"] = evidence.cmi_note
        return MeasureResult(name, None, details=details)
    details.update(
        {
            "bits": held.estimate,
            "bits_ci_low": held.ci_low,
            "bits_ci_high": held.ci_high,
            "h_domain_given_context_bits": held.h_domain_given_context,
            "assignments_scored": held.n_assignments,
            "n_folds": held.n_folds,
            "n_bootstrap": held.n_resamples,
        }
    )
    return MeasureResult(
        name, _finite(held.share), _finite(held.share_ci_low), _finite(held.share_ci_high), 0.0, held.p_value, details
    )


def _mi_domain(inputs: LayerInputs) -> MeasureResult:
    joint = inputs.joint
    return MeasureResult(
        "mi_domain",
        mutual_information(joint),
        details={"corrected": mutual_information_mm(joint), "entropy_domain_bits": entropy(joint.sum(axis=1))},
    )


def _mi_token(inputs: LayerInputs) -> MeasureResult:
    te = inputs.counts.token_expert(weighted=inputs.counts.weighting == "gate")
    return MeasureResult("mi_token", mutual_information(te), details={"corrected": mutual_information_mm(te)})


def _vocabulary(inputs: LayerInputs) -> MeasureResult:
    c = inputs.counts
    # Rare tokens score high by chance; 10E/k occurrences is the helper's suggested floor.
    min_count = math.ceil(10 * c.num_experts / c.top_k)
    value = vocabulary_specialization(c.token_expert(), c.top_k, min_count=min_count)
    return MeasureResult(
        "vocabulary", _finite(value), null_mean=c.top_k / c.num_experts, details={"min_count": min_count}
    )


def _consecutive(inputs: LayerInputs) -> MeasureResult:
    c = inputs.counts
    top1 = c.top1 / max(c.top1.sum(), 1.0)
    rate = c.consecutive_same / c.consecutive_pairs if c.consecutive_pairs else None
    # Null: sum_e p_e^2 of the top-1 load (`analysis.metrics.consecutive_expert_null`, "top1").
    return MeasureResult(
        "consecutive", rate, null_mean=float(np.dot(top1, top1)), details={"pairs": c.consecutive_pairs}
    )


def _maxvio(inputs: LayerInputs) -> MeasureResult:
    c = inputs.counts
    batch_vio = [max_violation(b) for b in c.batch_loads if b.sum() > 0]
    return MeasureResult(
        "maxvio",
        max_violation(c.load),
        details={
            "counts": c.load.tolist(),
            "batch_mean": float(np.mean(batch_vio)) if batch_vio else None,
            "entropy_bits": load_entropy(c.load),
            "entropy_max_bits": math.log2(c.num_experts),
        },
    )


def _committee_overlap(inputs: LayerInputs) -> MeasureResult:
    c = inputs.counts
    return committee_evidence(
        c.docs,
        c.num_domains,
        n_permutations=inputs.n_permutations,
        n_bootstrap=inputs.n_bootstrap,
        confidence=inputs.confidence,
        rng=inputs.seed,
    ).as_measure_result()


def knockout_result(entry: Mapping[str, Any] | None) -> MeasureResult:
    """The knockout measure from `analysis.report`'s per-layer knockout entry: the median over
    experts of each expert's percentile among the dense twin's damage-matched unit groups."""
    if entry is None:
        return MeasureResult("knockout", None)
    raw = entry.get("percentile")
    pct = np.asarray([np.nan if x is None else x for x in ([] if raw is None else list(raw))], dtype=np.float64)
    value = float(np.nanmedian(pct)) if np.isfinite(pct).any() else None
    return MeasureResult("knockout", value, null_mean=0.5 if value is not None else None, details=dict(entry))


def cka_result(matrix: Any, mean_offdiag: float) -> MeasureResult:
    """The CKA measure: mean off-diagonal linear CKA between experts, with the matrix."""
    return MeasureResult("cka", _finite(mean_offdiag), details={"matrix": matrix})


for _m in (
    Measure(
        "nmi",
        "NMI − null",
        "NMI = I(D;E)/H(D) minus its document-permutation null mean",
        "share of H(D)",
        _nmi,
        "specialist",
    ),
    Measure(
        "cmi",
        "I(D;E|C) share",
        "held-out domain information beyond the context, I(D;E|C) / H(D|C)",
        "share of H(D|C)",
        _cmi,
        "specialist",
    ),
    Measure(
        "nmi_top1", "NMI − null (top-1)", "nmi counting each token's top-1 expert only", "share of H(D)", _nmi_top1
    ),
    Measure(
        "cmi_top1",
        "I(D;E|C) share (top-1)",
        "cmi counting each token's top-1 expert only",
        "share of H(D|C)",
        _cmi_top1,
    ),
    Measure("mi_domain", "I(D;E)", "I(D;E), plug-in", "bits", _mi_domain),
    Measure("mi_token", "I(T;E)", "I(T;E): routing explained by the token id, plug-in", "bits", _mi_token),
    Measure("vocabulary", "vocab. spec.", "OLMoE vocabulary specialization (null: k/E)", "share", _vocabulary),
    Measure(
        "consecutive",
        "consec. top-1",
        "adjacent tokens sharing their top-1 expert (null: sum p_e^2)",
        "share",
        _consecutive,
    ),
    Measure("maxvio", "MaxVio", "load imbalance on the validation tokens", "ratio", _maxvio),
    Measure(
        "committee_overlap",
        "committee overlap",
        "mean Jaccard overlap across domains of the expert sets carrying half of each domain's routing mass",
        "Jaccard",
        _committee_overlap,
        "ensemble",
    ),
    Measure(
        "knockout",
        "KO percentile",
        "median expert percentile among damage-matched dense unit groups",
        "percentile",
        None,
        "specialist",
    ),
    Measure("cka", "expert CKA", "mean off-diagonal linear CKA between experts", "CKA", None, "ensemble"),
    Measure(
        "probe_info",
        "probe bits",
        "domain information in the router's input: held-out linear probe, H(D) minus its cross-entropy",
        "bits per token",
        None,
    ),
):
    register(_m)


def layer_inputs(
    counts: LayerCounts,
    records: RoutingRecords | None,
    layer: int,
    *,
    n_permutations: int,
    n_bootstrap: int,
    confidence: float,
    context: str,
    rng: Any,
) -> LayerInputs:
    """A layer's `LayerInputs`: its counts and, given the raw records, its per-token arrays."""
    arrays = None
    if records is not None:
        rec = records.layers[layer]
        kept = rec.kept
        weights = (
            np.where(kept, rec.gates, 0.0)
            if counts.weighting == "gate"
            else (None if kept.all() else kept.astype(np.float64))
        )  # a dropped slot weighs 0: no routing decision
        arrays = dict(
            token=records.token,
            prev_token=previous_tokens(records.token, records.position),
            domain=records.domain,
            doc=records.doc,
            experts=rec.experts.astype(np.int64),
            weights=weights,
            gates=rec.gates,
            kept=kept,
        )
    return LayerInputs(counts, arrays, n_permutations, n_bootstrap, confidence, context, rng)


def measure_layer(
    counts: LayerCounts,
    records: RoutingRecords | None = None,
    layer: int = 0,
    *,
    n_permutations: int = 200,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    context: str = "token",
    rng: np.random.Generator | int,
) -> dict[str, Any]:
    """One layer's descriptive tables and `measures: {name: MeasureResult.as_dict()}` for every
    registered routing measure (keys in `analysis.report`).

    counts: the layer's `LayerCounts`; records, layer: the raw records and this layer's index in
    them, for the held-out I(D;E|C) (None then). n_permutations: document permutations of the NMI
    null; n_bootstrap: document-bootstrap replicates (the held-out estimate uses at least 200);
    context: "token" or "bigram", what C holds.
    """
    inputs = layer_inputs(
        counts,
        records,
        layer,
        n_permutations=n_permutations,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        context=context,
        rng=rng,
    )
    measures = {name: m.compute(inputs).as_dict() for name, m in MEASURES.items() if m.compute is not None}
    e, k = counts.num_experts, counts.top_k
    co = coactivation_from_pairs(counts.pairs)
    co_null = coactivation_null(min(k, e), e) if e > 1 else None
    return {
        "tokens": counts.tokens,
        "assignments": counts.assignments,
        "assignments_per_token": counts.assignments / max(counts.tokens, 1),
        "weighting": counts.weighting,
        "domain_expert_counts": counts.domain_expert.tolist(),
        "domain_specialization": domain_shares(counts.domain_expert, counts.tokens_per_domain).tolist(),
        "uniform_share": k / e,
        # Each used row sums to the mean number of co-selected experts, so the mean off-diagonal is
        # fixed ((k-1)/(E-1) for top-k); the spread around the null is what redundancy changes.
        "coactivation": {
            "matrix": co.tolist(),
            "null": co_null,
            "max_offdiag": _nanstat(np.max, _offdiag(co)),
            "mean_abs_deviation": None if co_null is None else _nanstat(np.mean, np.abs(_offdiag(co) - co_null)),
        },
        "router_entropy_bits": {"mean": counts.entropy_bits_sum / max(counts.tokens, 1), "max": math.log2(e)},
        "measures": measures,
    }
