"""Statistics of expert loads shared by the training logs and the analysis (numpy, torch-free)."""

from __future__ import annotations

import numpy as np

__all__ = ["max_violation"]


def max_violation(load_E: np.ndarray) -> float:
    """MaxVio = (max_e load_e - mean load) / mean load of load [E] (assignments or summed router
    probabilities per expert). Unitless: 0 at perfect balance, E - 1 when one expert takes
    everything. nan when every load is 0 (no assignments: balance is undefined, not perfect).
    ValueError for an empty, non-1-D, negative or non-finite load."""
    load = np.asarray(load_E, dtype=np.float64)
    if load.ndim != 1 or load.size == 0:
        raise ValueError(f"load must be a non-empty 1-D array [E], got shape {load.shape}")
    if not np.all(np.isfinite(load)) or load.min() < 0:
        raise ValueError("load must be finite and non-negative (counts per expert)")
    mean = load.mean()
    if mean == 0:
        return float("nan")
    return float((load.max() - mean) / mean)
