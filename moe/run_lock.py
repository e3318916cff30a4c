"""Guards of a run directory: an exclusive lock, so two runs never write into the same one, and a
check, before any work, that the run can write every place it will write to.

    check_writable(run_dir, ["moe", "dense_active"])   # RunDirNotWritable naming the path
    with run_dir_lock(run_dir):
        ...  # train, checkpoint, write the comparison

The lock is an OS advisory lock (fcntl.flock) on `<run_dir>/.lock`, which holds the owner's PID and
host for the message a second writer gets while the lock is held, and is emptied again on release
(so a refused run leaves it as it found it). The OS releases the lock when the process dies, so a
killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["RunDirLocked", "RunDirNotWritable", "check_writable", "os_error_reason", "run_dir_lock", "write_error"]

# Errors of a write that more retries will not fix: full disk or quota, permissions, read-only mount.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


class RunDirLocked(RuntimeError):
    """Another process holds the run directory."""


class RunDirNotWritable(PermissionError):
    """A path of the run directory that the run must write cannot be written (or a write failed for
    lack of space or permission); the message names the path and the fix."""


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of `run_dir` (created if needed) for the block; RunDirLocked at once
    if another process holds it, naming that process."""
    import fcntl  # POSIX only, like the rest of the launcher

    path = Path(run_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "an unknown process"
            raise RunDirLocked(
                f"{run_dir} is in use by {holder}; wait for it to finish, or give this run "
                "another directory (hydra.run.dir=...)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield path
        finally:
            # Still holding the lock: empty the holder line, so the lock file reads the same before
            # and after a run (a killed run leaves its line; the next holder overwrites it).
            f.truncate(0)
    finally:
        f.close()  # releases the lock


def run_dir_paths(run_dir: Path, model_names: Iterable[str]) -> tuple[list[Path], list[Path]]:
    """(directories, files) of `run_dir` that a training run writes into or rewrites."""
    dirs = [run_dir, run_dir / ".hydra", run_dir / "data", run_dir / "models"]
    files = [run_dir / name for name in (".lock", "config.yaml", "comparison.json", "comparison.md")]
    files += [run_dir / ".hydra" / f"{name}.yaml" for name in ("config", "hydra", "overrides")]
    if (run_dir / "data").is_dir():
        files += sorted(p for p in (run_dir / "data").iterdir() if p.is_file())
    for name in model_names:
        model_dir = run_dir / "models" / name
        dirs += [model_dir, model_dir / "checkpoints", model_dir / "tensorboard"]
        files.append(model_dir / "metrics.jsonl")
    return dirs, files


def check_writable(run_dir: str | Path, model_names: Iterable[str]) -> None:
    """Raise RunDirNotWritable naming the first place a run into `run_dir` would fail to write: an
    existing directory or file of the run that is not writable (a missing run directory: its nearest
    existing parent), or a directory of the run that is a file. Call it before any work, so a
    read-only run or checkpoint directory stops the run at once rather than at its first save."""
    run_dir = Path(run_dir)
    dirs, files = run_dir_paths(run_dir, model_names)
    if not run_dir.exists():
        parent = next(p for p in run_dir.parents if p.exists())
        dirs = [parent]
    for d in dirs:
        if d.exists() and not d.is_dir():
            raise RunDirNotWritable(
                f"{d} is a file where the run keeps a directory; move it away or choose "
                "another run directory (hydra.run.dir=...)"
            )
        if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
            raise RunDirNotWritable(
                f"cannot write into {d}: {_reason(d)}. Make it writable, or choose another "
                "run directory (hydra.run.dir=...)"
            )
    for f in files:
        if f.is_file() and not os.access(f, os.W_OK):
            raise RunDirNotWritable(
                f"cannot write {f}: {_reason(f)}. Make it writable, or choose another run directory (hydra.run.dir=...)"
            )


def _reason(path: Path) -> str:
    """Why `path` is not writable: a read-only file system, or its permissions."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    except OSError:
        pass
    return f"permission denied (mode {oct(path.stat().st_mode & 0o777)}, owner uid {path.stat().st_uid})"


def os_error_reason(exc: OSError) -> str:
    """The system's reason with its errno name, e.g. "No space left on device [ENOSPC]"."""
    if exc.errno is None:
        raise ValueError(f"os_error_reason needs an OSError with an errno, got {exc!r}")
    return f"{exc.strerror or os.strerror(exc.errno)} [{errno.errorcode.get(exc.errno, exc.errno)}]"


def write_error(exc: OSError, where: str | Path) -> RunDirNotWritable | None:
    """A one-line RunDirNotWritable for a failed write (full disk, quota, permissions, read-only
    mount), naming the file when the error knows it and `where` otherwise (a write to an open file
    does not know its name); None for other errors."""
    if exc.errno not in WRITE_ERRNOS:
        return None
    path = exc.filename or where
    reason = os_error_reason(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what, fix = f"cannot write {path}: {reason}", "free disk space (or quota)"
    else:
        what, fix = f"{path}: {reason}", "fix its permissions (or choose another run directory)"
    return RunDirNotWritable(f"{what}; {fix}, then run the same command again to resume from the last checkpoint")
