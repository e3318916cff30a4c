"""Input checks shared by the information measures, their statistics and the published metrics
(pure numpy). Each returns the input converted (int64 ids, float64 tables) or raises a ValueError
or TypeError naming the argument at fault, so every measure fails early with the same message.

Legend as in `moe/__init__.py`: N rows of a sample (routed tokens), K slots per token, E experts.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "RngLike",
    "as_doc_ids",
    "as_experts",
    "as_ids",
    "as_labels",
    "as_rng",
    "as_table",
    "as_weights",
    "positive_int",
]

RngLike = np.random.Generator | int


def as_ids(name: str, ids: np.ndarray, n_classes: int) -> np.ndarray:
    """Integer ids (any shape) in [0, n_classes) as int64; TypeError for non-integers,
    ValueError for ids out of range or n_classes < 1."""
    a = np.asarray(ids)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if int(n_classes) < 1:
        raise ValueError(f"number of {name} classes must be >= 1, got {n_classes}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= n_classes):
        raise ValueError(f"{name} must lie in [0, {n_classes}), got range [{a.min()}, {a.max()}]")
    return a


def as_labels(name: str, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Integer labels [N] (one per row: a domain, a token id) in [0, n_labels) as int64."""
    a = np.asarray(labels)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {a.shape}")
    return as_ids(name, a, n_labels)


def as_doc_ids(doc: np.ndarray, n_tokens: int) -> np.ndarray:
    """Document ids [N] (any integers, N = n_tokens) as given; ValueError for another shape,
    TypeError for non-integers."""
    a = np.asarray(doc)
    if a.shape != (n_tokens,):
        raise ValueError(f"doc must be [N={n_tokens}], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"doc must hold integer ids, got dtype {a.dtype}")
    return a


def as_experts(experts: np.ndarray, n_tokens: int, n_experts: int) -> np.ndarray:
    """Expert ids [N, K] (a 1-D [N] array means K = 1) in [0, n_experts) as int64, N = n_tokens."""
    a = np.asarray(experts)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] != n_tokens:
        raise ValueError(f"experts must be [N={n_tokens}, K] (or [N]), got shape {np.shape(experts)}")
    return as_ids("experts", a, n_experts)


def as_weights(weights: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Per-assignment weights with the experts' shape ([N, K]; [N] when K = 1), finite and
    non-negative, as float64; None stays None (= 1 per assignment)."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1 and len(shape) == 2 and shape[1] == 1:
        w = w[:, None]
    if w.shape != shape:
        raise ValueError(f"weights must have the experts' shape {shape}, got {w.shape}")
    if not np.all(np.isfinite(w)) or (w.size and w.min() < 0):
        raise ValueError("weights must be finite and non-negative")
    return w


def as_table(table: np.ndarray, ndim: int | None = None, name: str = "table") -> np.ndarray:
    """A count table (any shape, or exactly `ndim` dimensions) as float64: non-empty, finite,
    non-negative, with a positive total ("has total 0: no samples" otherwise)."""
    t = np.asarray(table, dtype=np.float64)
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {t.shape}")
    if t.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{name} must be finite")
    if t.min() < 0:
        raise ValueError(f"{name} must be non-negative (counts), min is {t.min()}")
    if not t.sum() > 0:
        raise ValueError(f"{name} has total 0: no samples")
    return t


def as_rng(rng: RngLike) -> np.random.Generator:
    """A numpy Generator from a Generator or an int seed; TypeError for None, bool or float (the
    seed must be explicit, for determinism)."""
    if isinstance(rng, (bool, float)) or rng is None:
        raise TypeError("rng must be a np.random.Generator or an int seed (explicit, for determinism)")
    return np.random.default_rng(rng)


def positive_int(name: str, n: int) -> int:
    """`n` as an int >= 1 (a count of documents, resamples, permutations); ValueError otherwise."""
    if int(n) != n or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n}")
    return int(n)
