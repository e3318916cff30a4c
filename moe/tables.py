"""Writers of the result files: one markdown table format and one JSON format (torch-free).

For example:

    markdown_table(["model", "loss"], [["moe", 3.1], ["dense", None]], fmt=format_number)
    write_json(run_dir / "comparison.json", table, indent=2)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["format_number", "markdown_table", "to_jsonable", "write_json"]


def format_number(x: Any, digits: int = 3) -> str:
    """A table cell: None and nan as "–", floats to `digits` significant digits (scientific from
    1e4 on), anything else as str."""
    if x is None or (isinstance(x, (float, np.floating)) and math.isnan(x)):
        return "–"
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.{digits}e}"
    return str(x)


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], fmt: Callable[[Any], str] = str) -> str:
    """A GitHub markdown table, lines joined by "\\n" (no trailing newline):

        | a | b |
        |---|---|
        | 1 | 2 |

    Cells (header included) that are not strings are rendered with `fmt`; a "|" inside any cell
    (as in I(D;E|C)) is escaped to "\\|" so the columns stay aligned, so pass cells unescaped.
    """

    def line(cells: Sequence[Any]) -> str:
        text = [(c if isinstance(c, str) else fmt(c)).replace("|", "\\|") for c in cells]
        return "| " + " | ".join(text) + " |"

    header = list(header)
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows])


def to_jsonable(x: Any) -> Any:
    """`x` in plain JSON types: dataclass instances and mappings to dicts (keys as str), lists and
    tuples to lists, numpy arrays and scalars to Python values, nan and inf to None."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def write_json(path: str | Path, obj: Any, *, indent: int = 1) -> Path:
    """Write `to_jsonable(obj)` to `path` (parents created) as JSON with `indent`, ASCII only, no
    trailing newline; atomically: a reader sees the old file or the whole new one. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
