"""Document-level nulls and the document bootstrap: exactness against naive record-level
recomputation, the invariants each resampling must keep, and calibration on planted data."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.information import (
    contingency,
    doc_expert_counts,
    joint_from_docs,
    normalized_mutual_information,
)
from analysis.statistics import (
    SpecializationResult,
    bootstrap_ci,
    joints_from_doc_labels,
    joints_from_doc_weights,
    p_value,
    permutation_null,
    permute_doc_domains,
    resample_docs,
    stratified_doc_bootstrap,
    summarize_specialization,
)


def make_corpus(
    rng: np.random.Generator,
    n_docs: int = 60,
    n_domains: int = 3,
    n_experts: int = 6,
    k: int = 2,
    mean_len: int = 40,
    routing: str = "independent",
) -> dict[str, np.ndarray]:
    """Synthetic routing records of documents with one domain each.

    routing: "independent" (uniform top-k), "doc" (each document prefers its own random expert,
    independent of its domain: within-document correlation without domain information), or
    "domain" (domain i prefers expert i).
    """
    doc_domain = rng.integers(0, n_domains, n_docs)
    lengths = rng.integers(mean_len // 2, 3 * mean_len // 2, n_docs)
    doc = np.repeat(np.arange(n_docs) * 7 + 3, lengths)  # non-contiguous ids
    domain = np.repeat(doc_domain, lengths)
    scores = rng.random((doc.size, n_experts))
    if routing == "doc":
        pref = np.repeat(rng.integers(0, n_experts, n_docs), lengths)
        scores[np.arange(doc.size), pref] += 0.6
    elif routing == "domain":
        scores[np.arange(doc.size), domain % n_experts] += 0.6
    elif routing != "independent":
        raise ValueError(routing)
    experts = np.argsort(-scores, axis=1)[:, :k]
    return {"doc": doc, "domain": domain, "experts": experts}


def doc_table(c, n_domains=3, n_experts=6, weights=None):
    return doc_expert_counts(c["doc"], c["domain"], c["experts"], n_domains, n_experts, weights=weights)


# ----------------------------------------------------------------------------- p-value convention
def test_p_value_convention():
    assert p_value(2.0, np.array([1.0, 2.0, 3.0])) == pytest.approx(3 / 4)  # ties count
    assert p_value(5.0, np.array([1.0, 2.0, 3.0])) == pytest.approx(1 / 4)  # never 0
    assert p_value(0.0, np.array([1.0, 2.0, 3.0])) == 1.0
    assert p_value(1.0, np.array([1.0 - 1e-15])) == 1.0  # rounding-level ties are ties
    with pytest.raises(ValueError, match="empty"):
        p_value(1.0, np.array([]))


# ----------------------------------------------------------------------------- document permutation
def test_document_permutation_keeps_documents_whole():
    rng = np.random.default_rng(0)
    c = make_corpus(rng)
    docs = doc_table(c)
    labels = permute_doc_domains(docs.doc_domain, 50, rng=1)
    assert labels.shape == (50, docs.doc_ids.size)
    _, token_doc = np.unique(c["doc"], return_inverse=True)
    for row in labels:
        # the multiset of document domains is preserved ...
        np.testing.assert_array_equal(np.sort(row), np.sort(docs.doc_domain))
        # ... and, expanded to tokens, every document maps to exactly one domain
        token_domain = row[token_doc]
        for m in range(docs.doc_ids.size):
            assert np.unique(token_domain[token_doc == m]).size == 1
    assert not np.all(labels == docs.doc_domain)  # it does shuffle
    np.testing.assert_array_equal(labels, permute_doc_domains(docs.doc_domain, 50, rng=1))  # seeded


def test_permuted_joints_equal_record_level_recount():
    rng = np.random.default_rng(1)
    c = make_corpus(rng)
    docs = doc_table(c)
    labels = permute_doc_domains(docs.doc_domain, 5, rng=2)
    joints = joints_from_doc_labels(labels, docs.counts, 3)
    token_doc = np.searchsorted(docs.doc_ids, c["doc"])
    for r in range(5):
        np.testing.assert_allclose(joints[r], contingency(labels[r][token_doc], c["experts"], 3, 6))


def test_bootstrap_joints_equal_record_level_resample():
    """Multiplicity-weighted doc tables == recounting the records of the drawn documents."""
    rng = np.random.default_rng(2)
    c = make_corpus(rng)
    gates = rng.random(c["experts"].shape)
    docs = doc_table(c, weights=gates)
    mult = resample_docs(docs.doc_ids.size, 4, rng=3)
    np.testing.assert_array_equal(mult.sum(axis=1), docs.doc_ids.size)
    joints = joints_from_doc_weights(mult, docs.doc_domain, docs.counts, 3)
    token_doc = np.searchsorted(docs.doc_ids, c["doc"])
    for r in range(4):
        rows = np.repeat(np.arange(token_doc.size), mult[r][token_doc].astype(int))  # records, duplicated
        ref = contingency(c["domain"][rows], c["experts"][rows], 3, 6, weights=gates[rows])
        np.testing.assert_allclose(joints[r], ref)


def test_independent_routing_is_not_significant_in_most_seeds():
    p = [
        permutation_null(doc_table(make_corpus(np.random.default_rng(s))), 3, n_permutations=99, rng=s).p_value
        for s in range(10)
    ]
    assert sum(pv > 0.05 for pv in p) >= 8, p


def test_document_correlated_routing_needs_the_document_null():
    """Documents with their own (domain-independent) routing preference: the document null stays
    calibrated, while a naive token-level shuffle calls it significant."""
    doc_p, token_p = [], []
    for s in range(10):
        rng = np.random.default_rng(100 + s)
        c = make_corpus(rng, routing="doc")
        docs = doc_table(c)
        null = permutation_null(docs, 3, n_permutations=99, rng=s)
        doc_p.append(null.p_value)
        token_null = [
            normalized_mutual_information(contingency(rng.permutation(c["domain"]), c["experts"], 3, 6))
            for _ in range(99)
        ]
        token_p.append(p_value(null.observed, np.array(token_null)))
    assert sum(p > 0.05 for p in doc_p) >= 8, doc_p
    assert sum(p <= 0.05 for p in token_p) >= 8, token_p


def test_domain_routing_is_significant_and_null_is_consistent():
    c = make_corpus(np.random.default_rng(3), routing="domain")
    docs = doc_table(c)
    null = permutation_null(docs, 3, n_permutations=199, rng=0)
    assert null.p_value == pytest.approx(1 / 200)
    assert null.observed == pytest.approx(normalized_mutual_information(contingency(c["domain"], c["experts"], 3, 6)))
    assert null.samples.shape == (199,)
    assert null.mean < null.q95 < null.observed

    # any statistic of the joint table can be plugged in
    def total_variation(j):
        return float(np.abs(j / j.sum() - np.outer(j.sum(1), j.sum(0)) / j.sum() ** 2).sum())

    tv = permutation_null(docs, 3, total_variation, n_permutations=49, rng=0)
    assert tv.p_value == pytest.approx(1 / 50)


def test_bootstrap_ci():
    docs = doc_table(make_corpus(np.random.default_rng(4), routing="domain"))
    ci = bootstrap_ci(docs, 3, n_resamples=200, rng=0)
    assert ci.samples.shape == (200,)
    assert ci.low < ci.estimate < ci.high
    bias = ci.samples.mean() - ci.estimate  # resampled plug-in NMI runs high; the interval is shifted back
    assert bias > 0
    assert ci.low == pytest.approx(np.quantile(ci.samples, 0.025) - bias)
    again = bootstrap_ci(docs, 3, n_resamples=200, rng=0)
    assert (again.low, again.high) == (ci.low, ci.high)
    narrow = bootstrap_ci(docs, 3, n_resamples=200, confidence=0.5, rng=0)
    assert ci.low <= narrow.low <= narrow.high <= ci.high
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(docs, 3, confidence=95, rng=0)


def test_summary_is_deterministic_and_consistent():
    docs = doc_table(make_corpus(np.random.default_rng(5), routing="domain"))
    res = summarize_specialization(docs, 3, n_permutations=99, n_resamples=99, rng=7)
    assert isinstance(res, SpecializationResult)
    assert res == summarize_specialization(docs, 3, n_permutations=99, n_resamples=99, rng=7)
    joint = joint_from_docs(docs.doc_domain, docs.counts, 3)
    assert res.observed == pytest.approx(normalized_mutual_information(joint))
    assert res.corrected < res.observed
    assert res.ci_low < res.observed < res.ci_high
    assert res.null_q95 < res.ci_low and res.p_value == pytest.approx(1 / 100)
    assert res.excess == pytest.approx(res.observed - res.null_mean)
    assert res.n_docs == docs.doc_ids.size and res.n_samples == docs.counts.sum()


def test_stratified_bootstrap_keeps_documents_per_domain():
    doc_domain = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    mult = stratified_doc_bootstrap(doc_domain, 50, rng=0)
    assert mult.shape == (50, 9)
    for d in range(3):
        np.testing.assert_array_equal(mult[:, doc_domain == d].sum(axis=1), (doc_domain == d).sum())
    np.testing.assert_array_equal(mult, stratified_doc_bootstrap(doc_domain, 50, rng=0))


def test_interval_contains_its_estimate_with_few_documents():
    """The percentile interval of a plug-in NMI sat above its estimate with few documents; the
    bias-corrected one must bracket it (domain-blind routing, 5 documents per domain)."""
    inside = 0
    for seed in range(20):
        docs = doc_table(make_corpus(np.random.default_rng(100 + seed), n_docs=15, routing="independent"))
        ci = bootstrap_ci(docs, 3, n_resamples=200, rng=seed)
        inside += ci.low <= ci.estimate <= ci.high
    assert inside == 20


def test_rng_must_be_explicit():
    docs = doc_table(make_corpus(np.random.default_rng(6)))
    with pytest.raises(TypeError, match="rng"):
        permutation_null(docs, 3, rng=None)  # type: ignore[arg-type]
