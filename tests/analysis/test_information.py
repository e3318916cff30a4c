"""Information measures against independent references (sklearn, scipy, naive loops) and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import mutual_info_score

import analysis.information as info
from analysis.information import (
    TokenDomainExpertCounts,
    assignment_weights,
    conditional_mutual_information,
    conditional_mutual_information_mm,
    contingency,
    doc_expert_counts,
    entropy,
    entropy_mm,
    joint_from_docs,
    mutual_information,
    mutual_information_mm,
    normalized_mutual_information,
    normalized_mutual_information_mm,
    token_domain_expert_counts,
)

LN2 = np.log(2.0)


def distinct_experts(rng: np.random.Generator, n: int, n_experts: int, k: int) -> np.ndarray:
    """[n, k] distinct uniform expert ids per row."""
    return np.argsort(rng.random((n, n_experts)), axis=1)[:, :k]


def random_joint(rng: np.random.Generator, d: int = 4, e: int = 6) -> np.ndarray:
    j = rng.integers(0, 20, size=(d, e)).astype(float)
    j[rng.random((d, e)) < 0.2] = 0.0  # some empty cells
    j[0, 0] += 1.0
    return j


# ----------------------------------------------------------------------------- references
@pytest.mark.parametrize("seed", range(5))
def test_mi_equals_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n, d, e = 500, 4, 7
    domain = rng.integers(0, d, n)
    expert = (domain + rng.integers(0, 3, n)) % e  # some dependence
    joint = contingency(domain, expert, d, e)
    ref_bits = mutual_info_score(domain, expert) / LN2
    assert mutual_information(joint) == pytest.approx(ref_bits, rel=1e-12, abs=1e-14)
    # sklearn's contingency= entry point takes the same table
    via_table = mutual_info_score(None, None, contingency=joint) / LN2
    assert mutual_information(joint) == pytest.approx(via_table, rel=1e-12)


def test_mi_with_top_k_counts_each_assignment():
    rng = np.random.default_rng(0)
    n, d, e, k = 400, 3, 8, 2
    domain = rng.integers(0, d, n)
    experts = distinct_experts(rng, n, e, k)
    joint = contingency(domain, experts, d, e)
    assert joint.sum() == n * k
    ref = mutual_info_score(np.repeat(domain, k), experts.ravel()) / LN2
    assert mutual_information(joint) == pytest.approx(ref, rel=1e-12)


def test_entropy_matches_scipy_and_mm_formula():
    rng = np.random.default_rng(1)
    c = rng.integers(0, 50, 10).astype(float)
    c[3] = 0
    assert entropy(c) == pytest.approx(scipy_entropy(c, base=2), rel=1e-13)
    k = np.count_nonzero(c)
    assert entropy_mm(c) == pytest.approx(scipy_entropy(c, base=2) + (k - 1) / (2 * c.sum() * LN2), rel=1e-13)
    assert entropy_mm(c, n_samples=7) == pytest.approx(scipy_entropy(c, base=2) + (k - 1) / (14 * LN2), rel=1e-13)
    assert entropy(np.ones(8)) == pytest.approx(3.0)


def test_mm_mi_equals_mm_corrected_entropies():
    """I_MM = H_MM(D) + H_MM(E) - H_MM(D,E), each corrected on its own."""
    j = random_joint(np.random.default_rng(2))
    ref = entropy_mm(j.sum(1)) + entropy_mm(j.sum(0)) - entropy_mm(j)
    assert mutual_information_mm(j) == pytest.approx(ref, rel=1e-12, abs=1e-14)
    assert normalized_mutual_information_mm(j) == pytest.approx(ref / entropy_mm(j.sum(1)), rel=1e-12)


def naive_cmi_bits(token, domain, expert) -> float:
    """sum_x p(x) I(D;E|X=x), one Python iteration per token id, via sklearn."""
    total, n = 0.0, len(token)
    for x in np.unique(token):
        sel = token == x
        total += sel.sum() / n * mutual_info_score(domain[sel], expert[sel]) / LN2
    return total


@pytest.mark.parametrize("seed", range(3))
def test_cmi_equals_naive_loop_over_tokens(seed):
    rng = np.random.default_rng(seed)
    n, v, d, e = 3000, 12, 3, 5
    token = rng.integers(0, v, n)
    domain = rng.integers(0, d, n)
    expert = (token + domain * rng.integers(0, 2, n) + rng.integers(0, 2, n)) % e
    cube = token_domain_expert_counts(token, domain, expert, v, d, e)
    assert conditional_mutual_information(cube) == pytest.approx(naive_cmi_bits(token, domain, expert), rel=1e-10)


def test_cmi_mm_equals_mm_corrected_entropies():
    rng = np.random.default_rng(3)
    n, v, d, e = 2000, 10, 3, 4
    token, domain, expert = rng.integers(0, v, n), rng.integers(0, d, n), rng.integers(0, e, n)
    cube = token_domain_expert_counts(token, domain, expert, v, d, e)

    def h_mm(*cols):
        _, counts = np.unique(np.stack(cols, axis=1), axis=0, return_counts=True)
        return entropy_mm(counts)

    ref = h_mm(token, domain) + h_mm(token, expert) - h_mm(token, domain, expert) - h_mm(token)
    assert conditional_mutual_information_mm(cube) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_i_token_expert_is_mi_of_token_table():
    rng = np.random.default_rng(4)
    n, v, e = 2000, 50, 8
    token = rng.integers(0, v, n)
    expert = (token * 3 + rng.integers(0, 2, n)) % e
    table = contingency(token, expert, v, e)
    assert mutual_information(table) == pytest.approx(mutual_info_score(token, expert) / LN2, rel=1e-12)


# ----------------------------------------------------------------------------- tables
def test_doc_tables_rebuild_the_joint():
    rng = np.random.default_rng(5)
    n_docs, d, e, k = 40, 3, 6, 2
    doc_dom = rng.integers(0, d, n_docs)
    lengths = rng.integers(1, 30, n_docs)
    doc_ids = rng.choice(10**9, n_docs, replace=False) - 5 * 10**8  # arbitrary, negative, sparse ids
    doc = np.repeat(doc_ids, lengths)
    domain = np.repeat(doc_dom, lengths)
    perm = rng.permutation(doc.size)  # records need not be grouped by document
    doc, domain = doc[perm], domain[perm]
    experts = distinct_experts(rng, doc.size, e, k)
    gates = rng.random((doc.size, k))
    for w in (None, gates):
        docs = doc_expert_counts(doc, domain, experts, d, e, weights=w)
        np.testing.assert_array_equal(docs.doc_ids, np.sort(doc_ids))
        assert docs.counts.shape == (n_docs, e)
        joint = joint_from_docs(docs.doc_domain, docs.counts, d)
        np.testing.assert_allclose(joint, contingency(domain, experts, d, e, w))
    # compact ids take the O(N) path; same answer as the sort path
    compact = doc_expert_counts(np.searchsorted(np.sort(doc_ids), doc), domain, experts, d, e)
    np.testing.assert_array_equal(compact.counts, doc_expert_counts(doc, domain, experts, d, e).counts)


def test_doc_with_two_domains_is_rejected():
    doc = np.array([0, 0, 1, 1])
    domain = np.array([0, 1, 1, 1])
    with pytest.raises(ValueError, match="more than one domain"):
        doc_expert_counts(doc, domain, np.zeros(4, dtype=int), 2, 2)


def naive_cube(token, domain, experts, weights, shape):
    dense = np.zeros(shape)
    for i in range(len(token)):
        for j in range(experts.shape[1]):
            dense[token[i], domain[i], experts[i, j]] += 1.0 if weights is None else weights[i, j]
    return dense


@pytest.mark.parametrize("dense_limit", [info._DENSE_CELLS, 0], ids=["bincount", "unique"])
def test_sparse_cube_matches_dense_reference(monkeypatch, dense_limit):
    monkeypatch.setattr(info, "_DENSE_CELLS", dense_limit)
    rng = np.random.default_rng(6)
    n, v, d, e, k = 300, 20, 3, 5, 2
    token, domain = rng.integers(0, v, n), rng.integers(0, d, n)
    experts = distinct_experts(rng, n, e, k)
    gates = rng.random((n, k))
    for w in (None, gates):
        cube = token_domain_expert_counts(token, domain, experts, v, d, e, weights=w)
        dense = np.zeros((v, d, e))
        dense[cube.token, cube.domain, cube.expert] = cube.count
        np.testing.assert_allclose(dense, naive_cube(token, domain, experts, w, (v, d, e)))
        assert np.all(cube.count > 0)
        ref = naive_cmi_bits(np.repeat(token, k), np.repeat(domain, k), experts.ravel()) if w is None else None
        if ref is not None:
            assert conditional_mutual_information(cube) == pytest.approx(ref, rel=1e-10)


def test_assignment_weights():
    gates = np.array([[0.6, 0.2], [0.0, 0.0], [0.5, 0.5]])
    np.testing.assert_array_equal(assignment_weights(gates), np.ones((3, 2)))
    np.testing.assert_array_equal(assignment_weights(gates, "gate"), gates)
    norm = assignment_weights(gates, "normalized_gate")
    np.testing.assert_allclose(norm.sum(axis=1), 1.0)  # every token counts once
    np.testing.assert_allclose(norm[0], [0.75, 0.25])
    with pytest.raises(ValueError, match="scheme"):
        assignment_weights(gates, "softmax")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- common properties
# sklearn test_common.py style: every joint-table metric through the same property tests.
JOINT_METRICS = {
    "mutual_information": mutual_information,
    "mutual_information_mm": mutual_information_mm,
    "normalized_mutual_information": normalized_mutual_information,
    "normalized_mutual_information_mm": normalized_mutual_information_mm,
}
SYMMETRIC = {"mutual_information", "mutual_information_mm"}
UNIT_INTERVAL = {"normalized_mutual_information"}
NONNEGATIVE = {"mutual_information", "normalized_mutual_information"}


@pytest.mark.parametrize("name", sorted(JOINT_METRICS))
def test_returns_python_float(name):
    value = JOINT_METRICS[name](random_joint(np.random.default_rng(0)))
    assert isinstance(value, float)


@pytest.mark.parametrize("name", sorted(SYMMETRIC))
def test_symmetric(name):
    j = random_joint(np.random.default_rng(1))
    assert JOINT_METRICS[name](j) == pytest.approx(JOINT_METRICS[name](j.T), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", sorted(JOINT_METRICS))
@pytest.mark.parametrize("seed", range(3))
def test_relabelling_invariance(name, seed):
    """Permuting expert ids (columns) or domain ids (rows) changes nothing."""
    rng = np.random.default_rng(seed)
    j = random_joint(rng)
    relabelled = j[rng.permutation(j.shape[0])][:, rng.permutation(j.shape[1])]
    assert JOINT_METRICS[name](relabelled) == pytest.approx(JOINT_METRICS[name](j), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", sorted(UNIT_INTERVAL | NONNEGATIVE))
@pytest.mark.parametrize("seed", range(5))
def test_bounds(name, seed):
    j = random_joint(np.random.default_rng(seed))
    value = JOINT_METRICS[name](j)
    assert value >= 0.0
    if name in UNIT_INTERVAL:
        assert value <= 1.0
    if name == "mutual_information":
        assert value <= min(entropy(j.sum(1)), entropy(j.sum(0))) + 1e-12


@pytest.mark.parametrize("name", sorted(JOINT_METRICS))
def test_one_domain_or_one_expert_gives_zero(name):
    assert JOINT_METRICS[name](np.array([[3.0, 5.0, 0.0, 2.0]])) == 0.0
    if name in SYMMETRIC:
        assert JOINT_METRICS[name](np.array([[3.0], [5.0]])) == 0.0


@pytest.mark.parametrize("name", sorted(JOINT_METRICS))
@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([[1.0, -1.0], [2.0, 3.0]]), "non-negative"),
        (np.zeros((2, 2)), "no samples"),
        (np.array([1.0, 2.0]), "2-D"),
        (np.array([[np.nan, 1.0], [1.0, 1.0]]), "finite"),
    ],
)
def test_bad_tables_raise(name, bad, match):
    with pytest.raises(ValueError, match=match):
        JOINT_METRICS[name](bad)


def test_label_checks():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        contingency(np.array([0, 3]), np.array([0, 1]), 3, 2)
    with pytest.raises(ValueError, match=r"experts must lie"):
        contingency(np.array([0, 1]), np.array([0, 2]), 3, 2)
    with pytest.raises(TypeError, match="integers"):
        contingency(np.array([0.0, 1.0]), np.array([0, 1]), 3, 2)
    with pytest.raises(ValueError, match="weights"):
        contingency(np.array([0, 1]), np.array([[0, 1], [1, 0]]), 3, 2, weights=np.ones(2))


@pytest.mark.parametrize("seed", range(3))
def test_cmi_relabelling_invariance(seed):
    rng = np.random.default_rng(seed)
    n, v, d, e = 2000, 15, 3, 6
    token, domain = rng.integers(0, v, n), rng.integers(0, d, n)
    expert = (token + 2 * domain + rng.integers(0, 2, n)) % e
    base = conditional_mutual_information(token_domain_expert_counts(token, domain, expert, v, d, e))
    pt, pd, pe = rng.permutation(v), rng.permutation(d), rng.permutation(e)
    relabelled = token_domain_expert_counts(pt[token], pd[domain], pe[expert], v, d, e)
    assert conditional_mutual_information(relabelled) == pytest.approx(base, rel=1e-12)
    assert 0.0 < base <= entropy(contingency(token, domain, v, d)) - entropy(np.bincount(token))


# ----------------------------------------------------------------------------- planted structure
@pytest.mark.parametrize("k", [1, 2])
def test_each_domain_its_own_experts_gives_nmi_one_exactly(k):
    rng = np.random.default_rng(0)
    d = 4
    domain = rng.integers(0, d, 1000)
    # domain i uses experts {k*i, ..., k*i + k - 1}: no expert is shared between domains
    experts = domain[:, None] * k + np.arange(k)[None, :]
    joint = contingency(domain, experts, d, d * k)
    assert normalized_mutual_information(joint) == 1.0
    assert mutual_information(joint) == pytest.approx(entropy(joint.sum(1)), rel=1e-12)


def test_independent_routing_mm_nmi_near_zero():
    rng = np.random.default_rng(0)
    n, d, e, k = 20_000, 4, 8, 2
    domain = rng.integers(0, d, n)
    joint = contingency(domain, distinct_experts(rng, n, e, k), d, e)
    plug_in, corrected = normalized_mutual_information(joint), normalized_mutual_information_mm(joint)
    assert corrected < plug_in  # the correction removes the upward bias ...
    assert abs(corrected) < 3e-4  # ... down to ~0 (plug-in bias is ~ 21 / (2 N ln2) / H(D) ~ 4e-4)


def test_token_only_routing_has_domain_mi_but_no_cmi():
    """A router keyed on token ids: large I(D;E) (domains use different tokens), I(D;E|X) = 0."""
    rng = np.random.default_rng(0)
    n, v, d, e = 20_000, 64, 4, 8
    domain = rng.integers(0, d, n)
    token = (domain * (v // d) + rng.integers(0, v // d + 8, n)) % v  # mostly domain-specific tokens
    expert = token // (v // e)  # deterministic function of the token
    joint = contingency(domain, expert, d, e)
    cube = token_domain_expert_counts(token, domain, expert, v, d, e)
    assert normalized_mutual_information(joint) > 0.2
    assert conditional_mutual_information(cube) == 0.0
    i_te = mutual_information(contingency(token, expert, v, e))
    assert i_te == pytest.approx(entropy(np.bincount(expert)), rel=1e-12)  # I(T;E) = H(E)


def test_cube_type_checked():
    with pytest.raises(TypeError, match="TokenDomainExpertCounts"):
        conditional_mutual_information((np.zeros(1),) * 4)  # type: ignore[arg-type]
    empty = TokenDomainExpertCounts(*(np.zeros(0, dtype=np.int64),) * 3, np.zeros(0), (1, 1, 1))
    with pytest.raises(ValueError, match="no samples"):
        conditional_mutual_information(empty)


def test_measure_modules_import_neither_torch_nor_the_model():
    """The statistics core is pure numpy: usable on a machine without torch."""
    import ast
    from pathlib import Path

    root = Path(info.__file__).parent
    # The torch-free helpers of moe/ (checked to stay torch-free below) may be shared.
    torch_free_moe = {"moe.loads", "moe.validation", "moe.tables"}
    for name in ("information.py", "statistics.py", "metrics.py", "similarity.py", "validation.py", "records.py"):
        tree = ast.parse((root / name).read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported = {m.split(".")[0] for m in modules - torch_free_moe}
        allowed = {
            "__future__",
            "numpy",
            "scipy",
            "typing",
            "collections",
            "dataclasses",
            "itertools",
            "pathlib",
            "analysis",
        }
        assert imported <= allowed, (name, imported)


def test_numpy_modules_do_not_load_torch():
    """Importing the records format and the measures (with the moe helpers they share) in a fresh
    interpreter leaves torch unloaded: routing.npz can be read on a machine without torch."""
    import subprocess
    import sys

    modules = [
        "analysis.records",
        "analysis.validation",
        "analysis.information",
        "analysis.statistics",
        "analysis.metrics",
        "analysis.heldout",
        "moe.loads",
        "moe.validation",
        "moe.tables",
    ]
    code = f"import sys\nimport {', '.join(modules)}\nassert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "ids",
    [
        np.array([3, 1, 3, 0, 2, 1]),  # dense from 0
        np.array([7, 5, 6, 5, 7]),  # dense, offset
        np.array([-1, 4, 4, 9, -1, 2]),  # gaps and a negative id
        np.array([10**12, 5, 10**12, 17]),  # span far beyond the size: the sort path
        np.array([2, 0, 1], dtype=np.int32),
        np.array([4]),
    ],
)
def test_dense_index_equals_np_unique(ids):
    uniq, inverse = info.dense_index(ids)
    ref_uniq, ref_inverse = np.unique(ids, return_inverse=True)
    np.testing.assert_array_equal(uniq, ref_uniq)
    np.testing.assert_array_equal(inverse, ref_inverse.reshape(-1))
    assert inverse.dtype == np.int64
    before = ids.copy()
    inverse[:] = -5  # the inverse never shares memory with the input
    np.testing.assert_array_equal(ids, before)
