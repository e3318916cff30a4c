"""Every specialization measure of one MoE layer, from its recorded counts (bits throughout).

Glue between the recorder and the pure statistics: `measure_layer` takes a layer's `LayerCounts`
(and, for the within-token null, the raw records) and returns a JSON-ready dict of plain floats.
The formulas live in `analysis.information`, `analysis.statistics` and `analysis.metrics`; this
module only decides which table feeds which measure and which reference value goes next to it.

Legend as in `analysis.recorder`: N tokens, K slots, E experts, D domains, V vocabulary, M documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.information import (
    DocCounts,
    conditional_mutual_information,
    conditional_mutual_information_mm,
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
from analysis.recorder import LayerCounts, RoutingRecords
from analysis.heldout import HeldoutInformation, context_keys, heldout_conditional_information
from analysis.statistics import SpecializationResult, summarize_specialization

CONTEXTS = ("token", "bigram")

__all__ = ["CONTEXTS", "RoutingEvidence", "coactivation_from_pairs", "domain_shares", "measure_layer",
           "previous_tokens", "routing_evidence"]


def domain_shares(domain_expert: np.ndarray, tokens_per_domain: np.ndarray) -> np.ndarray:
    """OLMoE domain specialization [D, E]: the fraction of domain d's tokens sent to expert e.

    domain_expert [D, E] kept assignments; tokens_per_domain [D]. Equal to
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


def routing_evidence(docs: DocCounts, n_domains: int, n_experts: int, *, token: np.ndarray | None = None,
                     prev_token: np.ndarray | None = None, domain: np.ndarray | None = None,
                     doc: np.ndarray | None = None, experts: np.ndarray | None = None,
                     weights: np.ndarray | None = None, context: str = "token", n_permutations: int = 200,
                     n_bootstrap: int = 200, confidence: float = 0.95,
                     rng: np.random.Generator | int) -> RoutingEvidence:
    """NMI of the per-document table `docs` against its document-permutation null, and (given the
    per-token arrays token, domain, doc [N], experts [N, K], weights [N, K] or None) the held-out
    I(D;E|C) with C = the token id (`context="token"`) or the token and the previous token
    (`"bigram"`, prev_token [N], -1 at a sequence start). One function for a trained model's
    records and for the calibration battery, so both are judged by the same numbers."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    nmi_rng, cmi_rng = np.random.default_rng(rng).spawn(2)
    nmi = summarize_specialization(docs, n_domains, n_permutations=n_permutations, n_resamples=n_bootstrap,
                                   confidence=confidence, rng=nmi_rng)
    cmi = None
    if token is not None:
        keys = context_keys(token, prev_token if context == "bigram" else None)
        cmi = heldout_conditional_information(keys, domain, doc, experts, n_domains, n_experts, weights,
                                              n_resamples=max(n_bootstrap, 200), confidence=confidence, rng=cmi_rng)
    return RoutingEvidence(nmi, cmi, context)


def previous_tokens(token: np.ndarray, position: np.ndarray) -> np.ndarray:
    """The previous token of each record in stream order [N], -1 at position 0 of a sequence."""
    prev = np.empty_like(np.asarray(token, dtype=np.int64))
    prev[1:] = token[:-1]
    prev[0] = -1
    prev[np.asarray(position) == 0] = -1
    return prev


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
    """All measures of one layer as a dict of floats / nested lists (keys in `analysis.report`).

    counts: the layer's `LayerCounts`; records, layer: the raw records and this layer's index in
    them, for the held-out I(D;E|C) (skipped, fields None, when records is None).
    n_permutations: document-permutation replicates of the NMI null; n_bootstrap: document-bootstrap
    replicates of the NMI interval and of the held-out I(D;E|C) (at least 200); context: "token" or
    "bigram", what C holds.
    """
    e, d, k = counts.num_experts, counts.num_domains, counts.top_k
    joint = joint_from_docs(counts.docs.doc_domain, counts.docs.counts, d)  # weighted [D, E]
    token_expert = counts.token_expert(weighted=counts.weighting == "gate")
    arrays: dict[str, Any] = {}
    if records is not None:
        rec = records.layers[layer]
        kept = rec.kept
        weights = np.where(kept, rec.gates, 0.0) if counts.weighting == "gate" else (
            None if kept.all() else kept.astype(np.float64))  # a dropped slot weighs 0: no routing decision
        arrays = dict(token=records.token, prev_token=previous_tokens(records.token, records.position),
                      domain=records.domain, doc=records.doc, experts=rec.experts.astype(np.int64), weights=weights)
    ev = routing_evidence(counts.docs, d, e, context=context, n_permutations=n_permutations,
                          n_bootstrap=n_bootstrap, confidence=confidence, rng=rng, **arrays)
    spec, held = ev.nmi, ev.cmi
    cube = counts.cube
    cmi_out: dict[str, Any] = {
        "context": context,
        "plugin_token_bits": conditional_mutual_information(cube),
        "plugin_token_corrected_bits": conditional_mutual_information_mm(cube),
        "bits": None, "bits_ci_low": None, "bits_ci_high": None, "share": None, "share_ci_low": None,
        "share_ci_high": None, "p_value": None, "h_domain_given_context_bits": None, "assignments_scored": None,
        "n_folds": None, "n_bootstrap": None,
    }
    if held is not None:
        h = held.h_domain_given_context
        cmi_out.update({
            "bits": held.estimate, "bits_ci_low": held.ci_low, "bits_ci_high": held.ci_high,
            "share": held.share, "share_ci_low": held.ci_low / h if h > 1e-12 else None,
            "share_ci_high": held.ci_high / h if h > 1e-12 else None, "p_value": held.p_value,
            "h_domain_given_context_bits": h, "assignments_scored": held.n_assignments,
            "n_folds": held.n_folds, "n_bootstrap": held.n_resamples,
        })

    co = coactivation_from_pairs(counts.pairs)
    co_null = coactivation_null(min(k, e), e) if e > 1 else None
    load = counts.load
    top1 = counts.top1 / max(counts.top1.sum(), 1.0)
    batch_vio = [max_violation(b) for b in counts.batch_loads if b.sum() > 0]
    min_count = math.ceil(10 * e / k)
    vocab_spec = vocabulary_specialization(counts.token_expert(), k, min_count=min_count)
    return {
        "tokens": counts.tokens,
        "assignments": counts.assignments,
        "assignments_per_token": counts.assignments / max(counts.tokens, 1),
        "weighting": counts.weighting,
        "domain_expert_counts": counts.domain_expert.tolist(),
        "domain_specialization": domain_shares(counts.domain_expert, counts.tokens_per_domain).tolist(),
        "uniform_share": k / e,
        "entropy_domain_bits": entropy(joint.sum(axis=1)),
        "mi_domain_expert_bits": {"plugin": mutual_information(joint), "corrected": mutual_information_mm(joint)},
        "nmi": {
            "excess": spec.excess, "excess_ci_low": spec.excess_ci_low, "excess_ci_high": spec.excess_ci_high,
            "plugin": spec.observed, "corrected": spec.corrected, "ci_low": spec.ci_low, "ci_high": spec.ci_high,
            "confidence": spec.confidence, "null_mean": spec.null_mean, "null_q95": spec.null_q95,
            "p_value": spec.p_value, "n_docs": spec.n_docs, "docs_per_domain": list(spec.docs_per_domain),
            "n_permutations": spec.n_permutations, "n_bootstrap": spec.n_resamples,
        },
        "mi_token_expert_bits": {"plugin": mutual_information(token_expert),
                                 "corrected": mutual_information_mm(token_expert)},
        "cmi": cmi_out,
        # Rare tokens score high by chance; 10E/k occurrences is the helper's suggested floor.
        "vocabulary_specialization": {"value": vocab_spec if math.isfinite(vocab_spec) else None,
                                      "min_count": min_count, "uniform": k / e},
        # Each used row sums to the mean number of co-selected experts, so the mean off-diagonal is
        # fixed ((k-1)/(E-1) for top-k); the spread around the null is what redundancy changes.
        "coactivation": {
            "matrix": co.tolist(), "null": co_null,
            "max_offdiag": _nanstat(np.max, _offdiag(co)),
            "mean_abs_deviation": None if co_null is None else _nanstat(np.mean, np.abs(_offdiag(co) - co_null)),
        },
        # Top-1 agreement of adjacent tokens of one document; null = sum_e p_e^2 of the top-1 load
        # (`analysis.metrics.consecutive_expert_null`, "top1").
        "consecutive_top1": {
            "rate": counts.consecutive_same / counts.consecutive_pairs if counts.consecutive_pairs else None,
            "null": float(np.dot(top1, top1)), "pairs": counts.consecutive_pairs,
        },
        "router_entropy_bits": {"mean": counts.entropy_bits_sum / max(counts.tokens, 1), "max": math.log2(e)},
        "load": {
            "counts": load.tolist(), "max_violation": max_violation(load),
            "max_violation_batch_mean": float(np.mean(batch_vio)) if batch_vio else None,
            "entropy_bits": load_entropy(load), "entropy_max_bits": math.log2(e),
        },
    }
