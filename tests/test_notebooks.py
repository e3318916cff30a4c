"""The notebooks: committed clean (no outputs, python3 kernel, a papermill `parameters` cell) and
executed end to end with nbclient on tiny runs trained here, in a fake multirun layout.

Parameters are injected the way papermill does it: a code cell tagged `injected-parameters`,
placed right after the cell tagged `parameters`, so the notebook's defaults are overridden.
Every notebook saves its figures into the injected `figures_dir`; the tests check the PNG files
and the `image/png` outputs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from hydra import compose, initialize_config_module
from nbclient import NotebookClient

from analysis.report import AnalysisConfig
from analysis.run import analyze_run
from analysis.runs import find_runs, load_sweep
from moe.config import register_configs, to_train_config
from moe.train import run_experiment

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))
# Small analysis settings: the run dirs are complete but cheap (a few seconds each).
FAST = AnalysisConfig(n_permutations=20, n_bootstrap=20, knockout_tokens=256, probe_tokens=256)
# A sweep of balance scope x seed, as `moe-train -m balance=... seed=...` would lay it out.
JOBS = {
    "balance=micro_batch,seed=0": ("balance=micro_batch", "seed=0"),
    "balance=global_batch,seed=1": ("balance=global_batch", "seed=1"),
}


def test_there_are_notebooks():
    assert {p.name for p in ALL} >= {"specialization.ipynb", "sweep.ipynb"}


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """Why a notebook is not fit to commit: outputs, execution counts, a kernel other than python3,
    extra metadata, not exactly one code cell tagged `parameters` (with a `figures_dir`)."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            if cell.outputs:
                found.append(f"cell {i} has outputs: clear them before committing")
            if cell.execution_count is not None:
                found.append(f"cell {i} has an execution count")
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        found.append(f"kernelspec is {nb.metadata.get('kernelspec')}, not python3")
    if set(nb.metadata) - {"kernelspec", "language_info"}:
        found.append(f"extra notebook metadata {sorted(set(nb.metadata) - {'kernelspec', 'language_info'})}")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1 or tagged[0].cell_type != "code" or "figures_dir = None" not in tagged[0].source:
        found.append("needs exactly one code cell tagged parameters, setting figures_dir = None")
    return found


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_committed_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert problems(nb) == [], path.name


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """Two tiny analyzed runs under multirun/<date>/<time>/<job>/ (about 10 s on one CPU thread)."""
    register_configs()
    root = tmp_path_factory.mktemp("multirun") / "2026-01-01" / "00-00-00"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job, overrides in JOBS.items():
            with initialize_config_module(config_module="moe.conf", version_base="1.3"):
                cfg = to_train_config(
                    compose(
                        config_name="train",
                        overrides=["experiment=smoke", "analyze=false", "data.val_tokens_per_domain=4096", *overrides],
                    )
                )
            run_experiment(cfg, root / job)
            analyze_run(root / job, FAST)
    finally:
        torch.set_num_threads(threads)
    return root


def execute(name: str, params: dict, cwd: Path) -> nbformat.NotebookNode:
    """Run notebooks/<name> with `params` injected after its parameters cell; returns the executed notebook."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def png_outputs(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel spec runs `python`: make it this interpreter, on one thread."""
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_sweep_fixture_is_found_as_a_sweep(sweep_dir):
    assert len(find_runs(sweep_dir)) == 2
    sweep = load_sweep(sweep_dir)
    assert sweep.axes == ["balance.scope", "seed"] and sweep.main_axis == "balance.scope"


SPECIALIZATION_FIGURES = {
    "domain_expert_by_domain",
    "domain_expert_by_expert",
    "domain_expert_gate_weighted",
    "nmi",
    "information",
    "knockout",
    "cka",
    "loss_curves",
    "loss",
}
SWEEP_FIGURES = {"sweep", "sweep_domain_expert_by_domain", "sweep_domain_expert_by_expert"}


def test_specialization_notebook_runs_on_a_run_dir(sweep_dir, tmp_path, kernel_env):
    run_dir = sweep_dir / "balance=micro_batch,seed=0"
    nb = execute("specialization.ipynb", {"run_dir": str(run_dir), "figures_dir": str(tmp_path / "figs")}, tmp_path)
    saved = {p.stem for p in (tmp_path / "figs").glob("*.png")}
    assert saved == SPECIALIZATION_FIGURES
    assert all(p.stat().st_size > 5000 for p in (tmp_path / "figs").glob("*.png"))
    assert png_outputs(nb) == len(SPECIALIZATION_FIGURES)
    text = "".join(
        o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert str(run_dir) in text and "**Verdict:" in text and "## Verdict per layer" in text
    assert "cell 3 has outputs: clear them before committing" in problems(nb)  # the check catches an executed one


def test_sweep_notebook_runs_on_a_multirun_dir(sweep_dir, tmp_path, kernel_env):
    nb = execute("sweep.ipynb", {"sweep_dir": str(sweep_dir), "figures_dir": str(tmp_path / "figs")}, tmp_path)
    assert {p.stem for p in (tmp_path / "figs").glob("*.png")} == SWEEP_FIGURES
    assert png_outputs(nb) == len(SWEEP_FIGURES)
    text = "".join(
        o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "2 runs under" in text and "scope=global_batch, seed=1" in text
