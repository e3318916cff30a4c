"""Analyze a finished training run from its directory alone (checkpoints + data/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from analysis.report import AnalysisConfig, analyze_model
from moe.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from moe.data import load_prepared
from moe.model import LanguageModel, ModelConfig
from moe.routing import RouterConfig


def load_trained_model(run_dir: str | Path, name: str, device: str | torch.device = "cpu") -> LanguageModel:
    """The newest checkpoint of model `name` (e.g. `moe`, `dense_active`) in eval mode."""
    path = latest_checkpoint(run_dir, name)
    if path is None:
        raise CheckpointError(f"no checkpoint of model {name!r} under {Path(run_dir) / 'models' / name / 'checkpoints'}; "
                              "is this a moe-train run directory, and did the model train?")
    state = load_checkpoint(path, map_location=device)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), state["fingerprint"]["model"]))
    router_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RouterConfig), state["config"]["router"]))
    vocab_size = state["model"]["embed.weight"].shape[0]
    model = LanguageModel(model_cfg, vocab_size, router_cfg).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


def analyze_run(run_dir: str | Path, cfg: AnalysisConfig | None = None, *, model: str = "moe",
                twin: str | None = "dense_active", batch_size: int = 16, device: str = "cpu",
                out_dir: str | Path | None = None) -> dict[str, Any]:
    """Record, measure and report the MoE of a run into `out_dir` (default `<run_dir>/analysis/`);
    returns the summary."""
    run_dir = Path(run_dir)
    data = load_prepared(run_dir)
    val = {d: data.val_batches(batch_size=batch_size, domain=d) for d in data.domains}
    moe_model = load_trained_model(run_dir, model, device)
    twin_model = load_trained_model(run_dir, twin, device) if twin and latest_checkpoint(run_dir, twin) else None
    comparison = None
    comparison_file = run_dir / "comparison.json"
    if comparison_file.exists():
        table = json.loads(comparison_file.read_text())
        # The analyzed model and its twin are evaluated again by analyze_model; list the others only.
        comparison = {name: row["val_loss"] for name, row in table.items() if name not in (model, twin)}
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    return analyze_model(moe_model, val, data.domains, out, dense_twin=twin_model,
                         comparison=comparison, cfg=cfg)
