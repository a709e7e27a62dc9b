"""Money: integer micro-USD, and the rounding rules of DESIGN section 1.

Every amount is an ``int`` of micro-USD (1 USD = 1,000,000 micros). There is no float anywhere
in this module: floats cannot represent 0.1 USD exactly, and a ledger that drifts by a micro per
reading is wrong after a million readings.

Rounding never drifts because charges are *differences of cumulative floors*: a resource's cost so
far is ``floor(total * price / unit)``, and each reading charges that figure minus what was already
charged. The sum of the charges therefore telescopes to the floor of the total, whatever the
number, order or duplication of readings.

The formula functions treat bad arguments as bugs (``InvariantViolation``): by the time a number
reaches them it has been validated by the event parser. ``parse_usd_micros`` is the one function
here that takes input from people, and it raises ``MoneyParseError`` with a message they can act on.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Final

from ledger.invariants import fail, require_int

MICROS_PER_USD: Final = 1_000_000
SECONDS_PER_HOUR: Final = 3600
MILLIS_PER_SECOND: Final = 1000
MICROS_PER_CENT: Final = 10_000

# Serverless exact costs are kept in thousandths of a micro ("millimicros"): compute_ms * price per
# second in micros is exactly that unit, so the running sum stays exact and only the charge rounds.
MILLIMICROS_PER_MICRO: Final = MILLIS_PER_SECOND

# Every stored amount is a PostgreSQL BIGINT. A result outside it is a bug upstream (an input that
# escaped its bounds), and must stop the unit of work rather than fail later inside the database.
BIGINT_MAX: Final = 2**63 - 1

# A person typing an amount never means more than a trillion dollars; bounding it keeps the parser
# from building huge integers out of inputs such as "1e999999999".
MAX_PARSE_USD: Final = 10**12
MAX_PARSE_MICROS: Final = MAX_PARSE_USD * MICROS_PER_USD
MAX_DECIMAL_PLACES: Final = 6
# Longest amount string worth reading: 13 integer digits, a point, 6 decimals, plus slack for
# trailing zeros and an exponent. Anything longer is refused before Decimal sees it.
MAX_AMOUNT_CHARS: Final = 64

# ASCII digits, no sign (so "-0" is refused too), no underscores: Decimal() alone would also accept
# "1_000", "Infinity", "nan" and non-ASCII digits such as "١٢", none of which a person means as money.
_AMOUNT_RE: Final = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class MoneyParseError(ValueError):
    """An amount given by a person (or an API client) that is not a valid amount of USD."""


def _require_non_negative(value: object, name: str) -> int:
    result = require_int(value, name)
    if not (result >= 0):
        fail(f"{name} must be >= 0, got {result}")
    return result


def _require_bigint(value: int, name: str) -> int:
    if not (-BIGINT_MAX <= value <= BIGINT_MAX):
        fail(f"{name} does not fit a BIGINT: {value}")
    return value


def rental_cost_micros(billable_seconds: int, price_per_hour_micros: int) -> int:
    """Cost of a rental so far: ``floor(billable_seconds * price_per_hour_micros / 3600)``."""
    seconds = _require_non_negative(billable_seconds, "billable_seconds")
    price = _require_non_negative(price_per_hour_micros, "price_per_hour_micros")
    return _require_bigint(seconds * price // SECONDS_PER_HOUR, "rental cost")


def serverless_exact_millimicros(compute_ms: int, price_per_second_micros: int) -> int:
    """Exact cost of one job in thousandths of a micro: ``compute_ms * price_per_second_micros``."""
    millis = _require_non_negative(compute_ms, "compute_ms")
    price = _require_non_negative(price_per_second_micros, "price_per_second_micros")
    return _require_bigint(millis * price, "serverless exact cost")


def serverless_cost_micros(exact_millimicros_total: int) -> int:
    """Cost so far of an endpoint's jobs for one wallet: ``floor(exact_total / 1000)``."""
    total = _require_non_negative(exact_millimicros_total, "exact_millimicros_total")
    return total // MILLIMICROS_PER_MICRO


def parse_usd_micros(value: object) -> int:
    """Parse an amount of USD given by a person (``10``, ``"12.5"``, ``Decimal("5")``) into micros.

    Exact or refused: never rounds. Accepts ``int``, ``str`` and ``Decimal``; refuses ``float``
    (the HTTP layer parses JSON numbers as ``Decimal`` so a float never carries money), ``bool``,
    negatives, NaN, infinities, more than 6 decimal places and more than 10^12 USD.
    """
    if isinstance(value, bool):
        raise MoneyParseError(f"amount must be a number of USD, not a boolean: {value!r}")
    if isinstance(value, float):
        raise MoneyParseError(
            f"amount must be given exactly (an integer, a decimal string or a Decimal), not a float: {value!r}"
        )
    if isinstance(value, int):
        return _parse_usd_int(value)
    if isinstance(value, str):
        return _parse_usd_str(value)
    if isinstance(value, Decimal):
        return _parse_usd_decimal(value, _shown(str(value)))
    raise MoneyParseError(f"amount must be a number of USD, got {type(value).__name__}")


def _parse_usd_int(amount_usd: int) -> int:
    # str() of an int past 4300 digits raises ValueError: quote only ints of a sane size.
    shown = str(amount_usd) if abs(amount_usd) < 10**30 else f"a {amount_usd.bit_length()}-bit integer"
    if amount_usd < 0:
        raise MoneyParseError(f"amount must not be negative: {shown}")
    if amount_usd > MAX_PARSE_USD:
        raise MoneyParseError(f"amount is more than {MAX_PARSE_USD} USD: {shown}")
    return amount_usd * MICROS_PER_USD


def _parse_usd_str(text: str) -> int:
    shown = _shown(text)
    stripped = text.strip()
    if not stripped:
        raise MoneyParseError("amount is empty; give a number of USD such as 10 or 12.50")
    if len(stripped) > MAX_AMOUNT_CHARS:
        raise MoneyParseError(f"amount is too long ({len(stripped)} characters): {shown}")
    if stripped.startswith("-"):
        raise MoneyParseError(f"amount must not be negative: {shown}")
    if _AMOUNT_RE.fullmatch(stripped) is None:
        raise MoneyParseError(f"amount is not a plain decimal number of USD such as 12.50: {shown}")
    try:
        amount = Decimal(stripped)
    except ArithmeticError:  # decimal.InvalidOperation: an exponent beyond what Decimal holds ("0E10**19")
        raise MoneyParseError(f"amount is out of range: {shown}") from None
    return _parse_usd_decimal(amount, shown)


def _shown(text: str) -> str:
    """The offending amount as quoted in a message, bounded: error messages are stored and shown."""
    return repr(text if len(text) <= MAX_AMOUNT_CHARS else text[:MAX_AMOUNT_CHARS] + "...")


def _parse_usd_decimal(amount: Decimal, shown: str) -> int:
    """Exact conversion from the Decimal's digits: no Decimal arithmetic, so no context rounding."""
    if amount.is_nan():
        raise MoneyParseError(f"amount is not a number: {shown}")
    if amount.is_infinite():
        raise MoneyParseError(f"amount must be finite: {shown}")
    sign, digits, exponent = amount.as_tuple()
    if not isinstance(exponent, int):
        fail(f"finite Decimal without an int exponent: {amount!r}")
    # Trailing zeros are not decimal places that matter: "1.50000000" is exactly 1.5.
    significant = len(digits)
    while significant > 0 and digits[significant - 1] == 0:
        significant -= 1
        exponent += 1
    if significant == 0:
        return 0  # "0", "0.000" and Decimal("-0E-30") are all zero; the sign of zero means nothing.
    if sign == 1:
        raise MoneyParseError(f"amount must not be negative: {shown}")
    if exponent < -MAX_DECIMAL_PLACES:
        raise MoneyParseError(f"amount has more than {MAX_DECIMAL_PLACES} decimal places: {shown}")
    # Count the result's digits before building it, so Decimal("1e999999") never builds 10**999999.
    if significant + exponent + MAX_DECIMAL_PLACES > len(str(MAX_PARSE_MICROS)):
        raise MoneyParseError(f"amount is more than {MAX_PARSE_USD} USD: {shown}")
    coefficient = 0
    for digit in digits[:significant]:
        coefficient = coefficient * 10 + digit
    # exponent >= -6 here, so the power is an int (typeshed types int ** int as Any for that reason).
    scale: int = 10 ** (exponent + MAX_DECIMAL_PLACES)
    micros = coefficient * scale
    if micros > MAX_PARSE_MICROS:
        raise MoneyParseError(f"amount is more than {MAX_PARSE_USD} USD: {shown}")
    return micros


def format_usd(micros: int) -> str:
    """Exact decimal USD for people: ``9490000`` -> ``"9.490000"``, ``-4166`` -> ``"-0.004166"``."""
    amount_micros = require_int(micros, "micros")
    sign = "-" if amount_micros < 0 else ""
    whole_usd, fraction_micros = divmod(abs(amount_micros), MICROS_PER_USD)
    return f"{sign}{whole_usd}.{fraction_micros:06d}"


def micros_to_cents_exact(micros: int) -> int:
    """Micros as whole cents (Stripe's unit); refuses an amount with a fraction of a cent."""
    amount_micros = require_int(micros, "micros")
    cents, remainder_micros = divmod(amount_micros, MICROS_PER_CENT)
    if remainder_micros != 0:
        raise MoneyParseError(
            f"amount {format_usd(amount_micros)} USD is not a whole number of cents; give at most 2 decimal places"
        )
    return cents


def cents_to_micros(cents: int) -> int:
    """Whole cents (Stripe's unit) as micros; exact."""
    return require_int(cents, "cents") * MICROS_PER_CENT


def display_usd(micros: int, *, exact: bool = False) -> str:
    """Money for people to read: ``"$1,234.56"`` (to the cent), or with ``exact`` every micro
    (``"$1,234.567891"``); negatives as ``"-$11,980.00"``. The one place micros become text in tables.

    Cents are rounded half away from zero (``$0.005`` -> ``$0.01``), the way people round money by hand;
    a nonzero amount that rounds to zero keeps its sign (``-$0.00``), so a debt of a few micros still
    reads as a debt. Integers only: the exact figure is ``exact=True``, never a float.
    """
    amount_micros = require_int(micros, "micros")
    sign = "-" if amount_micros < 0 else ""
    if exact:
        whole_usd, fraction_micros = divmod(abs(amount_micros), MICROS_PER_USD)
        return f"{sign}${whole_usd:,}.{fraction_micros:06d}"
    cents, remainder_micros = divmod(abs(amount_micros), MICROS_PER_CENT)
    if 2 * remainder_micros >= MICROS_PER_CENT:
        cents += 1
    whole_usd, fraction_cents = divmod(cents, 100)
    return f"{sign}${whole_usd:,}.{fraction_cents:02d}"
