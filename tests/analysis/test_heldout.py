"""Held-out I(D;E|C): what it must say on routing whose truth is known, with document clustering
that fools a test treating token occurrences as independent."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.heldout import (
    conditional_entropy_mm,
    context_keys,
    document_folds,
    heldout_conditional_information,
)
from analysis.information import conditional_mutual_information, doc_index, entropy, token_domain_expert_counts

D, E, K = 3, 6, 2


def corpus(
    rng: np.random.Generator, routing: str, n_docs: int = 36, doc_len: int = 120, v: int = 60, strength: float = 1.0
):
    """Documents of one domain each; each domain draws tokens from its own (overlapping) range of a
    vocabulary of v ids. routing: "token" (experts by token id only), "doc" (token id plus a random
    expert preference per document, independent of the domain: a topic/style effect), "domain"
    (token id plus a pull towards expert `domain`)."""
    doc_domain = np.arange(n_docs) % D
    doc = np.repeat(np.arange(n_docs) * 5 + 11, doc_len)
    domain = np.repeat(doc_domain, doc_len)
    token = (domain * (v // D) + rng.integers(0, v // D + 10, doc.size)) % v
    token_pref = np.random.default_rng(999).random((v, E)) * 2.0  # the rule is fixed; the sample varies
    scores = token_pref[token] + rng.random((doc.size, E))
    if routing == "doc":
        pref = np.repeat(rng.integers(0, E, n_docs), doc_len)
        scores[np.arange(doc.size), pref] += strength
    elif routing == "domain":
        scores[np.arange(doc.size), domain] += strength
    elif routing != "token":
        raise ValueError(routing)
    return token, domain, doc, np.argsort(-scores, axis=1)[:, :K]


def heldout(token, domain, doc, experts, seed=0, **kw):
    return heldout_conditional_information(
        context_keys(token), domain, doc, experts, D, E, rng=seed, n_resamples=300, **kw
    )


def within_token_shuffle_p(token, domain, experts, rng, n=99) -> float:
    """The old test, as a reference: shuffle domains among the occurrences of each token (as if
    occurrences were independent) and recompute the plug-in I(D;E|T)."""

    def cmi(dom):
        return conditional_mutual_information(token_domain_expert_counts(token, dom, experts, token.max() + 1, D, E))

    obs = cmi(domain)
    order = np.argsort(token, kind="stable")
    null = []
    for _ in range(n):
        shuffled = domain.copy()
        t_sorted = token[order]
        keys = t_sorted * 2**20 + rng.integers(0, 2**20, token.size)
        shuffled[order] = domain[order][np.argsort(keys, kind="stable")]
        null.append(cmi(shuffled))
    return (1 + np.sum(np.array(null) >= obs)) / (1 + n)


def test_token_keyed_routing_carries_no_domain_information_beyond_the_token():
    token, domain, doc, _ = corpus(np.random.default_rng(0), "token")
    experts = np.argsort(np.random.default_rng(1).random((token.max() + 1, E)), axis=1)[:, :K][token]  # pure hash
    res = heldout(token, domain, doc, experts)
    assert abs(res.estimate) < 1e-4  # a function of the token: nothing to gain but smoothing crumbs
    assert res.p_value > 0.5


def test_document_clustering_is_not_domain_information():
    """Domain-blind routing with per-document preferences: the within-token shuffle calls it
    significant most of the time, the held-out estimate almost never."""
    old, new = 0, 0
    for seed in range(12):
        rng = np.random.default_rng(10 + seed)
        token, domain, doc, experts = corpus(rng, "doc", n_docs=18)
        old += within_token_shuffle_p(token, domain, experts, rng) < 0.05
        res = heldout(token, domain, doc, experts, seed=seed)
        new += res.p_value < 0.05
        assert res.estimate < 0.01
    assert old >= 9, "the reference within-token test should be fooled by document clustering"
    assert new <= 1


def test_domain_routing_is_detected_and_estimated_from_below():
    rng = np.random.default_rng(3)
    token, domain, doc, experts = corpus(rng, "domain", strength=0.6)
    res = heldout(token, domain, doc, experts)
    assert res.p_value < 0.01 and res.ci_low > 0
    assert res.ci_low <= res.estimate <= res.ci_high
    # The truth, from a 20x larger sample of the same routing rule: the plug-in is nearly unbiased
    # there. The domain offsets catch the pull that shows in every context, so from below.
    big = corpus(np.random.default_rng(3), "domain", n_docs=720, strength=0.6)
    truth = conditional_mutual_information(token_domain_expert_counts(big[0], big[1], big[3], 60, D, E))
    # Here the pull varies by context (nothing to gain where the token already picks expert
    # `domain`), so the shared offsets recover about a third of it (measured 0.024 of 0.076 bits).
    assert 0.2 * truth < res.estimate < 1.0 * truth
    assert 0 < res.share < 1 and res.h_domain_given_context > 0


def test_deterministic_and_validated():
    token, domain, doc, experts = corpus(np.random.default_rng(4), "domain", strength=0.3)
    a, b = heldout(token, domain, doc, experts, seed=5), heldout(token, domain, doc, experts, seed=5)
    assert (a.estimate, a.ci_low, a.p_value) == (b.estimate, b.ci_low, b.p_value)
    bad = domain.copy()
    bad[0] = (bad[0] + 1) % D
    with pytest.raises(ValueError, match="more than one domain"):
        heldout(token, bad, doc, experts)
    one_doc = doc.copy()
    one_doc[domain == 0] = 99999
    with pytest.raises(ValueError, match="at least 2 documents"):
        heldout(token, domain, one_doc, experts)
    with pytest.raises(TypeError, match="rng"):
        heldout_conditional_information(context_keys(token), domain, doc, experts, D, E, rng=None)
    # a document index the caller already has gives the same result; one of other records is refused
    c = heldout(token, domain, doc, experts, seed=5, docs=doc_index(doc, domain))
    assert (c.estimate, c.ci_low, c.p_value) == (a.estimate, a.ci_low, a.p_value)
    with pytest.raises(ValueError, match="docs must be doc_index"):
        heldout(token, domain, doc, experts, docs=doc_index(doc[:-5], domain[:-5]))


def test_bigram_context_nests_in_the_token_context():
    token = np.array([1, 2, 1, 2, 1])
    prev = np.array([-1, 1, 2, 1, 2])
    coarse, fine = context_keys(token, prev)
    np.testing.assert_array_equal(coarse, token)
    # Equal fine keys imply equal tokens, and (1 after 2) differs from (1 at a start).
    assert fine[2] == fine[4] and fine[0] != fine[2] and fine[1] == fine[3]


def test_folds_split_every_domain():
    doc_domain = np.array([0] * 10 + [1] * 7 + [2] * 5)
    fold = document_folds(doc_domain, 5, rng=0)
    for d in range(3):
        sizes = np.bincount(fold[doc_domain == d], minlength=5)
        assert sizes.max() - sizes.min() <= 1


def test_miller_madow_conditional_entropy():
    rng = np.random.default_rng(8)
    context = rng.integers(0, 50, 20000)
    domain = (context % 3 + (rng.random(20000) < 0.3) * rng.integers(0, 3, 20000)) % 3
    cd = np.bincount(context * 3 + domain, minlength=150)
    c = np.bincount(context, minlength=50)
    plugin = entropy(cd[cd > 0]) - entropy(c[c > 0])
    mm = conditional_entropy_mm(context, domain)
    assert mm == pytest.approx(plugin + ((cd > 0).sum() - (c > 0).sum()) / (2 * 20000 * np.log(2)))
    assert conditional_entropy_mm(np.zeros(10, dtype=int), np.zeros(10, dtype=int)) == 0.0


def test_too_few_records_leave_cmi_unmeasured_instead_of_failing():
    from analysis.information import doc_expert_counts
    from analysis.measures import routing_evidence

    rng = np.random.default_rng(0)
    n = 60  # 4 domains x 3 documents x 5 tokens, every token id distinct: no context reaches min_support
    domain = np.repeat(np.arange(4), 15)
    doc = np.repeat(np.arange(12), 5)
    token = np.arange(n)
    experts = rng.integers(0, 8, (n, 1))
    docs = doc_expert_counts(doc, domain, experts, 4, 8)
    ev = routing_evidence(
        docs,
        4,
        8,
        token=token,
        prev_token=np.full(n, -1),
        domain=domain,
        doc=doc,
        experts=experts,
        n_permutations=9,
        n_bootstrap=9,
        rng=0,
    )
    assert ev.cmi is None and "too few records" in ev.cmi_note


def reference_heldout(contexts, domain, doc, experts, weights, n_domains, n_experts, seed, n_resamples):
    """A reference: the cross-fitted gain computed per fold on the records themselves (masks over
    the records, the model q(e | c) from np.unique groups, a log-softmax per token and slot), the
    way the estimator reads, with the estimator's folds, offsets fit and bootstrap draws."""
    from analysis.heldout import _fit_domain_offsets
    from analysis.information import doc_index
    from analysis.statistics import stratified_doc_bootstrap

    smoothing, min_support, n_folds = 0.5, 16, 5
    doc_ids, doc_of, doc_domain = doc_index(doc, domain)
    fold_rng, boot_rng = np.random.default_rng(seed).spawn(2)
    n_folds = int(min(n_folds, np.bincount(doc_domain).min()))
    fold = document_folds(doc_domain, n_folds, fold_rng)[doc_of]
    # nested context ids: the level's key together with every coarser key
    levels = [
        np.unique(np.stack(contexts[: i + 1], axis=1), axis=0, return_inverse=True)[1].reshape(-1)
        for i in range(len(contexts))
    ]
    gain = np.zeros(domain.size)
    scored = np.zeros(domain.size)
    for f in range(n_folds):
        tr = fold != f

        def counts(level, tr=tr):
            c = np.zeros((level.max() + 1, n_experts))
            for j in range(experts.shape[1]):
                np.add.at(c, (level[tr], experts[tr, j]), weights[tr, j])
            return c

        load = counts(np.zeros(domain.size, dtype=int))[0]
        q_parent = np.broadcast_to((load + 1) / (load.sum() + n_experts), (domain.size, n_experts))
        for level in levels:  # per record: its context's smoothed distribution
            c = counts(level)[level]
            q_parent = (c + smoothing * q_parent) / (c.sum(axis=1, keepdims=True) + smoothing)
        support = counts(levels[-1]).sum(axis=1)[levels[-1]] >= min_support
        log_q = np.log(q_parent)
        train, test = tr & support, ~tr & support
        if not train.any() or not test.any():
            continue
        _, first, grp = np.unique(levels[-1][train] * n_domains + domain[train], return_index=True, return_inverse=True)
        target = np.zeros((n_domains, n_experts))
        for j in range(experts.shape[1]):
            np.add.at(target, (domain[train], experts[train, j]), weights[train, j])
        beta = _fit_domain_offsets(
            np.exp(log_q[train][first]),
            np.bincount(grp.reshape(-1), weights=weights[train].sum(axis=1)),
            domain[train][first],
            target,
            25,
        )
        z = log_q[test] + beta[domain[test]]
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # log q(e | c, d) per test record
        rows = np.flatnonzero(test)
        for j in range(experts.shape[1]):
            e = experts[rows, j]
            gain[rows] += weights[rows, j] * (log_p[np.arange(rows.size), e] - log_q[rows, e]) / np.log(2)
            scored[rows] += weights[rows, j]
    doc_gain = np.bincount(doc_of, weights=gain, minlength=doc_ids.size)
    doc_weight = np.bincount(doc_of, weights=scored, minlength=doc_ids.size)
    mult = stratified_doc_bootstrap(doc_domain, n_resamples, boot_rng)
    on = scored > 0
    h = conditional_entropy_mm(levels[-1][on], domain[on], scored[on])
    return doc_gain.sum() / doc_weight.sum(), (mult @ doc_gain) / (mult @ doc_weight), h


@pytest.mark.parametrize("bigram", [False, True])
def test_estimate_equals_a_per_record_reference(bigram):
    rng = np.random.default_rng(12)
    token, domain, doc, experts = corpus(rng, "domain", strength=0.4, v=24)
    weights = rng.random(experts.shape) * (rng.random(experts.shape) > 0.1)  # some dropped slots
    prev = np.where(np.arange(token.size) % 120 == 0, -1, np.roll(token, 1)) % 5 if bigram else None
    contexts = context_keys(token, prev)
    got = heldout_conditional_information(contexts, domain, doc, experts, D, E, weights, rng=3, n_resamples=50)
    estimate, samples, h = reference_heldout(contexts, domain, doc, experts, weights, D, E, 3, 50)
    assert got.estimate > 0.01
    assert got.estimate == pytest.approx(estimate, rel=1e-9)
    np.testing.assert_allclose(got.samples, samples, rtol=1e-9)
    assert got.h_domain_given_context == pytest.approx(h, rel=1e-9)


def test_domain_offsets_are_the_maximum_likelihood_fit():
    """At the likelihood's maximum its gradient in beta[d, e], the observed minus the predicted
    domain x expert margin, is zero; the predicted margin is recomputed here group by group with a
    log-softmax, and a perturbed beta must fit worse."""
    from analysis.heldout import _fit_domain_offsets

    rng = np.random.default_rng(5)
    n_groups, n_dom, n_exp = 40, 3, 5
    q = rng.dirichlet(np.full(n_exp, 0.7), n_groups) + 1e-9
    q /= q.sum(axis=1, keepdims=True)
    group_domain = rng.integers(0, n_dom, n_groups)
    counts = np.stack([rng.multinomial(200, row) for row in q]).astype(float)  # observed, per group
    counts[group_domain == 1, 2] += 60  # domain 1 pulls towards expert 2 in every context
    target = np.stack([counts[group_domain == g].sum(axis=0) for g in range(n_dom)])
    beta = _fit_domain_offsets(q, counts.sum(axis=1), group_domain, target, iterations=500)

    def log_likelihood(b):
        z = np.log(q) + b[group_domain]
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float((counts * log_p).sum())

    pred = np.zeros((n_dom, n_exp))
    for g in range(n_groups):
        z = np.log(q[g]) + beta[group_domain[g]]
        pred[group_domain[g]] += counts[g].sum() * np.exp(z - np.log(np.exp(z).sum()))
    np.testing.assert_allclose(pred, target, rtol=1e-8, atol=1e-8)
    assert beta[1, 2] > beta[1].mean() + 0.2
    best = log_likelihood(beta)
    for _ in range(5):
        assert log_likelihood(beta + rng.normal(0, 1e-3, beta.shape)) < best
