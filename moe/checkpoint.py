"""Checkpoints: atomic writes, keep-last-N, clear errors for corrupted or mismatched files.

Layout of one trained model inside a run directory:
    <run_dir>/models/<name>/checkpoints/step_00000100.pt
A checkpoint is a dict: model, optimizer, step, rng, data (iterator position), fingerprint
(the config that decides the trajectory), config (the whole run config as a plain dict).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_STEP_FILE = re.compile(r"step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def checkpoint_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "models" / name / "checkpoints"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = [p for p in directory.iterdir() if _STEP_FILE.search(p.name)]
    return sorted(files, key=lambda p: int(_STEP_FILE.search(p.name).group(1)))


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` to step_<step>.pt atomically (temporary file, fsync, rename), then delete all
    but the newest `keep_last` checkpoints. A crash mid-write leaves the previous ones intact."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(directory)[:-max(1, keep_last)]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, turning unreadable files into a `CheckpointError`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}). It is corrupted or "
            f"truncated: delete it to resume from the previous checkpoint in {path.parent}, or start a "
            f"new run directory.") from exc
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a moe-specialization checkpoint (no model/step entries)")
    return state


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume from a checkpoint whose trajectory-defining config differs; the message
    names every differing field (dotted)."""
    saved, current = _flatten(saved), _flatten(current)
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint={saved.get(k)!r} now={current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by a different configuration:\n  " + "\n  ".join(diffs)
            + "\nResume with the original settings, or start a new run directory (hydra.run.dir=...).")


def latest_checkpoint(run_dir: str | Path, name: str) -> Path | None:
    files = list_checkpoints(checkpoint_dir(run_dir, name))
    return files[-1] if files else None
