"""Standing committees: the smallest half-mass expert sets against a brute-force search over all
subsets, the Jaccard overlap against hand computations, the vectorized null and bootstrap against a
per-table loop, and the evidence on planted domain-specialist, ensemble and domain-blind routing."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest

from analysis.committees import (
    CommitteeResult,
    committee_evidence,
    committee_intersection_union,
    committee_masks,
    committee_overlap,
    committee_sizes,
    committees,
)
from analysis.information import DocCounts, joint_from_docs
from analysis.registry import columns
from analysis.statistics import permute_doc_domains, stratified_doc_bootstrap

MASSES = (0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0)


# ----------------------------------------------------------------------------- hand-built documents
def demix_docs(
    seed: int, n_domains: int = 5, n_experts: int = 16, per_domain: int = 20, length: int = 200
) -> DocCounts:
    """DEMix-like routing: domain d sends 90% of its tokens to its own experts 2d and 2d+1 (45%
    each), the rest uniformly; each document's counts are multinomial."""
    rng = np.random.default_rng(seed)
    doc_domain = np.repeat(np.arange(n_domains), per_domain)
    counts = np.empty((doc_domain.size, n_experts))
    for m, d in enumerate(doc_domain):
        p = np.full(n_experts, 0.1 / n_experts)
        p[[2 * d, 2 * d + 1]] += 0.45
        counts[m] = rng.multinomial(length, p / p.sum())
    return DocCounts(np.arange(doc_domain.size) * 3 + 1, doc_domain, counts)


def ensemble_docs(seed: int, n_domains: int = 5, n_experts: int = 16, per_domain: int = 20) -> DocCounts:
    """Every domain sends 90% of its tokens to experts 0 and 1: one shared committee."""
    rng = np.random.default_rng(seed)
    doc_domain = np.repeat(np.arange(n_domains), per_domain)
    p = np.full(n_experts, 0.1 / n_experts)
    p[[0, 1]] += 0.45
    counts = rng.multinomial(200, p / p.sum(), size=doc_domain.size).astype(np.float64)
    return DocCounts(np.arange(doc_domain.size), doc_domain, counts)


def blind_docs(
    seed: int, n_domains: int = 5, n_experts: int = 16, per_domain: int = 20, alpha: float = 0.3
) -> DocCounts:
    """Domain-blind routing with document quirks: each document draws its own expert preferences
    from Dirichlet(alpha), independent of its domain, and multinomial counts from them."""
    rng = np.random.default_rng(seed)
    doc_domain = rng.permutation(np.repeat(np.arange(n_domains), per_domain))
    counts = np.stack([rng.multinomial(200, rng.dirichlet(np.full(n_experts, alpha))) for _ in doc_domain])
    return DocCounts(np.arange(doc_domain.size), doc_domain, counts.astype(np.float64))


# ----------------------------------------------------------------------------- independent references
def brute_force_committee(row: np.ndarray, mass: float) -> tuple[int, ...]:
    """Search all expert subsets, smallest first: among the subsets of the minimal size carrying at
    least `mass` of the row (exact rational arithmetic, `mass` read as its decimal), the one carrying
    most, then the lexicographically smallest; () for a row without mass."""
    vals = [Fraction(int(v)) for v in row]
    total = sum(vals, Fraction(0))
    if total == 0:
        return ()
    need = Fraction(str(mass)) * total
    for k in range(1, len(vals) + 1):
        hits = [c for c in itertools.combinations(range(len(vals)), k) if sum(vals[i] for i in c) >= need]
        if hits:
            best = max(sum(vals[i] for i in c) for c in hits)
            return next(c for c in hits if sum(vals[i] for i in c) == best)  # combinations: lexicographic
    raise AssertionError("unreachable: the full set carries everything")


def naive_overlap(sets: list[set[int]]) -> float:
    used = [s for s in sets if s]
    pairs = [len(a & b) / len(a | b) for a, b in itertools.combinations(used, 2)]
    return sum(pairs) / len(pairs) if pairs else float("nan")


# ----------------------------------------------------------------------------- committees
@pytest.mark.parametrize("seed", range(6))
def test_smallest_committee_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(8):
        g, e = int(rng.integers(1, 5)), int(rng.integers(1, 9))
        joint = rng.integers(0, 6, size=(g, e)).astype(np.float64)  # small integers: many ties and zeros
        if rng.random() < 0.3:
            joint[rng.integers(0, g)] = 0.0  # a domain without mass
        if joint.sum() == 0:
            joint[0, 0] = 1.0
        for mass in MASSES:
            got = committees(joint, mass)
            assert len(got) == g
            for d in range(g):
                want = brute_force_committee(joint[d], mass)
                assert tuple(sorted(got[d].tolist())) == want, (joint[d], mass, got[d])
                assert got[d].dtype == np.int64
                # committee order: descending share, ties by lower index
                keys = [(-joint[d, i], i) for i in got[d]]
                assert keys == sorted(keys)
            np.testing.assert_array_equal(committee_sizes(joint, mass), [len(c) for c in got])


def test_sizes_match_brute_force_on_continuous_tables() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        e = int(rng.integers(2, 9))
        row = rng.exponential(size=e) ** 3
        for mass in (0.2, 0.5, 0.8):
            best = min(
                k
                for k in range(1, e + 1)
                if any(row[list(c)].sum() >= mass * row.sum() for c in itertools.combinations(range(e), k))
            )
            assert committee_sizes(row[None], mass)[0] == best


def test_exact_half_counts_as_enough() -> None:
    # 5 of 10 is exactly half: one expert suffices; 0.3 of 20 is 6 (a float 6.000000000000001).
    assert committees(np.array([[5.0, 3.0, 2.0]]), 0.5)[0].tolist() == [0]
    assert committee_sizes(np.array([[6.0, 5.0, 5.0, 4.0]]), 0.3)[0] == 1


def test_ties_broken_by_expert_index() -> None:
    joint = np.array([[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    got = committees(joint, 0.5)
    assert got[0].tolist() == [1, 2]
    assert got[1].tolist() == [0, 1]


def test_mass_one_gives_every_used_expert() -> None:
    rng = np.random.default_rng(3)
    joint = rng.integers(0, 4, size=(4, 12)).astype(np.float64)
    joint[2] = 0.0
    for d, c in enumerate(committees(joint, 1.0)):
        assert sorted(c.tolist()) == np.flatnonzero(joint[d]).tolist()
    # a weight far below the total's rounding still counts as used
    tiny = np.array([[1.0, 1e-20, 0.0, 0.5]])
    assert sorted(committees(tiny, 1.0)[0].tolist()) == [0, 1, 3]


def test_committees_invariant_to_relabelling_experts() -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        g, e = 4, int(rng.integers(2, 20))
        joint = rng.exponential(size=(g, e))  # continuous: no ties, the sets are unique
        perm = rng.permutation(e)  # new column j is old expert perm[j]
        for mass in (0.3, 0.5, 0.9, 1.0):
            old, new = committees(joint, mass), committees(joint[:, perm], mass)
            for a, b in zip(old, new):
                np.testing.assert_array_equal(perm[b], a)  # same experts, same committee order
            assert committee_overlap(new, e) == pytest.approx(committee_overlap(old, e), abs=1e-15)
        ties = rng.integers(0, 3, size=(g, e)).astype(np.float64) + np.eye(g, e)  # with ties: sizes only
        np.testing.assert_array_equal(committee_sizes(ties[:, perm]), committee_sizes(ties))


def test_masks_agree_with_committees_on_a_stack() -> None:
    rng = np.random.default_rng(5)
    stack = rng.integers(0, 5, size=(6, 3, 7)).astype(np.float64)
    stack[2, 1] = 0.0
    mask, sizes = committee_masks(stack, 0.5)
    assert mask.shape == stack.shape and sizes.shape == (6, 3)
    for r in range(6):
        if stack[r].sum() == 0:
            continue
        for d, c in enumerate(committees(stack[r], 0.5)):
            assert np.flatnonzero(mask[r, d]).tolist() == sorted(c.tolist())
            assert sizes[r, d] == c.size


@pytest.mark.parametrize("mass", [0.0, -0.1, 1.5, float("nan")])
def test_mass_out_of_range_raises(mass: float) -> None:
    with pytest.raises(ValueError, match="mass"):
        committees(np.ones((2, 3)), mass)


def test_bad_tables_raise() -> None:
    with pytest.raises(ValueError):
        committees(np.ones(3))
    with pytest.raises(ValueError):
        committees(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        committees(-np.ones((2, 3)))


# ----------------------------------------------------------------------------- overlap
def test_jaccard_matches_hand_computation() -> None:
    # J({0,1},{1,2}) = 1/3, J({0,1},{3}) = 0, J({1,2},{3}) = 0: mean 1/9
    sets = [np.array([0, 1]), np.array([1, 2]), np.array([3])]
    assert committee_overlap(sets, 5) == pytest.approx(1 / 9, abs=1e-15)
    assert committee_intersection_union(sets, 5) == (0, 4)
    # J = 2/3, 1/4, 1/3: mean 5/12; {2} in all three; union {0,1,2,3}
    lists = [[0, 1, 2], [1, 2], [2, 3]]
    assert committee_overlap(lists, 4) == pytest.approx(5 / 12, abs=1e-15)
    assert committee_intersection_union(lists, 4) == (1, 4)
    assert committee_overlap([[3, 1], [1, 3], [3, 1]], 4) == 1.0
    assert committee_intersection_union([[3, 1], [1, 3], [3, 1]], 4) == (2, 2)
    assert committee_overlap([[0], [1], [2]], 3) == 0.0


def test_empty_committees_are_left_out() -> None:
    assert committee_overlap([[0, 1], [], [1]], 3) == pytest.approx(0.5)
    assert committee_intersection_union([[0, 1], [], [1]], 3) == (1, 2)
    assert np.isnan(committee_overlap([[0, 1], []], 3))
    assert committee_intersection_union([[], []], 3) == (0, 0)


def test_overlap_matches_naive_on_random_sets() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        e, g = int(rng.integers(1, 12)), int(rng.integers(2, 7))
        sets = [set(rng.choice(e, size=int(rng.integers(0, e + 1)), replace=False).tolist()) for _ in range(g)]
        got = committee_overlap([sorted(s) for s in sets], e)
        want = naive_overlap(sets)
        assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want, abs=1e-14)
        used = [s for s in sets if s]
        inter = len(set.intersection(*used)) if used else 0
        assert committee_intersection_union([sorted(s) for s in sets], e) == (inter, len(set().union(*sets)))


def test_overlap_rejects_bad_sets() -> None:
    with pytest.raises(ValueError):
        committee_overlap([[0, 5]], 5)
    with pytest.raises(TypeError):
        committee_overlap([np.array([0.5])], 5)
    with pytest.raises(ValueError):
        committee_overlap([], 5)


# ----------------------------------------------------------------------------- evidence
def test_null_and_bootstrap_match_a_per_table_loop() -> None:
    docs = blind_docs(4, n_domains=3, n_experts=8, per_domain=6)
    res = committee_evidence(docs, 3, n_permutations=30, n_bootstrap=30, rng=123)
    null_rng, boot_rng = np.random.default_rng(123).spawn(2)
    labels = permute_doc_domains(docs.doc_domain, 30, null_rng)
    null = [committee_overlap(committees(joint_from_docs(lab, docs.counts, 3)), 8) for lab in labels]
    np.testing.assert_allclose(res.null_samples, null, rtol=0, atol=1e-14)
    weights = stratified_doc_bootstrap(docs.doc_domain, 30, boot_rng)
    boot = []
    for w in weights:
        joint = np.zeros((3, 8))
        for m, d in enumerate(docs.doc_domain):
            joint[d] += w[m] * docs.counts[m]
        boot.append(committee_overlap(committees(joint), 8))
    np.testing.assert_allclose(res.boot_samples, boot, rtol=0, atol=1e-14)
    want_p = (1 + sum(x <= res.overlap + 1e-12 for x in null)) / 31
    assert res.p_value == pytest.approx(want_p)
    assert res.null_mean == pytest.approx(np.mean(null))


def test_planted_demix_gives_disjoint_small_committees() -> None:
    res = committee_evidence(demix_docs(0), 5, n_permutations=200, n_bootstrap=200, rng=0)
    assert isinstance(res, CommitteeResult)
    assert res.overlap == 0.0
    assert all(1 <= s <= 2 for s in res.sizes)
    for d, members in enumerate(res.members):
        assert set(members) <= {2 * d, 2 * d + 1}
    assert res.intersection == 0 and res.union == sum(res.sizes)
    assert res.null_mean > 0.15
    assert res.p_value == pytest.approx(1 / 201)  # no permutation reaches 0
    assert res.ci_low == 0.0 and res.ci_high == 0.0


def test_ensemble_shares_one_committee() -> None:
    res = committee_evidence(ensemble_docs(1), 5, n_permutations=100, n_bootstrap=100, rng=1)
    assert res.overlap == 1.0
    assert [set(c) for c in res.members] == [{0, 1}] * 5
    assert res.intersection == 2 and res.union == 2
    assert res.p_value == 1.0  # every permutation is as low or lower: not below chance
    assert res.ci_high == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_domain_blind_routing_sits_at_its_null(seed: int) -> None:
    res = committee_evidence(blind_docs(seed), 5, n_permutations=200, n_bootstrap=100, rng=seed)
    assert abs(res.overlap - res.null_mean) < 0.1
    assert res.p_value > 0.01
    assert res.ci_low <= res.overlap <= res.ci_high


def test_domain_blind_false_positive_rate() -> None:
    ps = [
        committee_evidence(blind_docs(100 + s, alpha=1.0), 5, n_permutations=99, n_bootstrap=1, rng=s).p_value
        for s in range(40)
    ]
    assert np.mean(np.array(ps) <= 0.05) <= 0.15
    assert np.mean(ps) > 0.3


def test_evidence_is_deterministic_and_json_ready() -> None:
    docs = demix_docs(2, per_domain=8)
    a = committee_evidence(docs, 5, n_permutations=50, n_bootstrap=50, rng=9)
    b = committee_evidence(docs, 5, n_permutations=50, n_bootstrap=50, rng=9)
    np.testing.assert_array_equal(a.null_samples, b.null_samples)
    np.testing.assert_array_equal(a.boot_samples, b.boot_samples)
    m = a.as_measure_result()
    assert m.name == "committee_overlap"
    assert m.value == a.overlap and m.null_mean == a.null_mean and m.p_value == a.p_value
    assert (m.ci_low, m.ci_high) == (a.ci_low, a.ci_high)
    d = m.as_dict()
    json.dumps(d, allow_nan=False)
    assert d["sizes"] == list(a.sizes) and d["members"] == [list(x) for x in a.members]
    assert d["mean_size"] == pytest.approx(np.mean(a.sizes))
    assert (d["intersection"], d["union"], d["mass"]) == (a.intersection, a.union, 0.5)
    assert columns("committee_overlap", d)["committee_overlap_p"] == a.p_value


def test_absent_domain_is_left_out() -> None:
    docs = demix_docs(3, n_domains=3, per_domain=5)
    res = committee_evidence(docs, 4, n_permutations=20, n_bootstrap=20, rng=0)  # domain 3 has no documents
    assert res.sizes[3] == 0 and res.members[3] == ()
    assert res.overlap == 0.0
    assert res.as_measure_result().details["mean_size"] == pytest.approx(np.mean(res.sizes[:3]))


def test_one_domain_gives_no_overlap() -> None:
    docs = DocCounts(np.arange(3), np.zeros(3, dtype=np.int64), np.array([[3.0, 1.0], [2.0, 2.0], [0.0, 4.0]]))
    res = committee_evidence(docs, 1, n_permutations=10, n_bootstrap=10, rng=0)
    assert np.isnan(res.overlap) and np.isnan(res.p_value)
    m = res.as_measure_result()
    assert m.value is None and m.p_value is None
    json.dumps(m.as_dict(), allow_nan=False)


def test_evidence_rejects_bad_input() -> None:
    docs = demix_docs(0, per_domain=2)
    with pytest.raises(ValueError, match="mass"):
        committee_evidence(docs, 5, mass=0.0, rng=0)
    with pytest.raises(ValueError, match="confidence"):
        committee_evidence(docs, 5, confidence=1.0, rng=0)
    with pytest.raises(ValueError):
        committee_evidence(docs, 3, rng=0)  # domains out of range
    with pytest.raises(TypeError):
        committee_evidence(docs, 5, rng=None)  # type: ignore[arg-type]
