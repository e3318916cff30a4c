"""Progress bars of the long analysis loops (tqdm): recording, knockouts, checkpoints, sweep jobs.

On when stderr is a terminal, off otherwise (logs, CI, notebooks' captured output); the environment
variable MOE_PROGRESS=1/0 forces them on/off, and `analysis.progress=true|false` (AnalysisConfig)
does so for one analysis:

    with progress_bars(cfg.progress):        # None: the default rule above
        for batch in progress(batches, desc="recording"):
            ...
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "progress_bars", "progress_enabled"]

T = TypeVar("T")
_forced: list[bool | None] = [None]  # set by progress_bars for the duration of a block


def progress_enabled() -> bool:
    """Whether bars are drawn now: progress_bars' setting, else MOE_PROGRESS, else stderr is a TTY."""
    if _forced[-1] is not None:
        return bool(_forced[-1])
    env = os.environ.get("MOE_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("", "0", "false", "no", "off")
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bars(enabled: bool | None) -> Iterator[None]:
    """Force bars on (True) or off (False) inside the block; None keeps the default rule."""
    _forced.append(enabled)
    try:
        yield
    finally:
        _forced.pop()


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
    """`iterable` itself when bars are off, else a tqdm bar over it (cleared when done)."""
    if not progress_enabled():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)
