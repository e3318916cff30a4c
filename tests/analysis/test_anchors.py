"""The shipped OLMoE routing counts and their anchor measures, against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from analysis.anchors import COUNTINGS, anchor_rows, anchor_source, load_anchor_counts

LN2 = np.log(2.0)
DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")
LAYERS = (0, 7, 15)
TABLE_IDS = [
    (model, counting, layer) for model in ("OLMoE-1B-7B", "Mixtral-8x7B") for counting in COUNTINGS for layer in LAYERS
]


@pytest.fixture(scope="module")
def counts():
    return load_anchor_counts()


@pytest.fixture(scope="module")
def rows():
    return {(r["model"], r["counting"], r["layer"]): r for r in anchor_rows()}


def test_source_names_the_repository_commit_and_paper():
    src = anchor_source()
    assert src["repository"] == "https://github.com/allenai/OLMoE"
    assert len(src["commit"]) == 40 and int(src["commit"], 16) >= 0
    assert "arXiv:2409.02060" in src["paper"]
    assert len(src["paths"]) == 2 * 2 * len(DOMAINS)  # models x countings x domains
    assert {"counts", "topk", "top1"} <= set(src["meaning"])


def test_counts_have_the_documented_shapes(counts):
    assert set(counts) == {"OLMoE-1B-7B", "Mixtral-8x7B"}
    olmoe, mixtral = counts["OLMoE-1B-7B"], counts["Mixtral-8x7B"]
    assert (olmoe.n_experts, olmoe.top_k, mixtral.n_experts, mixtral.top_k) == (64, 8, 8, 2)
    for m in counts.values():
        assert m.domains == DOMAINS and m.layers == LAYERS
        assert set(m.tables) == {(c, layer) for c in COUNTINGS for layer in LAYERS}
        for table in m.tables.values():
            assert table.shape == (len(DOMAINS), m.n_experts) and table.dtype == np.int64
            assert table.min() >= 0 and not table.flags.writeable


def test_row_sums_count_k_slots_per_token(counts):
    """Every domain has the same number of tokens, each counted once (top-1) or top_k times."""
    for m in counts.values():
        for layer in m.layers:
            top1 = m.tables[("top1", layer)].sum(axis=1)
            topk = m.tables[("topk", layer)].sum(axis=1)
            np.testing.assert_array_equal(top1, m.tokens_per_domain)
            np.testing.assert_array_equal(topk, m.top_k * top1)
            # The top-1 expert is one of the top-k: a cell's top-1 count never exceeds its top-k count.
            assert np.all(m.tables[("top1", layer)] <= m.tables[("topk", layer)])


@pytest.mark.parametrize("model,counting,layer", TABLE_IDS)
def test_nmi_matches_sklearn(counts, rows, model, counting, layer):
    joint = np.asarray(counts[model].tables[(counting, layer)])
    mi_bits = mutual_info_score(None, None, contingency=joint) / LN2  # sklearn works in nats
    p_domain = joint.sum(axis=1) / joint.sum()
    h_domain_bits = -np.sum(p_domain * np.log2(p_domain))
    row = rows[(model, counting, layer)]
    assert row["mi_bits"] == pytest.approx(mi_bits, rel=1e-9, abs=1e-12)
    assert row["entropy_domain_bits"] == pytest.approx(h_domain_bits, rel=1e-12)
    assert row["nmi"] == pytest.approx(mi_bits / h_domain_bits, rel=1e-9, abs=1e-12)
    # ~10^6 assignments: Miller-Madow moves NMI by less than 1e-3.
    assert abs(row["nmi_mm"] - row["nmi"]) < 1e-3
    assert row["K"] == (counts[model].top_k if counting == "topk" else 1)
    assert row["assignments"] == row["K"] * len(DOMAINS) * counts[model].tokens_per_domain


@pytest.mark.parametrize("counting,expected", [("top1", (0.27, 0.42, 0.44)), ("topk", (0.07, 0.17, 0.22))])
def test_olmoe_nmi_golden(rows, counting, expected):
    """OLMoE-1B-7B I(D;E)/H(D) at layers 0/7/15 as quoted in the issue (computed from these counts)."""
    got = tuple(round(rows[("OLMoE-1B-7B", counting, layer)]["nmi"], 2) for layer in LAYERS)
    assert got == expected
