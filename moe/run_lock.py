"""An exclusive lock on a run directory, so two runs never write into the same one.

    with run_dir_lock(run_dir):
        ...  # train, checkpoint, write the comparison

The lock is an OS advisory lock (fcntl.flock) on `<run_dir>/.lock`, which also holds the owner's PID
and host for the message a second writer gets. The OS releases it when the process dies, so a
killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

__all__ = ["RunDirLocked", "run_dir_lock"]


class RunDirLocked(RuntimeError):
    """Another process holds the run directory."""


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
            raise RunDirLocked(f"{run_dir} is in use by {holder}; wait for it to finish, or give this run "
                               "another directory (hydra.run.dir=...)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield path
    finally:
        f.close()  # releases the lock
