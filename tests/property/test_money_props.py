"""Properties of money: parsing, formatting and cents conversions read back what they wrote.

(That charges telescope to the floor of the total, whatever the readings, is a property of the
rules: tests/property/test_rules_props.py.)"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.money import (
    MoneyParseError,
    cents_to_micros,
    format_usd,
    micros_to_cents_exact,
    parse_usd_micros,
)

pytestmark = pytest.mark.property

MAX_PARSE_MICROS = 10**18


@settings(max_examples=300)
@given(micros=st.integers(0, MAX_PARSE_MICROS) | st.integers(0, 10_000_000))
def test_parse_reads_back_what_format_wrote(micros: int) -> None:
    assert parse_usd_micros(format_usd(micros)) == micros


@settings(max_examples=200)
@given(micros=st.integers(-MAX_PARSE_MICROS, MAX_PARSE_MICROS))
def test_format_is_exact(micros: int) -> None:
    text = format_usd(micros)
    whole, _, fraction = text.lstrip("-").partition(".")
    assert len(fraction) == 6
    assert (int(whole) * 1_000_000 + int(fraction)) * (-1 if text.startswith("-") else 1) == micros


@settings(max_examples=300)
@given(amount=st.decimals(min_value=0, max_value=10**12, places=6, allow_nan=False, allow_infinity=False))
def test_parse_round_trips_decimal_strings_of_at_most_6_places(amount: Decimal) -> None:
    # 19 significant digits at most: exact in the default 28-digit context.
    expected_micros = int(amount * 1_000_000)
    assert Decimal(expected_micros) == amount * 1_000_000
    assert parse_usd_micros(str(amount)) == expected_micros
    assert parse_usd_micros(f"{amount:f}") == expected_micros
    assert parse_usd_micros(f"{amount:E}") == expected_micros  # exponent notation, same value
    assert parse_usd_micros(amount) == expected_micros


@settings(max_examples=200)
@given(
    micros=st.integers(0, MAX_PARSE_MICROS // 10),
    extra_digit=st.integers(1, 9),
    trailing_zeros=st.integers(0, 5),
)
def test_parse_refuses_a_seventh_decimal_place(micros: int, extra_digit: int, trailing_zeros: int) -> None:
    text = format_usd(micros) + str(extra_digit) + "0" * trailing_zeros
    with pytest.raises(MoneyParseError, match="more than 6 decimal places"):
        parse_usd_micros(text)
    # Trailing zeros alone are harmless.
    assert parse_usd_micros(format_usd(micros) + "0" * trailing_zeros) == micros


@settings(max_examples=300)
@given(value=st.text(max_size=30) | st.decimals() | st.integers() | st.floats() | st.booleans())
def test_parse_either_returns_micros_in_range_or_raises_money_parse_error(value: object) -> None:
    try:
        micros = parse_usd_micros(value)
    except MoneyParseError as error:
        message = str(error)  # a person must be told something
    else:
        message = "parsed"
        assert type(micros) is int
        assert 0 <= micros <= MAX_PARSE_MICROS
    assert message


@settings(max_examples=200)
@given(cents=st.integers(-(10**14), 10**14))
def test_cents_round_trip(cents: int) -> None:
    assert micros_to_cents_exact(cents_to_micros(cents)) == cents
