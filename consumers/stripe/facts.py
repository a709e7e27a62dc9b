"""Money Stripe moved, into the ledger: confirms and webhooks as Stripe facts of the log.

Both paths build :mod:`ledger.events` Stripe facts whose identity is Stripe's own (source
``stripe``; the PaymentIntent, refund or ``<dispute>.opened``/``.closed`` id) and put them in the
ledger with :func:`projections.write_path.write` (a :class:`~projections.write_path.Facts` command),
which locks the wallet, drops what the log already holds and writes the journal and projections in
the caller's transaction. That is what
makes a PaymentIntent credit exactly once, whether it arrives by webhook, by confirm, by both,
concurrently, or a hundred times: the second writer waits for the wallet lock, then finds
``("stripe", <pi id>)`` in the log.

Stripe calls (retrieving a PaymentIntent, listing refunds) happen *before* the database
transaction, so no lock is held across the network.

Webhooks
--------
Each webhook is recorded once by Stripe's event id in ``stripe_webhook_events``, in the same
transaction as its facts; a redelivery finds the row and does nothing. Handled types:

- ``payment_intent.succeeded``: the PaymentIntent's ``amount_received`` is credited (id = PI id).
- ``charge.refunded``: one refund fact per *succeeded* refund of the charge (id = refund id), so
  partial and repeated refunds each count once. The refunds are the ones embedded in the charge
  (``charge.refunds.data``); when the charge does not embed them (newer API versions) or has more
  than one page of them, they are listed from Stripe.
- ``charge.dispute.created`` / ``charge.dispute.closed``: the dispute's amount is held, then
  released (``won``) or gone (any other closing status).

Facts are booked at Stripe's ``created`` when it is within the webhook tolerance (300 s) of the
service clock, else at their receipt with ``data.stripeCreated`` keeping Stripe's claim (the
``event_time`` anomaly). A refund or dispute larger than what its payment has left is applied in full
by the rules and flagged in its journal memo (``exceeds_payment``). Both are counted in
``billing_stripe_anomalies_total{kind}`` and listed by projections.anomalies.

Any other type is answered 200 and recorded with ``handled = false``; so is a handled type that
cannot be attributed to a wallet or is not in USD (logged as an error: finance must look).

The wallet of a PaymentIntent is, in this order: the wallet the ledger already books it to (a
refund must debit the wallet the payment credited), the ``metadata.walletId`` of the object in
hand, the ``metadata.walletId`` of the PaymentIntent retrieved from Stripe.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal, TypeVar

import psycopg
from pydantic import BaseModel, ValidationError
from sqlalchemy import Engine

from consumers.stripe.gateway import (
    WEBHOOK_TOLERANCE_SECONDS,
    ChargeView,
    DisputeView,
    PaymentIntentView,
    RefundView,
    StripeEventView,
    StripeGateway,
    StripeUnavailable,
    read_view,
    verify_webhook_signature,
)
from ledger.db import unit_of_work
from ledger.events import (
    ID_PATTERN,
    MAX_STRIPE_AMOUNT_MICROS,
    STRIPE_SOURCE,
    StripeDisputeClosed,
    StripeDisputeClosedEvent,
    StripeDisputeOpened,
    StripeDisputeOpenedEvent,
    StripeFact,
    StripePaymentSucceeded,
    StripePaymentSucceededEvent,
    StripeRefundSucceeded,
    StripeRefundSucceededEvent,
    event_to_json,
)
from ledger.money import cents_to_micros
from projections import anomalies
from projections.stripe_records import UnstorableWebhook, record_webhook, wallet_of_payment, webhook_handled
from projections.write_path import Disposition, Facts, Incoming, write

log = logging.getLogger("billing.stripe")

HANDLED_TYPES: Final = frozenset(
    {"payment_intent.succeeded", "charge.refunded", "charge.dispute.created", "charge.dispute.closed"}
)
MAX_WEBHOOK_BYTES: Final = 1_048_576
"""Stripe events are a few kilobytes; a megabyte is far above any real one."""

_WALLET_RE: Final = re.compile(ID_PATTERN)

Clock = Callable[[], datetime]
_V = TypeVar("_V", bound=BaseModel)


class TopUpRefused(Exception):
    """A confirm that books nothing, as a domain refusal: ``error`` is a stable code
    (``payment_intent_not_found``, ``payment_not_succeeded``, ``not_a_wallet_topup``), ``detail``
    says what to do; the HTTP side maps the code to its status (consumers.http.errors)."""

    def __init__(self, error: str, detail: str, *, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail
        self.extra = dict(extra or {})


class InvalidWebhook(Exception):
    """A correctly signed body that is not a Stripe event: answered 400, nothing recorded."""


class _Unattributable(Exception):
    """A handled event that cannot become ledger facts (no wallet, not USD...): recorded, not handled."""


@dataclass(frozen=True, slots=True)
class ConfirmResult:
    wallet_id: str
    payment_intent_id: str
    amount_micros: int
    balance_micros: int
    credited: bool
    """True if this call put the payment in the ledger; False if it was there already."""


@dataclass(frozen=True, slots=True)
class WebhookResult:
    event_id: str
    type: str
    handled: bool
    duplicate: bool
    """The same Stripe event was recorded before: nothing was done this time."""
    facts: int
    """Ledger facts the event carries."""
    applied: int
    """Of those, how many were new to the ledger."""
    note: str


def _parse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_json(payload: bytes) -> Any:
    """JSON as Stripe sends it: numbers with a fraction become Decimal (never float); NaN refused."""
    return json.loads(payload, parse_float=Decimal, parse_constant=_parse_constant)


# A JSON string escape, or an escaped backslash (consumed first, so "\\\\u0000" is left alone).
_ESCAPE_RE: Final = re.compile(r"(\\\\)|\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|\\u([0-9a-f]{4})", re.IGNORECASE)


def storable_json(text: str) -> str:
    """The JSON text with what PostgreSQL's jsonb refuses (``\\u0000`` and unpaired surrogate
    escapes) replaced by ``\\ufffd``; everything else, numbers and key order included, unchanged."""
    if "\\u" not in text:
        return text

    def fix(match: re.Match[str]) -> str:
        single = match.group(4)
        if single is None:
            return match.group(0)  # an escaped backslash, or a valid surrogate pair
        code = int(single, 16)
        return "\\ufffd" if code == 0 or 0xD800 <= code <= 0xDFFF else match.group(0)

    return _ESCAPE_RE.sub(fix, text)


class StripeFacts:
    """Confirms and webhooks, each one unit of work."""

    def __init__(
        self,
        engine: Engine,
        gateway: StripeGateway | None,
        clock: Clock,
        *,
        on_anomaly: Callable[[str, int], None] | None = None,
    ) -> None:
        self._engine = engine
        self._gateway = gateway
        self._clock = clock
        self._on_anomaly = on_anomaly
        """(kind, count) for each anomaly newly in the ledger (the metric)."""

    # ----------------------------------------------------------------------------------- confirm

    def confirm(self, payment_intent_id: str) -> ConfirmResult:
        """Retrieve the PaymentIntent; if it succeeded, credit its wallet once (``via="confirm"``)."""
        intent = self._stripe().retrieve_payment_intent(payment_intent_id)
        if intent is None:
            raise TopUpRefused(
                "payment_intent_not_found",
                f"Stripe has no PaymentIntent {payment_intent_id}; use the paymentIntentId that "
                "POST /wallet/create-intent returned",
            )
        if intent.status != "succeeded":
            raise TopUpRefused(
                "payment_not_succeeded",
                f"PaymentIntent {intent.id} is {intent.status}, not succeeded; nothing was credited. "
                "Confirm again once the payment has succeeded (the webhook will credit it too).",
                extra={"status": intent.status},
            )
        wallet_id = intent.metadata.get("walletId")
        if wallet_id is None:
            raise TopUpRefused(
                "not_a_wallet_topup",
                f"PaymentIntent {intent.id} has no metadata.walletId: it was not created by POST /wallet/create-intent",
            )
        now = self._clock()
        try:
            wallet_id = self._wallet_of(intent.id, intent.metadata)  # the ledger's, if it knows the payment
            fact = self._payment_fact(intent, wallet_id, via="confirm", at=now)
        except _Unattributable as why:
            raise TopUpRefused("not_a_wallet_topup", str(why)) from None
        with unit_of_work(self._engine) as uow:
            result = write(uow.pg, Facts([Incoming(fact, event_to_json(fact))]), now=now)
            balance = result.balances_micros[wallet_id]
            found = _new_anomalies(uow.pg, [fact], result.dispositions)
            uow.commit()
        self._report(found, payment_intent_id)
        credited = result.dispositions[0] is Disposition.accepted
        if credited:
            log.info("payment %s credited to wallet %s by confirm", intent.id, wallet_id)
        return ConfirmResult(
            wallet_id=wallet_id,
            payment_intent_id=intent.id,
            amount_micros=fact.data.amount_micros,
            balance_micros=balance,
            credited=credited,
        )

    # ---------------------------------------------------------------------------------- webhooks

    def webhook(self, payload: bytes, signature: str | None, secret: str) -> WebhookResult:
        """Verify, record once, apply. Raises :class:`WebhookSignatureError` (answer 400, nothing
        changed), :class:`InvalidWebhook` for a signed body that is not a Stripe event (400) and
        :class:`StripeUnavailable` when Stripe must be asked and cannot be (5xx: Stripe retries)."""
        now = self._clock()
        verify_webhook_signature(payload, signature, secret, now=now)
        try:
            document = load_json(payload)
        except (ValueError, RecursionError, ArithmeticError):  # ArithmeticError: Decimal("1e9999999999999999999")
            raise InvalidWebhook("the webhook body is not valid JSON") from None
        try:
            event = StripeEventView.model_validate(document)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "event"
            raise InvalidWebhook(f"the webhook body is not a Stripe event ({where}: {first['msg']})") from None

        recorded = self._recorded(event.id)
        if recorded is not None:
            return WebhookResult(event.id, event.type, recorded, True, 0, 0, "already received")

        facts: Sequence[StripeFact] = ()
        handled = event.type in HANDLED_TYPES
        note = "recorded; this event type is not acted on" if not handled else ""
        if handled:
            try:
                facts = self._facts_of(event, now)
            except _Unattributable as why:
                handled, note = False, f"recorded, not handled: {why}"
                log.error("stripe event %s (%s) not handled: %s", event.id, event.type, why)

        stored = storable_json(payload.decode())
        with unit_of_work(self._engine) as uow:
            try:
                first_time = record_webhook(
                    uow.pg, event_id=event.id, type=event.type, received_at=now, handled=handled, payload=stored
                )
            except UnstorableWebhook as why:  # e.g. a number beyond PostgreSQL's numeric range
                raise InvalidWebhook(f"the event cannot be stored: {why}") from None
            if not first_time:  # a concurrent delivery of the same event got there first (and committed)
                uow.conn.rollback()
                recorded = self._recorded(event.id)
                return WebhookResult(event.id, event.type, bool(recorded), True, 0, 0, "already received")
            applied = 0
            found: dict[str, int] = {}
            if facts:
                result = write(uow.pg, Facts([Incoming(f, event_to_json(f)) for f in facts]), now=now)
                applied = sum(1 for d in result.dispositions if d is Disposition.accepted)
                found = _new_anomalies(uow.pg, facts, result.dispositions)
            uow.commit()
        if applied:
            log.info("stripe event %s (%s): %d new fact(s) in the ledger", event.id, event.type, applied)
        self._report(found, event.id)
        if handled:
            note = f"{len(facts)} fact(s), {applied} new to the ledger"
            if found:
                flags = ", ".join(f"{kind} x{n}" for kind, n in sorted(found.items()))
                note += f"; applied as Stripe says and flagged for finance ({flags}): GET /finance/anomalies"
        return WebhookResult(event.id, event.type, handled, False, len(facts), applied, note)

    def _recorded(self, event_id: str) -> bool | None:
        """Whether the event was handled when it was recorded; None if it was never received."""
        with unit_of_work(self._engine) as uow:
            return webhook_handled(uow.pg, event_id)

    def _facts_of(self, event: StripeEventView, now: datetime) -> list[StripeFact]:
        at, claimed = _event_time(event.created, now)
        return [_with_claimed_time(f, claimed) for f in self._facts_at(event, at)]

    def _facts_at(self, event: StripeEventView, at: datetime) -> list[StripeFact]:
        obj = event.data.object
        if event.type == "payment_intent.succeeded":
            intent = _object(PaymentIntentView, obj, "PaymentIntent")
            if intent.status != "succeeded":
                raise _Unattributable(f"PaymentIntent {intent.id} is {intent.status}")
            wallet_id = self._wallet_of(intent.id, intent.metadata)
            return [self._payment_fact(intent, wallet_id, via="webhook", at=at)]
        if event.type == "charge.refunded":
            charge = _object(ChargeView, obj, "charge")
            _require_usd(charge.currency, f"charge {charge.id}")
            if charge.payment_intent is None:
                raise _Unattributable(f"charge {charge.id} has no PaymentIntent")
            wallet_id = self._wallet_of(charge.payment_intent, charge.metadata)
            refunds: list[RefundView]
            if charge.refunds is not None and not charge.refunds.has_more:
                refunds = list(charge.refunds.data)
            else:
                refunds = self._stripe().list_refunds(charge.id)
            return [
                _refund_fact(r, wallet_id, charge.payment_intent, at)
                for r in refunds
                if r.status == "succeeded" and r.amount > 0
            ]
        dispute = _object(DisputeView, obj, "dispute")
        _require_usd(dispute.currency, f"dispute {dispute.id}")
        pi = dispute.payment_intent or self._payment_intent_of_charge(dispute.charge)
        wallet_id = self._wallet_of(pi, dispute.metadata)
        amount = _micros(dispute.amount, f"dispute {dispute.id}")
        if event.type == "charge.dispute.created":
            return [
                StripeDisputeOpenedEvent(
                    specversion="1.0",
                    id=f"{dispute.id}.opened",
                    source=STRIPE_SOURCE,
                    time=at,
                    data=StripeDisputeOpened(
                        wallet_id=wallet_id, payment_intent_id=pi, dispute_id=dispute.id, amount_micros=amount
                    ),
                )
            ]
        return [
            StripeDisputeClosedEvent(
                specversion="1.0",
                id=f"{dispute.id}.closed",
                source=STRIPE_SOURCE,
                time=at,
                data=StripeDisputeClosed(
                    wallet_id=wallet_id,
                    payment_intent_id=pi,
                    dispute_id=dispute.id,
                    amount_micros=amount,
                    won=dispute.status == "won",
                ),
            )
        ]

    # ----------------------------------------------------------------------------------- helpers

    def _report(self, found: dict[str, int], what: str) -> None:
        for kind, n in sorted(found.items()):
            log.warning("stripe %s: %d fact(s) flagged %s for finance (billing report anomalies)", what, n, kind)
            if self._on_anomaly is not None:
                self._on_anomaly(kind, n)

    def _stripe(self) -> StripeGateway:
        if self._gateway is None:
            raise StripeUnavailable("Stripe is not configured (set BILLING_STRIPE_API_KEY)")
        return self._gateway

    def _payment_intent_of_charge(self, charge_id: str | None) -> str:
        if charge_id is None:
            raise _Unattributable("the dispute names neither a PaymentIntent nor a charge")
        charge = self._stripe().retrieve_charge(charge_id)
        if charge is None or charge.payment_intent is None:
            raise _Unattributable(f"charge {charge_id} has no PaymentIntent at Stripe")
        return charge.payment_intent

    def _wallet_of(self, payment_intent_id: str, metadata: dict[str, str]) -> str:
        with unit_of_work(self._engine) as uow:
            booked = wallet_of_payment(uow.pg, payment_intent_id)
        if booked is not None:
            return booked
        wallet_id = metadata.get("walletId")
        if wallet_id is None:
            intent = self._stripe().retrieve_payment_intent(payment_intent_id)
            if intent is None:
                raise _Unattributable(f"Stripe has no PaymentIntent {payment_intent_id}")
            wallet_id = intent.metadata.get("walletId")
        if wallet_id is None:
            raise _Unattributable(f"PaymentIntent {payment_intent_id} has no metadata.walletId")
        return _valid_wallet(wallet_id, payment_intent_id)

    def _payment_fact(
        self, intent: PaymentIntentView, wallet_id: str, *, via: Literal["webhook", "confirm"], at: datetime
    ) -> StripePaymentSucceededEvent:
        _require_usd(intent.currency, f"PaymentIntent {intent.id}")
        amount = _micros(intent.amount_received, f"PaymentIntent {intent.id} (amount_received)")
        return StripePaymentSucceededEvent(
            specversion="1.0",
            id=intent.id,
            source=STRIPE_SOURCE,
            time=at,
            data=StripePaymentSucceeded(
                wallet_id=_valid_wallet(wallet_id, intent.id),
                payment_intent_id=intent.id,
                amount_micros=amount,
                via=via,
            ),
        )


def _with_claimed_time(fact: StripeFact, claimed: int | None) -> StripeFact:
    """The fact with Stripe's claimed ``created`` kept in its data (the anomaly flag), if any."""
    if claimed is None:
        return fact
    data = type(fact.data).model_validate({**fact.data.model_dump(), "stripe_created": claimed})
    return fact.model_copy(update={"data": data})


def _object(view: type[_V], value: dict[str, Any], what: str) -> _V:
    """The event's ``data.object`` read as ``view``; a shape not understood is recorded, not handled."""
    try:
        return read_view(view, value, what)
    except StripeUnavailable as why:
        raise _Unattributable(why.detail) from None


def _refund_fact(
    refund: RefundView, wallet_id: str, payment_intent_id: str, at: datetime
) -> StripeRefundSucceededEvent:
    return StripeRefundSucceededEvent(
        specversion="1.0",
        id=refund.id,
        source=STRIPE_SOURCE,
        time=at,
        data=StripeRefundSucceeded(
            wallet_id=wallet_id,
            payment_intent_id=payment_intent_id,
            refund_id=refund.id,
            amount_micros=_micros(refund.amount, f"refund {refund.id}"),
        ),
    )


def _valid_wallet(wallet_id: str, payment_intent_id: str) -> str:
    if _WALLET_RE.fullmatch(wallet_id) is None:
        raise _Unattributable(
            f"PaymentIntent {payment_intent_id} names wallet {wallet_id[:80]!r}, which is not a wallet id "
            f"({ID_PATTERN})"
        )
    return wallet_id


def _require_usd(currency: str | None, what: str) -> None:
    if currency is not None and currency.lower() != "usd":
        raise _Unattributable(f"{what} is in {currency.upper()[:8]}; wallets are in USD only")


def _micros(cents: int, what: str) -> int:
    micros = cents_to_micros(cents)
    if not 1 <= micros <= MAX_STRIPE_AMOUNT_MICROS:
        raise _Unattributable(f"{what} is {cents} cents, outside 1..{MAX_STRIPE_AMOUNT_MICROS // 10_000}")
    return micros


def _event_time(created: int | None, now: datetime) -> tuple[datetime, int | None]:
    """When a webhook's facts are booked, and Stripe's ``created`` when it is flagged.

    Stripe's own time when it is within the webhook tolerance of the service clock (never after the
    clock); otherwise the receipt time ``now``, with ``created`` returned to be kept in the fact and
    shown to finance: a producer's clock (``created`` = 1 is 1970) never books into another period."""
    if created is None:
        return now, None
    try:
        at = datetime.fromtimestamp(created, UTC)
    except (OverflowError, OSError, ValueError):
        return now, created
    if abs((at - now).total_seconds()) > WEBHOOK_TOLERANCE_SECONDS:
        return now, created
    return min(at, now), None


def _new_anomalies(
    conn: psycopg.Connection[Any], facts: Sequence[StripeFact], dispositions: Sequence[Disposition]
) -> dict[str, int]:
    """The anomalies (projections.anomalies) among the facts this batch put in the ledger."""
    new = [f for f, d in zip(facts, dispositions, strict=True) if d is Disposition.accepted]
    found = anomalies.flagged_in(conn, [f.id for f in new])
    late = sum(1 for f in new if f.data.stripe_created is not None)
    if late:
        found["event_time"] = late
    return found
