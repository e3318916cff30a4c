"""Keep freed CPU buffers in the process instead of handing them back to the operating system.

PyTorch caches GPU memory but not CPU memory: a CPU tensor comes from malloc and goes back to it.
glibc's malloc serves a block above its mmap threshold (adaptive, at most 32 MiB) with fresh pages
from the kernel and returns freed memory at the top of the heap to it, so a buffer of that size
allocated every step pays one page fault per 4 KiB page on first touch, every step. An MoE layer
allocates T*k rows where the dense layer allocates T, so it pays k times as much: on a 2-core CPU
(torch 2.13, E=64 k=8 d=256 f=64, 4096 tokens, forward+backward) the layer took 165 ms with the
default settings and 110 ms with this one; its FLOP-matched dense MLP took ~52 ms either way.
Setting both thresholds high makes malloc reuse the same memory step after step, the way jemalloc
or tcmalloc under LD_PRELOAD do in PyTorch's CPU performance guide. The cost: the process keeps
its peak heap instead of shrinking after it.

Training calls this at start (`trainer.retain_host_memory`), as do the benchmarks; importing the
package never changes the allocator.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks below this come from the reusable heap. glibc keeps its mmap threshold below 32 MiB
# unless told otherwise; 1 GiB covers the T*k-row buffers of any CPU-sized run.
RETAIN_UP_TO_BYTES = 1 << 30
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def retain_freed_memory(up_to_bytes: int = RETAIN_UP_TO_BYTES) -> bool:
    """Serve CPU blocks up to `up_to_bytes` from the heap and never trim it. Returns whether the
    allocator took the setting (False, and nothing changed, off glibc)."""
    if not 0 < up_to_bytes <= _INT_MAX:
        raise ValueError(f"up_to_bytes={up_to_bytes} must lie in (0, {_INT_MAX}] (mallopt takes a C int)")
    libc = _glibc()
    if libc is None:
        return False
    # Trim only past 2 GiB of free heap: one step's buffers stay for the next.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, up_to_bytes)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX))
