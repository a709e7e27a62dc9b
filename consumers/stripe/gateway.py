"""Stripe, as the billing service sees it: the calls it makes, the objects it reads, webhook signatures.

Every call goes through the official ``stripe`` library (a ``StripeClient``, pointed at
``BILLING_STRIPE_API_BASE`` when set, e.g. a local fake). Every object Stripe returns or posts is
read through a small pydantic view with only the fields used here, so a surprise in Stripe's answer
is a clear :class:`StripeUnavailable` ("unexpected answer"), never an ``AttributeError`` deep down.
Amounts are Stripe's integer cents (``StrictInt``: never a float, never a boolean).

Failures are split by who must act:

- :class:`StripeRefused`: Stripe refused *this request* (an amount it will not charge, an
  idempotency key reused with other parameters): a 4xx for the caller.
- :class:`StripeUnavailable`: Stripe could not be reached, failed, rate-limited us, refused our
  credentials or answered something unreadable: retry later (a 5xx for the caller).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Final, TypeVar

import stripe
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StringConstraints, ValidationError

from consumers.runtime.settings import Settings

WEBHOOK_TOLERANCE_SECONDS: Final = 300
"""How far a webhook's signed timestamp may be from the service clock, either way."""

DEFAULT_NETWORK_RETRIES: Final = 2
"""The library's own retries (with idempotency keys) when the service builds the client."""

STRIPE_OBJECT_ID: Final = r"^[A-Za-z0-9_]{1,255}$"

_View = TypeVar("_View", bound=BaseModel)
_T = TypeVar("_T")


class StripeRefused(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


class StripeUnavailable(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class WebhookSignatureError(Exception):
    """The webhook is not provably from Stripe now: bad, missing, stale or future signature."""


# ------------------------------------------------------------------------------------------- views


def _expandable_id(value: object) -> object:
    """Stripe fields such as ``charge.payment_intent`` are an id, or the object when expanded."""
    if isinstance(value, dict):
        return value.get("id")
    return value


def _metadata(value: object) -> object:
    return {} if value is None else value


StripeObjectId = Annotated[str, StringConstraints(pattern=STRIPE_OBJECT_ID)]
ExpandableId = Annotated[StripeObjectId | None, BeforeValidator(_expandable_id)]
Cents = Annotated[StrictInt, Field(ge=0)]
Metadata = Annotated[dict[str, str], BeforeValidator(_metadata)]


class _StripeView(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PaymentIntentView(_StripeView):
    id: StripeObjectId
    status: str
    amount: Cents
    amount_received: Cents = 0
    currency: str
    metadata: Metadata = {}
    client_secret: str | None = None


class RefundView(_StripeView):
    id: StripeObjectId
    amount: Cents
    status: str | None = None
    currency: str | None = None
    charge: ExpandableId = None
    payment_intent: ExpandableId = None


class RefundListView(_StripeView):
    data: list[RefundView]
    has_more: bool = False


class ChargeView(_StripeView):
    id: StripeObjectId
    amount: Cents = 0
    currency: str | None = None
    payment_intent: ExpandableId = None
    metadata: Metadata = {}
    refunds: RefundListView | None = None


class DisputeView(_StripeView):
    id: StripeObjectId
    amount: Cents
    status: str
    currency: str | None = None
    charge: ExpandableId = None
    payment_intent: ExpandableId = None
    metadata: Metadata = {}


class StripeEventData(_StripeView):
    object: dict[str, Any]


class StripeEventView(_StripeView):
    """A webhook event (``object: "event"``): what happened, when, and a snapshot of the object."""

    id: StripeObjectId
    type: Annotated[str, StringConstraints(pattern=r"^[!-~]{1,255}$")]  # printable ASCII, as Stripe's are
    # Unix seconds; a signed event beyond int64 is not one of Stripe's (400, nothing recorded).
    created: Annotated[StrictInt, Field(ge=-(2**63 - 1), le=2**63 - 1)] | None = None
    data: StripeEventData


def read_view(view: type[_View], value: Any, what: str) -> _View:
    try:
        return view.model_validate(value)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or what
        raise StripeUnavailable(f"unexpected {what} from Stripe ({where}: {first['msg']})") from None


# ------------------------------------------------------------------------------------------ client


def client_from_settings(settings: Settings) -> stripe.StripeClient | None:
    """The service's client: the configured key, the configured API base. None without a key."""
    key = settings.stripe_api_key.get_secret_value()
    if not key:
        return None
    bases: dict[str, str] = {}
    if settings.stripe_api_base:
        bases["api"] = settings.stripe_api_base.rstrip("/")
    return stripe.StripeClient(key, base_addresses=bases or None, max_network_retries=DEFAULT_NETWORK_RETRIES)  # type: ignore[arg-type]


class StripeGateway:
    """The Stripe calls of the billing service, with typed answers and sorted failures."""

    def __init__(self, client: stripe.StripeClient) -> None:
        self._client = client

    def create_payment_intent(self, *, wallet_id: str, amount_cents: int, idempotency_key: str) -> PaymentIntentView:
        """A USD PaymentIntent for a wallet top-up; ``metadata.walletId`` names the wallet."""
        params: Any = {
            "amount": amount_cents,
            "currency": "usd",
            "metadata": {"walletId": wallet_id},
            "automatic_payment_methods": {"enabled": True},
            "description": f"Wallet top-up {wallet_id}",
        }
        intent = _call(
            lambda: self._client.v1.payment_intents.create(params=params, options={"idempotency_key": idempotency_key})
        )
        return read_view(PaymentIntentView, intent.to_dict(), "PaymentIntent")

    def retrieve_payment_intent(self, payment_intent_id: str) -> PaymentIntentView | None:
        """The PaymentIntent, or None if Stripe has none with this id."""
        intent = _call_or_none(lambda: self._client.v1.payment_intents.retrieve(payment_intent_id))
        return None if intent is None else read_view(PaymentIntentView, intent.to_dict(), "PaymentIntent")

    def retrieve_charge(self, charge_id: str) -> ChargeView | None:
        charge = _call_or_none(lambda: self._client.v1.charges.retrieve(charge_id))
        return None if charge is None else read_view(ChargeView, charge.to_dict(), "charge")

    def list_refunds(self, charge_id: str) -> list[RefundView]:
        """Every refund of a charge, all pages (``starting_after`` / ``has_more``)."""

        def fetch() -> list[dict[str, Any]]:
            page = self._client.v1.refunds.list(params={"charge": charge_id, "limit": 100})
            return [r.to_dict() for r in page.auto_paging_iter()]

        return [read_view(RefundView, r, "refund") for r in _call(fetch)]


def _stripe_message(error: stripe.StripeError) -> str:
    """What Stripe said (its error's message), bounded; for the caller and the finance operator."""
    message = (error.user_message or str(error) or "").strip()
    return message[:300] or "no message"


def _call(fn: Callable[[], _T]) -> _T:
    """Run one Stripe call, turning the library's errors into StripeRefused / StripeUnavailable, each
    with Stripe's own message in its detail."""
    try:
        return fn()
    except stripe.InvalidRequestError as error:
        raise StripeRefused(422, "stripe_refused", f"Stripe refused the request: {_stripe_message(error)}") from None
    except stripe.IdempotencyError as error:
        detail = (
            "this Idempotency-Key was already used for a different request; use a new key for a new "
            f"top-up ({error.user_message or 'idempotency error'})"
        )
        raise StripeRefused(409, "idempotency_key_reused", detail) from None
    except stripe.RateLimitError as error:
        raise StripeUnavailable(
            f"Stripe is rate-limiting requests; try again in a few seconds (Stripe: {_stripe_message(error)})"
        ) from None
    except (stripe.AuthenticationError, stripe.PermissionError) as error:
        raise StripeUnavailable(
            f"Stripe refused the service's API key (check BILLING_STRIPE_API_KEY; Stripe: {_stripe_message(error)})"
        ) from None
    except stripe.APIConnectionError as error:
        raise StripeUnavailable(f"Stripe could not be reached; try again (Stripe: {_stripe_message(error)})") from None
    except stripe.StripeError as error:
        status = error.http_status or "no status"
        raise StripeUnavailable(f"Stripe failed ({status}); try again (Stripe: {_stripe_message(error)})") from None


def _call_or_none(fn: Callable[[], _T]) -> _T | None:
    """:func:`_call` where Stripe's 404 (``resource_missing``) means "no such object": None."""

    def attempt() -> _T | None:
        try:
            return fn()
        except stripe.InvalidRequestError as error:
            if error.http_status == 404:
                return None
            raise

    return _call(attempt)


# -------------------------------------------------------------------------------------- signatures


def verify_webhook_signature(
    payload: bytes,
    header: str | None,
    secret: str,
    *,
    now: datetime,
    tolerance_seconds: int = WEBHOOK_TOLERANCE_SECONDS,
) -> int:
    """Check ``Stripe-Signature`` and return its signed timestamp; raise :class:`WebhookSignatureError`.

    The HMAC itself is checked by the stripe library (``WebhookSignature.verify_header``: HMAC-SHA256
    of ``f"{t}.{payload}"`` with the secret, any ``v1`` signature of the header, constant-time). The
    time is checked here, against the service clock ``now``, in both directions: a signed timestamp
    more than ``tolerance_seconds`` in the past is stale (a replay) and one more than
    ``tolerance_seconds`` in the future is refused too. stripe's ``construct_event`` accepts future
    timestamps; this service does not, because a signature dated ahead would stay "fresh" for as
    long as its date is ahead, turning the replay window from 5 minutes into however long an
    attacker or a broken clock chose. Stripe signs with its current time, so an honest webhook is
    never more than clock skew ahead: 300 s is ample.
    """
    if not header:
        raise WebhookSignatureError(
            "the Stripe-Signature header is missing; only Stripe's signed webhooks are accepted"
        )
    if not secret:
        raise WebhookSignatureError("no webhook secret is configured (BILLING_STRIPE_WEBHOOK_SECRET)")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookSignatureError("the webhook body is not UTF-8 text") from None
    try:
        stripe.WebhookSignature.verify_header(text, header, secret, tolerance=None)
        timestamp = _signed_timestamp(header)
    except stripe.SignatureVerificationError as error:
        raise WebhookSignatureError(f"the Stripe-Signature does not verify: {error.user_message or error}") from None
    except Exception:  # a header stripe could not even parse (non-ASCII signatures, huge numbers...)
        raise WebhookSignatureError("the Stripe-Signature header is malformed") from None
    age = int(now.timestamp()) - timestamp
    if age > tolerance_seconds:
        raise WebhookSignatureError(
            f"the signature is {age} s old, more than the {tolerance_seconds} s allowed (a replay, or a late retry)"
        )
    if -age > tolerance_seconds:
        raise WebhookSignatureError(
            f"the signature is dated {-age} s in the future, more than the {tolerance_seconds} s allowed; "
            "check the clocks"
        )
    return timestamp


def _signed_timestamp(header: str) -> int:
    """The ``t`` of the header, read the way the stripe library reads it (the first ``t=``)."""
    for item in header.split(","):
        parts = item.split("=", 2)
        if parts[0] == "t":
            return int(parts[1])
    raise WebhookSignatureError("the Stripe-Signature header has no timestamp")
