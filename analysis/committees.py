"""Standing committees: per domain, the smallest set of experts carrying half its routing mass, and
how much those sets overlap across domains (pure numpy).

Reading (arXiv 2601.03425 found 1-5 experts carrying more than 50% of the routing mass per domain
in OLMoE, Qwen3-30B-A3B and DeepSeek-V2-Lite):

- a *domain-specialist* layer has small, disjoint committees: each domain's mass sits on a few
  experts of its own, so the mean pairwise Jaccard overlap is well below its document-permutation
  null (what domain-blind routing of the same documents would give) and its p-value is small;
- an *ensemble* layer shares one committee: every domain's mass sits on the same experts, the
  overlap is near 1 and not below its null (p-value near 1).

The committee of domain d at mass q is the smallest expert set S with sum_{e in S} joint[d, e] >=
q * sum_e joint[d, e]. Taking experts by descending share attains the minimum size (no k experts
carry more than the k largest shares); ties are broken by the expert index (lower first), so the
set is deterministic. A domain with no routing mass gets the empty committee.

The overlap is the mean over pairs of domains (both with mass) of the Jaccard index
|S_a ∩ S_b| / |S_a ∪ S_b|: 1 = one shared committee, 0 = pairwise disjoint. Domains without mass
are left out (an absent domain is not evidence of disjointness); with fewer than two domains with
mass the overlap is nan.

Discreteness: the overlap of a few small sets takes few values (two singletons give 0 or 1, five
size-2 sets a handful of fractions), so a small overlap alone says little and several layers can tie.
The document-permutation null is computed on the same discrete statistic, with ties counted as
"as extreme" in the p-value, so the test stays valid (conservative) however coarse the values are;
read the overlap against `null_mean`, never against 0 or 1. The null is not 1 either: with flat
routing a half-mass committee holds about half of the experts, chosen by noise, and two random
halves overlap with Jaccard about 1/3.

Units: joint tables hold (weighted) assignment counts; shares, overlaps and mass are fractions in
[0, 1]; sizes and intersection/union sizes are numbers of experts.

Legend as in `moe/__init__.py`: G domains, E experts, M documents, R resamples (permutations or
bootstrap replicates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.information import DocCounts, joint_from_docs
from analysis.registry import MeasureResult
from analysis.statistics import (
    check_doc_counts,
    joints_from_doc_labels,
    joints_from_doc_weights,
    p_value,
    permute_doc_domains,
    stratified_doc_bootstrap,
)
from analysis.validation import RngLike, as_rng, as_table, positive_int

__all__ = [
    "CommitteeResult",
    "committee_evidence",
    "committee_intersection_union",
    "committee_masks",
    "committee_overlap",
    "committee_sizes",
    "committees",
]

# Relative slack on "carries at least `mass`": shares summed in a different order than the total
# may fall short of mass * total by rounding; exact for integer counts below 2**53.
_REL_TOL = 1e-12


def _check_mass(mass: float) -> float:
    m = float(mass)
    if not 0.0 < m <= 1.0:
        raise ValueError(f"mass must lie in (0, 1], got {mass}")
    return m


# ----------------------------------------------------------------------------- vectorized core
def committee_masks(joints: np.ndarray, mass: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Committee membership of a stack of tables: (mask [..., G, E] bool, sizes [..., G] int64).

    joints [..., G, E]: non-negative (weighted) counts, any leading shape (e.g. [R, G, E]). mask[..., d, e]
    is True when expert e is in domain d's committee at `mass` (see the module docstring); sizes is
    the number of members (0 for a domain without mass). mass = 1 gives exactly the experts with a
    positive count.
    """
    q = _check_mass(mass)
    j = np.asarray(joints, dtype=np.float64)
    if j.ndim < 2:
        raise ValueError(f"joints must be [..., G, E], got shape {j.shape}")
    order = np.argsort(-j, axis=-1, kind="stable")  # descending share, ties by expert index
    ranked = np.take_along_axis(j, order, axis=-1)
    if q >= 1.0:
        sizes = np.count_nonzero(j > 0, axis=-1)
    else:
        csum = np.cumsum(ranked, axis=-1)
        total = csum[..., -1:]
        # Size = 1 + #{k : csum[k] < threshold}; csum is non-decreasing.
        sizes = 1 + np.count_nonzero(csum < total * (q - _REL_TOL), axis=-1)
        sizes = np.where(total[..., 0] > 0, sizes, 0)
    sizes = sizes.astype(np.int64)
    member_by_rank = np.arange(j.shape[-1]) < sizes[..., None]
    mask = np.zeros(j.shape, dtype=bool)
    np.put_along_axis(mask, order, member_by_rank, axis=-1)
    return mask, sizes


def _overlap_stats(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean pairwise Jaccard overlap [R], intersection size [R] and union size [R] of committee
    masks [R, G, E], over the domains with a non-empty committee (overlap nan with fewer than two;
    intersection and union 0 with none)."""
    m = mask.astype(np.float64)
    inter = m @ np.swapaxes(m, -1, -2)  # [R, G, G] |S_a ∩ S_b|, exact small integers
    sz = np.diagonal(inter, axis1=-2, axis2=-1)  # [R, G]
    union = sz[..., :, None] + sz[..., None, :] - inter
    a, b = np.triu_indices(mask.shape[-2], k=1)
    valid = (sz[..., a] > 0) & (sz[..., b] > 0)  # [R, pairs]
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(valid, inter[..., a, b] / np.where(valid, union[..., a, b], 1.0), 0.0)
        n_pairs = valid.sum(axis=-1)
        overlap = np.where(n_pairs > 0, jac.sum(axis=-1) / np.maximum(n_pairs, 1), np.nan)
    used = sz > 0  # [R, G]
    in_all = np.all(mask | ~used[..., None], axis=-2) & np.any(used, axis=-1)[..., None]
    return overlap, in_all.sum(axis=-1), mask.any(axis=-2).sum(axis=-1)


# ----------------------------------------------------------------------------- one table
def committees(joint_GE: np.ndarray, mass: float = 0.5) -> list[np.ndarray]:
    """Per domain, the smallest expert set carrying at least `mass` of that domain's routing mass.

    joint_GE [G, E]: (weighted) assignment counts of domain x expert. Returns G int64 arrays of expert
    indices, each in committee order (descending share, ties by lower index first); a domain with
    no mass gets an empty array. Their lengths are `committee_sizes(joint_GE, mass)`.
    """
    j = as_table(joint_GE, ndim=2, name="joint_GE")
    _, sizes = committee_masks(j, mass)
    order = np.argsort(-j, axis=-1, kind="stable")
    return [order[d, : sizes[d]].astype(np.int64) for d in range(j.shape[0])]


def committee_sizes(joint_GE: np.ndarray, mass: float = 0.5) -> np.ndarray:
    """Committee size per domain [G] int64 (number of experts; 0 for a domain without mass)."""
    j = as_table(joint_GE, ndim=2, name="joint_GE")
    return committee_masks(j, mass)[1]


def _sets_to_mask(sets: Sequence[np.ndarray | Sequence[int]], n_experts: int) -> np.ndarray:
    e = positive_int("n_experts", n_experts)
    if len(sets) == 0:
        raise ValueError("no committees given")
    mask = np.zeros((1, len(sets), e), dtype=bool)
    for d, s in enumerate(sets):
        idx = np.asarray(s).reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"committee {d} must hold integer expert indices, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= e):
            raise ValueError(f"committee {d} has experts outside [0, {e}): {idx.tolist()}")
        mask[0, d, idx] = True
    return mask


def committee_overlap(sets: Sequence[np.ndarray | Sequence[int]], n_experts: int) -> float:
    """Mean pairwise Jaccard overlap |S_a ∩ S_b| / |S_a ∪ S_b| of the committees `sets` (one expert
    index array per domain, indices in [0, n_experts)). 1 = one shared committee, 0 = disjoint.
    Empty committees (domains without mass) are left out; nan with fewer than two non-empty ones."""
    return float(_overlap_stats(_sets_to_mask(sets, n_experts))[0][0])


def committee_intersection_union(sets: Sequence[np.ndarray | Sequence[int]], n_experts: int) -> tuple[int, int]:
    """(number of experts in every non-empty committee, number of experts in any committee)."""
    _, inter, union = _overlap_stats(_sets_to_mask(sets, n_experts))
    return int(inter[0]), int(union[0])


# ----------------------------------------------------------------------------- evidence
def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass(frozen=True, eq=False)
class CommitteeResult:
    """Standing committees of one layer and their overlap against the document-permutation null.

    overlap: mean pairwise Jaccard overlap of the committees of the document-summed table (nan with
    fewer than two domains with mass); sizes [G]: committee size per domain (0: no mass); members:
    per domain, the committee's experts in committee order; intersection/union: experts in every /
    in any committee; mass: the share of each domain's routing a committee carries.
    null_samples [R]: the overlap with domain labels shuffled across documents (each document keeps
    its routing, so the null keeps the documents' own quirks and only breaks the domain link);
    null_mean, null_q05 (its 5% quantile); null_mean_size: mean committee size under the null;
    p_value: one-sided, "overlap lower than chance", (1 + #{null <= overlap}) / (1 + R) with ties
    counted (conservative for this discrete statistic). boot_samples [R]: overlaps of the
    domain-stratified document bootstrap, boot_mean their mean; ci_low/ci_high: their percentile
    interval at `confidence` shifted by the bootstrap's own bias (boot_mean - overlap), as in
    `analysis.statistics.bootstrap_ci`, and clipped to [0, 1]. The shift matters: a resample
    duplicates documents, which makes each domain's table more idiosyncratic and its committee more
    its own, so resampled overlaps run low (by 0.05-0.1 on domain-blind tables of 100 documents) and
    the plain percentile interval fell below its estimate.
    """

    overlap: float
    sizes: tuple[int, ...]
    members: tuple[tuple[int, ...], ...]
    intersection: int
    union: int
    mass: float
    null_mean: float
    null_q05: float
    null_mean_size: float
    p_value: float
    ci_low: float
    ci_high: float
    confidence: float
    boot_mean: float
    n_docs: int
    n_permutations: int
    n_bootstrap: int
    null_samples: np.ndarray
    boot_samples: np.ndarray

    @property
    def mean_size(self) -> float:
        """Mean committee size over the domains with mass (nan when none has mass)."""
        used = [s for s in self.sizes if s > 0]
        return float(np.mean(used)) if used else math.nan

    def as_measure_result(self) -> MeasureResult:
        """The registry unit "committee_overlap": value = overlap (higher points to an ensemble),
        null_mean, p_value (overlap below chance), bias-corrected bootstrap ci; details JSON-ready (nan -> None)."""
        details: dict[str, Any] = {
            "sizes": list(self.sizes),
            "mean_size": _finite_or_none(self.mean_size),
            "members": [list(m) for m in self.members],
            "intersection": self.intersection,
            "union": self.union,
            "mass": self.mass,
            "null_q05": _finite_or_none(self.null_q05),
            "null_mean_size": _finite_or_none(self.null_mean_size),
            "boot_mean": _finite_or_none(self.boot_mean),
            "confidence": self.confidence,
            "n_docs": self.n_docs,
            "n_permutations": self.n_permutations,
            "n_bootstrap": self.n_bootstrap,
        }
        return MeasureResult(
            name="committee_overlap",
            value=_finite_or_none(self.overlap),
            ci_low=_finite_or_none(self.ci_low),
            ci_high=_finite_or_none(self.ci_high),
            null_mean=_finite_or_none(self.null_mean),
            p_value=_finite_or_none(self.p_value),
            details=details,
        )


def _nan_stat(fn: Any, a: np.ndarray, *args: Any) -> float:
    f = a[np.isfinite(a)]
    return float(fn(f, *args)) if f.size else math.nan


def committee_evidence(
    docs: DocCounts,
    n_domains: int,
    *,
    mass: float = 0.5,
    n_permutations: int = 200,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    rng: RngLike,
) -> CommitteeResult:
    """Committees of the document-summed table, their overlap, its document-permutation null and
    its domain-stratified document-bootstrap interval.

    docs: per-document expert counts [M, E] with each document's domain [M] in [0, n_domains).
    A domain-specialist layer has small, disjoint committees: overlap well below `null_mean`, small
    p-value. An ensemble shares one committee: overlap near 1 and not below its null (p near 1).
    The overlap is discrete (few small sets take few values); the null is computed on the same
    statistic with ties counted, so the p-value stays valid. The interval is the bias-corrected
    percentile interval of the stratified bootstrap (see `CommitteeResult`). Deterministic given
    `rng` (split into independent null and bootstrap streams). Cost: two [R, M] x [M, E] products
    per domain plus O(R G E log E) for the committees (about 30 ms for M = 200, E = 64, G = 5 and
    200 permutations and 200 bootstrap replicates on one CPU thread).
    """
    q = _check_mass(mass)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    dd, counts = check_doc_counts(docs, n_domains)
    joint = as_table(joint_from_docs(dd, counts, n_domains), ndim=2, name="joint")
    null_rng, boot_rng = as_rng(rng).spawn(2)  # independent streams: the result ignores call order

    mask, sizes = committee_masks(joint[None], q)
    overlap_a, inter, union = _overlap_stats(mask)
    overlap = float(overlap_a[0])
    members = tuple(tuple(int(e) for e in c) for c in committees(joint, q))

    labels = permute_doc_domains(dd, n_permutations, null_rng)
    null_mask, null_sizes = committee_masks(joints_from_doc_labels(labels, counts, n_domains), q)
    null = _overlap_stats(null_mask)[0]
    finite = null[np.isfinite(null)]
    # Lower tail: (1 + #{null <= observed}) / (1 + R), ties counted, via the upper-tail helper.
    p = p_value(-overlap, -finite) if math.isfinite(overlap) and finite.size else math.nan
    used = null_sizes > 0
    null_mean_size = float(null_sizes[used].mean()) if used.any() else math.nan

    weights = stratified_doc_bootstrap(dd, n_bootstrap, boot_rng)
    boot = _overlap_stats(committee_masks(joints_from_doc_weights(weights, dd, counts, n_domains), q)[0])[0]
    alpha = (1.0 - confidence) / 2.0
    boot_mean = _nan_stat(np.mean, boot)
    shift = boot_mean - overlap  # the bootstrap's own bias (nan propagates: no interval)
    ci_low = float(np.clip(_nan_stat(np.quantile, boot, alpha) - shift, 0.0, 1.0))
    ci_high = float(np.clip(_nan_stat(np.quantile, boot, 1.0 - alpha) - shift, 0.0, 1.0))

    return CommitteeResult(
        overlap=overlap,
        sizes=tuple(int(s) for s in sizes[0]),
        members=members,
        intersection=int(inter[0]),
        union=int(union[0]),
        mass=q,
        null_mean=_nan_stat(np.mean, null),
        null_q05=_nan_stat(np.quantile, null, 0.05),
        null_mean_size=null_mean_size,
        p_value=p,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=float(confidence),
        boot_mean=boot_mean,
        n_docs=int(dd.size),
        n_permutations=int(n_permutations),
        n_bootstrap=int(n_bootstrap),
        null_samples=null,
        boot_samples=boot,
    )
