"""analysis.runs on hand-made run directories (no training), and the figures it feeds.

The real files come from tests/test_notebooks.py, which trains tiny runs and executes the notebooks
on them; here each reader is checked against directories whose content is known exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from analysis.plots import (
    plot_domain_expert_heatmaps,
    plot_information,
    plot_loss_curves,
    plot_sweep,
    plot_sweep_heatmaps,
    save_figure,
)
from analysis.records import LayerRecords, RoutingRecords
from analysis.runs import (
    domain_expert_from_records,
    find_runs,
    flatten_config,
    load_run,
    load_sweep,
    markdown_table,
    newest_run,
    run_overview,
    sweep_rows,
    val_loss_curves,
    varying_keys,
)

DOMAINS = ["a", "b"]


def layer_entry(i: int, nmi: float) -> dict:
    counts = [[6.0, 2.0, 0.0], [0.0, 2.0, 6.0]]  # 4 tokens per domain, k = 2, E = 3
    crit = {"name": "nmi", "verdict": "specialist", "value": nmi, "threshold": "t", "reason": "r"}
    return {
        "layer": i,
        "block": i,
        "domain_expert_counts": counts,
        "domain_specialization": (np.array(counts) / 4).tolist(),
        "uniform_share": 2 / 3,
        "measures": {
            "nmi": {
                "value": nmi,
                "ci_low": nmi - 0.1,
                "ci_high": nmi + 0.1,
                "null_mean": 0.01,
                "p_value": 0.01,
                "plugin": nmi + 0.01,
                "null_q95": 0.02,
                "docs_per_domain": [31, 40],
            },
            "cmi": {
                "value": 0.18,
                "ci_low": 0.1,
                "ci_high": 0.26,
                "null_mean": 0.0,
                "p_value": 0.01,
                "bits": 0.09,
                "h_domain_given_context_bits": 0.5,
            },
            "mi_domain": {"value": 0.5, "corrected": 0.4, "entropy_domain_bits": 1.0},
            "mi_token": {"value": 0.9, "corrected": 0.8},
            "maxvio": {"value": 0.1},
            "knockout": {"value": 0.6, "dense_cv_median": None},
            "cka": {"value": 0.3},
        },
        "verdict": {"verdict": "specialist", "criteria": {"nmi": crit}},
    }


def make_run(path: Path, *, seed: int = 0, scope: str = "micro_batch", analyzed: bool = True, nmi: float = 0.5) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        f"seed: {seed}\nmodel:\n  moe:\n    num_experts: 3\n    top_k: 2\nbalance:\n  scope: {scope}\n"
        "router:\n  kind: topk\ntwin:\n  match: [active]\ndata:\n  source: synthetic\ntrainer:\n  max_steps: 4\n"
    )
    comparison = {
        name: {"val_loss": {"a": loss, "b": loss + 0.5, "all": loss + 0.25}}
        for name, loss in (("moe", 3.0 + seed), ("dense_active", 3.5 + seed))
    }
    (path / "comparison.json").write_text(json.dumps(comparison))
    for name in comparison:
        (path / "models" / name).mkdir(parents=True)
        lines = [
            {"step": 1, "loss": 5.0},
            {"step": 2, "val_loss": {"a": 4.0, "b": 4.5, "all": 4.2}},
            {"step": 4, "val_loss": {"a": 3.0, "b": 3.5, "all": 3.2}},
            {"step": 2, "val_loss": {"a": 3.9}},
        ]
        (path / "models" / name / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    if analyzed:
        summary = {
            "domains": DOMAINS,
            "model": {"num_moe_layers": 2, "top_k": 2, "num_experts": 3},
            "tokens": {"recorded": 8},
            "comparison": {n: c["val_loss"] for n, c in comparison.items()},
            "verdict": {"verdict": "specialist", "rule": "majority"},
            "layers": [layer_entry(0, nmi), layer_entry(1, nmi / 2)],
            "paths": {"top1": {"value": nmi + 0.1, "ci_low": nmi, "ci_high": nmi + 0.2, "p_value": 0.01}},
        }
        (path / "analysis").mkdir()
        (path / "analysis" / "summary.json").write_text(json.dumps(summary))
        (path / "analysis" / "report.md").write_text("# Report\n\nbody\n\n## Figures\n\n![x](figures/x.png)\n")
    return path


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    make_run(root / "balance=micro_batch,seed=0", seed=0, scope="micro_batch")
    make_run(root / "balance=global_batch,seed=0", seed=0, scope="global_batch", nmi=0.2)
    make_run(root / "balance=global_batch,seed=1", seed=1, scope="global_batch", analyzed=False)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_load_run_reads_every_file(sweep):
    run = load_run(sweep / "balance=micro_batch,seed=0")
    assert run.name == "balance=micro_batch,seed=0"
    assert run.config["balance"]["scope"] == "micro_batch" and run.config["twin"]["match"] == ["active"]
    assert set(run.metrics) == {"moe", "dense_active"} and len(run.metrics["moe"]) == 4
    assert run.summary["domains"] == DOMAINS
    assert run.comparison["moe"]["val_loss"]["all"] == 3.25
    assert run.report() == "# Report\n\nbody\n" and "## Figures" in run.report(figures=True)
    curves = run.val_curves()
    steps, loss = curves["moe"]["a"]
    # Step 2 was evaluated twice (as after a resume): the last evaluation replaces the first.
    assert steps.tolist() == [2, 4] and loss.tolist() == [3.9, 3.0]
    assert curves["moe"]["b"][0].tolist() == [4]


def test_load_run_errors_name_the_fix(sweep, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="load_sweep"):
        load_run(sweep)
    with pytest.raises(FileNotFoundError, match="moe-analyze run_dir="):
        load_run(sweep / "balance=global_batch,seed=1")
    assert load_run(sweep / "balance=global_batch,seed=1", need_summary=False).summary is None
    with pytest.raises(FileNotFoundError, match="routing.npz"):
        load_run(sweep / "balance=micro_batch,seed=0").records()


def test_val_loss_curves_without_evaluations_is_empty():
    assert val_loss_curves([{"step": 1, "loss": 3.0}]) == {}


def test_find_and_newest_run(sweep, tmp_path):
    runs = find_runs(tmp_path)
    assert [p.name for p in runs] == [
        "balance=global_batch,seed=0",
        "balance=global_batch,seed=1",
        "balance=micro_batch,seed=0",
    ]
    newest = sweep / "balance=global_batch,seed=0"
    os.utime(newest / "comparison.json", (2e9, 2e9))
    assert newest_run(tmp_path) == newest
    with pytest.raises(FileNotFoundError, match="no moe-train run directory"):
        newest_run(tmp_path / "multirun" / "2026-01-01" / "nothing")


def test_flatten_and_varying_keys():
    a = {"seed": 0, "model": {"moe": {"k": 2}, "d": 8}, "m": [1, 2], "empty": {}}
    b = {"seed": 1, "model": {"moe": {"k": 2}, "d": 16}, "m": [1, 2]}
    assert flatten_config(a) == {"seed": 0, "model.moe.k": 2, "model.d": 8, "m": (1, 2), "empty": {}}
    assert varying_keys([a, b]) == ["model.d", "empty", "seed"]  # seed last; missing counts as differing
    assert varying_keys([a, a]) == []


def test_load_sweep_axes_labels_and_rows(sweep):
    s = load_sweep(sweep)
    assert len(s.runs) == 3 and s.axes == ["balance.scope", "seed"] and s.main_axis == "balance.scope"
    assert s.label(s.runs[0]) == "scope=global_batch, seed=0"
    assert list(s.summaries()) == ["scope=global_batch, seed=0", "scope=micro_batch, seed=0"]
    rows = sweep_rows(s)
    assert len(rows) == 2 + 1 + 2  # two layers per analyzed run, one row for the run without analysis
    first = rows[0]
    assert first["balance.scope"] == "global_batch" and first["seed"] == 0 and first["layer"] == 0
    assert first["nmi"] == 0.2 and first["nmi_plugin"] == pytest.approx(0.21)
    assert first["loss_gap"] == pytest.approx(-0.5) and first["cmi"] == 0.18
    assert first["cmi_low"] == 0.1 and first["docs_min"] == 31 and np.isnan(first["vocabulary"])
    assert np.isnan(first["dense_cv"]) and first["verdict"] == "specialist"
    # The run's cross-layer path measure is on each of its layer rows; a mode it lacks is nan.
    assert rows[0]["path_nmi"] == rows[1]["path_nmi"] == pytest.approx(0.3) and rows[0]["path_nmi_low"] == 0.2
    assert np.isnan(rows[0]["path_nmi_topk"]) and np.isnan(rows[0]["routing_use"])
    bare = rows[2]
    assert bare["layer"] is None and bare["seed"] == 1 and bare["loss_gap"] == pytest.approx(-0.5)
    table = markdown_table(rows, ["label", "layer", "nmi", "dense_cv"])
    assert table.splitlines()[2] == "| scope=global_batch, seed=0 | 0 | 0.2 | – |"
    with pytest.raises(FileNotFoundError, match="no run directory"):
        load_sweep(sweep / "balance=micro_batch,seed=0" / "models")


def test_run_overview_names_the_run_and_its_verdicts(sweep):
    text = run_overview(load_run(sweep / "balance=micro_batch,seed=0"))
    assert "balance `micro_batch`" in text and "**Verdict: specialist**" in text
    assert "MoE layer 1 (block 1): **specialist** (nmi: specialist)" in text


def test_domain_expert_from_records_counts_kept_assignments_and_gates():
    experts = np.array([[0, 1], [2, 1], [0, 2]])
    gates = np.array([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]], dtype=np.float32)
    kept = np.array([[True, True], [True, True], [True, False]])
    records = RoutingRecords(
        DOMAINS,
        np.arange(3),
        np.array([0, 1, 0]),
        np.arange(3),
        np.arange(3),
        [LayerRecords(experts, gates, kept)],
        3,
        2,
    )
    assert domain_expert_from_records(records, 0).tolist() == [[2, 1, 0], [0, 1, 1]]
    assert domain_expert_from_records(records, -1, "gate").tolist() == [[1.75, 0.25, 0], [0, 0.5, 0.5]]
    with pytest.raises(ValueError, match="out of range"):
        domain_expert_from_records(records, 1)
    with pytest.raises(ValueError, match="weighting"):
        domain_expert_from_records(records, 0, "prob")


def test_new_figures_draw_from_loaded_runs(sweep, tmp_path):
    s = load_sweep(sweep)
    run = s.runs[0]
    figures = {
        "by_domain": plot_domain_expert_heatmaps(run.summary),
        "by_expert": plot_domain_expert_heatmaps(run.summary, normalize="expert"),
        "arrays": plot_domain_expert_heatmaps([np.eye(2, 3)], DOMAINS, titles=["gates"], annotate=False),
        "information": plot_information(run.summary),
        "curves": plot_loss_curves(run.val_curves()),
        "sweep": plot_sweep(sweep_rows(s), by=s.main_axis),
        "sweep_by_label": plot_sweep(sweep_rows(s), metrics=("nmi", "maxvio")),
        "sweep_heatmaps": plot_sweep_heatmaps(s.summaries(), layer=-1, normalize="expert"),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure), name
        assert save_figure(fig, name, tmp_path) is fig
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert save_figure(figures["sweep"], "not_saved") is figures["sweep"]
    assert not (Path.cwd() / "not_saved.png").exists()


def test_figure_inputs_are_checked(sweep):
    s = load_sweep(sweep)
    summary = s.runs[0].summary
    with pytest.raises(ValueError, match="normalize"):
        plot_domain_expert_heatmaps(summary, normalize="layer")
    with pytest.raises(ValueError, match="titles"):
        plot_domain_expert_heatmaps(summary, titles=["one"])
    with pytest.raises(ValueError, match="unknown sweep metrics"):
        plot_sweep(sweep_rows(s), metrics=("accuracy",))
    with pytest.raises(ValueError, match="out of range"):
        plot_sweep_heatmaps(s.summaries(), layer=2)
    with pytest.raises(ValueError, match="domains"):
        plot_sweep_heatmaps({"x": summary, "y": {**summary, "domains": ["c", "d"]}})
    with pytest.raises(ValueError, match="no validation loss curves"):
        plot_loss_curves({"moe": {}})
