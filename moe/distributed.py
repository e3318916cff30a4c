"""torch.distributed set-up for `torchrun` launches: NCCL on GPU, gloo on CPU.

Single-process runs need no launcher: without torchrun's environment this is a no-op context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> cuda:<local_rank> when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available; use trainer.device=cpu or auto")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"trainer.device={name!r} is unknown; allowed values: auto, cpu, cuda")
    return torch.device("cpu")


def init_distributed(device_name: str) -> DistContext:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    if not launched_by_torchrun():
        return DistContext(0, 1, 0, resolve_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(rank, world, local_rank, device)


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's value on every rank (e.g. the run directory, so all ranks agree on it)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return value


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
