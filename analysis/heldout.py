"""Held-out (cross-fitted) domain information in routing beyond a context, with document-level
inference (pure numpy; bits throughout).

Why not the plug-in I(D;E|T) against a within-token null: tokens of one document share context,
and a router that prefers some experts per document (topic, style) but never sees the domain still
makes domain d's few documents look different from the others. Shuffling single token occurrences
treats them as independent, so that null calls such domain-blind routers significant (an audit saw
p < .05 in 12/12 runs). The two document-level shuffles one tries next break p(token, domain) and
return p = 1.

What transfers between *disjoint* sets of documents is the domain, not a document's private quirks.
So the routing model is fitted on some documents and scored on others:

    q(e | c)     experts given the context c (token id, or token and previous token), smoothed
                 towards the coarser context and finally the global load;
    q(e | c, d)  softmax_e(log q(e | c) + beta[d, e]): the same with G x E domain offsets fitted on
                 the training documents, so the domain can only move routing the same way in
                 every context (few parameters, hence power; context-specific domain effects are
                 caught only in part, so the estimate runs low for them);

    gain = mean over held-out assignments of log2 q(e | c, d) / q(e | c)      (bits per assignment)

with every document held out once (K folds stratified by domain), on contexts seen often enough in
the training folds. Under domain-blind routing (population I(D;E|C) = 0, document quirks
independent of the domain) its expectation is <= 0: the offsets only carry the training documents'
quirks. Under domain routing it estimates I(D;E|C) from below for moderate effects; for routing
the domain nearly decides it can exceed H(D|C) a little, because the context-only baseline is
itself misfit on held-out documents (a test statistic, not a plug-in entropy). Inference resamples
documents within each domain (stratified bootstrap of the per-document gains): a one-sided p-value
for gain <= 0 and a percentile interval. Documents are the unit throughout.

Legend as in `moe/__init__.py`: N tokens, K slots, E experts, G domains, M documents, R bootstrap
resamples; folds and context groups are spelled out. In I(D;E|C) and H(D|C), D, E and C name the
domain, expert and context variables, not shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from analysis.information import dense_index, doc_index, entropy, slot_counts, sum_over_slots
from analysis.statistics import stratified_doc_bootstrap
from analysis.validation import RngLike, as_experts, as_labels, as_rng, as_weights

__all__ = [
    "HeldoutInformation",
    "TooFewRecords",
    "conditional_entropy_mm",
    "context_keys",
    "document_folds",
    "heldout_conditional_information",
]

# Gains below this (bits per assignment) count as none in the p-value: the smoothing of q(e | c)
# leaves a little mass on experts a context never uses, and domain offsets recover ~1e-6 bits of it
# even when the token determines the experts (hash routing). The margins are ~1e-2 bits.
_TIE_BITS = 1e-4


class TooFewRecords(ValueError):
    """The records are too few for the held-out estimate (no context reaches the minimum support)."""


@dataclass(frozen=True)
class HeldoutInformation:
    """Held-out domain information beyond the context (bits per assignment) with its inference.

    estimate: the cross-fitted gain (sum of per-document gains / assignments); ci_low/ci_high:
    percentile interval of the domain-stratified document bootstrap; p_value: one-sided,
    (1 + #{replicate <= 1e-4 bits}) / (1 + R); h_domain_given_context: Miller-Madow H(D|C) in bits, the most
    the estimate can reach; n_docs, n_folds, n_resamples, smoothing: how it was computed.
    """

    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float
    h_domain_given_context: float
    n_assignments: float
    n_docs: int
    n_folds: int
    n_resamples: int
    smoothing: float
    samples: np.ndarray

    @property
    def share(self) -> float:
        """The estimate as a share of H(D|C): the fraction of the domain uncertainty left by the
        context that routing removes (nan when H(D|C) is ~0)."""
        return self._of_h(self.estimate)

    @property
    def share_ci_low(self) -> float:
        return self._of_h(self.ci_low)

    @property
    def share_ci_high(self) -> float:
        return self._of_h(self.ci_high)

    def _of_h(self, bits: float) -> float:
        h = self.h_domain_given_context
        return bits / h if h > 1e-12 else float("nan")


def context_keys(token: np.ndarray, prev_token: np.ndarray | None = None) -> list[np.ndarray]:
    """Nested context keys, coarse to fine: [token] or [token, (token, previous token)], each [N]
    int64. prev_token [N] may hold -1 where a token has no predecessor in its sequence."""
    t = np.asarray(token, dtype=np.int64)
    if prev_token is None:
        return [t]
    p = np.asarray(prev_token, dtype=np.int64)
    if p.shape != t.shape:
        raise ValueError(f"prev_token must have the token's shape {t.shape}, got {p.shape}")
    _, tid = dense_index(t)
    _, pid = dense_index(p)
    return [t, tid.reshape(-1).astype(np.int64) * (int(pid.max()) + 1) + pid.reshape(-1)]


def document_folds(doc_domain: np.ndarray, n_folds: int, rng: RngLike) -> np.ndarray:
    """Fold of each document [M] in [0, n_folds): within every domain the documents are shuffled and
    dealt round-robin, so each fold holds ~1/n_folds of every domain's documents (the domain offsets
    rotate so small domains do not all start at fold 0)."""
    dd = np.asarray(doc_domain)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    gen = as_rng(rng)
    fold = np.empty(dd.size, dtype=np.int64)
    for i, d in enumerate(np.unique(dd)):
        idx = gen.permutation(np.flatnonzero(dd == d))
        fold[idx] = (np.arange(idx.size) + i) % n_folds
    return fold


def conditional_entropy_mm(context: np.ndarray, domain: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Miller-Madow H(D|C) = H_MM(C, D) - H_MM(C) in bits, clipped to [0, H(D)].

    The plug-in H(D|C) is biased low when contexts are seen few times (0.89x the truth at 12k
    tokens per domain for token contexts); Miller-Madow adds (#occupied cells - 1) / (2N ln 2) to
    each entropy. N is the number of occurrences (each counted once; `weights` [N] rescales them).
    """
    c = np.asarray(context, dtype=np.int64)
    d = np.asarray(domain, dtype=np.int64)
    w = np.ones(c.size) if weights is None else np.asarray(weights, dtype=np.float64)
    _, cid = dense_index(c)
    nd = int(d.max()) + 1
    cd = np.bincount(cid * nd + d, weights=w)
    cc = np.bincount(cid, weights=w)
    n = float(w.sum())
    cd, cc = cd[cd > 0], cc[cc > 0]
    corr = (cd.size - cc.size) / (2.0 * n * np.log(2.0))
    h_d = entropy(np.bincount(d, weights=w))
    return float(np.clip(entropy(cd) - entropy(cc) + corr, 0.0, h_d))


def _nested_groups(contexts: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Group index [N] of every context level (coarse to fine) and, for each level, the parent
    group of each of its groups ([groups of the level]; the global level's single group 0 for the coarsest)."""
    groups, parents = [], []
    prev: np.ndarray | None = None  # the coarser level's groups; None above the coarsest (one global group)
    for key in contexts:
        if prev is None:
            _, g = dense_index(key)
            parent = np.zeros(int(g.max()) + 1, dtype=np.int64)
        else:
            # Refine the parent: a finer key is only meaningful inside its coarser context.
            shifted = key - min(int(key.min()), 0)  # keys may hold -1 (no previous token)
            _, g = dense_index(prev * (int(shifted.max()) + 1) + shifted)
            parent = np.zeros(int(g.max()) + 1, dtype=np.int64)
            parent[g] = prev
        groups.append(g)
        parents.append(parent)
        prev = g
    return groups, parents


def _fit_domain_offsets(
    q: np.ndarray, weight: np.ndarray, group_domain: np.ndarray, target: np.ndarray, iterations: int
) -> np.ndarray:
    """Offsets beta [G, E] maximizing sum n_{g,e} log softmax_e(log q[g] + beta[d(g)]) by iterative
    proportional fitting: each step matches the predicted domain x expert margin to target [G, E];
    at most `iterations` steps, fewer once a step moves no offset by 1e-12.

    q [groups, E] the context model of each (context, domain) group (probabilities, every entry
    > 0), weight [groups] its assignments, group_domain [groups]; target [G, E] observed
    assignments per domain and expert."""
    n_dom, n_exp = target.shape
    # softmax_e(log q[g, e] + beta[d, e]) = q[g, e] b[e] / (q[g] @ b) with b = exp(beta[d] - max_e beta[d]),
    # so a domain's predicted margin, sum_g weight[g] softmax(...)[g], is b * ((weight / (q @ b)) @ q):
    # two matrix-vector products per domain and step, no [groups, E] exp or row reductions.
    blocks = []
    for d in range(n_dom):
        rows = np.flatnonzero(group_domain == d)
        if rows.size:
            blocks.append((d, np.ascontiguousarray(q[rows]), weight[rows]))
    beta = np.zeros((n_dom, n_exp))
    pred = np.zeros((n_dom, n_exp))
    tiny = 1e-12
    for _ in range(iterations):
        for d, q_d, w_d in blocks:
            b = np.exp(beta[d] - beta[d].max())
            pred[d] = b * ((w_d / (q_d @ b)) @ q_d)
        step = np.log((target + tiny) / (pred + tiny))
        step -= step.mean(axis=1, keepdims=True)
        beta += step
        if np.abs(step).max() < 1e-12:  # converged (typically in 15-20 steps): more only rounds
            break
    return beta


def _log_gain(q: np.ndarray, cell_ctx: np.ndarray, cell_dom: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """log q(e | c, d) - log q(e | c) = beta[d, e] - log sum_e' q(e' | c) exp(beta[d, e']) in nats, [cells, E],
    of (context, domain) cells (cell_ctx, cell_dom [cells]) under the context model q [contexts, E]."""
    top = beta.max(axis=1)
    b = np.exp(beta - top[:, None])  # [G, E], each row's largest entry 1
    log_norm = np.log(np.einsum("ce,ce->c", q[cell_ctx], b[cell_dom])) + top[cell_dom]
    return beta[cell_dom] - log_norm[:, None]


def _training_counts(
    group: np.ndarray,
    n_groups: int,
    fold: np.ndarray,
    n_folds: int,
    experts: np.ndarray,
    weights: np.ndarray | None,
    n_experts: int,
) -> np.ndarray:
    """Expert counts [folds, groups, E] of each fold's training folds (all folds but that one) for
    one context level: group [N] a record's group of the level, fold [N] its fold."""
    cell = fold * n_groups
    cell += group
    cell *= n_experts
    c = slot_counts(cell, experts, weights, n_folds * n_groups * n_experts).reshape(n_folds, n_groups, n_experts)
    return c.sum(axis=0, keepdims=True) - c


def heldout_conditional_information(
    contexts: Sequence[np.ndarray],
    domain: np.ndarray,
    doc: np.ndarray,
    experts: np.ndarray,
    n_domains: int,
    n_experts: int,
    weights: np.ndarray | None = None,
    *,
    n_folds: int = 5,
    smoothing: float = 0.5,
    min_support: int = 16,
    iterations: int = 25,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    rng: RngLike,
    docs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> HeldoutInformation:
    """Cross-fitted domain information beyond the context, bits per assignment, with a
    domain-stratified document bootstrap.

    Fitted on the training folds: the context model q(e | c), additive smoothing along the nested
    `contexts` (coarse to fine, see `context_keys`) from the global load, `smoothing` pseudo-counts
    per step; and domain offsets beta [G, E] with q(e | c, d) = softmax_e(log q(e | c) + beta[d, e])
    (`_fit_domain_offsets`), G*E numbers, so the test has power for a domain's pull on routing that
    shows in every context. Scored on the held-out fold: log2 q(e | c, d) / q(e | c) per assignment.

    Only contexts seen at least `min_support` times in the training folds are scored (also when
    fitting beta): for a context without data q(e | c) is the global load, and the domain would
    "help" only because it hints at which tokens occur, not because it moves routing. The share of
    assignments scored is `n_assignments` against the total.

    domain [N] in [0, G); doc [N] document ids (one domain each); experts [N, K] (every slot is one
    assignment, as the package's tables count them); weights [N, K] or None (1 each; 0 for a dropped
    slot). docs: `analysis.information.doc_index(doc, domain)` of these records when the caller has
    it already (then `doc` is not read again). Deterministic given `rng`. Domain-blind routing
    (including per-document preferences that do not depend on the domain) gives an estimate <= 0 in
    expectation.
    """
    d = as_labels("domain", domain, n_domains)
    n = d.size
    if n == 0:
        raise ValueError("no routing records")
    if not contexts:
        raise ValueError("contexts must hold at least one key array (e.g. context_keys(token))")
    ctx = [np.asarray(c, dtype=np.int64) for c in contexts]
    for c in ctx:
        if c.shape != (n,):
            raise ValueError(f"every context key must be [N={n}], got {c.shape}")
    ex = as_experts(experts, n, n_experts)
    w = as_weights(weights, ex.shape)  # None: 1 per assignment, without an [N, K] array of ones
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    doc_ids, doc_of, doc_domain = doc_index(doc, d) if docs is None else docs
    if doc_of.shape != (n,):
        raise ValueError(f"docs must be doc_index(doc, domain) of these N={n} records, got {doc_of.shape[0]} rows")
    m = doc_ids.size
    per_domain = np.bincount(doc_domain, minlength=n_domains)
    if per_domain[per_domain > 0].min() < 2:
        raise ValueError(
            "every domain needs at least 2 documents so that some can be held out; add validation documents"
        )
    gen = as_rng(rng)
    fold_rng, boot_rng = gen.spawn(2)
    n_folds = int(min(n_folds, per_domain[per_domain > 0].min()))
    fold = document_folds(doc_domain, n_folds, fold_rng)[doc_of]  # [N]
    e_n = int(n_experts)
    groups, parents = _nested_groups(ctx)
    fine = groups[-1]
    n_fine = parents[-1].size
    per_fold = [_training_counts(g, parent.size, fold, n_folds, ex, w, e_n) for g, parent in zip(groups, parents)]
    del groups
    # Everything else the folds need is a function of the (fold, context, domain) cell of a record
    # and its experts, so the records are tallied once into cells [cells, E] and every fold works on
    # that table instead of gathering its ~(1 - 1/K) N training records again.
    key = fold * n_fine
    key += fine
    key *= n_domains
    key += d
    del fold, fine
    keys, cell_of = dense_index(key)
    del key
    n_cells = keys.size
    cell_fold = keys // (n_fine * n_domains)
    cell_ctx = keys // n_domains % n_fine
    cell_dom = keys % n_domains
    cell_counts = slot_counts(cell_of * e_n, ex, w, n_cells * e_n).reshape(n_cells, e_n)
    cell_weight = cell_counts.sum(axis=1)
    # bits per assignment of each (cell, expert), log2 q(e | c, d) / q(e | c); 0 where not scored
    cell_gain = np.zeros((n_cells, e_n))
    cell_scored = np.zeros(n_cells, dtype=bool)
    for f in range(n_folds):
        load = per_fold[0][f].sum(axis=0)
        q = ((load + 1.0) / (load.sum() + e_n))[None, :]  # [1, E]
        for c_all, parent in zip(per_fold, parents):
            c = c_all[f]
            q = (c + smoothing * q[parent]) / (c.sum(axis=1, keepdims=True) + smoothing)
        supported = (per_fold[-1][f].sum(axis=1) >= min_support)[cell_ctx]  # [cells]
        train = np.flatnonzero((cell_fold != f) & supported)
        test = np.flatnonzero((cell_fold == f) & supported)
        if not train.size or not test.size:
            continue
        # (context, domain) groups of the training cells, for the offsets.
        pairs, pair_of = dense_index(cell_ctx[train] * n_domains + cell_dom[train])
        grp_w = np.bincount(pair_of, weights=cell_weight[train], minlength=pairs.size)
        target = np.stack([cell_counts[train[cell_dom[train] == g]].sum(axis=0) for g in range(n_domains)])
        beta = _fit_domain_offsets(q[pairs // n_domains], grp_w, pairs % n_domains, target, iterations)
        # A test cell is one (context, domain) pair, so the gain's normalizer is computed once per cell.
        cell_gain[test] = _log_gain(q, cell_ctx[test], cell_dom[test], beta) / np.log(2.0)
        cell_scored[test] = True
    # Per document: the scored assignments, then the gains slot by slot. One [N] float buffer and
    # cell_of turned in place into each slot's index of the flattened [cells, E] table: at 1e7
    # records every [N] temporary is 80 MB, and fresh pages cost more than the passes.
    buf = np.full(n, float(ex.shape[1])) if w is None else sum_over_slots(w)
    buf *= cell_scored[cell_of]  # a record's assignments count where its cell is scored
    doc_weight = np.bincount(doc_of, weights=buf, minlength=m)
    flat_gain = cell_gain.reshape(-1)
    doc_gain = np.zeros(m)
    index = cell_of
    index *= e_n
    for j in range(ex.shape[1]):
        index += ex[:, j]
        np.take(flat_gain, index, out=buf)
        index -= ex[:, j]
        if w is not None:
            buf *= w[:, j]
        doc_gain += np.bincount(doc_of, weights=buf, minlength=m)
    del buf, index, cell_of
    scored_weight = np.where(cell_scored, cell_weight, 0.0)
    total = float(doc_weight.sum())
    if not total > 0:
        raise TooFewRecords(
            f"no context is seen {min_support} times in the training folds: too few records "
            "for the held-out estimate (lower min_support or record more tokens)"
        )
    estimate = float(doc_gain.sum() / total)
    mult = stratified_doc_bootstrap(doc_domain, n_resamples, boot_rng)
    samples = (mult @ doc_gain) / np.maximum(mult @ doc_weight, 1e-300)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    p = float((1 + np.count_nonzero(samples <= _TIE_BITS)) / (1 + samples.size))
    # H(D|C) over the scored assignments: the ceiling the estimate is a share of.
    scored_cells = scored_weight > 0
    h = conditional_entropy_mm(cell_ctx[scored_cells], cell_dom[scored_cells], scored_weight[scored_cells])
    return HeldoutInformation(
        estimate=estimate,
        ci_low=float(low),
        ci_high=float(high),
        confidence=float(confidence),
        p_value=p,
        h_domain_given_context=h,
        n_assignments=total,
        n_docs=int(m),
        n_folds=n_folds,
        n_resamples=int(n_resamples),
        smoothing=float(smoothing),
        samples=samples,
    )
