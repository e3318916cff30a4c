"""Measures as units: a measure registered once appears in summary.json, the report's table,
the sweep rows and the measures figure, with no other file touched."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from analysis.measures import MEASURES, measure_layer
from analysis.plots import plot_measures
from analysis.registry import Measure, MeasureResult, columns, register
from analysis.report import render_report


def test_result_dict_and_columns():
    r = MeasureResult("x", 0.2, 0.1, 0.3, 0.0, 0.01, {"bits": 1.5})
    d = r.as_dict()
    assert d == {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3, "null_mean": 0.0, "p_value": 0.01, "bits": 1.5}
    assert columns("x", d) == {"x": 0.2, "x_low": 0.1, "x_high": 0.3, "x_p": 0.01}
    assert all(math.isnan(v) for v in columns("x", None).values())
    with pytest.raises(ValueError, match="redefine"):
        MeasureResult("x", 1.0, details={"value": 2}).as_dict()


def test_register_checks_names():
    with pytest.raises(ValueError, match="already registered"):
        register(Measure("nmi", "", "", ""))
    with pytest.raises(ValueError, match="identifier"):
        register(Measure("not a name", "", "", ""))


@pytest.fixture
def planted_measure():
    """A toy routing measure, the share of assignments on expert 0, registered for one test."""

    def share0(inputs) -> MeasureResult:
        load = inputs.counts.load
        return MeasureResult("share0", float(load[0] / load.sum()), null_mean=1 / inputs.counts.num_experts)

    register(Measure("share0", "expert-0 share", "share of assignments on expert 0", "share", share0))
    yield
    del MEASURES["share0"]


def test_a_new_measure_flows_everywhere(planted_measure, trained_moe, val_by_domain, synthetic_data):
    from analysis.recorder import interleave_domains, record_routing

    rec = record_routing(trained_moe, interleave_domains(val_by_domain), num_domains=len(synthetic_data.domains))
    layer = measure_layer(rec.layers[0], rec.records, 0, n_permutations=19, n_bootstrap=19, rng=0)
    entry = layer["measures"]["share0"]
    load = rec.layers[0].load
    assert entry["value"] == pytest.approx(load[0] / load.sum())
    layer.update(layer=0, block=1, verdict={"verdict": "inconclusive", "rule": "r", "notes": [], "criteria": {}})
    layer["measures"].update(knockout={"value": None}, cka={"value": None})
    summary = {
        "model": {"router": "TopK", "blocks": [1], "num_moe_layers": 1, "num_experts": 4, "top_k": 2},
        "verdict": {"verdict": "inconclusive", "rule": "r"},
        "domains": synthetic_data.domains,
        "tokens": {"recorded": 1, "per_domain": {d: 1 for d in synthetic_data.domains}},
        "config": {"n_permutations": 19, "n_bootstrap": 19},
        "layers": [layer],
        "files": {},
    }
    assert "expert-0 share" in render_report(summary)
    assert isinstance(plot_measures(summary), Figure)
    assert columns("share0", entry)["share0"] == pytest.approx(entry["value"])
    assert np.isfinite(columns("share0", entry)["share0"])


def test_top1_measures_count_each_tokens_highest_gate_expert(trained_moe, val_by_domain, synthetic_data):
    from sklearn.metrics import mutual_info_score

    from analysis.recorder import interleave_domains, record_routing

    rec = record_routing(
        trained_moe, interleave_domains(val_by_domain), num_domains=len(synthetic_data.domains), keep_records=True
    )
    layer = measure_layer(rec.layers[0], rec.records, 0, n_permutations=19, n_bootstrap=19, rng=0)
    raw = rec.records.layers[0]
    # Reference: a naive loop picking each token's highest-gate kept expert; NMI = I(D;E1) / H(D).
    top1 = np.array(
        [
            max((g, -j, e) for j, (e, g, k) in enumerate(zip(es, gs, ks)) if k)[2]
            for es, gs, ks in zip(raw.experts, raw.gates, raw.kept)
        ]
    )
    domain = rec.records.domain
    h_domain = mutual_info_score(domain, domain)
    expected = mutual_info_score(domain, top1) / h_domain
    nmi_top1, nmi = layer["measures"]["nmi_top1"], layer["measures"]["nmi"]
    assert nmi_top1["plugin"] == pytest.approx(expected, rel=1e-9)
    assert nmi_top1["plugin"] != pytest.approx(nmi["plugin"])  # top-k counting is a different table
    assert layer["measures"]["cmi_top1"]["value"] is not None
