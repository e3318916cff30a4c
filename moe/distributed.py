"""torch.distributed set-up for `torchrun` launches: NCCL on GPU, gloo on CPU.

Single-process runs need no launcher: without torchrun's environment this is a no-op context.

A collective waits at most `trainer.dist_timeout_s` for the other ranks. With gloo the waiting
ranks then raise; `collectives_watched` turns that into `RankStalled`, naming the rank(s) that
stopped answering: each waiting rank marks itself in the process group's key-value store, and the
ranks that leave no mark within a short grace period are the ones that stalled. (NCCL's watchdog
aborts the process at the timeout instead; its log names the collective.)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.validation import check_choice

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float | None = None  # the collectives' timeout (None: torch's default)

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
    check_choice("trainer.device", name, DEVICES)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available; use trainer.device=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class RankStalled(RuntimeError):
    """A collective timed out because one or more ranks stopped answering; the message names them."""


def init_distributed(device_name: str, timeout_s: float | None = None) -> DistContext:
    """Join the process group torchrun describes (if any) and pick this rank's device. `timeout_s`
    bounds every collective (torch's default, 30 minutes, when None)."""
    if not launched_by_torchrun():
        return DistContext(0, 1, 0, resolve_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world, timeout=timeout
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(rank, world, local_rank, device, timeout_s)


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's value on every rank (e.g. the run directory, so all ranks agree on it)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def first_problem(problem: str | None, ctx: DistContext) -> str | None:
    """The problem of the lowest rank that has one (None when none has): every rank the same verdict,
    e.g. on a checkpoint whose files the ranks verified in shares, or one only some ranks could read."""
    return next((p for p in all_gather_objects(problem, ctx) if p is not None), None)


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


def _is_timeout(exc: BaseException) -> bool:
    """Whether `exc` is a collective's timeout (gloo: "Timed out waiting 600000ms for recv ...")."""
    message = str(exc).lower()
    return "timed out" in message or "timeout" in message


def _silent_ranks(ctx: DistContext, grace_s: float) -> list[int] | None:
    """The ranks that, unlike this one, did not report a timed-out collective within `grace_s`:
    those that stopped answering. None if the store cannot tell (it may live in the stalled rank)."""
    key = "moe/collective_timed_out/{}".format
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=grace_s))
        store.set(key(ctx.rank), "1")
        deadline = time.monotonic() + grace_s
        while True:
            silent = [r for r in range(ctx.world_size) if not store.check([key(r)])]
            if not silent or time.monotonic() >= deadline:
                return silent
            time.sleep(0.1)
    except Exception:  # the store's own timeout or a lost connection: no answer to give
        return None


@contextlib.contextmanager
def collectives_watched(ctx: DistContext) -> Iterator[None]:
    """Turn a collective's timeout inside the block into RankStalled naming the rank(s) that stopped
    answering (see the module docstring); other errors pass through unchanged."""
    try:
        yield
    except RuntimeError as exc:
        if not (ctx.enabled and dist.is_initialized() and _is_timeout(exc)):
            raise
        # The waiting ranks time out within about one step of each other; a few seconds covers that.
        silent = _silent_ranks(ctx, grace_s=min(5.0, max(1.0, (ctx.timeout_s or 10.0) / 2)))
        if silent:
            who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering"
        elif silent is None:
            who = "a rank stopped answering (which one is unknown: the key-value store did not answer either)"
        else:
            who = "every rank timed out waiting for the others (they are in different collectives: a bug)"
        waited = f"{ctx.timeout_s:g} s (trainer.dist_timeout_s)" if ctx.timeout_s else "torch's default timeout"
        raise RankStalled(
            f"{who}: rank {ctx.rank} waited {waited} for the others' part of a collective operation "
            f"({str(exc).splitlines()[0][-200:]}). Check that process (stopped, swapping, stuck on I/O) or its "
            "machine; raise trainer.dist_timeout_s if a step legitimately takes longer. Then rerun the same "
            "command to resume from the last checkpoint."
        ) from exc
