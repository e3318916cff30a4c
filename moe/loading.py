"""A trained model from its run directory: the one loader the analysis, the export and notebooks use."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moe.checkpoint import CheckpointError, check_fingerprint, latest_good_checkpoint, trajectory_fingerprint
from moe.config import config_object, models_to_train, to_train_config
from moe.model import LanguageModel, ModelConfig
from moe.routers import resolve_router_config


def check_checkpoint_matches_run(run_dir: Path, name: str, path: Path, state: dict[str, Any]) -> None:
    """Refuse (CheckpointError) a checkpoint that the config of its run directory (config.yaml, which
    data/ was prepared with) did not write: the same fingerprint and comparison as a resume. A run
    directory without config.yaml, or with one this version cannot read, is not checked (a warning)."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return
    try:
        run_cfg = OmegaConf.load(config_file)
        if not isinstance(run_cfg, DictConfig):
            raise TypeError(f"it holds a {type(run_cfg).__name__}, not a mapping")
        cfg = to_train_config(run_cfg, stored=True)
    except Exception as exc:  # an older or hand-edited config.yaml: load what is there, unchecked
        warnings.warn(f"cannot check {path} against {config_file} ({exc}); loading it unchecked", stacklevel=3)
        return
    model_cfg = dict(models_to_train(cfg)).get(name)
    if model_cfg is not None:
        saved = state["fingerprint"]
        check_fingerprint(saved, trajectory_fingerprint(cfg, model_cfg, saved.get("world_size", 1)), path)


def load_model(run_dir: str | Path, name: str, device: str | torch.device = "cpu") -> LanguageModel:
    """The newest good checkpoint of model `name` (e.g. `moe`, `dense_active`) of a moe-train run, in
    eval mode with the native experts backend (whatever backend trained it), checked against the
    run's config.yaml."""
    found = latest_good_checkpoint(run_dir, name, map_location=device)
    if found is None:
        raise CheckpointError(
            f"no checkpoint of model {name!r} under {Path(run_dir) / 'models' / name / 'checkpoints'}; "
            "is this a moe-train run directory, and did the model train?"
        )
    path, state = found
    check_checkpoint_matches_run(Path(run_dir), name, path, state)
    return model_from_state(state, device)


def model_from_state(state: dict[str, Any], device: str | torch.device = "cpu") -> LanguageModel:
    """The model a loaded checkpoint (`moe.checkpoint.load_checkpoint`) holds, in eval mode."""
    model_cfg = config_object(
        ModelConfig, OmegaConf.merge(OmegaConf.structured(ModelConfig), state["fingerprint"]["model"])
    )
    router_cfg = resolve_router_config(state["config"]["router"], stored=True)
    vocab_size = state["model"]["embed.weight"].shape[0]
    model = LanguageModel(model_cfg, vocab_size, router_cfg).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


__all__ = ["check_checkpoint_matches_run", "load_model", "model_from_state"]
