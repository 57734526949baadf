"""The crash-point plan read from TRIBUTARY_CRASH_AT (server/faults.py)."""

from __future__ import annotations

import pytest

from server.faults import _parse


def test_a_plan_names_a_point_and_a_count() -> None:
    assert _parse("checkpoint.written:2") == ("checkpoint.written", 2)
    assert _parse(None) is None and _parse("") is None


@pytest.mark.parametrize("value", ["push.logged", "push.logged:0", "push.logged:-1", ":3", "push.logged:x"])
def test_a_bad_plan_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match=r"TRIBUTARY_CRASH_AT must be 'point:n' with n >= 1"):
        _parse(value)
