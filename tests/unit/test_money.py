"""Money: integer micro-USD and the rounding rules of DESIGN section 1."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from ledger.invariants import InvariantViolation
from ledger.money import (
    MICROS_PER_CENT,
    MICROS_PER_USD,
    MILLIS_PER_SECOND,
    SECONDS_PER_HOUR,
    MoneyParseError,
    cents_to_micros,
    format_usd,
    micros_to_cents_exact,
    parse_usd_micros,
    rental_cost_micros,
    serverless_cost_micros,
    serverless_exact_millimicros,
)

pytestmark = pytest.mark.unit


def test_constants() -> None:
    assert MICROS_PER_USD == 1_000_000
    assert SECONDS_PER_HOUR == 3600
    assert MILLIS_PER_SECOND == 1000
    assert MICROS_PER_CENT == 10_000


def test_rental_cost_is_floor_of_exact_cost() -> None:
    assert rental_cost_micros(0, 510_000) == 0
    assert rental_cost_micros(3600, 510_000) == 510_000
    assert rental_cost_micros(1, 510_000) == 141  # 141.666... floors
    assert rental_cost_micros(7080, 1_000_000) == 1_966_666
    assert rental_cost_micros(10, 0) == 0


def test_design_example_serverless_fractions_carry() -> None:
    # DESIGN section 1: ten 1.5 s jobs at 333 micros/s cost 4,995 micros, not 10 x 499.
    job_exact = serverless_exact_millimicros(1500, 333)
    assert job_exact == 499_500
    assert serverless_cost_micros(job_exact) == 499
    assert serverless_cost_micros(10 * job_exact) == 4995


def test_serverless_cost_floors() -> None:
    assert serverless_cost_micros(0) == 0
    assert serverless_cost_micros(999) == 0
    assert serverless_cost_micros(1000) == 1


@pytest.mark.parametrize(
    ("call", "args"),
    [
        (rental_cost_micros, (-1, 100)),
        (rental_cost_micros, (1, -100)),
        (serverless_exact_millimicros, (-1, 10)),
        (serverless_exact_millimicros, (1, -10)),
        (serverless_cost_micros, (-1,)),
    ],
)
def test_negative_inputs_are_invariant_violations(call, args) -> None:
    with pytest.raises(InvariantViolation, match="must be >= 0"):
        call(*args)


@pytest.mark.parametrize("bad", [1.0, True, "3", Decimal(3), None])
def test_formula_inputs_must_be_plain_ints(bad) -> None:
    with pytest.raises(InvariantViolation, match="must be an int"):
        rental_cost_micros(bad, 100)
    with pytest.raises(InvariantViolation, match="must be an int"):
        serverless_exact_millimicros(100, bad)


def test_result_that_would_not_fit_a_bigint_is_an_invariant_violation() -> None:
    with pytest.raises(InvariantViolation, match="BIGINT"):
        serverless_exact_millimicros(2**40, 2**40)


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        (10, 10_000_000),
        (0, 0),
        ("10", 10_000_000),
        ("12.5", 12_500_000),
        ("12.50", 12_500_000),
        (" 25 ", 25_000_000),
        (".5", 500_000),
        ("5.", 5_000_000),
        ("0.000001", 1),
        ("1.50000000", 1_500_000),  # trailing zeros are not decimal places that matter
        ("1e2", 100_000_000),
        ("1.5E-3", 1_500),
        ("0E-30", 0),
        ("1000000000000", 10**18),
        (Decimal("5"), 5_000_000),
        (Decimal("9.49"), 9_490_000),
        (Decimal("-0"), 0),
        (Decimal("1E+3"), 1_000_000_000),
        (10**12, 10**18),
    ],
)
def test_parse_usd_micros_exact(value, micros) -> None:
    assert parse_usd_micros(value) == micros


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "not a float"),
        (10.0, "not a float"),
        (True, "not a boolean"),
        (None, "got NoneType"),
        ([10], "got list"),
        ("1.0000001", "more than 6 decimal places: '1.0000001'"),
        (Decimal("0.0000001"), "more than 6 decimal places"),
        ("1e-7", "more than 6 decimal places"),
        (Decimal("1e-999999"), "more than 6 decimal places"),
        ("-1", "must not be negative"),
        ("-0", "must not be negative"),
        (-5, "must not be negative"),
        (Decimal("-0.5"), "must not be negative"),
        ("", "amount is empty"),
        ("   ", "amount is empty"),
        ("nan", "not a plain decimal number"),
        ("Infinity", "not a plain decimal number"),
        ("1_000", "not a plain decimal number"),
        ("١٢", "not a plain decimal number"),
        ("$10", "not a plain decimal number"),
        ("10 USD", "not a plain decimal number"),
        ("1,5", "not a plain decimal number"),
        (Decimal("NaN"), "not a number"),
        (Decimal("sNaN"), "not a number"),
        (Decimal("Infinity"), "must be finite"),
        (Decimal("-Infinity"), "must be finite"),
        ("1000000000000.000001", "more than 1000000000000 USD"),
        ("1e13", "more than 1000000000000 USD"),
        ("1e999999999", "more than 1000000000000 USD"),
        (Decimal("1e999999"), "more than 1000000000000 USD"),
        (10**12 + 1, "more than 1000000000000 USD"),
        pytest.param(10**5000, "more than 1000000000000 USD: a 16610-bit integer", id="5000-digit-int"),
        pytest.param(-(10**5000), "must not be negative", id="negative-5000-digit-int"),
        ("9" * 65, "too long"),
    ],
)
def test_parse_usd_micros_refuses_with_a_useful_message(value, message) -> None:
    with pytest.raises(MoneyParseError, match=re.escape(message)):
        parse_usd_micros(value)


def test_money_parse_error_is_a_value_error() -> None:
    assert issubclass(MoneyParseError, ValueError)


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (9_490_000, "9.490000"),
        (-4166, "-0.004166"),
        (0, "0.000000"),
        (1, "0.000001"),
        (-1_000_000, "-1.000000"),
        (10**18, "1000000000000.000000"),
    ],
)
def test_format_usd(micros, text) -> None:
    assert format_usd(micros) == text


def test_format_usd_refuses_non_int() -> None:
    with pytest.raises(InvariantViolation):
        format_usd(1.5)  # type: ignore[arg-type]


def test_cents_conversions() -> None:
    assert micros_to_cents_exact(12_340_000) == 1234
    assert micros_to_cents_exact(0) == 0
    assert micros_to_cents_exact(-10_000) == -1
    assert cents_to_micros(1234) == 12_340_000
    assert cents_to_micros(-1) == -10_000
    with pytest.raises(MoneyParseError, match="not a whole number of cents"):
        micros_to_cents_exact(12_345_678)
    with pytest.raises(MoneyParseError, match="not a whole number of cents"):
        micros_to_cents_exact(-5)
    with pytest.raises(InvariantViolation):
        cents_to_micros(True)


def test_an_exponent_beyond_decimal_is_a_parse_error_not_a_crash() -> None:
    # Found by the HTTP fuzzer: Decimal("0E1000000000000000000") raises InvalidOperation.
    with pytest.raises(MoneyParseError):
        parse_usd_micros("0E1000000000000000000")
