"""Turning raw bytes and records into document text: decoding policy, fields, truncation.

Non-UTF-8 policy (config `non_utf8`): inside otherwise good text each byte that is not valid UTF-8
is replaced by U+FFFD ("replace") or dropped ("skip"), and counted. Input that is not text at all
(a NUL byte, or more than `MAX_BAD_FRACTION` of its bytes undecodable: binary files, UTF-16,
legacy 8-bit encodings of non-Latin scripts) is refused with a `DataError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from moe.data.errors import DataError

# More undecodable bytes than this means the file is in another encoding (or binary), and
# replacing them would silently feed the model garbage.
MAX_BAD_FRACTION = 0.10

# `surrogateescape` maps each undecodable byte to one lone surrogate in this range, which makes
# counting them exact (the stock "replace" handler merges runs of bad bytes into one U+FFFD).
_ESCAPED = re.compile("[\udc80-\udcff]")


def decode_text(raw: bytes, *, policy: str, name: str, check: bool = True) -> tuple[str, int]:
    """Decode `raw` as UTF-8 under `policy`; return (text, number of undecodable bytes).

    `name` (a path or record id) goes into the error raised for input that is not text;
    `check=False` skips that test (for a line of a file already checked as a whole, where one
    accented byte in a short line must not count as "mostly undecodable").
    """
    if check and b"\x00" in raw:
        raise DataError(
            f"{name} is not UTF-8 text (it contains NUL bytes: binary or UTF-16); convert it to "
            f"UTF-8 or remove it from the data"
        )
    text = raw.decode("utf-8", errors="surrogateescape")
    bad = len(_ESCAPED.findall(text)) if not text.isascii() else 0
    if bad == 0:
        return text, 0
    if check and bad > MAX_BAD_FRACTION * len(raw):
        raise DataError(
            f"{name} is not UTF-8 text ({bad} of {len(raw)} bytes undecodable); convert it to UTF-8 "
            f"(e.g. `iconv -f <encoding> -t utf-8`) or remove it from the data"
        )
    return _ESCAPED.sub("\ufffd" if policy == "replace" else "", text), bad


def get_field(record: Mapping[str, Any], dotted: str, *, where: str) -> Any:
    """`record["a"]["b"]` for `dotted="a.b"`; a missing key raises a `DataError` naming `where`."""
    value: Any = record
    for i, key in enumerate(dotted.split(".")):
        if not isinstance(value, Mapping) or key not in value:
            have = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            reached = ".".join(dotted.split(".")[:i]) or "<record>"
            raise DataError(
                f"{where}: field {dotted!r} is missing ({reached} has {have}); set the field name "
                f"in the data config (text_field / domain_field) to one the records have"
            )
        value = value[key]
    return value


def truncate_at_line(text: str, limit: int) -> str:
    """At most `limit` characters of `text`, cut after a newline when one lies in the second half.

    Cutting at a line keeps code and prose well formed; the fallback hard cut only hits single
    enormous lines.
    """
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut + 1] if cut >= limit // 2 else text[:limit]
