"""Expert paths (`analysis.paths`): path ids against a naive loop over tuples, one-layer paths
against the package's per-layer top-1 NMI, the merged document x path table against the full one,
I(D; path) against sklearn, and the estimator on planted data: a domain coded only in the pair of
layers, domain-blind routing, and a huge path alphabet with few tokens."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from analysis.information import (
    contingency,
    doc_expert_counts,
    mutual_information_mm,
    normalized_mutual_information,
)
from analysis.measures import layer_inputs
from analysis.paths import doc_path_counts, path_ids, path_information
from analysis.records import LayerRecords, RoutingRecords
from analysis.statistics import summarize_specialization

SMALL = dict(n_permutations=99, n_bootstrap=50)


def corpus(rng: np.random.Generator, n_domains: int, docs_per_domain: int, doc_len: int, vocab: int = 8):
    """Documents of one domain each: (token, domain, doc, position), each [N]; doc ids not contiguous."""
    n_docs = n_domains * docs_per_domain
    doc_domain = np.repeat(np.arange(n_domains), docs_per_domain)
    domain = np.repeat(doc_domain, doc_len)
    doc = np.repeat(np.arange(n_docs) * 3 + 5, doc_len)
    position = np.tile(np.arange(doc_len), n_docs)
    token = rng.integers(0, vocab, domain.size)
    return token, domain, doc, position


def records(token, domain, doc, position, layers, n_experts: int, n_domains: int) -> RoutingRecords:
    """RoutingRecords from per-layer (experts, gates, kept) triples ([N, K] each; a 1-D experts
    array is one slot with gate 1 and kept)."""
    recs = []
    for layer in layers:
        if isinstance(layer, np.ndarray):
            e = layer[:, None].astype(np.int64)
            layer = (e, np.ones(e.shape, dtype=np.float32), np.ones(e.shape, dtype=bool))
        e, g, k = layer
        recs.append(LayerRecords(np.asarray(e, dtype=np.int64), np.asarray(g, dtype=np.float32), np.asarray(k)))
    top_k = recs[0].experts.shape[1]
    return RoutingRecords(
        [f"d{i}" for i in range(n_domains)],
        np.asarray(token, dtype=np.int64),
        np.asarray(domain, dtype=np.int64),
        np.asarray(doc, dtype=np.int64),
        np.asarray(position, dtype=np.int64),
        recs,
        n_experts,
        top_k,
    )


def random_layer(rng: np.random.Generator, n: int, n_experts: int, k: int, p_kept: float = 1.0, distinct=True):
    """Random top-k routing: experts [N, K] (distinct per row unless told), gates from a coarse grid
    (so ties occur), kept with probability p_kept."""
    if distinct:
        experts = np.argsort(rng.random((n, n_experts)), axis=1)[:, :k]
    else:
        experts = rng.integers(0, n_experts, (n, k))
    gates = rng.choice([0.1, 0.3, 0.6], size=(n, k))
    kept = rng.random((n, k)) < p_kept
    return experts, gates, kept


# ----------------------------------------------------------------------------- naive references
def naive_symbol(experts, gates, kept, mode: str):
    if mode == "top1":
        best, best_gate = None, -math.inf
        for e, g, k in zip(experts, gates, kept):
            if k and g > best_gate:  # strict: the first slot wins a tie
                best, best_gate = int(e), float(g)
        return -1 if best is None else best
    return tuple(sorted({int(e) for e, k in zip(experts, kept) if k}))


def naive_path_ids(rec: RoutingRecords, layers, mode: str):
    tuples = [
        tuple(
            naive_symbol(rec.layers[i].experts[t], rec.layers[i].gates[t], rec.layers[i].kept[t], mode) for i in layers
        )
        for t in range(rec.domain.size)
    ]
    order = {p: i for i, p in enumerate(sorted(set(tuples)))}
    return np.array([order[p] for p in tuples]), len(order)


# ----------------------------------------------------------------------------- path ids
@pytest.mark.parametrize("mode", ["top1", "topk"])
@pytest.mark.parametrize("layers", [None, [2, 0], [1]])
def test_path_ids_match_naive_tuples(mode, layers):
    rng = np.random.default_rng(0)
    token, domain, doc, position = corpus(rng, 2, 5, 40)
    n = domain.size
    recs = records(
        token,
        domain,
        doc,
        position,
        [
            random_layer(rng, n, 4, 2, p_kept=0.7),
            random_layer(rng, n, 4, 2, p_kept=0.9, distinct=False),  # repeated experts: a set counts once
            random_layer(rng, n, 4, 2, p_kept=0.5),
        ],
        4,
        2,
    )
    ids, n_paths = path_ids(recs, layers=layers, mode=mode)
    want, n_want = naive_path_ids(recs, layers if layers is not None else [0, 1, 2], mode)
    assert ids.dtype == np.int64 and ids.shape == (n,)
    assert n_paths == n_want
    np.testing.assert_array_equal(ids, want)  # same tuples, same lexicographic numbering


def test_topk_paths_ignore_slot_order():
    rng = np.random.default_rng(1)
    token, domain, doc, position = corpus(rng, 3, 4, 50)
    n = domain.size
    layers = [random_layer(rng, n, 8, 3, p_kept=0.8) for _ in range(3)]
    shuffled = []
    for e, g, k in layers:
        perm = np.argsort(rng.random(e.shape), axis=1)  # a different slot order in every row
        take = np.take_along_axis
        shuffled.append((take(e, perm, 1), take(g, perm, 1), take(k, perm, 1)))
    a = path_ids(records(token, domain, doc, position, layers, 8, 3), mode="topk")
    b = path_ids(records(token, domain, doc, position, shuffled, 8, 3), mode="topk")
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


def test_bad_arguments_are_named():
    rng = np.random.default_rng(2)
    token, domain, doc, position = corpus(rng, 2, 2, 10)
    recs = records(token, domain, doc, position, [rng.integers(0, 4, domain.size)] * 2, 4, 2)
    with pytest.raises(ValueError, match="mode"):
        path_ids(recs, mode="top2")
    with pytest.raises(ValueError, match="out of range"):
        path_ids(recs, layers=[0, 2])
    with pytest.raises(ValueError, match="repeat"):
        path_ids(recs, layers=[1, 1])
    with pytest.raises(ValueError, match="at least one"):
        path_ids(recs, layers=[])


# ----------------------------------------------------------------------------- against the package and sklearn
def test_one_layer_path_is_the_layers_top1_nmi():
    """A one-layer top-1 path is the layer's top-1 expert: the same numbers as the package's
    `nmi_top1` evidence (`LayerInputs.evidence_top1`) with the same seed."""
    rng = np.random.default_rng(3)
    g, e = 3, 6
    token, domain, doc, position = corpus(rng, g, 8, 60)
    n = domain.size
    experts, gates, kept = random_layer(rng, n, e, 2)
    pull = rng.random(n) < 0.3  # domain d pulls its tokens' first slot to expert d
    experts[pull, 0] = np.where(experts[pull, 1] == domain[pull], (domain[pull] + 1) % e, domain[pull])
    gates[pull, 0] = 0.9
    second = random_layer(rng, n, e, 2)
    recs = records(token, domain, doc, position, [(experts, gates, kept), second], e, g)
    seed = 11
    result = path_information(recs, g, rng=seed, heldout=False, **SMALL)
    for layer in (0, 1):
        counts = SimpleNamespace(num_domains=g, num_experts=e, weighting="count")
        inputs = layer_inputs(
            counts, recs, layer, n_permutations=99, n_bootstrap=50, confidence=0.95, context="token", rng=seed
        )
        ref = inputs.evidence_top1.nmi
        alone = path_information(recs, g, layers=[layer], rng=seed, heldout=False, **SMALL).nmi
        for got in (alone, result.per_layer[layer].nmi):
            for field in ("observed", "corrected", "null_mean", "null_q95", "p_value", "ci_low", "ci_high"):
                assert getattr(got, field) == pytest.approx(getattr(ref, field), abs=1e-12), field
    assert result.per_layer[0].nmi.excess > 0.05  # the planted pull is seen
    assert result.per_layer[0].nmi.p_value < 0.05


@pytest.mark.parametrize("mode", ["top1", "topk"])
def test_plugin_information_matches_sklearn_and_the_full_table(mode):
    rng = np.random.default_rng(4)
    g = 3
    token, domain, doc, position = corpus(rng, g, 6, 30)
    n = domain.size
    layers = [random_layer(rng, n, 6, 2, p_kept=0.9) for _ in range(3)]
    layers[1][0][:, 0] = np.where(rng.random(n) < 0.4, domain, layers[1][0][:, 0])  # some domain pull
    recs = records(token, domain, doc, position, layers, 6, g)
    res = path_information(recs, g, mode=mode, rng=5, heldout=False, per_layer=False, **SMALL)
    ids, n_paths = path_ids(recs, mode=mode)
    assert res.bits == pytest.approx(mutual_info_score(domain, ids) / math.log(2.0), abs=1e-10)
    full = contingency(domain, ids[:, None], g, n_paths)  # [G, P], unmerged
    assert res.bits_mm == pytest.approx(mutual_information_mm(full), abs=1e-10)
    assert res.nmi.observed == pytest.approx(normalized_mutual_information(full), abs=1e-12)
    assert res.table_columns < res.n_paths  # the merge of single-document paths is in use here
    # The merged table gives what the full document x path table gives, null and interval included.
    nmi_rng = np.random.default_rng(5).spawn(2)[0]
    ref = summarize_specialization(
        doc_expert_counts(doc, domain, ids[:, None], g, n_paths), g, n_permutations=99, n_resamples=50, rng=nmi_rng
    )
    for field in ("observed", "corrected", "null_mean", "null_q95", "p_value", "ci_low", "ci_high"):
        assert getattr(res.nmi, field) == pytest.approx(getattr(ref, field), abs=1e-12), field


def test_merged_table_keeps_shared_paths_and_one_column_per_document():
    ids = np.array([0, 0, 1, 2, 3, 3, 4])
    doc = np.array([7, 7, 7, 9, 9, 7, 9])
    domain = np.array([0, 0, 0, 1, 1, 0, 1])
    docs, n_columns = doc_path_counts(ids, 5, doc, domain, 2)
    # path 3 is shared (docs 7 and 9); 0 and 1 are private to doc 7, 2 and 4 to doc 9
    assert n_columns == 3
    np.testing.assert_array_equal(docs.doc_ids, [7, 9])
    np.testing.assert_array_equal(docs.counts, [[1, 3, 0], [1, 0, 2]])
    with pytest.raises(TypeError, match="integer ids"):
        doc_path_counts(ids, 5, doc.astype(float), domain, 2)
    with pytest.raises(ValueError, match=r"\[N\]"):
        doc_path_counts(ids[:-1], 5, doc, domain, 2)
    with pytest.raises(ValueError, match="document 7 carries more than one domain"):
        doc_path_counts(ids, 5, doc, np.array([0, 1, 0, 1, 1, 0, 1]), 2)


def naive_merged_table(ids, n_paths, doc, domain):
    """The merged document x path table by a loop over paths: shared paths in path order, then one
    column per document (in document order) holding its paths seen in no other document."""
    docs = np.unique(doc)
    row = {d: i for i, d in enumerate(docs)}
    shared, private = [], np.zeros(docs.size)
    for p in range(n_paths):
        column = np.zeros(docs.size)
        for d, i in row.items():
            column[i] = np.count_nonzero((ids == p) & (doc == d))
        if np.count_nonzero(column) >= 2:
            shared.append(column)
        else:
            private += column
    has = np.flatnonzero(private)
    merged = np.zeros((docs.size, has.size))
    merged[has, np.arange(has.size)] = private[has]
    return docs, np.column_stack(shared + [merged]) if shared else merged


@pytest.mark.parametrize("tokens_per_doc", [3, 400])  # docs x paths above and below the records
def test_merged_table_equals_a_loop_over_paths(tokens_per_doc):
    rng = np.random.default_rng(tokens_per_doc)
    n_docs, n_paths = 12, 30
    doc = np.repeat(rng.permutation(100)[:n_docs], tokens_per_doc)
    domain = np.repeat(np.arange(n_docs) % 3, tokens_per_doc)
    ids = (rng.zipf(1.5, doc.size) - 1) % n_paths  # a few common paths, a tail of rare ones
    docs, n_columns = doc_path_counts(ids, n_paths, doc, domain, 3)
    ref_docs, ref = naive_merged_table(ids, n_paths, doc, domain)
    np.testing.assert_array_equal(docs.doc_ids, ref_docs)
    np.testing.assert_array_equal(docs.counts, ref)
    assert n_columns == ref.shape[1]
    assert docs.counts.dtype == np.float64


# ----------------------------------------------------------------------------- planted structure
def xor_records(seed: int, docs_per_domain: int = 20, doc_len: int = 48):
    """Two layers of 4 experts: layer 0 routes a token to b + 2 h0, layer 1 to (b XOR domain bit)
    + 2 h1, with bits (b, h0, h1) balanced in every document (each of the 8 combinations on
    doc_len / 8 tokens, in shuffled order). Each layer alone then sends every document's tokens
    to the 4 experts in equal numbers (exactly domain-blind); the pair determines the domain."""
    rng = np.random.default_rng(seed)
    token, domain, doc, position = corpus(rng, 2, docs_per_domain, doc_len)
    combos = np.repeat(np.arange(8), doc_len // 8)
    bits = np.concatenate([rng.permutation(combos) for _ in range(2 * docs_per_domain)])
    b, h0, h1 = bits & 1, (bits >> 1) & 1, (bits >> 2) & 1
    return records(token, domain, doc, position, [b + 2 * h0, (b ^ domain) + 2 * h1], 4, 2)


def test_domain_coded_only_in_the_pair_of_layers():
    res = path_information(xor_records(0), 2, rng=0, **SMALL)
    assert res.nmi.observed == pytest.approx(1.0)  # the path determines the domain
    assert res.excess > 0.9
    assert res.nmi.p_value == pytest.approx(1 / 100)
    assert res.bits == pytest.approx(1.0)
    for layer in res.per_layer:  # each layer alone: exactly domain-blind
        assert layer.nmi.observed == pytest.approx(0.0, abs=1e-12)
        assert layer.nmi.excess == pytest.approx(0.0, abs=1e-12)
        assert layer.nmi.p_value == 1.0
        assert layer.bits == pytest.approx(0.0, abs=1e-12)
    assert res.heldout is not None
    assert res.heldout.share > 0.8 and res.heldout.p_value < 0.01
    m = res.as_measure_result()
    assert m.name == "path_nmi" and m.value == pytest.approx(res.excess)
    assert m.details["per_layer_nmi"] == [pytest.approx(x.nmi.excess) for x in res.per_layer]


@pytest.mark.parametrize("mode", ["top1", "topk"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_domain_blind_routing_scores_zero(mode, seed):
    rng = np.random.default_rng(100 + seed)
    g = 3
    token, domain, doc, position = corpus(rng, g, 10, 40)
    n = domain.size
    recs = records(token, domain, doc, position, [random_layer(rng, n, 4, 2) for _ in range(2)], 4, g)
    res = path_information(recs, g, mode=mode, rng=seed, **SMALL)
    assert res.nmi.observed > 0  # the plug-in bias
    assert abs(res.excess) < 0.02
    assert res.nmi.p_value > 0.01
    assert res.nmi.excess_ci_low <= 0.01
    assert res.heldout is not None and res.heldout.estimate < 0.02


def test_huge_alphabet_few_tokens():
    """Six layers of 8 experts (262,144 possible top-1 paths) over 400 tokens: nearly every path
    is seen once, the plug-in NMI is ~1 for a domain-blind router and the excess over the null ~0."""
    rng = np.random.default_rng(7)
    g = 2
    token, domain, doc, position = corpus(rng, g, 10, 20)
    n = domain.size
    recs = records(token, domain, doc, position, [rng.integers(0, 8, n) for _ in range(6)], 8, g)
    res = path_information(recs, g, rng=3, max_heldout_paths=256, **SMALL)
    assert res.n_paths > 0.95 * n and res.singletons > 0.9 * n
    assert res.tokens_per_path < 1.1
    assert res.table_columns <= 20 + (res.n_paths - res.singletons)  # M + shared paths at most
    assert res.nmi.observed > 0.9
    assert abs(res.excess) < 0.02 and res.nmi.p_value > 0.5
    assert res.plugin_bias_bits > 0.3
    assert res.heldout is None and "max_heldout_paths" in res.heldout_note
    d = res.as_measure_result().as_dict()
    assert d["heldout_share"] is None and "max_heldout_paths" in d["heldout_note"]
    json.dumps(d)  # JSON-ready


def test_power_fades_as_paths_become_unique():
    """A domain coded in the pair of layers 0 and 1, with random 8-expert layers appended: the
    plug-in NMI stays 1, but the null mean rises towards it as N / P falls to 1, and the excess
    with it; the counts that show it are reported."""
    recs = xor_records(0, docs_per_domain=10, doc_len=24)  # 480 tokens
    rng = np.random.default_rng(1)
    n = recs.domain.size
    for _ in range(4):
        recs.layers.append(LayerRecords(rng.integers(0, 8, (n, 1)), np.ones((n, 1), np.float32), np.ones((n, 1), bool)))
    recs.num_experts = 8
    kw = dict(rng=0, per_layer=False, heldout=False, **SMALL)
    pair = path_information(recs, 2, layers=[0, 1], **kw)
    every = path_information(recs, 2, **kw)
    assert pair.nmi.observed == pytest.approx(1.0) and every.nmi.observed == pytest.approx(1.0)
    assert pair.excess > 0.9 and pair.tokens_per_path > 10
    assert every.excess < 0.05 and every.tokens_per_path < 1.1 and every.singletons > 0.95 * n


def test_moderate_alphabet_bias_is_removed_by_the_null():
    """Four layers of 4 experts (256 paths) over 400 tokens: a large plug-in NMI, ~0 above the null."""
    rng = np.random.default_rng(8)
    g = 2
    token, domain, doc, position = corpus(rng, g, 10, 20)
    n = domain.size
    recs = records(token, domain, doc, position, [rng.integers(0, 4, n) for _ in range(4)], 4, g)
    res = path_information(recs, g, rng=4, heldout=False, **SMALL)
    assert res.nmi.observed > 0.3
    assert abs(res.excess) < 0.05 and res.nmi.p_value > 0.05


def test_topk_measure_name_and_bigram_context():
    res = path_information(xor_records(1), 2, mode="topk", context="bigram", rng=1, **SMALL)
    m = res.as_measure_result()
    assert m.name == "path_nmi_topk" and res.context == "bigram"
    assert m.details["n_paths"] == res.n_paths and m.null_mean == pytest.approx(res.nmi.null_mean)
    json.dumps(m.as_dict())
