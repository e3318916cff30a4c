"""Which documents are held out, and how much each domain weighs in the train stream."""

from __future__ import annotations

import numpy as np

from moe.data.corpus import name_salt
from moe.data.errors import DataError


def split_documents(
    doc_domain: np.ndarray, domains: list[str], *, seed: int, val_fraction: float
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Split by document, per domain: round(val_fraction * n) documents (at least 1, at most
    n - 1) go to validation. Returns is_val bool [N_doc] and, per domain, the validation document
    ids in their (seeded) order. Each domain has its own RNG stream, so adding a domain leaves the
    others' splits unchanged."""
    is_val = np.zeros(doc_domain.size, dtype=bool)
    val_order = []
    for d, name in enumerate(domains):
        docs = np.flatnonzero(doc_domain == d)
        if docs.size < 2:
            raise DataError(
                f"domain {name!r} has {docs.size} document(s); a train/validation split by document needs "
                f"at least 2: add documents, raise data.max_chars_per_domain, or drop the domain"
            )
        n_val = int(min(max(round(val_fraction * docs.size), 1), docs.size - 1))
        rng = np.random.default_rng([seed, 0x5B117, name_salt(name)])
        chosen = docs[rng.permutation(docs.size)[:n_val]]
        is_val[chosen] = True
        val_order.append(chosen)
    return is_val, val_order


def mixture_weights(mixture: dict[str, float] | None, domains: list[str]) -> np.ndarray:
    """float64 [D] train-token share per domain (sums to 1); None or {} = equal shares."""
    if not mixture:
        return np.full(len(domains), 1.0 / len(domains))
    unknown = sorted(set(mixture) - set(domains))
    if unknown:
        raise DataError(f"data.mixture names unknown domains {unknown}; the domains are {domains}")
    w = np.array([float(mixture.get(name, 0.0)) for name in domains])
    if not np.all(w >= 0) or w.sum() <= 0:
        raise DataError(f"data.mixture={dict(mixture)} needs non-negative weights with a positive sum")
    return w / w.sum()
