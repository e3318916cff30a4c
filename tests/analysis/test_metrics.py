"""Published anchors' metrics against naive loops, their uniform-routing reference values and
planted extremes."""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from analysis.information import contingency
from analysis.metrics import (
    coactivation,
    coactivation_null,
    consecutive_expert_null,
    consecutive_expert_rate,
    domain_specialization,
    load_entropy,
    max_violation,
    mean_router_entropy,
    router_saturation,
    vocabulary_specialization,
    vocabulary_specialization_per_token,
)


def uniform_topk(rng: np.random.Generator, n: int, e: int, k: int) -> np.ndarray:
    return np.argsort(rng.random((n, e)), axis=1)[:, :k]


# ----------------------------------------------------------------------------- OLMoE
def test_domain_specialization_matches_naive_and_uniform_reference():
    rng = np.random.default_rng(0)
    n, d, e, k = 20_000, 3, 8, 2
    domain = rng.integers(0, d, n)
    experts = uniform_topk(rng, n, e, k)
    table = domain_specialization(contingency(domain, experts, d, e), k)
    naive = np.array([[np.mean((experts[domain == i] == j).any(axis=1)) for j in range(e)] for i in range(d)])
    np.testing.assert_allclose(table, naive, rtol=1e-12)
    np.testing.assert_allclose(table.sum(axis=1), k)
    np.testing.assert_allclose(table, k / e, atol=0.02)  # uniform routing -> k/E


def test_domain_specialization_planted_and_checks():
    domain = np.array([0, 0, 1, 1])
    experts = np.array([[0, 1], [0, 2], [3, 1], [3, 2]])
    table = domain_specialization(contingency(domain, experts, 3, 4), 2)
    np.testing.assert_allclose(table[:2], [[1.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 1.0]])
    assert np.all(np.isnan(table[2]))  # a domain without tokens
    with pytest.raises(ValueError, match="unweighted"):
        domain_specialization(contingency(domain, experts, 3, 4, weights=np.full((4, 2), 0.3)), 2)
    with pytest.raises(ValueError, match="k must"):
        domain_specialization(contingency(domain, experts, 3, 4), 5)


def test_vocabulary_specialization():
    rng = np.random.default_rng(1)
    v, e, k = 30, 8, 2
    token = rng.integers(0, v, 5000)
    experts = uniform_topk(rng, token.size, e, k)
    experts[token == 3] = [5, 6]  # token 3 always goes to experts 5 and 6
    table = contingency(token, experts, v + 1, e)  # id v never occurs
    per_token = vocabulary_specialization_per_token(table, k)
    naive = [max(np.mean((experts[token == x] == j).any(axis=1)) for j in range(e)) for x in range(v)]
    np.testing.assert_allclose(per_token[:v], naive, rtol=1e-12)
    assert per_token[3] == 1.0 and np.isnan(per_token[v])
    counts = np.bincount(token, minlength=v)
    assert vocabulary_specialization(table, k) == pytest.approx(np.average(naive, weights=counts))
    rest = np.delete(per_token[:v], 3)
    assert np.all(rest < 0.45)  # uniform: ~k/E = 0.25 plus the max-of-8 excess at ~170 draws
    assert np.isnan(vocabulary_specialization(table, k, min_count=10**6))
    # one occurrence scores 1 whatever the router does: min_count keeps such tokens out
    rare = contingency(np.array([0, 1, 1, 1, 1]), np.array([[0, 1], [0, 1], [2, 3], [4, 5], [6, 7]]), 2, 8)
    assert vocabulary_specialization(rare, 2) == pytest.approx((1 * 1.0 + 4 * 0.25) / 5)
    assert vocabulary_specialization(rare, 2, min_count=2) == pytest.approx(0.25)


def test_router_saturation():
    rng = np.random.default_rng(2)
    a = uniform_topk(rng, 20_000, 8, 2)
    assert router_saturation(a, a) == 1.0
    assert router_saturation(a, a[:, ::-1]) == 1.0  # order inside the top-k does not matter
    b = uniform_topk(rng, 20_000, 8, 2)
    naive = np.mean([len(set(x) & set(y)) / 2 for x, y in zip(a[:500], b[:500])])
    assert router_saturation(a[:500], b[:500]) == pytest.approx(naive)
    assert router_saturation(a, b) == pytest.approx(2 / 8, abs=0.01)  # independent -> k/E
    with pytest.raises(ValueError, match="same shape"):
        router_saturation(a, b[:, :1])


def test_coactivation():
    rng = np.random.default_rng(3)
    e, k = 6, 3
    experts = uniform_topk(rng, 30_000, e, k)
    c = coactivation(experts, e)
    sub = experts[:300]
    naive = np.zeros((e, e))
    for i in range(e):
        has_i = (sub == i).any(axis=1)
        for j in range(e):
            if i != j:
                naive[i, j] = np.mean((sub[has_i] == j).any(axis=1))
    np.testing.assert_allclose(coactivation(sub, e), naive, rtol=1e-12)
    np.testing.assert_allclose(c.sum(axis=1), k - 1)
    off = c[~np.eye(e, dtype=bool)]
    np.testing.assert_allclose(off, coactivation_null(k, e), atol=0.02)  # uniform -> (k-1)/(E-1)
    assert coactivation_null(2, 8) == pytest.approx(1 / 7)
    unused = coactivation(np.array([[0, 1], [1, 0]]), 3)
    assert np.all(np.isnan(unused[2])) and unused[0, 1] == 1.0
    with pytest.raises(ValueError, match="distinct"):
        coactivation(np.array([[1, 1]]), 3)
    for k in (3, 12):  # a repeat in the last two of K slots, checked pairwise (K = 3) or sorted (K = 12)
        ids = np.tile(np.arange(k), (5, 1))
        ids[3, -1] = ids[3, -2]
        with pytest.raises(ValueError, match="distinct"):
            coactivation(ids, k)
        assert np.isfinite(coactivation(np.tile(np.arange(k), (5, 1)), k)[0, 1])


# ----------------------------------------------------------------------------- Mixtral
def naive_consecutive(experts, doc, top1):
    hits = pairs = 0
    for t in range(len(doc) - 1):
        if doc[t] == doc[t + 1]:
            pairs += 1
            a = {experts[t + 1, 0]} if top1 else set(experts[t + 1])
            b = {experts[t, 0]} if top1 else set(experts[t])
            hits += bool(a & b)
    return hits / pairs


@pytest.mark.parametrize("k", [2, 7])  # column-by-column comparison and the [pairs, K, K] one
def test_consecutive_rate_matches_naive_loop(k):
    rng = np.random.default_rng(4)
    n = 800
    experts = uniform_topk(rng, n, 8 if k == 2 else 16, k)
    sticky = rng.random(n) < 0.5
    experts[1:][sticky[1:]] = experts[:-1][sticky[1:]]  # some repetition along the stream (chained)
    doc = np.repeat(np.arange(40), 20)
    assert consecutive_expert_rate(experts, doc) == pytest.approx(naive_consecutive(experts, doc, True))
    overlap = consecutive_expert_rate(experts, doc, variant="overlap")
    assert overlap == pytest.approx(naive_consecutive(experts, doc, False))
    assert consecutive_expert_rate(experts, doc) > consecutive_expert_null(experts) + 0.2


def test_consecutive_rate_respects_documents_positions_and_gates():
    experts = np.array([[0, 1], [0, 2], [3, 0], [3, 1]])
    doc = np.array([7, 7, 8, 8])
    assert consecutive_expert_rate(experts, doc) == pytest.approx(1.0)  # pairs (0,1) and (2,3)
    assert consecutive_expert_rate(experts, doc, positions=np.array([0, 1, 0, 5])) == 1.0  # only (0,1)
    # gates make the second column the top-1 for token 1: experts 2 vs 0 then 3 vs 3
    gates = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    assert consecutive_expert_rate(experts, doc, gates=gates) == pytest.approx(0.5)
    assert np.isnan(consecutive_expert_rate(experts, np.arange(4)))  # no consecutive pair


def test_consecutive_null_uniform_reference():
    rng = np.random.default_rng(5)
    experts = uniform_topk(rng, 50_000, 8, 2)
    doc = np.repeat(np.arange(500), 100)
    assert consecutive_expert_rate(experts, doc) == pytest.approx(1 / 8, abs=0.01)  # Mixtral's 12.5%
    overlap = consecutive_expert_rate(experts, doc, variant="overlap")
    assert overlap == pytest.approx(1 - comb(6, 2) / comb(8, 2), abs=0.01)  # Mixtral's ~46%
    assert consecutive_expert_null(experts) == pytest.approx(1 / 8, abs=0.002)
    # every 2- or 3-subset exactly once: the exact uniform value
    for e, k in [(8, 2), (7, 3)]:
        all_sets = np.array(list(combinations(range(e), k)))
        exact = 1 - comb(e - k, k) / comb(e, k)
        assert consecutive_expert_null(all_sets, variant="overlap") == pytest.approx(exact, rel=1e-12)


def test_consecutive_null_equals_brute_force_over_pairs():
    rng = np.random.default_rng(6)
    scores = rng.random((120, 6)) + np.array([0.5, 0.3, 0, 0, 0, 0])  # unbalanced load
    experts = np.argsort(-scores, axis=1)[:, :3]
    sets = [set(r) for r in experts]
    brute = np.mean([bool(a & b) for a in sets for b in sets])  # iid draws: i == j included
    assert consecutive_expert_null(experts, variant="overlap") == pytest.approx(brute, rel=1e-12)
    top1 = np.bincount(experts[:, 0], minlength=6) / 120
    assert consecutive_expert_null(experts) == pytest.approx(np.sum(top1**2), rel=1e-12)


# ----------------------------------------------------------------------------- load and confidence
def test_router_entropy():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(100, 8))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert mean_router_entropy(probs) == pytest.approx(np.mean(scipy_entropy(probs, base=2, axis=1)), rel=1e-12)
    assert mean_router_entropy(np.full((5, 8), 1 / 8)) == pytest.approx(3.0)
    assert mean_router_entropy(np.eye(8)) == 0.0
    with pytest.raises(ValueError, match="sum to 1"):
        mean_router_entropy(np.ones((2, 4)))


def test_load_measures():
    assert load_entropy(np.full(8, 100.0)) == pytest.approx(3.0)
    assert load_entropy(np.array([5.0, 0, 0, 0])) == 0.0
    assert max_violation(np.full(8, 100.0)) == 0.0
    assert max_violation(np.array([12.0, 0, 0, 0])) == pytest.approx(3.0)  # E - 1
    assert max_violation(np.array([3.0, 1.0, 2.0, 2.0])) == pytest.approx(0.5)
    assert np.isnan(max_violation(np.zeros(4)))  # no load: balance undefined, not perfect
    with pytest.raises(ValueError, match="non-negative"):
        max_violation(np.array([1.0, -1.0]))


def test_max_violation_is_the_training_logs_definition():
    """One MaxVio: the trainer's (moe.balance, torch counts) and the analysis' agree, zero load too."""
    torch = pytest.importorskip("torch")
    from moe.balance import max_violation as training_max_violation

    for load in ([3.0, 1.0, 2.0, 2.0], [12.0, 0, 0, 0], [5.0, 5.0]):
        assert training_max_violation(torch.tensor(load)) == max_violation(np.array(load))
    assert np.isnan(training_max_violation(torch.zeros(4)))


SCALAR_METRICS = {
    "vocabulary_specialization": lambda ex, doc: vocabulary_specialization(contingency(doc % 5, ex, 5, 8), 2),
    "router_saturation": lambda ex, doc: router_saturation(ex, ex[::-1]),
    "consecutive_expert_rate": lambda ex, doc: consecutive_expert_rate(ex, doc),
    "consecutive_expert_null": lambda ex, doc: consecutive_expert_null(ex, variant="overlap"),
    "load_entropy": lambda ex, doc: load_entropy(np.bincount(ex.ravel(), minlength=8)),
    "max_violation": lambda ex, doc: max_violation(np.bincount(ex.ravel(), minlength=8)),
}


@pytest.mark.parametrize("name", sorted(SCALAR_METRICS))
def test_scalar_metrics_return_float_and_ignore_expert_relabelling(name):
    rng = np.random.default_rng(8)
    experts = np.argsort(-(rng.random((400, 8)) + np.linspace(0, 0.5, 8)), axis=1)[:, :2]
    doc = np.repeat(np.arange(20), 20)
    value = SCALAR_METRICS[name](experts, doc)
    assert isinstance(value, float)
    relabel = rng.permutation(8)
    assert SCALAR_METRICS[name](relabel[experts], doc) == pytest.approx(value, rel=1e-12)
