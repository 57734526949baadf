"""Staleness functions s(tau) and their configuration, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from proto import staleness
from server.config import StalenessConfig
from server.errors import ConfigError


@pytest.mark.parametrize("tau", [0, 1, 7, 10_000])
def test_constant_is_one_for_any_staleness(tau: int) -> None:
    assert staleness.constant(tau) == 1.0


@pytest.mark.parametrize(
    ("tau", "expected"),
    [
        (0, 1.0),  # 1/sqrt(1)
        (1, 0.7071067811865476),  # 1/sqrt(2)
        (3, 0.5),  # 1/sqrt(4)
        (8, 1.0 / 3.0),  # 1/sqrt(9)
        (99, 0.1),  # 1/sqrt(100)
    ],
)
def test_polynomial_with_a_half_is_one_over_sqrt_one_plus_tau(tau: int, expected: float) -> None:
    assert staleness.polynomial(tau, a=0.5) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("tau", "a", "expected"),
    [
        (1, 1.0, 0.5),  # 2^-1
        (3, 2.0, 0.0625),  # 4^-2
        (7, 1.0 / 3.0, 0.5),  # 8^(-1/3)
        (0, 5.0, 1.0),  # 1^-5: a fresh update always counts fully
    ],
)
def test_polynomial_other_exponents(tau: int, a: float, expected: float) -> None:
    assert staleness.polynomial(tau, a=a) == pytest.approx(expected, rel=1e-12)


def test_polynomial_returns_a_python_float() -> None:
    assert type(staleness.polynomial(3, a=0.5)) is float


@pytest.mark.parametrize(
    ("tau", "expected"),
    [
        (0, 1.0),  # below b
        (3, 1.0),  # below b
        (4, 1.0),  # at b: still full weight (tau <= b)
        (5, 1.0 / 1.5),  # 1 / (0.5 * 1 + 1)
        (6, 0.5),  # 1 / (0.5 * 2 + 1)
        (10, 0.25),  # 1 / (0.5 * 6 + 1)
    ],
)
def test_hinge_below_at_and_above_b(tau: int, expected: float) -> None:
    assert staleness.hinge(tau, a=0.5, b=4) == pytest.approx(expected, rel=1e-12)


def test_hinge_with_zero_b_discounts_from_the_first_version() -> None:
    assert staleness.hinge(0, a=2.0, b=0) == 1.0
    assert staleness.hinge(1, a=2.0, b=0) == pytest.approx(1.0 / 3.0)  # 1 / (2 * 1 + 1)
    assert staleness.hinge(2, a=2.0, b=0) == pytest.approx(0.2)  # 1 / (2 * 2 + 1)


# -- StalenessConfig ----------------------------------------------------------


def test_default_config_is_polynomial_a_half() -> None:
    config = StalenessConfig()
    assert (config.kind, config.a) == ("polynomial", 0.5)
    assert config.function()(3) == pytest.approx(0.5)
    assert config.describe() == "polynomial(a=0.5)"


def test_config_function_binds_constant() -> None:
    fn = StalenessConfig(kind="constant").function()
    assert fn(0) == 1.0
    assert fn(123) == 1.0
    assert StalenessConfig(kind="constant").describe() == "constant"


def test_config_function_binds_polynomial_exponent() -> None:
    fn = StalenessConfig(kind="polynomial", a=2.0).function()
    assert fn(0) == 1.0
    assert fn(1) == pytest.approx(0.25)  # 2^-2
    assert fn(3) == pytest.approx(0.0625)  # 4^-2


def test_config_function_binds_hinge_parameters() -> None:
    config = StalenessConfig(kind="hinge", a=0.5, b=2)
    fn = config.function()
    assert fn(2) == 1.0
    assert fn(4) == pytest.approx(0.5)  # 1 / (0.5 * 2 + 1)
    assert fn(8) == pytest.approx(0.25)  # 1 / (0.5 * 6 + 1)
    assert config.describe() == "hinge(a=0.5, b=2)"


def test_constant_config_ignores_a_and_b() -> None:
    # a and b have no meaning for the constant function, so no value of them is an error.
    config = StalenessConfig(kind="constant", a=-3.0, b=-1.0)
    assert config.function()(5) == 1.0


def test_config_is_frozen() -> None:
    config = StalenessConfig()
    with pytest.raises(AttributeError):
        config.a = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kind": "linear"}, "staleness must be one of"),
        ({"kind": "Polynomial"}, "staleness must be one of"),
        ({"kind": "polynomial", "a": 0.0}, "staleness_a"),
        ({"kind": "polynomial", "a": -0.5}, "staleness_a"),
        ({"kind": "polynomial", "a": math.inf}, "staleness_a"),
        ({"kind": "polynomial", "a": math.nan}, "staleness_a"),
        ({"kind": "hinge", "a": 0.0, "b": 4.0}, "staleness_a"),
        ({"kind": "hinge", "a": -1.0, "b": 4.0}, "staleness_a"),
        ({"kind": "hinge", "a": 0.5, "b": -1.0}, "staleness_b"),
        ({"kind": "hinge", "a": 0.5, "b": math.inf}, "staleness_b"),
        ({"kind": "hinge", "a": 0.5, "b": math.nan}, "staleness_b"),
    ],
)
def test_config_rejects_invalid_values_naming_them(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        StalenessConfig(**kwargs)  # type: ignore[arg-type]


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        StalenessConfig(kind="nope")


def test_hinge_b_zero_is_valid() -> None:
    assert StalenessConfig(kind="hinge", a=1.0, b=0.0).function()(1) == pytest.approx(0.5)
