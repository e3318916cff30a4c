"""Shared input checks whose messages name the field at fault (torch-free).

For example:

    check_choice("router.kind", kind, ROUTER_KINDS)
    # ValueError: router.kind='topkk' is unknown; allowed values: topk, expert_choice, ...
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice"]


def check_choice(field: str, value: Any, allowed: Iterable[Any], *, error: type[Exception] = ValueError) -> None:
    """Raise `error` (a ValueError unless told otherwise, e.g. `moe.data.errors.DataError`) when
    `value` is not one of `allowed`, with the message
    `"{field}={value!r} is unknown; allowed values: a, b, c"` (allowed listed in the given order)."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise error(f"{field}={value!r} is unknown; allowed values: {', '.join(map(str, allowed))}")
