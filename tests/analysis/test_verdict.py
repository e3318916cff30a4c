"""Verdict rules on hand-made numbers: each criterion's three outcomes, its stated threshold, and
the majority aggregation of layers and model."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.verdict import (
    ENSEMBLE,
    INCONCLUSIVE,
    SPECIALIST,
    LayerEvidence,
    VerdictThresholds,
    judge_cka,
    judge_cmi,
    judge_knockout,
    judge_layer,
    judge_model,
    judge_nmi,
    majority,
)

T = VerdictThresholds()
DENSE = np.linspace(0.1, 0.3, 20)  # dense-slice selectivities: median 0.2, q95 0.29


@pytest.mark.parametrize(
    "corrected, ci_low, ci_high, null_mean, null_q95, expected",
    [
        (0.30, 0.25, 0.35, 0.01, 0.02, SPECIALIST),     # far above the null and large
        (0.004, 0.001, 0.012, 0.005, 0.009, ENSEMBLE),  # at the null, tiny
        (0.02, 0.015, 0.03, 0.001, 0.002, ENSEMBLE),    # significant but negligible even at the CI top
        (0.03, 0.01, 0.12, 0.005, 0.015, ENSEMBLE),     # overlaps the null and small
        (0.04, 0.03, 0.09, 0.001, 0.002, INCONCLUSIVE), # significant, small, CI reaching 0.05
        (0.20, 0.01, 0.40, 0.01, 0.03, INCONCLUSIVE),   # large but overlapping the null (few documents)
        (None, 0.0, 0.1, 0.0, 0.0, INCONCLUSIVE),       # not measured
        (float("nan"), 0.0, 0.1, 0.0, 0.0, INCONCLUSIVE),
    ],
)
def test_nmi_rule(corrected, ci_low, ci_high, null_mean, null_q95, expected):
    c = judge_nmi(corrected, ci_low, ci_high, null_mean, null_q95, T)
    assert c.verdict == expected
    assert c.name == "nmi" and "0.05" in c.threshold


def test_nmi_threshold_is_configurable():
    args = (0.04, 0.03, 0.09, 0.001, 0.002)
    assert judge_nmi(*args, VerdictThresholds(nmi_min=0.03)).verdict == SPECIALIST
    assert "0.03" in judge_nmi(*args, VerdictThresholds(nmi_min=0.03)).threshold


@pytest.mark.parametrize(
    "observed, null_mean, p, h, expected",
    [
        (0.20, 0.01, 0.005, 1.0, SPECIALIST),   # excess 0.19 of H(D|T), significant
        (0.012, 0.01, 0.30, 1.0, ENSEMBLE),     # at the null
        (0.02, 0.01, 0.001, 1.0, ENSEMBLE),     # significant but 1% of H(D|T)
        (0.30, 0.01, 0.20, 1.0, INCONCLUSIVE),  # large but not significant
        (0.0, 0.0, 1.0, 0.0, INCONCLUSIVE),     # tokens determine the domain
        (0.0003, 0.00005, 0.02, 0.0075, INCONCLUSIVE),  # tiny H(D|T): a tiny CMI is no evidence
        (0.1, None, 0.01, 1.0, INCONCLUSIVE),
    ],
)
def test_cmi_rule(observed, null_mean, p, h, expected):
    c = judge_cmi(observed, null_mean, p, h, T)
    assert c.verdict == expected
    if h < T.min_h_domain_given_token:
        assert "nearly) determine the domain" in c.reason
    if expected == SPECIALIST:
        assert c.value == pytest.approx((observed - null_mean) / h)


def test_knockout_rule_against_dense_distribution():
    dense = DENSE
    assert judge_knockout([0.8, 0.7, 0.9, 0.6], dense, T).verdict == SPECIALIST
    assert judge_knockout([0.15, 0.2, 0.1, 0.25], dense, T).verdict == ENSEMBLE
    assert judge_knockout([0.25, 0.26, 0.24, 0.27], dense, T).verdict == INCONCLUSIVE
    c = judge_knockout([0.8, np.nan, 0.9], dense, T)  # nan experts (no damage) are ignored
    assert c.value == pytest.approx(0.85) and "0.29" in c.threshold
    assert judge_knockout([0.8, 0.9], None, T).verdict == INCONCLUSIVE  # no dense control
    assert judge_knockout([0.8, 0.9], [0.1, 0.2], T).verdict == INCONCLUSIVE  # too few slices
    assert judge_knockout([np.nan], dense, T).verdict == INCONCLUSIVE


def test_cka_rule():
    assert judge_cka(0.95, T).verdict == ENSEMBLE
    assert judge_cka(0.2, T).verdict == INCONCLUSIVE  # low CKA is the init state by default
    assert judge_cka(0.2, VerdictThresholds(cka_specialist=0.3)).verdict == SPECIALIST
    assert judge_cka(None, T).verdict == INCONCLUSIVE


def test_majority():
    assert majority([SPECIALIST, SPECIALIST, ENSEMBLE, INCONCLUSIVE])[0] == SPECIALIST
    assert majority([ENSEMBLE, INCONCLUSIVE, INCONCLUSIVE])[0] == ENSEMBLE
    assert majority([SPECIALIST, ENSEMBLE])[0] == INCONCLUSIVE  # tie
    assert majority([INCONCLUSIVE, INCONCLUSIVE])[0] == INCONCLUSIVE
    assert majority([SPECIALIST, INCONCLUSIVE], min_decisive=2)[0] == INCONCLUSIVE
    assert majority([SPECIALIST, ENSEMBLE, ENSEMBLE])[1] == {SPECIALIST: 1, ENSEMBLE: 2, INCONCLUSIVE: 0}


def _specialist_layer(i: int) -> LayerEvidence:
    return LayerEvidence(layer=i, nmi_corrected=0.3, nmi_ci_low=0.25, nmi_ci_high=0.35, nmi_null_mean=0.01,
                         nmi_null_q95=0.02, cmi_observed=0.2, cmi_null_mean=0.01, cmi_p_value=0.005,
                         h_domain_given_token=1.0, moe_selectivity=[0.8, 0.9], dense_selectivity=DENSE,
                         cka_mean_offdiag=0.2)


def _vocabulary_layer(i: int) -> LayerEvidence:
    """Domain information in routing, all explained by the token (a hash router on disjoint-ish data)."""
    return LayerEvidence(layer=i, nmi_corrected=0.3, nmi_ci_low=0.25, nmi_ci_high=0.35, nmi_null_mean=0.01,
                         nmi_null_q95=0.02, cmi_observed=0.011, cmi_null_mean=0.01, cmi_p_value=0.4,
                         h_domain_given_token=1.0, moe_selectivity=[0.1, 0.15], dense_selectivity=DENSE,
                         cka_mean_offdiag=0.9)


def test_layer_and_model_verdicts():
    spec = judge_layer(_specialist_layer(0), T)
    assert spec.verdict == SPECIALIST
    assert [c.name for c in spec.criteria] == ["nmi", "cmi", "knockout", "cka"]
    assert [c.verdict for c in spec.criteria] == [SPECIALIST, SPECIALIST, SPECIALIST, INCONCLUSIVE]

    vocab = judge_layer(_vocabulary_layer(1), T)
    assert [c.verdict for c in vocab.criteria] == [SPECIALIST, ENSEMBLE, ENSEMBLE, ENSEMBLE]
    assert vocab.verdict == ENSEMBLE
    assert any("token identity" in n for n in vocab.notes)

    empty = judge_layer(LayerEvidence(layer=2), T)
    assert empty.verdict == INCONCLUSIVE and all(c.verdict == INCONCLUSIVE for c in empty.criteria)

    assert judge_model([spec, spec, vocab], T).verdict == SPECIALIST
    assert judge_model([spec, vocab], T).verdict == INCONCLUSIVE
    model = judge_model([vocab, vocab, empty], T)
    assert model.verdict == ENSEMBLE and model.counts == {SPECIALIST: 0, ENSEMBLE: 2, INCONCLUSIVE: 1}
    d = model.as_dict()
    assert d["layers"][0]["criteria"]["nmi"]["threshold"].startswith("specialist:")
