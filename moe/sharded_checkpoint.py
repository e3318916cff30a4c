"""Sharded checkpoints through `torch.distributed.checkpoint` (`trainer.parallel.checkpoint=sharded`).

A consolidated checkpoint (`moe.checkpoint`) gathers the whole model and optimizer state into one
file: simple, but every byte passes through one rank. A sharded one lets each rank write the parts
it holds, and read back, at any world size and layout, the parts it holds then (FSDP2 shards, E/ep
experts, replicated tensors written once):

    <run_dir>/models/<name>/checkpoints/step_00000100.dcp/
        .metadata, __<rank>_0.distcp   torch.distributed.checkpoint's files: model and optimizer
        trainer.pt                     the rest of the step's state (step, data position, RNG,
                                       fingerprint, config), as in a consolidated checkpoint
        files.sha256                   each file's SHA-256 and size, checked before a load (the
                                       ranks hash and check the files in shares)

Expert-parallel weights are saved as what they are, row blocks of the layer's [E, ...] tensors (a
DTensor on the (dp, ep) mesh: replicated over dp, sharded over ep), so the saved tensors have the
one-process shapes and names. The directory is written under a temporary name and renamed when
every rank has finished, so a listed checkpoint is complete. The training's last checkpoint is
always consolidated (the analysis reads it); `consolidated_state` reads a sharded one in one process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from moe.distributed import all_gather_objects, broadcast_object
from moe.parallel import local_tensor, per_element

if TYPE_CHECKING:
    from moe.parallel import Parallelism

TRAINER_FILE = "trainer.pt"


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, parallel: Parallelism) -> dict[str, Any]:
    """{"model", "optimizer"} as torch.distributed.checkpoint reads and writes them: parameter names as
    keys, every tensor a DTensor or a plain (replicated) tensor of the one-process shape."""
    model_state: dict[str, Any] = dict(get_model_state_dict(model))
    # torch types the optimizer state loosely: it is {"state": {name: {key: value}}, "param_groups": [...]}.
    optim_state = cast(dict[str, Any], get_optimizer_state_dict(model, optimizer))
    if parallel.expert_params:
        experts = parallel.expert_params
        as_global = parallel.expert_dtensor
        model_state = {k: as_global(v) if k in experts else v for k, v in model_state.items()}
        per_param: dict[str, dict[str, Any]] = optim_state["state"]
        optim_state = {
            **optim_state,
            "state": {
                name: {k: as_global(v) if name in experts and per_element(v) else v for k, v in state.items()}
                for name, state in per_param.items()
            },
        }
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(path: Path, state: dict[str, Any], trainer_state: dict[str, Any], parallel: Parallelism) -> Path:
    """Write `state` (from `sharded_state`; every rank its own parts) and rank 0's `trainer_state`
    into the directory `path` (step_<step>.dcp), atomically: a collective, every rank calls it."""
    ctx = parallel.ctx
    tmp = path.with_name(f".{path.name}.tmp")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a write that was killed
        tmp.mkdir(parents=True)
    _barrier(ctx.enabled)
    try:
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=tmp, no_dist=not ctx.enabled)
        from moe.checkpoint import checkpoint_files, file_digests, write_directory_digests

        names = None
        if ctx.is_main:
            torch.save(trainer_state, tmp / TRAINER_FILE)
            # dcp.save returns once every rank's files are written (rank 0 writes .metadata last).
            names = checkpoint_files(tmp)
        # Rank 0's listing for all (a shared file system may list late on another node); each rank
        # hashes its share of the files.
        names = broadcast_object(names, ctx)
        digests = all_gather_objects(file_digests(tmp, names[ctx.rank :: ctx.world_size]), ctx)
        if ctx.is_main:
            write_directory_digests(tmp, [line for share in digests for line in share])
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    except Exception as exc:  # a full disk or a permission: the message names the directory and the fix
        from moe.checkpoint import write_failure

        raise write_failure(path, exc) from exc
    _barrier(ctx.enabled)
    return path


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, parallel: Parallelism) -> None:
    """Read the parts of a sharded checkpoint this rank holds in the current layout into `model` and
    `optimizer` (the saved layout may differ: torch.distributed.checkpoint reshards)."""
    state = sharded_state(model, optimizer, parallel)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=not parallel.ctx.enabled)
    if parallel.expert_params:  # back from the DTensor views to this rank's rows
        state["model"] = {k: local_tensor(v) for k, v in state["model"].items()}
        per_param: dict[str, dict[str, Any]] = state["optimizer"]["state"]
        state["optimizer"]["state"] = {
            name: {k: local_tensor(v) for k, v in s.items()} for name, s in per_param.items()
        }
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def consolidated_state(path: Path) -> dict[str, Any]:
    """A sharded checkpoint read whole in this process: its trainer state with "model" (full tensors,
    the one-process names and shapes) and "optimizer" (keyed by parameter name). For the analysis;
    the memory of the whole model, as a consolidated checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from moe.checkpoint import safe_load

    trainer_state = safe_load(path / TRAINER_FILE)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        whole = Path(tmp) / "whole.pt"
        with _quiet_single_process():
            dcp_to_torch_save(path, whole)
        tensors = safe_load(whole)
    return {**trainer_state, **tensors}


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every one-process save and load that it assumes one
    process; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier(enabled: bool) -> None:
    if enabled:
        dist.barrier()
