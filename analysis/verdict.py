"""Verdicts: does a layer's routing point to "specialist", "ensemble" or "inconclusive"?

Pure functions of measured numbers (no model, no I/O). Each criterion states the rule and the
numbers it applied, so a reader can disagree with a threshold and recompute. The thresholds are the
ones `docs/calibration.md` supports: run on routers whose truth is known (`moe-calibrate`), the
combined verdict calls a domain-blind router specialist in at most alpha of the replicates.

Every routing criterion reads an effect with a document-level test and interval the same way:

    specialist    significant (p < alpha) and not shown negligible (interval top >= margin)
    ensemble      shown negligible: the interval's top lies below the margin (an equivalence test;
                  a non-significant effect with a wide interval is *not* evidence of an ensemble)
    inconclusive  neither (not significant, interval reaching the margin)

- **nmi**: domain information in routing, `NMI = I(D;E)/H(D)` above its document-permutation null
  (`excess = NMI - null mean`; a domain-blind router scores ~0 however documents cluster), with the
  bias-corrected, domain-stratified document-bootstrap interval; margin `nmi_margin`.
- **cmi**: domain information beyond the context (token id, optionally with the previous token),
  the held-out (cross-fitted) I(D;E|C) as a share of the Miller-Madow H(D|C), with its
  domain-stratified document bootstrap (`analysis.heldout`); margin `cmi_margin`. Abstains when
  H(D|C) < `min_h_domain_given_context`: the context (nearly) fixes the domain.
- **knockout** (reported, does not vote, one-sided): removing one expert (its assignments dropped)
  against random hidden-unit groups of the dense twin's same layer at matched damage
  (`analysis.knockout`); more selective than them points to specialist, else inconclusive.
- **cka** (reported, does not vote): mean off-diagonal linear CKA between experts; near copies
  point to an ensemble. Independently initialized experts already score ~0.25, so low CKA alone
  says nothing about specialization.

Why two criteria decide and two only report: the measures share information. NMI and the CMI are
read from the same routing table (a token-keyed router has a large NMI and no CMI: vocabulary, not
domain); knockout selectivity follows the routing skew (damage tracks each domain's load share, so a
layer with NMI 0.18 already shows selectivity ~0.3), and CKA describes the experts, not the routing.
Counting them as separate votes would let one fact vote several times. So a layer is:

    specialist    nmi and cmi both say specialist (domain information, and beyond the context)
    ensemble      cmi says ensemble (whatever domain information routing has, the context explains
                  it: vocabulary, not domain), or nmi says ensemble and cmi does not say specialist
    inconclusive  otherwise (including nmi ensemble against cmi specialist)

Knockout and CKA that disagree with the layer's verdict are named in its notes. The model's verdict
is the majority of its layers' verdicts (ties -> inconclusive).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ENSEMBLE",
    "INCONCLUSIVE",
    "SPECIALIST",
    "Criterion",
    "LayerEvidence",
    "LayerVerdict",
    "ModelVerdict",
    "VerdictThresholds",
    "combine_routing",
    "judge_cka",
    "judge_cmi",
    "judge_effect",
    "judge_knockout",
    "judge_layer",
    "judge_model",
    "judge_nmi",
    "majority",
]

SPECIALIST, ENSEMBLE, INCONCLUSIVE = "specialist", "ensemble", "inconclusive"


@dataclass
class VerdictThresholds:
    """Decision thresholds (Hydra: `analysis.thresholds`), as calibrated in docs/calibration.md."""

    # Significance level of every test (document permutation, document bootstrap).
    alpha: float = 0.05
    # Equivalence margin of NMI above chance (NMI - null mean). The null mean also absorbs a little
    # real signal (permuted documents keep their expert sets), so the excess runs ~15% below the
    # true NMI: 0.03 gives >= 80% power at a true NMI of 0.05, the detection limit calibrated in
    # docs/calibration.md, and never calls a router at or above it an ensemble.
    nmi_margin: float = 0.03
    # Equivalence margin of the held-out I(D;E|C) as a share of H(D|C).
    cmi_margin: float = 0.02
    # Below this H(D|C) (bits) the context nearly fixes the domain: the share is ill-posed, abstain.
    min_h_domain_given_context: float = 0.05
    # Knockout (reported): the median over experts of each expert's percentile among the dense
    # twin's damage-matched unit groups above which it points to specialist.
    knockout_specialist_percentile: float = 0.95
    # Mean off-diagonal CKA at or above which experts are near copies (reported).
    cka_ensemble: float = 0.8


@dataclass(frozen=True)
class Criterion:
    """One criterion's verdict: `value` is the number compared, `threshold` the rule as applied,
    `reason` a sentence for the report, `votes` whether it enters the layer's verdict."""

    name: str
    verdict: str
    value: float | None
    threshold: str
    reason: str
    votes: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LayerEvidence:
    """The measured numbers the verdict of one layer uses; None = not measured.

    nmi_excess, nmi_excess_ci_low/high, nmi_p_value: NMI above its document-permutation null, its
    interval and p-value; cmi_share, cmi_share_ci_low/high, cmi_p_value, h_domain_given_context:
    the held-out I(D;E|C) / H(D|C), its interval and p-value, and H(D|C) in bits;
    knockout_percentiles [E]: each expert's selectivity percentile among the dense twin's
    damage-matched groups (nan without enough of them); cka_mean_offdiag: mean off-diagonal CKA.
    """

    layer: int
    nmi_excess: float | None = None
    nmi_excess_ci_low: float | None = None
    nmi_excess_ci_high: float | None = None
    nmi_p_value: float | None = None
    cmi_share: float | None = None
    cmi_share_ci_low: float | None = None
    cmi_share_ci_high: float | None = None
    cmi_p_value: float | None = None
    h_domain_given_context: float | None = None
    knockout_percentiles: Sequence[float] | None = None
    cka_mean_offdiag: float | None = None


@dataclass(frozen=True)
class LayerVerdict:
    layer: int
    verdict: str
    criteria: list[Criterion]
    rule: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "verdict": self.verdict,
            "rule": self.rule,
            "notes": list(self.notes),
            "criteria": {c.name: c.as_dict() for c in self.criteria},
        }


@dataclass(frozen=True)
class ModelVerdict:
    verdict: str
    layers: list[LayerVerdict]
    rule: str
    counts: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "rule": self.rule,
            "counts": dict(self.counts),
            "layers": [v.as_dict() for v in self.layers],
        }


def _measured(*values: float | None) -> tuple[float, ...] | None:
    """`values` when every one was measured; None when any is missing (None, or a nan/inf float)."""
    if any(v is None or (isinstance(v, float) and not math.isfinite(v)) for v in values):
        return None
    return tuple(v for v in values if v is not None)


def _g(x: float) -> str:
    return f"{x:.4g}"


# ----------------------------------------------------------------------------- criteria
def judge_effect(ci_high: float, p_value: float, margin: float, alpha: float) -> str:
    """The three-way reading of an effect with a test and an interval (module docstring):
    specialist if p < alpha and ci_high >= margin; ensemble if ci_high < margin; else inconclusive."""
    if ci_high < margin:
        return ENSEMBLE
    if p_value < alpha:
        return SPECIALIST
    return INCONCLUSIVE


_WHY = {
    SPECIALIST: "significant, and not shown to lie below the margin",
    ENSEMBLE: "shown negligible: the whole interval lies below the margin",
    INCONCLUSIVE: "not significant, but the interval reaches the margin (too little data to tell)",
}


def judge_nmi(
    excess: float | None,
    ci_low: float | None,
    ci_high: float | None,
    p_value: float | None,
    t: VerdictThresholds | None = None,
) -> Criterion:
    """NMI above its document-permutation null, with its document-bootstrap interval."""
    t = t or VerdictThresholds()
    rule = (
        f"excess = NMI - null mean; specialist: p < {_g(t.alpha)} and CI top >= {_g(t.nmi_margin)}; "
        f"ensemble: CI top < {_g(t.nmi_margin)}"
    )
    measured = _measured(excess, ci_low, ci_high, p_value)
    if measured is None:
        return Criterion("nmi", INCONCLUSIVE, None, rule, "NMI or its interval/null not measured")
    excess, ci_low, ci_high, p_value = measured
    verdict = judge_effect(ci_high, p_value, t.nmi_margin, t.alpha)
    numbers = f"NMI - null = {_g(excess)} [{_g(ci_low)}, {_g(ci_high)}], p = {_g(p_value)}"
    return Criterion("nmi", verdict, float(excess), rule, f"{_WHY[verdict]} ({numbers})")


def judge_cmi(
    share: float | None,
    ci_low: float | None,
    ci_high: float | None,
    p_value: float | None,
    h_domain_given_context: float | None,
    t: VerdictThresholds | None = None,
) -> Criterion:
    """Held-out I(D;E|C) as a share of H(D|C), with its document-bootstrap interval."""
    t = t or VerdictThresholds()
    rule = (
        f"share = held-out I(D;E|C) / H(D|C); specialist: p < {_g(t.alpha)} and CI top >= "
        f"{_g(t.cmi_margin)}; ensemble: CI top < {_g(t.cmi_margin)}"
    )
    measured = _measured(share, ci_low, ci_high, p_value, h_domain_given_context)
    if measured is None:
        if h_domain_given_context is not None and h_domain_given_context < t.min_h_domain_given_context:
            return _cmi_abstains(h_domain_given_context, rule, t)
        return Criterion("cmi", INCONCLUSIVE, None, rule, "the held-out I(D;E|C) was not measured")
    share, ci_low, ci_high, p_value, h_domain_given_context = measured
    if h_domain_given_context < t.min_h_domain_given_context:
        return _cmi_abstains(h_domain_given_context, rule, t)
    verdict = judge_effect(ci_high, p_value, t.cmi_margin, t.alpha)
    numbers = (
        f"share {_g(share)} [{_g(ci_low)}, {_g(ci_high)}], p = {_g(p_value)}, "
        f"H(D|C) = {_g(h_domain_given_context)} bits"
    )
    return Criterion("cmi", verdict, float(share), rule, f"{_WHY[verdict]} ({numbers})")


def _cmi_abstains(h: float, rule: str, t: VerdictThresholds) -> Criterion:
    return Criterion(
        "cmi",
        INCONCLUSIVE,
        None,
        rule,
        f"H(D|C) = {_g(h)} bits < {_g(t.min_h_domain_given_context)}: the context (nearly) determines "
        "the domain, so routing can carry little domain information beyond it",
    )


def judge_knockout(percentiles: Sequence[float] | None, t: VerdictThresholds | None = None) -> Criterion:
    """Median over experts of each expert's knockout-selectivity percentile among the dense twin's
    damage-matched unit groups of the same layer (reported; does not vote). One-sided: above the
    specialist percentile it points to specialist; otherwise inconclusive, because a percentile of
    a lower confidence bound cannot show that experts are *not* selective (at small damage experts
    and dense groups both score 0 and tie at the 50th percentile, specialist or not)."""
    t = t or VerdictThresholds()
    hi = t.knockout_specialist_percentile
    rule = (
        f"median expert percentile among damage-matched dense groups > {_g(hi)} points to specialist; "
        "never ensemble (reported, not voting)"
    )
    pct = np.asarray([] if percentiles is None else percentiles, dtype=np.float64)
    pct = pct[np.isfinite(pct)]
    if pct.size == 0:
        return Criterion(
            "knockout",
            INCONCLUSIVE,
            None,
            rule,
            "no expert with enough damage-matched dense groups (or no dense twin)",
            votes=False,
        )
    median = float(np.median(pct))
    numbers = f"median percentile {_g(median)} over {pct.size} experts"
    if median > hi:
        verdict, why = SPECIALIST, "expert knockouts are more domain-selective than dense units of equal damage"
    else:
        verdict, why = INCONCLUSIVE, "not more domain-selective than dense units of equal damage"
    return Criterion("knockout", verdict, median, rule, f"{why} ({numbers})", votes=False)


def judge_cka(mean_offdiag: float | None, t: VerdictThresholds | None = None) -> Criterion:
    """Mean off-diagonal CKA between experts: redundancy (reported; does not vote)."""
    t = t or VerdictThresholds()
    rule = f"mean CKA >= {_g(t.cka_ensemble)} points to ensemble (near copies); reported, not voting"
    if mean_offdiag is None or _measured(mean_offdiag) is None:
        return Criterion("cka", INCONCLUSIVE, None, rule, "expert CKA not measured", votes=False)
    if mean_offdiag >= t.cka_ensemble:
        verdict, why = ENSEMBLE, "experts compute near-identical functions"
    else:
        verdict, why = INCONCLUSIVE, "experts are not redundant copies, which alone does not show specialization"
    return Criterion("cka", verdict, float(mean_offdiag), rule, f"{why} (mean CKA {_g(mean_offdiag)})", votes=False)


# ----------------------------------------------------------------------------- aggregation
def combine_routing(nmi: str, cmi: str) -> str:
    """The layer's verdict from its two routing criteria (module docstring): specialist needs both;
    ensemble when routing shows no domain information beyond the context (cmi), or none at all
    (nmi) without cmi finding some; a contradiction is inconclusive."""
    if nmi == SPECIALIST and cmi == SPECIALIST:
        return SPECIALIST
    if cmi == ENSEMBLE or (nmi == ENSEMBLE and cmi != SPECIALIST):
        return ENSEMBLE
    return INCONCLUSIVE


def majority(verdicts: Sequence[str]) -> tuple[str, dict[str, int]]:
    """Majority of the decisive verdicts: (verdict, counts per label); ties and no decisive
    verdict give inconclusive."""
    counts = {label: sum(v == label for v in verdicts) for label in (SPECIALIST, ENSEMBLE, INCONCLUSIVE)}
    s, e = counts[SPECIALIST], counts[ENSEMBLE]
    if s == e:
        return INCONCLUSIVE, counts
    return (SPECIALIST if s > e else ENSEMBLE), counts


def judge_layer(evidence: LayerEvidence, t: VerdictThresholds | None = None) -> LayerVerdict:
    """Every criterion of one layer and the layer's verdict (nmi and cmi decide; see module)."""
    t = t or VerdictThresholds()
    ev = evidence
    nmi = judge_nmi(ev.nmi_excess, ev.nmi_excess_ci_low, ev.nmi_excess_ci_high, ev.nmi_p_value, t)
    cmi = judge_cmi(
        ev.cmi_share, ev.cmi_share_ci_low, ev.cmi_share_ci_high, ev.cmi_p_value, ev.h_domain_given_context, t
    )
    knockout, cka = judge_knockout(ev.knockout_percentiles, t), judge_cka(ev.cka_mean_offdiag, t)
    verdict = combine_routing(nmi.verdict, cmi.verdict)
    notes = []
    if nmi.verdict == SPECIALIST and cmi.verdict == ENSEMBLE:
        notes.append(
            "routing carries domain information, but none beyond the context: vocabulary, not domain, specialization"
        )
    if nmi.verdict == ENSEMBLE and cmi.verdict == SPECIALIST:
        notes.append("the two routing criteria contradict each other")
    for c in (knockout, cka):
        if c.verdict != INCONCLUSIVE and verdict != INCONCLUSIVE and c.verdict != verdict:
            notes.append(f"{c.name} points to {c.verdict} (reported only: it shares information with routing)")
    rule = (
        "nmi and cmi decide: specialist if both say specialist; ensemble if cmi says ensemble, or nmi does and "
        f"cmi is not specialist; else inconclusive (nmi: {nmi.verdict}, cmi: {cmi.verdict})"
    )
    return LayerVerdict(ev.layer, verdict, [nmi, cmi, knockout, cka], rule, notes)


def judge_model(layers: Sequence[LayerVerdict], t: VerdictThresholds | None = None) -> ModelVerdict:
    """The model's verdict: majority over its layers' verdicts (ties -> inconclusive)."""
    verdict, counts = majority([v.verdict for v in layers])
    rule = (
        f"majority of layer verdicts (specialist {counts[SPECIALIST]}, ensemble {counts[ENSEMBLE]}, "
        f"inconclusive {counts[INCONCLUSIVE]}; ties -> inconclusive)"
    )
    return ModelVerdict(verdict, list(layers), rule, counts)
