"""`moe.tables`: the one markdown table format and the one JSON writer of the result files."""

import json
import math

import numpy as np
import pytest

from moe.tables import format_number, markdown_table, to_jsonable, write_json


def test_markdown_table_layout_and_escaping():
    table = markdown_table(["domain", "I(D;E|C)"], [["code", "0.5"], ["a|b", "–"]])
    assert table == ("| domain | I(D;E\\|C) |\n|---|---|\n| code | 0.5 |\n| a\\|b | – |")


def test_markdown_table_formats_non_strings_with_fmt():
    rows = [[1, 0.123456, None, float("nan"), 12345.0]]
    assert markdown_table(list("abcde"), rows).splitlines()[2] == "| 1 | 0.123456 | None | nan | 12345.0 |"
    assert markdown_table(list("abcde"), rows, fmt=format_number).splitlines()[2] == "| 1 | 0.123 | – | – | 1.234e+04 |"
    assert markdown_table(["x"], []) == "| x |\n|---|"


def test_to_jsonable_makes_plain_json():
    x = {1: np.arange(2), "f": np.float32(0.5), "n": [math.nan, np.inf], "b": np.bool_(True), "t": (np.int64(3),)}
    assert to_jsonable(x) == {"1": [0, 1], "f": 0.5, "n": [None, None], "b": True, "t": [3]}
    assert type(to_jsonable(np.int64(3))) is int


def test_write_json_is_strict_and_leaves_no_temporary(tmp_path):
    path = write_json(tmp_path / "sub" / "out.json", {"a": [1.5, math.nan]}, indent=2)
    assert path.read_text() == json.dumps({"a": [1.5, None]}, indent=2)  # no trailing newline
    assert json.loads(path.read_text()) == {"a": [1.5, None]}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"a": object()})
    assert not list(tmp_path.glob("*bad*")) and not list(tmp_path.glob(".*"))
