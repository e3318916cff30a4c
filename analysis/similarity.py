"""Functional redundancy of experts: linear CKA between their outputs on the same inputs (numpy).

Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited"):
for column-centered X [n, p1] and Y [n, p2] (n shared inputs, p features),

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),  K = X X^T, L = Y Y^T (linear kernels).

In [0, 1]; 1 for identical representations up to an orthogonal transform and isotropic scaling;
~sqrt(p1 p2)/n for independent random features (-> 0 when n >> p). Two experts with CKA near 1
compute the same function on these inputs (an ensemble); specialists differ.

Zero-variance input (all rows equal after centering, e.g. an expert that never fired and outputs
zeros) makes CKA 0/0: we return nan rather than 0, because "undefined" must not read as "maximally
dissimilar" in a redundancy report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["cka_matrix", "linear_cka"]

# Stacking all n x n Gram matrices is used only while it stays under ~256 MiB of float64.
_GRAM_STACK_CELLS = 1 << 25


def _centered_unit(x: np.ndarray, name: str) -> np.ndarray | None:
    """Column-centered float64 copy of x [n, p] scaled to unit Frobenius norm; None when its
    centered norm is zero (up to the rounding that centering a constant column leaves)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must be [n >= 2, p >= 1], got shape {np.shape(x)}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    # Scale first so that squaring in the HSIC cannot overflow for huge activations.
    scale = np.max(np.abs(a))
    if scale == 0.0:
        return None
    a = a / scale
    c = a - a.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(c)
    # Centering a constant column leaves ~eps * |mean| per entry; treat that as no variance.
    if norm <= 1e-12 * np.sqrt(a.size):
        return None
    return c / norm


def _cka_centered(x: np.ndarray, y: np.ndarray) -> float:
    """CKA of centered, unit-norm x [n, p1], y [n, p2], in whichever form is cheaper."""
    n, p1 = x.shape
    p2 = y.shape[1]
    if n * n * (p1 + p2) < n * (p1 * p2 + p1 * p1 + p2 * p2):
        k, l = x @ x.T, y @ y.T
        num, den = np.vdot(k, l), np.linalg.norm(k) * np.linalg.norm(l)
    else:
        num = np.linalg.norm(y.T @ x) ** 2
        den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.clip(num / den, 0.0, 1.0))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in [0, 1] between x [n, p1] and y [n, p2] (rows = the same n inputs).

    Symmetric; invariant to orthogonal transforms and isotropic scaling of either argument and to
    adding a constant row offset; CKA(X, X) = 1. nan when either input has zero variance. Computed
    in float64 from the feature form ||Y^T X||_F^2 or the Gram form <XX^T, YY^T>_F, whichever is
    cheaper (identical values).

    Reference implementation: the analysis computes CKA with `cka_matrix` (all pairs at once); the
    tests compare it, and `analysis.probes.expert_cka`, with this pairwise form.
    """
    if np.shape(x)[:1] != np.shape(y)[:1]:
        raise ValueError(f"x and y must have the same number of rows (inputs), got {np.shape(x)} and {np.shape(y)}")
    a = _centered_unit(x, "x")
    b = _centered_unit(y, "y")
    if a is None or b is None:
        return float("nan")
    return _cka_centered(a, b)


def cka_matrix(representations: Sequence[np.ndarray]) -> np.ndarray:
    """Pairwise linear CKA, [E, E], of E representations [n, p_i] of the same n inputs.

    Symmetric with unit diagonal; rows and columns of zero-variance representations are nan.
    When the inputs are few (n^2 small next to p^2) all Gram matrices are stacked and compared with
    one matrix product; otherwise each pair uses the feature form.
    """
    reps = list(representations)
    if not reps:
        raise ValueError("need at least one representation")
    n = np.shape(reps[0])[0]
    for i, r in enumerate(reps):
        if np.shape(r)[0] != n:
            raise ValueError(f"representation {i} has {np.shape(r)[0]} rows, expected {n} (same inputs)")
    centered = [_centered_unit(r, f"representations[{i}]") for i, r in enumerate(reps)]
    e = len(centered)
    out = np.full((e, e), np.nan)
    units = {i: u for i, u in enumerate(centered) if u is not None}  # the representations with variance
    ok = list(units)
    if not ok:
        return out
    max_p = max(units[i].shape[1] for i in ok)
    if n <= max_p and len(ok) * n * n <= _GRAM_STACK_CELLS:
        grams = np.stack([(units[i] @ units[i].T).ravel() for i in ok])  # [E', n*n]
        hsic = grams @ grams.T
        norms = np.sqrt(np.diag(hsic))
        sub = np.clip(hsic / np.outer(norms, norms), 0.0, 1.0)
    else:
        self_norm = {i: np.linalg.norm(units[i].T @ units[i]) for i in ok}
        sub = np.empty((len(ok), len(ok)))
        for a, i in enumerate(ok):
            for b, j in enumerate(ok[a:], start=a):
                num = np.linalg.norm(units[j].T @ units[i]) ** 2
                sub[a, b] = sub[b, a] = np.clip(num / (self_norm[i] * self_norm[j]), 0.0, 1.0)
    np.fill_diagonal(sub, 1.0)  # exact by definition; avoids 0.9999999999999998 on the diagonal
    out[np.ix_(ok, ok)] = sub
    return out
