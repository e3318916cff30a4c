"""Permutation nulls and bootstrap intervals for the routing information measures (pure numpy).

Tokens of one document are not independent (same topic, same words, a router that drifts along a
sequence), so the unit of resampling is the *document*:

- `permutation_null`: shuffle domain labels across documents (each document keeps all its tokens
  and gets one domain), recompute the statistic. The null of "routing carries no domain
  information beyond chance document-to-domain assignment".
- `bootstrap_ci`: resample documents with replacement, recompute, take percentiles.
- `stratified_doc_bootstrap`: the same within each domain, so a replicate keeps every domain's
  number of documents.

Domain information beyond the token id, I(D;E|T), is tested by cross-fitting over documents in
`analysis.heldout`: a within-token shuffle of single occurrences ignores that a document's tokens
share context, and called routers significant that never see the domain.

The document nulls work on the per-document table `DocCounts` (counts [M, E]): a replicate's joint
[G, E] is a matrix product of a [R, M] label mask or multiplicity matrix with counts [M, E], so
their cost does not grow with the number of routing records. Every function takes an explicit
`np.random.Generator` or integer seed and is deterministic given it.

Legend as in `moe/__init__.py`: N tokens, K top-k, E experts, G domains, M documents,
R resamples (replicates); in I(D;E) and H(D), D is the domain variable, not a shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from analysis.information import (
    DocCounts,
    joint_from_docs,
    normalized_mutual_information,
    normalized_mutual_information_mm,
)
from analysis.validation import RngLike, as_labels, as_rng, positive_int

__all__ = [
    "check_doc_counts",
    "BootstrapInterval",
    "NullDistribution",
    "SpecializationResult",
    "bootstrap_ci",
    "joints_from_doc_labels",
    "joints_from_doc_weights",
    "p_value",
    "permutation_null",
    "permute_doc_domains",
    "resample_docs",
    "stratified_doc_bootstrap",
    "summarize_specialization",
]

Statistic = Callable[[np.ndarray], float]

# Replicates are processed in chunks so a [R, M] float mask stays under ~32 MiB.
_CHUNK_CELLS = 1 << 22


def check_doc_counts(docs: DocCounts, n_domains: int) -> tuple[np.ndarray, np.ndarray]:
    """(doc_domain [M] int64, counts [M, E] float64) of `docs`, checked: 2-D counts, one domain id in
    [0, G) per document, at least 2 documents (the nulls and bootstraps resample documents)."""
    counts = np.asarray(docs.counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"docs.counts must be [M, E], got shape {counts.shape}")
    dd = as_labels("doc_domain", docs.doc_domain, n_domains)
    if dd.shape[0] != counts.shape[0]:
        raise ValueError(f"docs.doc_domain has {dd.shape[0]} documents, counts has {counts.shape[0]}")
    if counts.shape[0] < 2:
        raise ValueError("resampling needs at least 2 documents")
    return dd, counts


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class NullDistribution:
    """A statistic and its null: samples [R], p-value (1 + #{null >= observed}) / (1 + R)."""

    observed: float
    samples: np.ndarray
    p_value: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples))

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.samples, q))

    @property
    def q95(self) -> float:
        return self.quantile(0.95)


@dataclass(frozen=True, eq=False)
class BootstrapInterval:
    """Percentile bootstrap interval of a statistic; samples [R]."""

    estimate: float
    low: float
    high: float
    confidence: float
    samples: np.ndarray


@dataclass(frozen=True)
class SpecializationResult:
    """Domain specialization of one layer: NMI above chance, its interval and its null.

    observed: plug-in NMI; corrected: Miller-Madow NMI; null_mean/null_q95/p_value: the
    document-permutation null of the plug-in NMI (chance level, including the share that document
    clustering and the plug-in bias add); excess = observed - null_mean, the headline number (a
    domain-blind router scores ~0 on it, whatever its document clustering); ci_low/ci_high: the
    domain-stratified document-bootstrap interval of the plug-in NMI, shifted by the bootstrap's own
    bias estimate (duplicated documents inflate a resampled plug-in NMI, which left the plain
    percentile interval above its estimate), so it contains the estimate; excess_ci_low/high: the
    same interval minus null_mean. n_samples: table total; n_docs: M; docs_per_domain [G].
    """

    observed: float
    corrected: float
    ci_low: float
    ci_high: float
    confidence: float
    null_mean: float
    null_q95: float
    p_value: float
    n_samples: float
    n_docs: int
    n_permutations: int
    n_resamples: int
    docs_per_domain: tuple[int, ...] = ()

    @property
    def excess(self) -> float:
        """Observed minus null mean: the NMI above chance (document clustering and bias removed)."""
        return self.observed - self.null_mean

    @property
    def excess_ci_low(self) -> float:
        return self.ci_low - self.null_mean

    @property
    def excess_ci_high(self) -> float:
        return self.ci_high - self.null_mean


def p_value(observed: float, null: np.ndarray) -> float:
    """One-sided permutation p-value (1 + #{null >= observed}) / (1 + R), in (0, 1].

    Ties count as "as extreme": a replicate counts when it is >= observed - 1e-12 * max(1, |obs|),
    because the observed and the replicate values are summed in different orders and an exact tie
    (e.g. the identity permutation, or a statistic that is 0 under both) must not come out as a
    rounding-level win.
    """
    s = np.asarray(null, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("empty null distribution")
    obs = float(observed)
    tol = 1e-12 * max(1.0, abs(obs))
    return float((1 + np.count_nonzero(s >= obs - tol)) / (1 + s.size))


# ----------------------------------------------------------------------------- document resampling
def permute_doc_domains(doc_domain: np.ndarray, n_permutations: int, rng: RngLike) -> np.ndarray:
    """R independent permutations of the document domains, [R, M] int64.

    Each row is a permutation of doc_domain [M]: every document keeps one domain and the number of
    documents per domain is preserved; tokens follow their document.
    """
    dd = np.asarray(doc_domain)
    if dd.ndim != 1 or not np.issubdtype(dd.dtype, np.integer):
        raise ValueError(f"doc_domain must be a 1-D integer array [M], got {dd.dtype} {dd.shape}")
    r = positive_int("n_permutations", n_permutations)
    return as_rng(rng).permuted(np.broadcast_to(dd.astype(np.int64), (r, dd.size)), axis=1)


def resample_docs(n_docs: int, n_resamples: int, rng: RngLike) -> np.ndarray:
    """Bootstrap multiplicities [R, M] float64: how often each document is drawn when M documents
    are drawn with replacement (each row sums to M)."""
    m = positive_int("n_docs", n_docs)
    r = positive_int("n_resamples", n_resamples)
    draws = as_rng(rng).integers(0, m, size=(r, m))
    flat = (draws + (np.arange(r) * m)[:, None]).ravel()
    return np.bincount(flat, minlength=r * m).reshape(r, m).astype(np.float64)


def stratified_doc_bootstrap(doc_domain: np.ndarray, n_resamples: int, rng: RngLike) -> np.ndarray:
    """Bootstrap multiplicities [R, M] stratified by domain: each domain's M_d documents are drawn
    M_d times with replacement, so every replicate keeps the number of documents per domain (rows
    restricted to one domain sum to M_d). Unstratified resampling lets a replicate lose a small
    domain's documents, which moves H(D) and every statistic normalized by it."""
    dd = np.asarray(doc_domain)
    if dd.ndim != 1:
        raise ValueError(f"doc_domain must be [M], got shape {dd.shape}")
    r = positive_int("n_resamples", n_resamples)
    gen = as_rng(rng)
    out = np.zeros((r, dd.size), dtype=np.float64)
    for d in np.unique(dd):
        idx = np.flatnonzero(dd == d)
        out[:, idx] = resample_docs(idx.size, r, gen)
    return out


def joints_from_doc_labels(labels: np.ndarray, counts: np.ndarray, n_domains: int) -> np.ndarray:
    """Joint tables [R, G, E] for R relabellings of the documents: joint[r, d] = sum of counts [M, E]
    over documents m with labels[r, m] == d. labels [R, M] int in [0, G)."""
    lab = np.asarray(labels)
    c = np.asarray(counts, dtype=np.float64)
    if lab.ndim != 2 or c.ndim != 2 or lab.shape[1] != c.shape[0]:
        raise ValueError(f"labels must be [R, M] and counts [M, E], got {lab.shape} and {c.shape}")
    r, m = lab.shape
    out = np.empty((r, n_domains, c.shape[1]), dtype=np.float64)
    step = max(1, _CHUNK_CELLS // max(m, 1))
    for s in range(0, r, step):
        block = lab[s : s + step]
        for d in range(n_domains):
            out[s : s + step, d] = (block == d).astype(np.float64) @ c
    return out


def joints_from_doc_weights(
    weights: np.ndarray, doc_domain: np.ndarray, counts: np.ndarray, n_domains: int
) -> np.ndarray:
    """Joint tables [R, G, E] for R reweightings of the documents (e.g. bootstrap multiplicities):
    joint[r, d] = weights[r, docs of d] @ counts[docs of d]. weights [R, M], doc_domain [M],
    counts [M, E]."""
    w = np.asarray(weights, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    dd = as_labels("doc_domain", doc_domain, n_domains)
    if w.ndim != 2 or c.ndim != 2 or w.shape[1] != c.shape[0] or dd.shape[0] != c.shape[0]:
        raise ValueError(f"weights [R, M], doc_domain [M], counts [M, E] disagree: {w.shape}, {dd.shape}, {c.shape}")
    out = np.empty((w.shape[0], n_domains, c.shape[1]), dtype=np.float64)
    for d in range(n_domains):
        idx = np.flatnonzero(dd == d)
        out[:, d] = w[:, idx] @ c[idx]
    return out


def permutation_null(
    docs: DocCounts,
    n_domains: int,
    statistic: Statistic = normalized_mutual_information,
    *,
    n_permutations: int = 999,
    rng: RngLike,
) -> NullDistribution:
    """Document-level permutation null of `statistic(joint [G, E]) -> float`.

    Domain labels are shuffled across documents (never across tokens), the joint table is rebuilt
    from the per-document counts and the statistic recomputed. Returns the observed value, R null
    samples and the p-value (1 + #{null >= observed}) / (1 + R). Uniform or domain-independent
    routing gives p ~ Uniform(0, 1).
    """
    dd, counts = check_doc_counts(docs, n_domains)
    observed = float(statistic(joint_from_docs(dd, counts, n_domains)))
    labels = permute_doc_domains(dd, n_permutations, rng)
    joints = joints_from_doc_labels(labels, counts, n_domains)
    null = np.array([statistic(j) for j in joints], dtype=np.float64)
    return NullDistribution(observed, null, p_value(observed, null))


def bootstrap_ci(
    docs: DocCounts,
    n_domains: int,
    statistic: Statistic = normalized_mutual_information,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    rng: RngLike,
) -> BootstrapInterval:
    """Bias-corrected percentile interval of `statistic(joint [G, E])`, resampling documents within
    each domain (`stratified_doc_bootstrap`).

    Each replicate rebuilds the joint by matrix products with counts [M, E]. A plug-in statistic
    comes out larger on resampled tables (a drawn-twice document adds apparent structure), so the
    percentile interval [q_{(1-c)/2}, q_{(1+c)/2}] is shifted down by the bootstrap bias estimate
    mean(replicates) - estimate (Efron & Tibshirani 1993, sec. 10.6): the interval then brackets the
    estimate, as the percentile interval of an unbiased statistic does.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    dd, counts = check_doc_counts(docs, n_domains)
    estimate = float(statistic(joint_from_docs(dd, counts, n_domains)))
    weights = stratified_doc_bootstrap(dd, n_resamples, rng)
    joints = joints_from_doc_weights(weights, dd, counts, n_domains)
    samples = np.array([statistic(j) for j in joints], dtype=np.float64)
    alpha = (1.0 - confidence) / 2.0
    bias = float(samples.mean()) - estimate
    low, high = np.quantile(samples, [alpha, 1.0 - alpha]) - bias
    return BootstrapInterval(estimate, float(low), float(high), float(confidence), samples)


def summarize_specialization(
    docs: DocCounts,
    n_domains: int,
    *,
    n_permutations: int = 999,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    rng: RngLike,
) -> SpecializationResult:
    """NMI of the domain x expert table above its document-permutation null, with its Miller-Madow
    value and the bias-corrected, domain-stratified document-bootstrap interval (see
    `SpecializationResult`)."""
    dd, counts = check_doc_counts(docs, n_domains)
    joint = joint_from_docs(dd, counts, n_domains)
    null_rng, boot_rng = as_rng(rng).spawn(2)  # independent streams: the result ignores call order
    null = permutation_null(docs, n_domains, n_permutations=n_permutations, rng=null_rng)
    ci = bootstrap_ci(docs, n_domains, n_resamples=n_resamples, confidence=confidence, rng=boot_rng)
    return SpecializationResult(
        observed=null.observed,
        corrected=normalized_mutual_information_mm(joint),
        ci_low=ci.low,
        ci_high=ci.high,
        confidence=float(confidence),
        null_mean=null.mean,
        null_q95=null.q95,
        p_value=null.p_value,
        n_samples=float(joint.sum()),
        n_docs=int(dd.size),
        n_permutations=int(n_permutations),
        n_resamples=int(n_resamples),
        docs_per_domain=tuple(int(c) for c in np.bincount(dd, minlength=n_domains)),
    )
