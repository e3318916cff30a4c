"""Analyze a finished training run from its directory alone (checkpoints + data/)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from analysis.report import AnalysisConfig, analyze_model
from moe.checkpoint import OPTIMIZATION_FIELDS, CheckpointError, latest_checkpoint
from moe.config import config_dict
from moe.data import load_prepared
from moe.loading import load_model

__all__ = ["analyze_run", "require_domains", "training_identity", "twin_mismatches"]


def require_domains(domains: Sequence[str], where: str) -> None:
    """Refuse (ValueError) to analyze fewer than two domains: with one, every measure of domain
    specialization is empty (there is nothing to tell apart) and a verdict would be meaningless."""
    if len(domains) < 2:
        raise ValueError(
            f"{where} has {len(domains)} domain(s) {list(domains)}; analyzing domain specialization "
            "needs at least two. Train (or evaluate) on a corpus with two or more domains."
        )


def training_identity(run_dir: Path) -> dict[str, Any]:
    """What decides the models a run trains, bookkeeping aside: data stream, model config and
    optimization (the trainer fields of the resume fingerprint, `moe.checkpoint.OPTIMIZATION_FIELDS`);
    two runs with equal identities train identical dense twins. Router and balance are left out: they
    vary between the MoE arms of a sweep and do not touch the dense twins."""
    config_file, manifest_file = run_dir / "config.yaml", run_dir / "data" / "manifest.json"
    for f in (config_file, manifest_file):
        if not f.is_file():
            raise CheckpointError(f"{f} does not exist: {run_dir} is not a complete moe-train run directory")
    config = config_dict(OmegaConf.load(config_file))
    trainer = config.get("trainer", {})
    return {
        "data stream (data/manifest.json stream_fingerprint: corpus, tokenizer, split, seed)": json.loads(
            manifest_file.read_text()
        )["stream_fingerprint"],
        "model config": config.get("model"),
        **{f"trainer.{k}": trainer.get(k) for k in OPTIMIZATION_FIELDS},
    }


def twin_mismatches(run_dir: str | Path, twin_run: str | Path) -> list[str]:
    """Why the dense twins trained in `twin_run` are not the twins of the MoE of `run_dir` (same
    model config, data stream and optimization): one line per differing item; [] = they are."""
    a, b = training_identity(Path(run_dir)), training_identity(Path(twin_run))
    return [f"{key}: {a[key]!r} vs {b[key]!r}" for key in a if a[key] != b[key]]


def analyze_run(
    run_dir: str | Path,
    cfg: AnalysisConfig | None = None,
    *,
    model: str = "moe",
    twin: str | None = "dense_active",
    twin_run: str | Path | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Record, measure and report the MoE of a run into `out_dir` (default `<run_dir>/analysis/`);
    returns the summary.

    `twin` names the dense control, taken from `twin_run` when given (a run that trained the twins
    without the MoE, `twin.only=true`, on the same data stream, model config and optimization;
    checked) and from `run_dir` otherwise.
    """
    run_dir = Path(run_dir)
    twin_dir = run_dir
    if twin_run is not None:
        twin_dir = Path(twin_run)
        problems = twin_mismatches(run_dir, twin_dir)
        if problems:
            raise ValueError(
                f"the models of {twin_dir} are not the twins of the MoE of {run_dir}; they differ in\n  "
                + "\n  ".join(problems)
                + "\nTrain the twins with the same data, seed, model and trainer."
            )
    data = load_prepared(run_dir)
    require_domains(data.domains, f"the run {run_dir}")
    val = {d: data.val_batches(batch_size=batch_size, domain=d) for d in data.domains}
    moe_model = load_model(run_dir, model, device)
    if twin_run is not None and twin and latest_checkpoint(twin_dir, twin) is None:
        raise CheckpointError(f"no checkpoint of the twin {twin!r} in {twin_dir}")
    twin_model = load_model(twin_dir, twin, device) if twin and latest_checkpoint(twin_dir, twin) else None
    comparison = {}
    for source in dict.fromkeys((run_dir, twin_dir)):
        comparison_file = source / "comparison.json"
        if comparison_file.exists():
            table = json.loads(comparison_file.read_text())
            # The analyzed model and its twin are evaluated again by analyze_model; list the others only.
            comparison.update({name: row["val_loss"] for name, row in table.items() if name not in (model, twin)})
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    return analyze_model(
        moe_model,
        val,
        data.domains,
        out,
        dense_twin=twin_model,
        comparison=comparison or None,
        cfg=cfg,
        data_splits=data.split_counts(),
        data_warnings=data.manifest.get("warnings"),
    )
