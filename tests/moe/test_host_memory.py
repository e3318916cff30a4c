"""retain_freed_memory: large CPU buffers come from the reusable heap instead of fresh pages."""

import platform
import subprocess
import sys
import textwrap

import pytest

from moe.host_memory import retain_freed_memory

# Bytes glibc holds in mmap'd blocks (mallinfo2().hblkhd) after allocating, then while holding, a 64 MiB tensor.
PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    from moe.host_memory import retain_freed_memory
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    before = libc.mallinfo2().hblkhd
    buffer = torch.empty(16 * 2**20)  # 64 MiB
    print(libc.mallinfo2().hblkhd - before)
""")


def mmapped_growth(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def has_mallinfo2() -> bool:
    libc, version = platform.libc_ver()
    return platform.system() == "Linux" and libc == "glibc" and tuple(map(int, version.split("."))) >= (2, 33)


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_large_buffers_come_from_the_heap_once_retained():
    assert mmapped_growth("default") >= 64 * 2**20  # glibc's default: a fresh mapping
    assert mmapped_growth("retain") == 0


def test_rejects_a_threshold_mallopt_cannot_take():
    with pytest.raises(ValueError, match="up_to_bytes"):
        retain_freed_memory(2**31)
