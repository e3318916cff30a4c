"""Checkpoints: atomic writes with a recorded digest, keep-last-N, loading that executes no code,
and a fallback past a corrupted newest file.

Layout of one trained model inside a run directory:
    <run_dir>/models/<name>/checkpoints/step_00000100.pt          the state (torch.save)
    <run_dir>/models/<name>/checkpoints/step_00000100.pt.sha256   its SHA-256 and size, written with it
A checkpoint is a dict: model, optimizer, step, rng, data (iterator position), fingerprint
(the config that decides the trajectory), config (the whole run config as a plain dict).

Loading uses `torch.load(weights_only=True)`: tensors, plain containers and numbers only (plus the
numpy array type of the saved RNG state), so analyzing a run directory someone sent you cannot
execute code hidden in its pickles. A state with a non-finite tensor is never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moe.config import as_plain_dict
from moe.run_lock import os_error_reason

if TYPE_CHECKING:
    from moe.config import TrainConfig
    from moe.model import ModelConfig

# A consolidated checkpoint is a file step_<8 digits>.pt; a sharded one a directory step_<8 digits>.dcp
# (moe.sharded_checkpoint).
_STEP_FILE = re.compile(r"step_(\d{8})\.(?:pt|dcp)$")
_TEMP_FILE = re.compile(r"^\.(step_\d{8}\.pt(?:\.sha256)?)\.tmp-(\d+)$")
_DIGEST_SUFFIX = ".sha256"
SHARDED_SUFFIX = ".dcp"


def _numpy_safe_globals() -> list[Any]:
    """What `weights_only` loading must allow for numpy's RNG state (an ndarray of uint32)."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def checkpoint_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "models" / name / "checkpoints"


def checkpoint_path(directory: str | Path, step: int, *, sharded: bool = False) -> Path:
    """Where the checkpoint of `step` goes in `directory`: step_<8 digits>.pt, or the directory
    step_<8 digits>.dcp of a sharded one (the names `list_checkpoints` finds)."""
    return Path(directory) / f"step_{step:08d}{SHARDED_SUFFIX if sharded else '.pt'}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in `directory` (consolidated files and sharded directories), oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(p, m) for p in directory.iterdir() if (m := _STEP_FILE.search(p.name))]
    return [p for p, _ in sorted(found, key=lambda pm: int(pm[1].group(1)))]


def _non_finite(tree: Any, prefix: str = "") -> Iterator[str]:
    """Dotted names of the floating tensors in `tree` that hold a nan or an inf."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            yield prefix.rstrip(".") or "<tensor>"
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _non_finite(value, f"{prefix}{key}.")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _non_finite(value, f"{prefix}{i}.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, or one in its cause/context chain. torch.save reports a
    full disk as `RuntimeError: ... unexpected pos 218816 vs 218704`, with the ENOSPC behind it."""
    seen = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError) and link.errno is not None:
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same directory: fsync, then rename over `path`. A
    failure removes the temporary file and raises CheckpointError naming `path` and the system's
    reason (no space left, permission denied, ...)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_failure(path, exc) from exc


def write_failure(path: Path, exc: BaseException) -> CheckpointError:
    """The error for a checkpoint write that failed: names `path` and the system's reason (no space
    left, permission denied, ...) with the fix, when an OSError is behind `exc`."""
    cause = _os_error(exc)
    if cause is None:
        return CheckpointError(f"could not write {path}: {type(exc).__name__}: {exc}")
    return CheckpointError(
        f"could not write {path}: {os_error_reason(cause)}; free disk space or fix "
        "the directory's permissions, then run the same command again to resume"
    )


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` to step_<step>.pt atomically (temporary file, fsync, rename) with its digest
    beside it, then delete all but the newest `keep_last` checkpoints. A crash mid-write leaves the
    previous ones intact. Refuses (CheckpointError) a state holding a non-finite tensor."""
    bad = list(_non_finite({"model": state.get("model"), "optimizer": state.get("optimizer")}))
    if bad:
        raise CheckpointError(
            f"refusing to write checkpoint step {step}: {bad[0]} holds non-finite values"
            + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    _write_atomic(path, lambda f: torch.save(state, f))
    digest = f"{_sha256(path)}  {path.stat().st_size}\n".encode()
    _write_atomic(path.with_name(path.name + _DIGEST_SUFFIX), lambda f: f.write(digest))
    prune_checkpoints(directory, keep_last)
    return path


def prune_checkpoints(directory: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` (at least one) checkpoints of either layout."""
    for old in list_checkpoints(directory)[: -max(1, keep_last)]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
            old.with_name(old.name + _DIGEST_SUFFIX).unlink(missing_ok=True)


def verify_checkpoint(path: str | Path) -> None:
    """Check `path` against the digest recorded when it was written (CheckpointError on a mismatch).
    A checkpoint written before digests were recorded passes unchecked."""
    path = Path(path)
    record = path.with_name(path.name + _DIGEST_SUFFIX)
    if not record.is_file():
        return
    try:
        want, size = record.read_text().split()
    except ValueError as exc:
        raise CheckpointError(f"the digest file {record} is malformed") from exc
    if _digest_problem(path, want, int(size)) is not None:
        raise CheckpointError(
            f"checkpoint {path} does not match the digest recorded when it was written "
            f"({record}): the file was modified or damaged after writing"
        )


def _digest_problem(path: Path, want: str, size: int) -> str | None:
    """What is wrong with `path` against its recorded SHA-256 and size (size first: no read), or None."""
    if not path.is_file():
        return "is missing"
    have = path.stat().st_size
    if have != size:
        return f"has {have} bytes, {size} when written"
    if _sha256(path) != want:
        return "does not match its digest"
    return None


DIRECTORY_DIGESTS = "files.sha256"  # in a sharded checkpoint: "<sha256> <bytes> <name>" per file


def checkpoint_files(directory: Path) -> list[str]:
    """The sorted names of the files in a checkpoint directory that its digest record covers."""
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != DIRECTORY_DIGESTS)


def file_digests(directory: Path, names: Iterable[str]) -> list[str]:
    """`DIRECTORY_DIGESTS` lines ("<sha256> <bytes> <name>") of the files `names` in `directory`: the
    ranks of a job each hash their share of a sharded checkpoint's files, rather than one rank all."""
    return [f"{_sha256(directory / n)} {(directory / n).stat().st_size} {n}\n" for n in names]


def write_directory_digests(directory: Path, lines: Iterable[str]) -> None:
    """Record the SHA-256 and size of every file in a checkpoint directory (`DIRECTORY_DIGESTS`; the
    `file_digests` lines of all of `checkpoint_files`, in any order), so that a shard damaged or truncated
    after writing is found before its bytes are loaded: the tensors in torch.distributed.checkpoint's
    files carry no checksum of their own."""
    text = "".join(sorted(lines, key=lambda line: line.split(" ", 2)[2]))
    _write_atomic(directory / DIRECTORY_DIGESTS, lambda f: f.write(text.encode()))


def verify_directory(directory: Path, share: tuple[int, int] = (0, 1)) -> None:
    """Check the files a checkpoint directory's digest record names, or with `share` = (i, n) the
    sorted names i, i + n, i + 2n, ... of them, one rank's share (CheckpointError naming the files
    that are missing, of another size or another digest). A directory written before digests were
    recorded passes unchecked."""
    record = directory / DIRECTORY_DIGESTS
    if not record.is_file():
        return
    entries: list[tuple[str, str, int]] = []  # (name, sha256, bytes)
    for line in record.read_text().splitlines():
        try:
            digest, size, name = line.split(" ", 2)
            entries.append((name, digest, int(size)))
        except ValueError as exc:
            raise CheckpointError(f"the digest file {record} is malformed") from exc
    index, parts = share
    bad = []
    for file, sha256, num_bytes in sorted(entries)[index::parts]:
        problem = _digest_problem(directory / file, sha256, num_bytes)
        if problem is not None:
            bad.append(f"{file} {problem}")
    if bad:
        raise CheckpointError(
            f"sharded checkpoint {directory} was modified or damaged after writing ({'; '.join(bad)}; "
            f"see {record.name}). Delete it to resume from the previous checkpoint in {directory.parent}, "
            "or start a new run directory."
        )


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    mmap: bool = False,
    tensors: bool = True,
    digest_share: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Verify a checkpoint's digest and load it without executing code (`weights_only=True`);
    anything wrong becomes a `CheckpointError` naming the file. mmap: map the tensors from the file
    instead of reading them (for a look at the metadata, e.g. the fingerprint). A sharded checkpoint
    (a step_*.dcp directory) is read whole into this process (`moe.sharded_checkpoint`), or with
    `tensors=False` its trainer state only (no "model" or "optimizer": the trainer reads its shards);
    `digest_share` = (i, n) verifies only its files of share i of n (`verify_directory`), the rest
    being some other rank's to verify."""
    path = Path(path)
    if path.suffix == SHARDED_SUFFIX:
        return _load_sharded_checkpoint(path, tensors, digest_share)
    verify_checkpoint(path)
    state = safe_load(path, map_location, mmap=mmap)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a moe-specialization checkpoint (no model/step entries)")
    return state


def _load_sharded_checkpoint(path: Path, tensors: bool, digest_share: tuple[int, int]) -> dict[str, Any]:
    from moe.sharded_checkpoint import TRAINER_FILE, consolidated_state

    missing = [name for name in (".metadata", TRAINER_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"sharded checkpoint {path} lacks {', '.join(missing)}: it is incomplete or damaged. Delete it to "
            f"resume from the previous checkpoint in {path.parent}, or start a new run directory."
        )
    verify_directory(path, digest_share)
    state = safe_load(path / TRAINER_FILE)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path / TRAINER_FILE} is not a moe-specialization trainer state (no step entry)")
    if not tensors:
        return state
    try:
        return {**state, **consolidated_state(path)}
    except Exception as exc:
        raise CheckpointError(f"sharded checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc


def safe_load(path: Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> Any:
    """torch.load without executing code (tensors, containers, numbers and numpy's RNG state only);
    CheckpointError naming the file when it cannot be read."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]}). It is corrupted, "
            "truncated or holds objects that loading without code execution refuses: delete it to resume from "
            f"the previous checkpoint in {path.parent}, or start a new run directory."
        ) from exc


def remove_orphaned_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes whose process is gone (killed mid-write);
    returns them. A temporary file of a live process is left alone."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TEMP_FILE.match(p.name)
        if m and not _alive(int(m.group(2))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Trainer fields that decide what a model learns (the rest is bookkeeping: logging, checkpoints,
# timeouts).
OPTIMIZATION_FIELDS = (
    "max_steps",
    "micro_batch_size",
    "grad_accum_steps",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "precision",
)
# Fields of the fingerprinted groups that do not change the computation (where caches live, when to
# warn): left out, and not compared where an older checkpoint recorded them, so that moving the
# data cache does not refuse a resume.
NOT_IN_FINGERPRINT = frozenset({"data.cache_dir", "data.hf.cache_dir", "data.max_upsample"})
# Fingerprint fields added after checkpoints without them were written: absent from an older
# checkpoint, they are not compared (the run they belong to did not record them).
LATER_FINGERPRINT_FIELDS = frozenset({"precision"})


def trajectory_fingerprint(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it: model, router, balance,
    data, seed, world size and optimization. The one definition both the trainer (at resume) and the
    analysis (a checkpoint against its run's config.yaml) compare with `check_fingerprint`."""
    plain = as_plain_dict(cfg)
    fingerprint = {
        "model": as_plain_dict(model_cfg),
        "router": plain["router"],
        "balance": plain["balance"],
        "data": plain["data"],
        "seed": cfg.seed,
        "world_size": world_size,
        **{k: plain["trainer"][k] for k in OPTIMIZATION_FIELDS},
    }
    for dotted in NOT_IN_FINGERPRINT:
        *parents, leaf = dotted.split(".")
        node = fingerprint
        for key in parents:
            node = node.get(key) or {}
        node.pop(leaf, None)
    return fingerprint


def _layout_free(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat fingerprint with `world_size` and `grad_accum_steps` folded into their product,
    `micro_batches_per_step`: the ranks and the accumulation shape a step only through the
    micro-batches it takes (each `micro_batch_size` sequences, fixed slices of one stream), so a run
    resumes at another world size with grad_accum_steps scaled to keep the product. Not under
    global_batch balancing, whose counts accumulate over the micro-steps in order."""
    if flat.get("balance.scope") == "global_batch" or not {"world_size", "grad_accum_steps"} <= flat.keys():
        return flat
    flat = dict(flat)
    flat["micro_batches_per_step (world_size x grad_accum_steps)"] = flat.pop("world_size") * flat.pop(
        "grad_accum_steps"
    )
    return flat


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume from a checkpoint whose trajectory-defining config differs; the message
    names every differing field (dotted)."""
    saved, current = _layout_free(_flatten(saved)), _layout_free(_flatten(current))
    # A router field the checkpoint recorded and the current router kind does not have (the flat
    # router config of earlier versions listed every kind's fields) cannot have shaped the run; a
    # different kind is caught by router.kind itself.
    retired = {k for k in saved if k.startswith("router.") and k not in current}
    keys = sorted(
        (set(saved) | set(current))
        - NOT_IN_FINGERPRINT
        - retired
        - {k for k in LATER_FINGERPRINT_FIELDS if k not in saved}
    )
    diffs = [f"{k}: checkpoint={saved.get(k)!r} now={current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by a different configuration:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the original settings, or start a new run directory (hydra.run.dir=...)."
        )


def latest_checkpoint(run_dir: str | Path, name: str) -> Path | None:
    files = list_checkpoints(checkpoint_dir(run_dir, name))
    return files[-1] if files else None


def latest_good_checkpoint(
    run_dir: str | Path,
    name: str,
    map_location: str | torch.device = "cpu",
    *,
    mmap: bool = False,
    tensors: bool = True,
    digest_share: tuple[int, int] = (0, 1),
    agree: Callable[[str | None], str | None] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of model `name` that verifies and loads, with its state; newer ones
    that do not are skipped with a warning naming them and the one used. None without checkpoints;
    CheckpointError when every one is bad.

    The ranks of a job split verifying a sharded checkpoint: each passes its `digest_share` = (rank,
    ranks) and an `agree` collective that hands every rank the first problem any rank found with a
    checkpoint (None when none did), so that all of them skip the same ones."""
    if digest_share[1] > 1 and agree is None:
        raise ValueError("a digest_share of several ranks needs `agree`: the other ranks verify the other files")
    files = list_checkpoints(checkpoint_dir(run_dir, name))
    bad: list[str] = []
    for path in reversed(files):
        problem = None
        try:
            state = load_checkpoint(path, map_location, mmap=mmap, tensors=tensors, digest_share=digest_share)
        except CheckpointError as exc:
            problem = str(exc)
        if agree is not None:
            problem = agree(problem)
        if problem is not None:
            bad.append(problem)
            continue
        if bad:
            warnings.warn(
                f"skipped {len(bad)} bad checkpoint(s), resuming from {path}:\n  " + "\n  ".join(bad), stacklevel=2
            )
        return path, state
    if bad:
        raise CheckpointError(
            f"no usable checkpoint of {name!r} in {checkpoint_dir(run_dir, name)}:\n  "
            + "\n  ".join(bad)
            + "\nStart a new run directory (hydra.run.dir=...)."
        )
    return None
