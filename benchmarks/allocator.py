"""The benchmarks' `--default-allocator` flag: by default they keep freed CPU memory for reuse, as
training, moe-analyze and moe-calibrate do (`moe.host_memory`), so they time what the package runs."""

from __future__ import annotations

import argparse

from moe.host_memory import retain_freed_memory


def add_allocator_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave malloc as it is instead of retaining freed memory as training and moe-analyze do",
    )


def set_allocator(default_allocator: bool) -> str:
    """Retain freed memory unless `default_allocator`; what malloc does now, for the printed header."""
    if default_allocator:
        return "glibc default"
    return "retained freed memory" if retain_freed_memory() else "default (not glibc)"
