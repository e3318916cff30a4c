"""Specialization metrics of published MoE analyses, so our numbers compare with theirs (pure numpy).

- OLMoE (Muennighoff et al. 2024, sec. 5): domain specialization, vocabulary specialization,
  router saturation between checkpoints, expert co-activation.
- Mixtral (Jiang et al. 2024, sec. 5): rate at which consecutive tokens get the same expert.
- Load and confidence of the router: per-token routing entropy, entropy of the expert load, MaxVio
  (the load-imbalance measure of the auxiliary-loss-free balancing papers; `moe.loads.max_violation`,
  the one definition the training logs use too, re-exported here).

Each metric comes with the value that uniform (or independent) routing gives, stated in its
docstring or returned by a `*_null` function, because a raw share means nothing without it.

Legend as in `moe/__init__.py`: N tokens, K top-k, E experts, G domains, V vocabulary.
Experts [N, K] hold each token's K distinct expert ids; where an order matters ("top-1") the
first column is taken as the highest-gate expert (torch.topk order) unless gates are given.
"""

from __future__ import annotations

from itertools import combinations
from typing import Literal

import numpy as np

from analysis.information import entropy
from analysis.validation import as_experts, as_table
from moe.loads import max_violation
from moe.validation import check_choice

__all__ = [
    "coactivation",
    "coactivation_null",
    "consecutive_expert_null",
    "consecutive_expert_rate",
    "domain_specialization",
    "load_entropy",
    "max_violation",
    "mean_router_entropy",
    "router_saturation",
    "vocabulary_specialization",
    "vocabulary_specialization_per_token",
]

Variant = Literal["top1", "overlap"]


# Slot comparisons run column by column up to this many elementwise passes over the records (K = 8
# for distinct ids, K = 5 for consecutive sets): numpy's sort or broadcast along a short axis 1 is
# several times slower than that many passes.
_PAIRWISE_MAX_PASSES = 28


def _distinct_experts(experts: np.ndarray, n_experts: int | None = None, name: str = "experts") -> np.ndarray:
    """Expert ids [N, K] int64, checked to be distinct within each token (as top-k ids are)."""
    a = np.asarray(experts)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, K] array, got shape {np.shape(experts)}")
    e = int(a.max()) + 1 if n_experts is None else n_experts
    a = as_experts(a, a.shape[0], e)
    k = a.shape[1]
    if k * (k - 1) // 2 <= _PAIRWISE_MAX_PASSES:
        repeated = any(np.any(a[:, i] == a[:, j]) for i, j in combinations(range(k), 2))
    else:
        s = np.sort(a, axis=1)
        repeated = bool(np.any(s[:, 1:] == s[:, :-1]))
    if repeated:
        raise ValueError(f"{name}: a token lists the same expert twice; top-k ids must be distinct")
    return a


def _integral_table(table: np.ndarray, ndim: int, name: str) -> np.ndarray:
    t = as_table(table, ndim=ndim, name=name)
    if not np.allclose(t, np.round(t), rtol=0, atol=1e-6):
        raise ValueError(f"{name} must hold unweighted assignment counts (build it with weights=None)")
    return t


# ----------------------------------------------------------------------------- OLMoE
def domain_specialization(joint: np.ndarray, k: int) -> np.ndarray:
    """OLMoE domain specialization, [G, E]: the fraction of domain d's tokens that have expert e
    among their top-k.

    joint [G, E] = unweighted assignment counts (`contingency(domain, experts, G, E)`), k = top-k.
    Cell = n(d, e) / n_tokens(d) with n_tokens(d) = sum_e n(d, e) / k. In [0, 1]; each row sums to
    k. Uniform routing gives k/E everywhere; a domain with its own expert gives 1 there. Rows of
    domains without tokens are nan.
    """
    t = _integral_table(joint, 2, "joint")
    if int(k) != k or not 1 <= k <= t.shape[1]:
        raise ValueError(f"k must be an integer in [1, E={t.shape[1]}], got {k}")
    tokens = t.sum(axis=1, keepdims=True) / k
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tokens > 0, t / tokens, np.nan)


def vocabulary_specialization_per_token(token_expert: np.ndarray, k: int) -> np.ndarray:
    """OLMoE vocabulary specialization per token id, [V]: max_e of the fraction of the token's
    occurrences routed to e (among the top-k).

    token_expert [V, E] = unweighted counts (`contingency(token, experts, V, E)`). In [k/E, 1]
    (a token always routed to the same expert gives 1); nan for ids never seen. Uniform routing
    gives ~k/E for frequent tokens but up to 1 for rare ones (a token seen once scores 1).
    """
    t = _integral_table(token_expert, 2, "token_expert")
    if int(k) != k or not 1 <= k <= t.shape[1]:
        raise ValueError(f"k must be an integer in [1, E={t.shape[1]}], got {k}")
    occurrences = t.sum(axis=1) / k
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(occurrences > 0, t.max(axis=1) / occurrences, np.nan)


def vocabulary_specialization(token_expert: np.ndarray, k: int, min_count: int = 1) -> float:
    """OLMoE vocabulary specialization averaged over token ids, weighted by their frequency.

    token_expert [V, E] unweighted counts; only tokens with at least `min_count` occurrences count
    (rare tokens score high by chance: raise min_count, e.g. to 10E/k, to compare layers with
    different data sizes). In [k/E, 1]; uniform routing of frequent tokens gives ~k/E. nan if no
    token passes min_count.
    """
    per_token = vocabulary_specialization_per_token(token_expert, k)
    occurrences = np.asarray(token_expert, dtype=np.float64).sum(axis=1) / k
    keep = occurrences >= max(min_count, 1)
    if not keep.any():
        return float("nan")
    return float(np.average(per_token[keep], weights=occurrences[keep]))


def router_saturation(experts_t: np.ndarray, experts_final: np.ndarray) -> float:
    """OLMoE router saturation: the fraction of a token's top-k experts at checkpoint t that are
    also in its top-k at the final checkpoint, averaged over tokens.

    experts_t, experts_final [N, K]: the same N tokens routed by both checkpoints. In [0, 1]; 1 when
    routing has converged; two independent uniform routers give k/E.
    """
    a = _distinct_experts(experts_t, name="experts_t")
    b = _distinct_experts(experts_final, name="experts_final")
    if a.shape != b.shape:
        raise ValueError(f"experts_t and experts_final must have the same shape, got {a.shape} and {b.shape}")
    shared = (a[:, :, None] == b[:, None, :]).any(axis=2)
    return float(shared.mean())


def coactivation(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """OLMoE co-activation, [E, E]: C[i, j] = P(j selected | i selected) = n(i and j) / n(i).

    experts [N, K] distinct ids per token. Not symmetric. Diagonal 0 by convention, so each row of
    a selected expert sums to K - 1; rows of experts never selected are nan. Uniform random top-k
    gives (K - 1)/(E - 1) off the diagonal (`coactivation_null`); redundant pairs that fire together
    sit far above it.
    """
    ex = _distinct_experts(experts, n_experts)
    e = int(n_experts)
    pairs = np.zeros(e * e, dtype=np.float64)
    for a, b in combinations(range(ex.shape[1]), 2):
        pairs += np.bincount(ex[:, a] * e + ex[:, b], minlength=e * e)
        pairs += np.bincount(ex[:, b] * e + ex[:, a], minlength=e * e)
    selected = np.bincount(ex.ravel(), minlength=e).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pairs.reshape(e, e) / selected[:, None]


def coactivation_null(k: int, n_experts: int) -> float:
    """Co-activation P(j | i) under uniform random top-k routing: (k - 1) / (E - 1)."""
    if n_experts < 2 or not 1 <= k <= n_experts:
        raise ValueError(f"need 1 <= k <= E and E >= 2, got k={k}, E={n_experts}")
    return (k - 1) / (n_experts - 1)


# ----------------------------------------------------------------------------- Mixtral
def _route_sets(experts: np.ndarray, gates: np.ndarray | None, variant: Variant) -> np.ndarray:
    """[N, 1] top-1 expert (argmax of gates, else column 0) or the [N, K] top-k set."""
    check_choice("variant", variant, ("top1", "overlap"))
    ex = _distinct_experts(experts)
    if variant == "overlap":
        return ex
    if gates is None:
        return ex[:, :1]
    g = np.asarray(gates, dtype=np.float64)
    if g.ndim == 1:
        g = g[:, None]
    if g.shape != ex.shape:
        raise ValueError(f"gates must have the experts' shape {ex.shape}, got {g.shape}")
    return np.take_along_axis(ex, np.argmax(g, axis=1)[:, None], axis=1)


def consecutive_expert_rate(
    experts: np.ndarray,
    doc: np.ndarray,
    *,
    gates: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    variant: Variant = "top1",
) -> float:
    """Mixtral's repetition rate: among consecutive tokens of one document, how often token t+1
    is routed like token t.

    experts [N, K] in stream order; doc [N] document ids (consecutive records of one document are
    consecutive tokens); positions [N] (optional) additionally require pos[t+1] = pos[t] + 1;
    gates [N, K] (optional) pick the top-1. variant "top1": same top-1 expert; "overlap": the two
    top-k sets share at least one expert (Mixtral's "first or second choice"). In [0, 1]; nan when
    there is no consecutive pair. Independent tokens give `consecutive_expert_null` (1/E top-1 and
    1 - C(E-k, k)/C(E, k) overlap under uniform load: 12.5% and 46.4% for Mixtral's E=8, k=2).
    """
    sets = _route_sets(experts, gates, variant)
    n = sets.shape[0]
    d = np.asarray(doc)
    if d.shape != (n,):
        raise ValueError(f"doc must be [N={n}], got shape {d.shape}")
    same = d[1:] == d[:-1]
    if positions is not None:
        p = np.asarray(positions)
        if p.shape != (n,):
            raise ValueError(f"positions must be [N={n}], got shape {p.shape}")
        same &= p[1:] == p[:-1] + 1
    n_pairs = int(np.count_nonzero(same))
    if not n_pairs:
        return float("nan")
    k = sets.shape[1]
    if k * k > _PAIRWISE_MAX_PASSES:  # many slots: one [pairs, K, K] comparison
        nxt, prev = sets[1:][same], sets[:-1][same]
        return float((nxt[:, :, None] == prev[:, None, :]).any(axis=(1, 2)).mean())
    routed_alike = np.zeros(n - 1, dtype=bool)
    for i in range(k):
        for j in range(k):
            routed_alike |= sets[1:, i] == sets[:-1, j]
    return float(np.count_nonzero(routed_alike & same) / n_pairs)


def _subset_mass_squares(sets: np.ndarray, size: int) -> float:
    """sum over expert subsets S with |S| = size of m(S)^2, m(S) = fraction of rows containing S."""
    srt = np.sort(sets, axis=1)
    n, e = srt.shape[0], int(srt.max()) + 1
    subs = [srt[:, list(c)] for c in combinations(range(srt.shape[1]), size)]
    if e**size < 2**62:
        weights = e ** np.arange(size - 1, -1, -1, dtype=np.int64)
        keys = np.concatenate([s @ weights for s in subs])
        _, counts = np.unique(keys, return_counts=True)
    else:  # ids too large for one int64 key: unique rows instead
        _, counts = np.unique(np.concatenate(subs), axis=0, return_counts=True)
    m = counts / n
    return float(np.dot(m, m))


def consecutive_expert_null(
    experts: np.ndarray, *, gates: np.ndarray | None = None, variant: Variant = "top1"
) -> float:
    """`consecutive_expert_rate` expected for two independent tokens drawn from the observed routing.

    top1: sum_e p_e^2 with p_e the top-1 load fractions (1/E when balanced). overlap: the
    probability that two independent top-k sets intersect, by inclusion-exclusion
    sum_{s=1..K} (-1)^(s+1) sum_{|S|=s} m(S)^2, m(S) = fraction of tokens whose set contains S
    (exact; 1 - C(E-k, k)/C(E, k) for uniform random top-k).
    """
    sets = _route_sets(experts, gates, variant)
    return float(sum((-1) ** (s + 1) * _subset_mass_squares(sets, s) for s in range(1, sets.shape[1] + 1)))


# ----------------------------------------------------------------------------- load and confidence
def mean_router_entropy(probs: np.ndarray) -> float:
    """Mean over tokens of the entropy (bits) of the router distribution probs [N, E].

    Rows must be probability vectors (sum 1 within 1e-3; renormalized). In [0, log2 E]: log2 E for
    a router that is uniform on every token, 0 for a one-hot router. Low per-token entropy with a
    high `load_entropy` is the healthy pattern: confident routing, balanced load.

    Reference implementation: the recorder accumulates the same quantity on the device
    (`LayerCounts.entropy_bits_sum`), and the tests compare it with this function.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty [N, E] array, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise ValueError("probs must be finite and non-negative")
    s = p.sum(axis=1, keepdims=True)
    if np.any(np.abs(s - 1.0) > 1e-3):
        raise ValueError(
            f"probs rows must sum to 1 (router softmax output), max deviation {float(np.max(np.abs(s - 1.0))):.3g}"
        )
    p = p / s
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p), 0.0)
    return float(max(-terms.sum(axis=1).mean(), 0.0))


def load_entropy(load: np.ndarray) -> float:
    """Entropy (bits) of the expert load, load [E] = counts (or summed probs) per expert.

    In [0, log2 E]: log2 E at perfect balance, 0 when one expert takes everything.
    """
    return entropy(as_table(load, ndim=1, name="load"))
