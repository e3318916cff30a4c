"""Verdicts: does each measurement point to "specialist", "ensemble" or "inconclusive"?

Pure functions of measured numbers (no model, no I/O). Each criterion states the rule and the
threshold it applied next to its verdict, so a reader can disagree with a threshold and recompute.

Criteria, per MoE layer (thresholds in `VerdictThresholds`):

- **nmi** (domain information in routing, `NMI = I(D;E)/H(D)`; the interval is a document
  bootstrap of the plug-in NMI, the null a document permutation of the same statistic):
  specialist if `ci_low > null_q95` and Miller-Madow NMI `>= nmi_min`;
  ensemble if `ci_high - null_mean < nmi_min` (even the top of the interval, less chance level, is
  negligible) or (`ci_low <= null_q95` and NMI `< nmi_min`) (indistinguishable from the null, and
  small); inconclusive otherwise (significant but small with a wide interval, or large but noisy).
- **cmi** (domain information beyond the token id, I(D;E|T), against its within-token null):
  with `excess = (observed - null_mean) / H(D|T)` (the share of the domain uncertainty left after
  the token that routing removes): specialist if `p < alpha` and `excess >= cmi_min`; ensemble if
  `excess < cmi_min`; inconclusive if the excess is large but not significant, or if
  H(D|T) < `min_h_domain_given_token` (tokens nearly determine the domain, so the share is ill-posed).
- **knockout** (does removing an expert hurt one domain?): the median over experts of the MoE's
  knockout selectivity against the selectivities of equal slices of the dense twin's FFN (same
  token budget, hence the same noise): specialist if above the dense `selectivity_specialist_quantile`
  (q95), ensemble if at most the dense `selectivity_ensemble_quantile` (median), else inconclusive.
- **cka** (functional redundancy): mean off-diagonal linear CKA between experts on shared inputs:
  ensemble if `>= cka_ensemble` (near copies), else inconclusive. Low CKA is *not* evidence of
  specialization by default: independently initialized experts already score ~0.25 (4 experts of
  width 32 at init, measured), so distinct functions are the starting point, not an achievement.
  Setting `cka_specialist` lets a mean CKA at or below it vote specialist.

Aggregation: a layer is "specialist" if more of its decisive (non-inconclusive) criteria say
specialist than ensemble, "ensemble" if the reverse, "inconclusive" on a tie or with fewer than
`min_decisive` decisive criteria. The model's verdict is the same majority over its layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

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
    "judge_cka",
    "judge_cmi",
    "judge_knockout",
    "judge_layer",
    "judge_model",
    "judge_nmi",
    "majority",
]

SPECIALIST, ENSEMBLE, INCONCLUSIVE = "specialist", "ensemble", "inconclusive"


@dataclass
class VerdictThresholds:
    """Decision thresholds (Hydra: `analysis.thresholds`). Plain fields so it composes as a schema."""

    # Smallest NMI (Miller-Madow) that counts as domain specialization: the expert choice removes
    # >= 5% of the domain uncertainty (domain-independent routing gives ~0).
    nmi_min: float = 0.05
    # Significance level of the permutation p-values.
    alpha: float = 0.05
    # Smallest excess I(D;E|T) over its null, as a share of H(D|T), that counts as domain expertise.
    cmi_min: float = 0.02
    # Below this H(D|T) (bits) the token nearly fixes the domain: dividing by it would turn a
    # negligible I(D;E|T) into a large share, so the criterion abstains.
    min_h_domain_given_token: float = 0.05
    # Dense-slice selectivity quantiles the MoE's median expert selectivity is compared with.
    selectivity_specialist_quantile: float = 0.95
    selectivity_ensemble_quantile: float = 0.5
    # Fewest finite dense-slice selectivities needed to form the reference distribution.
    min_dense_slices: int = 4
    # Mean off-diagonal CKA at or above which experts are near copies (redundant ensemble members).
    cka_ensemble: float = 0.8
    # At or below which distinct enough to vote specialist; None: never (untrained experts are
    # already distinct, CKA ~0.25, so low CKA alone says nothing about specialization).
    cka_specialist: Optional[float] = None
    # Fewest decisive criteria a layer (and layers a model) needs for a non-inconclusive verdict.
    min_decisive: int = 1


@dataclass(frozen=True)
class Criterion:
    """One criterion's verdict: `value` is the number compared, `threshold` the rule as applied
    (with the numbers filled in), `reason` a sentence for the report."""

    name: str
    verdict: str
    value: float | None
    threshold: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LayerEvidence:
    """The measured numbers the verdict of one layer uses; None = not measured.

    nmi_*: Miller-Madow NMI, bootstrap interval and permutation null of the plug-in NMI;
    cmi_observed / cmi_null_mean (bits), cmi_p_value, h_domain_given_token (bits): I(D;E|T) and
    its within-token null; moe_selectivity [E] and dense_selectivity [n]: knockout selectivities of
    the experts and of the dense control's slices; cka_mean_offdiag: mean off-diagonal CKA.
    """

    layer: int
    nmi_corrected: float | None = None
    nmi_ci_low: float | None = None
    nmi_ci_high: float | None = None
    nmi_null_mean: float | None = None
    nmi_null_q95: float | None = None
    cmi_observed: float | None = None
    cmi_null_mean: float | None = None
    cmi_p_value: float | None = None
    h_domain_given_token: float | None = None
    moe_selectivity: Sequence[float] | None = None
    dense_selectivity: Sequence[float] | None = None
    cka_mean_offdiag: float | None = None


@dataclass(frozen=True)
class LayerVerdict:
    layer: int
    verdict: str
    criteria: list[Criterion]
    rule: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "verdict": self.verdict, "rule": self.rule, "notes": list(self.notes),
                "criteria": {c.name: c.as_dict() for c in self.criteria}}


@dataclass(frozen=True)
class ModelVerdict:
    verdict: str
    layers: list[LayerVerdict]
    rule: str
    counts: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "rule": self.rule, "counts": dict(self.counts),
                "layers": [v.as_dict() for v in self.layers]}


def _missing(*values: Any) -> bool:
    for v in values:
        if v is None:
            return True
        if isinstance(v, float) and not math.isfinite(v):
            return True
    return False


def _g(x: float) -> str:
    return f"{x:.4g}"


# ----------------------------------------------------------------------------- criteria
def judge_nmi(corrected: float | None, ci_low: float | None, ci_high: float | None, null_mean: float | None,
              null_q95: float | None, t: VerdictThresholds | None = None) -> Criterion:
    """NMI with its document-bootstrap interval against its document-permutation null."""
    t = t or VerdictThresholds()
    rule = (f"specialist: ci_low > null_q95 and NMI_MM >= {_g(t.nmi_min)}; ensemble: ci_high - null_mean < "
            f"{_g(t.nmi_min)}, or ci_low <= null_q95 and NMI_MM < {_g(t.nmi_min)}")
    if _missing(corrected, ci_low, ci_high, null_mean, null_q95):
        return Criterion("nmi", INCONCLUSIVE, None, rule, "NMI or its interval/null not measured")
    numbers = (f"NMI_MM={_g(corrected)}, CI=[{_g(ci_low)}, {_g(ci_high)}], null mean {_g(null_mean)}, "
               f"null q95 {_g(null_q95)}")
    if ci_low > null_q95 and corrected >= t.nmi_min:
        verdict, why = SPECIALIST, "routing carries clearly more domain information than chance"
    elif ci_high - null_mean < t.nmi_min:
        verdict, why = ENSEMBLE, "even the top of the interval above chance is negligible"
    elif ci_low <= null_q95 and corrected < t.nmi_min:
        verdict, why = ENSEMBLE, "indistinguishable from the document null and small"
    else:
        verdict, why = INCONCLUSIVE, "significant but small, or large but not separated from the null"
    return Criterion("nmi", verdict, float(corrected), rule, f"{why} ({numbers})")


def judge_cmi(observed: float | None, null_mean: float | None, p_value: float | None,
              h_domain_given_token: float | None, t: VerdictThresholds | None = None) -> Criterion:
    """I(D;E|T) against its within-token null, scaled by H(D|T)."""
    t = t or VerdictThresholds()
    rule = (f"excess = (I(D;E|T) - null_mean) / H(D|T); specialist: p < {_g(t.alpha)} and excess >= "
            f"{_g(t.cmi_min)}; ensemble: excess < {_g(t.cmi_min)}")
    if _missing(observed, null_mean, p_value, h_domain_given_token):
        return Criterion("cmi", INCONCLUSIVE, None, rule, "I(D;E|T) or its within-token null not measured")
    if h_domain_given_token < t.min_h_domain_given_token:
        return Criterion("cmi", INCONCLUSIVE, None, rule,
                         f"H(D|T) = {_g(h_domain_given_token)} bits < {_g(t.min_h_domain_given_token)}: token ids "
                         "(nearly) determine the domain, so routing can carry little domain information beyond them")
    excess = (observed - null_mean) / h_domain_given_token
    numbers = (f"I(D;E|T)={_g(observed)} bits, null mean {_g(null_mean)}, p={_g(p_value)}, "
               f"H(D|T)={_g(h_domain_given_token)} bits, excess {_g(excess)}")
    if p_value < t.alpha and excess >= t.cmi_min:
        verdict, why = SPECIALIST, "routing knows the domain beyond the token id"
    elif excess < t.cmi_min:
        verdict, why = ENSEMBLE, "little domain information beyond the token id"
    else:
        verdict, why = INCONCLUSIVE, "a sizeable excess that is not significant"
    return Criterion("cmi", verdict, float(excess), rule, f"{why} ({numbers})")


def judge_knockout(moe_selectivity: Sequence[float] | None, dense_selectivity: Sequence[float] | None,
                   t: VerdictThresholds | None = None) -> Criterion:
    """Median knockout selectivity of the MoE's experts against the dense twin's slices."""
    t = t or VerdictThresholds()
    qs, qe = t.selectivity_specialist_quantile, t.selectivity_ensemble_quantile
    rule = f"specialist: median MoE selectivity > dense q{_g(100 * qs)}; ensemble: <= dense q{_g(100 * qe)}"
    moe = np.asarray([] if moe_selectivity is None else moe_selectivity, dtype=np.float64)
    dense = np.asarray([] if dense_selectivity is None else dense_selectivity, dtype=np.float64)
    moe, dense = moe[np.isfinite(moe)], dense[np.isfinite(dense)]
    if moe.size == 0:
        return Criterion("knockout", INCONCLUSIVE, None, rule, "no expert knockout with measurable damage")
    median = float(np.median(moe))
    if dense.size < t.min_dense_slices:
        return Criterion("knockout", INCONCLUSIVE, median, rule,
                         f"no dense control (fewer than {t.min_dense_slices} dense slices with measurable damage)")
    hi, lo = float(np.quantile(dense, qs)), float(np.quantile(dense, qe))
    rule = (f"specialist: median MoE selectivity > dense q{_g(100 * qs)} = {_g(hi)}; "
            f"ensemble: <= dense q{_g(100 * qe)} = {_g(lo)}")
    numbers = f"median MoE selectivity {_g(median)} over {moe.size} experts, {dense.size} dense slices"
    if median > hi:
        verdict, why = SPECIALIST, "knocking out an expert hurts some domains far more than others"
    elif median <= lo:
        verdict, why = ENSEMBLE, "expert knockouts are no more domain-selective than dense slices"
    else:
        verdict, why = INCONCLUSIVE, "more selective than typical dense slices, but within their range"
    return Criterion("knockout", verdict, median, rule, f"{why} ({numbers})")


def judge_cka(mean_offdiag: float | None, t: VerdictThresholds | None = None) -> Criterion:
    """Mean off-diagonal CKA between experts: redundancy."""
    t = t or VerdictThresholds()
    never = "never (low CKA is the init state)"
    rule = f"ensemble: mean CKA >= {_g(t.cka_ensemble)}; specialist: " + (
        f"mean CKA <= {_g(t.cka_specialist)}" if t.cka_specialist is not None else never)
    if _missing(mean_offdiag):
        return Criterion("cka", INCONCLUSIVE, None, rule, "expert CKA not measured")
    if mean_offdiag >= t.cka_ensemble:
        verdict, why = ENSEMBLE, "experts compute near-identical functions"
    elif t.cka_specialist is not None and mean_offdiag <= t.cka_specialist:
        verdict, why = SPECIALIST, "experts compute distinct functions"
    else:
        verdict, why = INCONCLUSIVE, "experts are not redundant copies, which alone does not show specialization"
    return Criterion("cka", verdict, float(mean_offdiag), rule, f"{why} (mean CKA {_g(mean_offdiag)})")


# ----------------------------------------------------------------------------- aggregation
def majority(verdicts: Sequence[str], min_decisive: int = 1) -> tuple[str, dict[str, int]]:
    """Majority of the decisive verdicts: (verdict, counts per label); ties and fewer than
    `min_decisive` decisive verdicts give inconclusive."""
    counts = {label: sum(v == label for v in verdicts) for label in (SPECIALIST, ENSEMBLE, INCONCLUSIVE)}
    s, e = counts[SPECIALIST], counts[ENSEMBLE]
    if s + e < max(min_decisive, 1) or s == e:
        return INCONCLUSIVE, counts
    return (SPECIALIST if s > e else ENSEMBLE), counts


def judge_layer(evidence: LayerEvidence, t: VerdictThresholds | None = None) -> LayerVerdict:
    """Every criterion of one layer and the layer's majority verdict."""
    t = t or VerdictThresholds()
    ev = evidence
    criteria = [
        judge_nmi(ev.nmi_corrected, ev.nmi_ci_low, ev.nmi_ci_high, ev.nmi_null_mean, ev.nmi_null_q95, t),
        judge_cmi(ev.cmi_observed, ev.cmi_null_mean, ev.cmi_p_value, ev.h_domain_given_token, t),
        judge_knockout(ev.moe_selectivity, ev.dense_selectivity, t),
        judge_cka(ev.cka_mean_offdiag, t),
    ]
    verdict, counts = majority([c.verdict for c in criteria], t.min_decisive)
    notes = []
    by_name = {c.name: c.verdict for c in criteria}
    if by_name["nmi"] == SPECIALIST and by_name["cmi"] == ENSEMBLE:
        notes.append("the domain information in routing is explained by token identity: vocabulary, not "
                     "domain, specialization")
    rule = (f"majority of decisive criteria (specialist {counts[SPECIALIST]}, ensemble {counts[ENSEMBLE]}, "
            f"inconclusive {counts[INCONCLUSIVE]}; ties or < {t.min_decisive} decisive -> inconclusive)")
    return LayerVerdict(ev.layer, verdict, criteria, rule, notes)


def judge_model(layers: Sequence[LayerVerdict], t: VerdictThresholds | None = None) -> ModelVerdict:
    """The model's verdict: majority over its layers' verdicts (ties -> inconclusive)."""
    t = t or VerdictThresholds()
    verdict, counts = majority([v.verdict for v in layers], t.min_decisive)
    rule = (f"majority of layer verdicts (specialist {counts[SPECIALIST]}, ensemble {counts[ENSEMBLE]}, "
            f"inconclusive {counts[INCONCLUSIVE]}; ties -> inconclusive)")
    return ModelVerdict(verdict, list(layers), rule, counts)
