"""Measures as units: one result type and one registry that summary.json, the report, the sweep
rows and the figures loop over (pure Python; no torch).

A measure is registered once, with its name, the label and description every table uses, its unit,
and (for a routing measure) the function that computes it from a layer's inputs:

    register(Measure("nmi", "NMI − null", "NMI = I(D;E)/H(D) minus its document-null mean",
                     "share of H(D)", compute=my_function))

Its result, `MeasureResult`, carries the headline value with its interval, null and p-value, plus
named details. summary.json stores `layer["measures"][name] = result.as_dict()`; sweep rows take
`columns(name, entry)` (name, name_low, name_high, name_p); the report prints `label: value [ci]`
for every registered measure in registry order. Adding a measure is one `register` call (in
`analysis.measures`) and its test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MEASURES", "Measure", "MeasureResult", "columns", "register"]


@dataclass(frozen=True)
class MeasureResult:
    """One measure of one layer. value: the headline number (None: not measured); ci_low/ci_high:
    its interval; null_mean: the chance level it was compared with (None: none); p_value: its test
    (None: untested); details: every other number, JSON-ready."""

    name: str
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    null_mean: float | None = None
    p_value: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        clash = {"value", "ci_low", "ci_high", "null_mean", "p_value"} & set(self.details)
        if clash:
            raise ValueError(f"measure {self.name!r}: details may not redefine {sorted(clash)}")
        return {
            "value": self.value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "null_mean": self.null_mean,
            "p_value": self.p_value,
            **self.details,
        }


@dataclass(frozen=True)
class Measure:
    """A registered measure. label: short column header; description: one sentence for tables and
    figure titles; unit; compute(inputs) -> MeasureResult for a routing measure (None for a measure
    that needs the model, built by `analysis.report`); higher: what a larger value points to
    ("specialist", "ensemble" or "" when it does not point either way)."""

    name: str
    label: str
    description: str
    unit: str
    compute: Callable[[Any], MeasureResult] | None = None
    higher: str = ""


MEASURES: dict[str, Measure] = {}


def register(measure: Measure) -> Measure:
    """Add `measure` to the registry (its name must be new and a plain identifier)."""
    if not measure.name.isidentifier():
        raise ValueError(f"measure name {measure.name!r} must be an identifier (it becomes column names)")
    if measure.name in MEASURES:
        raise ValueError(f"measure {measure.name!r} is already registered")
    MEASURES[measure.name] = measure
    return measure


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else math.nan


def columns(name: str, entry: Mapping[str, Any] | None) -> dict[str, float]:
    """The flat sweep columns of one measure's summary entry: name, name_low, name_high, name_p
    (nan where missing)."""
    e = entry or {}
    return {
        name: _num(e.get("value")),
        f"{name}_low": _num(e.get("ci_low")),
        f"{name}_high": _num(e.get("ci_high")),
        f"{name}_p": _num(e.get("p_value")),
    }
