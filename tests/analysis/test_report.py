"""analyze_model end to end on the tiny trained model: files written, summary keys stable and
strict JSON, figures drawable from the saved summary, config usable as a Hydra schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.figure import Figure

from analysis.measures import MEASURES
from analysis.plots import (
    plot_cka,
    plot_domain_expert_heatmaps,
    plot_information,
    plot_knockout,
    plot_loss_comparison,
    plot_measures,
    plot_nmi,
)
from analysis.progress import progress, progress_bars
from analysis.records import RoutingRecords
from analysis.report import SUMMARY_FORMAT_VERSION, AnalysisConfig, analysis_cost, analyze_model

FAST = dict(n_permutations=49, n_bootstrap=49, knockout_tokens=256, probe_tokens=512)

TOP_KEYS = {
    "format_version",
    "domains",
    "model",
    "config",
    "tokens",
    "data_splits",
    "data_warnings",
    "comparison",
    "knockout",
    "verdict",
    "layers",
    "files",
    "paths",
}
LAYER_KEYS = {
    "layer",
    "block",
    "tokens",
    "assignments",
    "assignments_per_token",
    "weighting",
    "domain_expert_counts",
    "domain_specialization",
    "uniform_share",
    "coactivation",
    "router_entropy_bits",
    "measures",
    "verdict",
}


def _strict_json(path):
    def no_nan(x):
        raise ValueError(f"non-standard JSON constant {x}")

    return json.loads(path.read_text(), parse_constant=no_nan)


@pytest.fixture(scope="module")
def full_run(trained_moe, trained_dense, val_by_domain, synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    comparison = {"dense_total": {d: 3.0 for d in synthetic_data.domains}}
    summary = analyze_model(
        trained_moe,
        val_by_domain,
        synthetic_data.domains,
        out,
        dense_twin=trained_dense,
        comparison=comparison,
        cfg=AnalysisConfig(**FAST),
    )
    return out, summary


def test_analyze_model_writes_report_summary_records_and_figures(full_run, synthetic_data):
    out, summary = full_run
    for name in ("report.md", "summary.json", "routing.npz"):
        assert (out / name).is_file()
    for name in ("domain_expert", "nmi", "knockout", "cka", "loss"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    assert summary["files"]["figures"]["knockout"] == "figures/knockout.png"
    assert _strict_json(out / "summary.json") == summary

    assert set(summary) == TOP_KEYS
    assert summary["format_version"] == SUMMARY_FORMAT_VERSION
    assert summary["domains"] == synthetic_data.domains
    assert summary["model"]["num_experts"] == 4 and summary["model"]["top_k"] == 2
    assert summary["config"]["thresholds"]["nmi_margin"] == 0.03
    assert set(summary["comparison"]) == {"moe", "dense_twin", "dense_total"}
    assert summary["verdict"]["verdict"] in ("specialist", "ensemble", "inconclusive")
    docs = summary["tokens"]["documents_per_domain"]
    assert set(docs) == set(synthetic_data.domains) and all(n >= 2 for n in docs.values())
    assert summary["knockout"]["intervention"]["expert"].startswith("drop: every assignment")
    assert len(summary["layers"]) == 2
    for layer in summary["layers"]:
        assert set(layer) == LAYER_KEYS
        assert np.array(layer["domain_expert_counts"]).shape == (4, 4)
        assert set(layer["measures"]) == set(MEASURES)  # every registered measure, in one place
        ko = layer["measures"]["knockout"]
        assert np.array(ko["damage"]).shape == (4, 4)
        g = len(AnalysisConfig().dense_group_sizes) * AnalysisConfig().dense_group_replicates
        assert np.array(ko["dense_damage"]).shape == (4, g)  # random unit groups of this layer
        assert len(ko["percentile"]) == 4
        assert np.array(layer["measures"]["cka"]["matrix"]).shape == (4, 4)
        assert set(layer["verdict"]["criteria"]) == {"nmi", "cmi", "knockout", "cka"}
        for c in layer["verdict"]["criteria"].values():
            assert c["threshold"] and c["verdict"] in ("specialist", "ensemble", "inconclusive")
        nmi = layer["measures"]["nmi"]
        assert nmi["plugin_ci_low"] <= nmi["plugin"] <= nmi["plugin_ci_high"]
        assert nmi["ci_low"] <= nmi["value"] <= nmi["ci_high"]
        assert nmi["value"] == pytest.approx(nmi["plugin"] - nmi["null_mean"])
        assert nmi["n_permutations"] == 49

    report = (out / "report.md").read_text()
    assert f"**Verdict: {summary['verdict']['verdict']}**" in report
    assert "CI top >= 0.03" in report and "no (reported)" in report and "documents" in report
    assert "![knockout](figures/knockout.png)" in report and "![measures](figures/measures.png)" in report
    for m in MEASURES.values():  # the report's table loops over the registry
        assert m.label in report

    # Issue 22's measures: committees and the router-input probe per layer, paths across the layers.
    for layer in summary["layers"]:
        committee = layer["measures"]["committee_overlap"]
        assert len(committee["sizes"]) == 4 and 0 <= committee["value"] <= 1
        probe = layer["measures"]["probe_info"]
        assert probe["value"] is not None and probe["h_domain_bits"] == pytest.approx(2.0, abs=0.05)
        assert probe["routing_use"] is None or probe["routing_use"] >= 0
    for mode in ("top1", "topk"):
        path = summary["paths"][mode]
        assert path["layers"] == [0, 1] and path["n_paths"] >= 1 and path["ci_low"] <= path["value"] <= path["ci_high"]
        assert len(path["per_layer_nmi"]) == 2
    assert "## Paths across layers" in report and "Committees (half of each domain's routing mass)" in report

    records = RoutingRecords.load(out / "routing.npz")
    assert records.token.size == summary["tokens"]["recorded"] == 4 * 1024
    assert records.domains == synthetic_data.domains


def test_plots_draw_from_the_saved_summary_and_from_arrays(full_run):
    out, _ = full_run
    summary = _strict_json(out / "summary.json")  # what a notebook reads
    for plot in (
        plot_domain_expert_heatmaps,
        plot_nmi,
        plot_knockout,
        plot_cka,
        plot_loss_comparison,
        plot_measures,
        plot_information,
    ):
        assert isinstance(plot(summary), Figure)
    counts = [np.array(layer["domain_expert_counts"]) for layer in summary["layers"]]
    assert isinstance(plot_domain_expert_heatmaps(counts, summary["domains"], top_k=2), Figure)
    assert isinstance(plot_cka(np.stack([np.eye(4), np.ones((4, 4))])), Figure)
    assert isinstance(plot_loss_comparison({"moe": {"a": 3.0, "b": 3.1}, "dense": {"a": 3.05}}), Figure)


def test_nmi_plot_takes_an_interval_that_excludes_its_point(full_run):
    """An interval that does not contain its point (as the plain percentile bootstrap of a plug-in
    NMI near zero did) must be drawn, not fail."""
    import copy

    summary = copy.deepcopy(_strict_json(full_run[0] / "summary.json"))
    nmi = summary["layers"][0]["measures"]["nmi"]
    nmi["value"], nmi["ci_low"], nmi["ci_high"] = 0.001, 0.002, 0.004
    assert isinstance(plot_nmi(summary), Figure)


def test_the_announced_cost_is_the_forward_passes_run(
    trained_moe, trained_dense, val_by_domain, synthetic_data, tmp_path, capsys
):
    cfg = AnalysisConfig(**FAST)
    counted = {"moe": 0, "twin": 0, "moe blocks": 0, "twin blocks": 0}

    def counter(name):
        def hook(module, args):
            counted[name] += 1

        return hook

    # Every pass, whole or from a knocked block on, ends in the head; each block evaluation is counted.
    handles = [trained_moe.head.register_forward_pre_hook(counter("moe"))]
    handles += [trained_dense.head.register_forward_pre_hook(counter("twin"))]
    handles += [b.register_forward_pre_hook(counter("moe blocks")) for b in trained_moe.blocks]
    handles += [b.register_forward_pre_hook(counter("twin blocks")) for b in trained_dense.blocks]
    try:
        analyze_model(trained_moe, val_by_domain, synthetic_data.domains, tmp_path, dense_twin=trained_dense, cfg=cfg)
    finally:
        for h in handles:
            h.remove()
    cost = analysis_cost(trained_moe, val_by_domain, cfg, has_twin=True)
    moe_stages, twin_stages = ("recording", "knockouts", "probes", "probe_info"), ("twin_loss", "dense_knockouts")
    assert counted["moe"] == sum(cost[k]["passes"] for k in moe_stages)
    assert counted["moe blocks"] == sum(cost[k]["blocks"] for k in moe_stages)
    assert counted["twin"] == sum(cost[k]["passes"] for k in twin_stages)
    assert counted["twin blocks"] == sum(cost[k]["blocks"] for k in twin_stages)
    # Knockouts from the knocked block on: fewer block evaluations than whole passes would take.
    assert cost["knockouts"]["blocks"] < cost["knockouts"]["passes"] * len(trained_moe.blocks)
    assert f"{sum(c['passes'] for c in cost.values()):,} forward passes" in capsys.readouterr().out


def test_progress_bars_only_when_asked_or_on_a_terminal(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.delenv("MOE_PROGRESS", raising=False)
    assert progress(items, desc="x") is items  # pytest's stderr is not a terminal
    with progress_bars(True):
        bar = progress(items, desc="x")
        assert bar is not items and list(bar) == items
    monkeypatch.setenv("MOE_PROGRESS", "1")
    assert progress(items, desc="x") is not items
    with progress_bars(False):
        assert progress(items, desc="x") is items


def test_analysis_without_twin_knockouts_or_probes(trained_moe, val_by_domain, synthetic_data, tmp_path):
    cfg = AnalysisConfig(n_permutations=19, n_bootstrap=19, knockouts=False, probes=False, save_records=False)
    summary = analyze_model(
        trained_moe,
        val_by_domain,
        synthetic_data.domains,
        tmp_path,
        cfg=cfg,
        data_warnings=["domain 'syn00' has 19 document(s)"],
    )
    assert "**data warning**: domain 'syn00' has 19 document(s)" in (tmp_path / "report.md").read_text()
    assert summary["knockout"] is None and summary["files"]["records"] is None
    assert not (tmp_path / "routing.npz").exists()
    assert set(summary["files"]["figures"]) == {"domain_expert", "nmi", "measures", "loss"}
    for layer in summary["layers"]:
        assert layer["measures"]["knockout"]["value"] is None and layer["measures"]["cka"]["value"] is None
        crit = layer["verdict"]["criteria"]
        assert crit["knockout"]["verdict"] == crit["cka"]["verdict"] == "inconclusive"
    assert set(summary["comparison"]) == {"moe"}


def test_inputs_are_checked(trained_moe, trained_dense, val_by_domain, synthetic_data, tmp_path):
    with pytest.raises(ValueError, match="not in domains"):
        analyze_model(trained_moe, {"nope": []}, synthetic_data.domains, tmp_path)
    swapped = dict(val_by_domain)
    a, b = synthetic_data.domains[:2]
    swapped[a], swapped[b] = val_by_domain[b], val_by_domain[a]
    with pytest.raises(ValueError, match="domain ids"):
        analyze_model(trained_moe, swapped, synthetic_data.domains, tmp_path)
    with pytest.raises(ValueError, match="MoE model"):
        analyze_model(trained_dense, val_by_domain, synthetic_data.domains, tmp_path)


def test_config_is_a_structured_hydra_schema():
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    schema = OmegaConf.structured(AnalysisConfig)
    merged = OmegaConf.merge(schema, {"n_permutations": 50, "thresholds": {"nmi_margin": 0.1}})
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, AnalysisConfig) and cfg.thresholds.nmi_margin == 0.1 and cfg.n_bootstrap == 200
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, {"n_permutation": 50})
