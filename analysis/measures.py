"""Every specialization measure of one MoE layer, from its recorded counts (bits throughout).

Glue between the recorder and the pure statistics: `measure_layer` takes a layer's `LayerCounts`
(and, for the within-token null, the raw records) and returns a JSON-ready dict of plain floats.
The formulas live in `analysis.information`, `analysis.statistics` and `analysis.metrics`; this
module only decides which table feeds which measure and which reference value goes next to it.

Legend as in `analysis.recorder`: N tokens, K slots, E experts, D domains, V vocabulary, M documents.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from analysis.information import (
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
from analysis.statistics import summarize_specialization, within_token_null

__all__ = ["coactivation_from_pairs", "domain_shares", "measure_layer"]


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


def _within_token(records: RoutingRecords, layer: int, *, n_permutations: int, max_records: int | None,
                  gate_weighted: bool, vocab_size: int, n_domains: int, n_experts: int,
                  rng: np.random.Generator) -> dict[str, Any]:
    """Within-token permutation null of I(D;E|T) on (a uniform subsample of) the raw records."""
    rec = records.layers[layer]
    n = records.token.size
    idx = np.arange(n)
    if max_records is not None and n > max_records:
        idx = np.sort(rng.choice(n, size=max_records, replace=False))
    kept = rec.kept[idx]
    weights = None
    if gate_weighted:
        weights = np.where(kept, rec.gates[idx], 0.0)
    elif not kept.all():
        weights = kept.astype(np.float64)  # dropped slots weigh 0: not a routing decision
    null = within_token_null(records.token[idx], records.domain[idx], rec.experts[idx].astype(np.int64),
                             vocab_size, n_domains, n_experts, weights, n_permutations=n_permutations, rng=rng)
    return {"null_observed": null.observed, "null_mean": null.mean, "null_q95": null.q95,
            "p_value": null.p_value, "n_permutations": int(n_permutations), "records_used": int(idx.size)}


def measure_layer(
    counts: LayerCounts,
    records: RoutingRecords | None = None,
    layer: int = 0,
    *,
    n_permutations: int = 200,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    max_null_records: int | None = 2_000_000,
    rng: np.random.Generator | int,
) -> dict[str, Any]:
    """All measures of one layer as a dict of floats / nested lists (keys in `analysis.report`).

    counts: the layer's `LayerCounts`; records, layer: the raw records and this layer's index in
    them, for the within-token null of I(D;E|T) (skipped, fields None, when records is None).
    n_permutations: document-permutation replicates of the NMI null and within-token replicates of
    the I(D;E|T) null; n_bootstrap: document-bootstrap replicates of the NMI interval;
    max_null_records: subsample the records of the within-token null to this many tokens (its cost
    grows with N per replicate); the null then carries its own observed value (`null_observed`).
    """
    gen = np.random.default_rng(rng)
    spec_rng, null_rng = gen.spawn(2)
    e, d, k = counts.num_experts, counts.num_domains, counts.top_k
    joint = joint_from_docs(counts.docs.doc_domain, counts.docs.counts, d)  # weighted [D, E]
    token_expert = counts.token_expert(weighted=counts.weighting == "gate")
    spec = summarize_specialization(counts.docs, d, n_permutations=n_permutations, n_resamples=n_bootstrap,
                                    confidence=confidence, rng=spec_rng)

    # H(D|T) bounds I(D;E|T): when tokens determine the domain it is 0 and so is I(D;E|T).
    cube = counts.cube
    td = np.bincount(cube.token * d + cube.domain, weights=cube.count)
    h_d_given_t = max(entropy(td[td > 0]) - entropy(np.bincount(cube.token, weights=cube.count)), 0.0)
    cmi = conditional_mutual_information(cube)
    cmi_out: dict[str, Any] = {
        "plugin": cmi, "corrected": conditional_mutual_information_mm(cube),
        "h_domain_given_token_bits": h_d_given_t,
        "null_observed": None, "null_mean": None, "null_q95": None, "p_value": None,
        "n_permutations": 0, "records_used": 0, "normalized_excess": None,
    }
    if records is not None:
        cmi_out.update(_within_token(records, layer, n_permutations=n_permutations, max_records=max_null_records,
                                     gate_weighted=counts.weighting == "gate", vocab_size=counts.vocab_size,
                                     n_domains=d, n_experts=e, rng=null_rng))
        if h_d_given_t > 1e-12:
            cmi_out["normalized_excess"] = (cmi_out["null_observed"] - cmi_out["null_mean"]) / h_d_given_t

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
            "plugin": spec.observed, "corrected": spec.corrected, "ci_low": spec.ci_low, "ci_high": spec.ci_high,
            "confidence": spec.confidence, "null_mean": spec.null_mean, "null_q95": spec.null_q95,
            "p_value": spec.p_value, "n_docs": spec.n_docs, "n_permutations": spec.n_permutations,
            "n_bootstrap": spec.n_resamples,
        },
        "mi_token_expert_bits": {"plugin": mutual_information(token_expert),
                                 "corrected": mutual_information_mm(token_expert)},
        "cmi_domain_expert_given_token_bits": cmi_out,
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
