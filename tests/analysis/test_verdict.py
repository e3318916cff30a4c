"""Verdict rules on hand-made numbers: the three-way reading of an effect (equivalence for
"ensemble"), the criteria that vote and those that only report, and the aggregation."""

from __future__ import annotations

import pytest

from analysis.verdict import (
    ENSEMBLE,
    INCONCLUSIVE,
    SPECIALIST,
    LayerEvidence,
    VerdictThresholds,
    combine_routing,
    judge_cka,
    judge_cmi,
    judge_knockout,
    judge_layer,
    judge_model,
    judge_nmi,
    majority,
)

T = VerdictThresholds()


@pytest.mark.parametrize(
    "excess, low, high, p, expected",
    [
        (0.30, 0.25, 0.35, 0.005, SPECIALIST),  # far above chance
        (0.001, -0.004, 0.012, 0.40, ENSEMBLE),  # at chance, shown negligible
        (0.012, 0.008, 0.02, 0.005, ENSEMBLE),  # significant but negligible even at the CI top
        (0.03, 0.00, 0.11, 0.20, INCONCLUSIVE),  # not significant, wide: NOT evidence of an ensemble
        (0.04, 0.01, 0.12, 0.01, SPECIALIST),  # significant, interval reaching the margin
        (None, 0.0, 0.1, 0.1, INCONCLUSIVE),  # not measured
        (float("nan"), 0.0, 0.1, 0.1, INCONCLUSIVE),
    ],
)
def test_nmi_rule(excess, low, high, p, expected):
    c = judge_nmi(excess, low, high, p, T)
    assert c.verdict == expected and c.votes
    assert c.name == "nmi" and f"{T.nmi_margin:g}" in c.threshold


def test_absence_of_evidence_is_not_an_ensemble():
    """The old rule called an interval of [0.01, 0.12] (non-significant) an ensemble."""
    assert judge_nmi(0.05, 0.01, 0.12, 0.3, T).verdict == INCONCLUSIVE
    assert judge_cmi(0.05, -0.01, 0.12, 0.3, 1.0, T).verdict == INCONCLUSIVE


def test_margins_are_configurable():
    args = (0.04, 0.035, 0.045, 0.001)
    assert judge_nmi(*args, T).verdict == SPECIALIST
    assert judge_nmi(*args, VerdictThresholds(nmi_margin=0.05)).verdict == ENSEMBLE


@pytest.mark.parametrize(
    "share, low, high, p, h, expected",
    [
        (0.20, 0.15, 0.25, 0.005, 1.0, SPECIALIST),
        (-0.01, -0.03, 0.01, 0.9, 1.0, ENSEMBLE),  # held-out gain at or below 0
        (0.05, -0.02, 0.12, 0.2, 1.0, INCONCLUSIVE),
        (0.3, 0.2, 0.4, 0.001, 0.01, INCONCLUSIVE),  # the context determines the domain
        (None, None, None, None, 0.0, INCONCLUSIVE),
    ],
)
def test_cmi_rule(share, low, high, p, h, expected):
    c = judge_cmi(share, low, high, p, h, T)
    assert c.verdict == expected
    if h < T.min_h_domain_given_context:
        assert "nearly) determines" in c.reason


def test_reported_criteria_do_not_vote():
    ko = judge_knockout([0.99, 0.98, 0.97], T)
    assert ko.verdict == SPECIALIST and not ko.votes
    assert judge_knockout([0.2, 0.4, float("nan")], T).verdict == INCONCLUSIVE  # one-sided: never ensemble
    assert judge_knockout([0.7, 0.8], T).verdict == INCONCLUSIVE
    assert judge_knockout(None, T).verdict == INCONCLUSIVE
    assert judge_cka(0.95, T).verdict == ENSEMBLE and not judge_cka(0.95, T).votes
    assert judge_cka(0.2, T).verdict == INCONCLUSIVE  # low CKA is the init state
    assert judge_cka(None, T).verdict == INCONCLUSIVE


@pytest.mark.parametrize(
    "nmi, cmi, expected",
    [
        (SPECIALIST, SPECIALIST, SPECIALIST),
        (SPECIALIST, ENSEMBLE, ENSEMBLE),  # vocabulary, not domain
        (ENSEMBLE, INCONCLUSIVE, ENSEMBLE),
        (ENSEMBLE, SPECIALIST, INCONCLUSIVE),  # contradiction
        (SPECIALIST, INCONCLUSIVE, INCONCLUSIVE),
        (INCONCLUSIVE, INCONCLUSIVE, INCONCLUSIVE),
    ],
)
def test_combination(nmi, cmi, expected):
    assert combine_routing(nmi, cmi) == expected


def test_majority():
    assert majority([SPECIALIST, SPECIALIST, ENSEMBLE, INCONCLUSIVE])[0] == SPECIALIST
    assert majority([ENSEMBLE, INCONCLUSIVE, INCONCLUSIVE])[0] == ENSEMBLE
    assert majority([SPECIALIST, ENSEMBLE])[0] == INCONCLUSIVE
    assert majority([INCONCLUSIVE])[0] == INCONCLUSIVE
    assert majority([SPECIALIST, ENSEMBLE, ENSEMBLE])[1] == {SPECIALIST: 1, ENSEMBLE: 2, INCONCLUSIVE: 0}


def _specialist_layer(i: int) -> LayerEvidence:
    return LayerEvidence(
        layer=i,
        nmi_excess=0.3,
        nmi_excess_ci_low=0.25,
        nmi_excess_ci_high=0.35,
        nmi_p_value=0.005,
        cmi_share=0.2,
        cmi_share_ci_low=0.15,
        cmi_share_ci_high=0.25,
        cmi_p_value=0.005,
        h_domain_given_context=1.0,
        knockout_percentiles=[0.99, 0.97],
        cka_mean_offdiag=0.2,
    )


def _vocabulary_layer(i: int) -> LayerEvidence:
    """Domain information in routing, all explained by the token (a hash router)."""
    return LayerEvidence(
        layer=i,
        nmi_excess=0.3,
        nmi_excess_ci_low=0.25,
        nmi_excess_ci_high=0.35,
        nmi_p_value=0.005,
        cmi_share=0.0,
        cmi_share_ci_low=-0.001,
        cmi_share_ci_high=0.001,
        cmi_p_value=0.9,
        h_domain_given_context=1.0,
        knockout_percentiles=[0.99, 0.98],
        cka_mean_offdiag=0.9,
    )


def test_layer_and_model_verdicts():
    spec = judge_layer(_specialist_layer(0), T)
    assert spec.verdict == SPECIALIST
    assert [c.name for c in spec.criteria] == ["nmi", "cmi", "knockout", "cka"]
    assert [c.votes for c in spec.criteria] == [True, True, False, False]

    vocab = judge_layer(_vocabulary_layer(1), T)
    assert [c.verdict for c in vocab.criteria][:2] == [SPECIALIST, ENSEMBLE]
    assert vocab.verdict == ENSEMBLE  # a selective knockout cannot outvote the routing
    assert any("vocabulary" in n for n in vocab.notes)
    assert any(n.startswith("knockout points to specialist") for n in vocab.notes)

    empty = judge_layer(LayerEvidence(layer=2), T)
    assert empty.verdict == INCONCLUSIVE and all(c.verdict == INCONCLUSIVE for c in empty.criteria)

    assert judge_model([spec, spec, vocab], T).verdict == SPECIALIST
    assert judge_model([spec, vocab], T).verdict == INCONCLUSIVE
    model = judge_model([vocab, vocab, empty], T)
    assert model.verdict == ENSEMBLE and model.counts == {SPECIALIST: 0, ENSEMBLE: 2, INCONCLUSIVE: 1}
    assert model.as_dict()["layers"][0]["criteria"]["nmi"]["threshold"].startswith("excess")
