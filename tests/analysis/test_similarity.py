"""Linear CKA against a naive centered-Gram (HSIC) implementation and its invariances."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from analysis.similarity import cka_matrix, linear_cka


def naive_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC = tr(K H L H) with K = X X^T, L = Y Y^T, H = I - 11^T/n (no column centering of X, Y)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("shape", [(50, 5, 7), (20, 40, 30)], ids=["feature-form", "gram-form"])
def test_matches_naive_centered_gram(shape):
    rng = np.random.default_rng(0)
    n, p1, p2 = shape
    x = rng.normal(size=(n, p1)) + 3.0  # offsets: centering must remove them
    y = x[:, :1] * rng.normal(size=(1, p2)) + rng.normal(size=(n, p2))
    assert linear_cka(x, y) == pytest.approx(naive_cka(x, y), rel=1e-10)


def test_self_similarity_symmetry_and_invariances():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 10))
    y = x @ rng.normal(size=(10, 6)) + rng.normal(size=(200, 6))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
    q = ortho_group.rvs(10, random_state=2)
    assert linear_cka(x @ q, y) == pytest.approx(linear_cka(x, y), rel=1e-10)  # orthogonal
    assert linear_cka(1e-3 * x, 1e4 * y) == pytest.approx(linear_cka(x, y), rel=1e-10)  # isotropic scale
    assert linear_cka(x + 7.0, y) == pytest.approx(linear_cka(x, y), rel=1e-10)  # offset
    assert linear_cka(x * np.arange(1, 11), x) < 0.99  # NOT invariant to anisotropic scaling


def test_independent_features_give_near_zero():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20_000, 4)), rng.normal(size=(20_000, 4))
    assert linear_cka(x, y) < 0.005  # ~ sqrt(p1 p2) / n in expectation


def test_huge_values_do_not_overflow():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(100, 5))
    assert linear_cka(1e200 * x, x) == pytest.approx(1.0, abs=1e-12)


def test_zero_variance_gives_nan():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 4))
    assert np.isnan(linear_cka(np.zeros((30, 4)), x))
    assert np.isnan(linear_cka(np.full((30, 4), 0.1), x))  # constant but nonzero
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(x, x[:10])


@pytest.mark.parametrize("n", [60, 8], ids=["pairwise", "stacked-grams"])
def test_cka_matrix_equals_pairwise(n):
    rng = np.random.default_rng(6)
    base = rng.normal(size=(n, 12))
    reps = [base @ rng.normal(size=(12, 12)) + s * rng.normal(size=(n, 12)) for s in (0.1, 1.0, 3.0)]
    reps.append(np.ones((n, 12)))  # an expert with constant output
    m = cka_matrix(reps)
    assert m.shape == (4, 4)
    for i in range(3):
        for j in range(3):
            assert m[i, j] == pytest.approx(linear_cka(reps[i], reps[j]), rel=1e-10, abs=1e-14)
    np.testing.assert_array_equal(np.diag(m)[:3], 1.0)
    np.testing.assert_array_equal(m, m.T)
    assert np.all(np.isnan(m[3])) and np.all(np.isnan(m[:, 3]))
