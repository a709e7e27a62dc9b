"""The request and response bodies of the API, and the error responses its operations document.

JSON in camelCase; money as integer ``...Micros`` with an exact decimal ``...Usd`` string beside it
for people. An amount in a request is USD in whole cents, read by ``ledger.money.parse_usd_micros``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from ledger.events import ID_PATTERN
from ledger.money import MAX_AMOUNT_CHARS, MoneyParseError, parse_usd_micros
from projections import rules

PAYMENT_INTENT_PATTERN: Final = r"^pi_[A-Za-z0-9_]{1,252}$"
# The amount strings ledger.money.parse_usd_micros reads (without the spaces it would strip).
AMOUNT_STRING_PATTERN: Final = r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"


class _In(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", frozen=True, validate_by_name=False)


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, frozen=True, validate_by_name=True, serialize_by_alias=True)


def _usd_to_micros(value: object) -> int:
    if isinstance(value, str) and value != value.strip():
        raise PydanticCustomError("usd_amount", "amount must not have spaces around it: {value}", {"value": value[:40]})
    try:
        return parse_usd_micros(value)
    except MoneyParseError as error:
        raise PydanticCustomError("usd_amount", "{message}", {"message": str(error)}) from None
    except ArithmeticError:
        # decimal.InvalidOperation from Decimal() itself, e.g. "0E1000000000000000000" (an exponent past
        # Decimal's limits): parse_usd_micros lets it through; it is bad input all the same.
        raise PydanticCustomError(
            "usd_amount", "amount is not a number of USD this service can read: {value}", {"value": str(value)[:40]}
        ) from None


def presets_text() -> str:
    return ", ".join(f"${p}" for p in rules.TOPUP_PRESETS_USD)


WalletId = Annotated[
    str,
    StringConstraints(pattern=ID_PATTERN),
    Field(description="The wallet's id: 1 to 64 letters, digits, '_' or '-'.", examples=["w_acme"]),
]
UsdAmount = Annotated[
    int,
    BeforeValidator(_usd_to_micros),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 5},
                {"type": "string", "pattern": AMOUNT_STRING_PATTERN, "maxLength": MAX_AMOUNT_CHARS},
            ],
            "description": 'USD, as a JSON number or a decimal string, in whole cents: 10, 12.5, "12.50". '
            f"At least $5 (presets: {presets_text()}).",
            "examples": [10, 12.5, "12.50"],
        }
    ),
]


class CreateIntentRequest(_In):
    wallet_id: WalletId
    amount_micros: UsdAmount = Field(alias="amount")


class CreateIntentResponse(_Out):
    wallet_id: str
    payment_intent_id: str
    client_secret: str = Field(description="For Stripe.js on the client: confirm the payment with it.")
    amount_micros: int
    amount_usd: str
    currency: Literal["usd"] = "usd"


class ConfirmRequest(_In):
    payment_intent_id: Annotated[
        str, StringConstraints(pattern=PAYMENT_INTENT_PATTERN), Field(examples=["pi_3Nabc123"])
    ]


class ConfirmResponse(_Out):
    wallet_id: str
    payment_intent_id: str
    credited: bool = Field(description="True if this call credited the payment; false if it was credited before.")
    amount_micros: int
    balance_micros: int
    balance_usd: str


class WalletResponse(_Out):
    wallet_id: str
    balance_micros: int = Field(description="Ledger balance: the sum of the wallet's journal entries.")
    balance_usd: str
    available_micros: int = Field(description="Balance minus usage accrued since the last readings minus holds.")
    available_usd: str
    holds_micros: int = Field(description="Open admission holds.")
    accrued_micros: int = Field(description="Usage of the running rentals accrued but not metered yet.")
    burn_micros_per_hour: int = Field(description="Sum of the hourly prices of the running rentals.")
    projected_zero_at: datetime | None = Field(description="When available reaches zero at the current burn.")
    state: Literal["active", "low", "exhausted"]
    running_rentals: int
    at: datetime = Field(description="The instant these figures were computed for.")


class RentalResponse(_Out):
    resource_id: str
    wallet_id: str
    resource_kind: str
    tier: str
    gpu_type: str
    state: Literal["running", "paused", "ended"]
    billable_seconds: int
    cost_micros: int = Field(description="floor(billableSeconds * pricePerHourMicros / 3600), charged so far.")
    cost_usd: str
    price_per_hour_micros: int
    started_at: datetime
    ended_at: datetime | None
    end_reason: str | None


class WebhookResponse(_Out):
    received: Literal[True] = True
    event_id: str
    type: str
    handled: bool = Field(description="The type is acted on and its facts are in the ledger.")
    duplicate: bool = Field(description="This Stripe event was received before; nothing was done again.")
    facts: int
    applied: int = Field(description="Facts new to the ledger (a payment already credited by confirm is not).")
    note: str = Field(description="What was done, or why the event was only recorded.")


class ErrorResponse(BaseModel):
    error: str = Field(description="A stable code, e.g. invalid_token, wallet_not_found.")
    detail: str = Field(description="What went wrong and what to do about it.")


_ERROR_DESCRIPTIONS: Final = {
    400: "Unreadable body, or a webhook whose signature does not verify",
    401: "No token, or a token this service does not know",
    403: "The token lacks the scope",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Body too large",
    422: "Invalid input",
    502: "Stripe failed or could not be reached; retry",
    503: "Not configured, or the database is unavailable; retry",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of an operation that may answer these error statuses (OpenAPI)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]}
        if status == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
        responses[status] = entry
    return responses
