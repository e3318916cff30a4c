"""`moe.validation.check_choice`: one wording for every "unknown choice" error."""

import pytest

from moe.data.errors import DataError
from moe.validation import check_choice


def test_known_value_passes():
    assert check_choice("router.kind", "topk", ("topk", "hash")) is None
    check_choice("k", 2, range(4))  # any iterable, any value type


def test_unknown_value_names_field_value_and_allowed_values_in_order():
    with pytest.raises(ValueError) as info:
        check_choice("router.kind", "topkk", ["topk", "hash", "expert_choice"])
    assert str(info.value) == "router.kind='topkk' is unknown; allowed values: topk, hash, expert_choice"


def test_error_class_is_the_callers():
    with pytest.raises(DataError, match=r"data\.non_utf8='ignore' is unknown; allowed values: replace, skip"):
        check_choice("data.non_utf8", "ignore", ("replace", "skip"), error=DataError)
