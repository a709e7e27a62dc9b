"""The Stripe reconciliation as one function for every caller (``GET /finance/stripe-reconciliation``
and ``billing report stripe-reconciliation``): Stripe's own records of a period (its list APIs, all
pages) matched against the ledger's, by Stripe id.

Stripe's failures come out as :class:`consumers.stripe.gateway.StripeUnavailable` (Stripe failed, or
answered something not shaped as Stripe's) or ``StripeRefused``, each with a one-line ``detail``
that carries Stripe's message; a period with more records than :data:`MAX_STRIPE_ITEMS` as
:class:`PeriodTooLarge` (a ``StripeRefused`` of status 422). Nothing here knows HTTP or the terminal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import stripe
from sqlalchemy import Connection

from consumers.stripe.gateway import StripeRefused, StripeUnavailable, _call
from ledger.money import cents_to_micros
from projections import reports
from projections.reports import Report, StripeRecord

# Stripe list pages are at most 100 items; a bound keeps one report from paging for ever.
MAX_STRIPE_ITEMS: Final = 100_000


class PeriodTooLarge(StripeRefused):
    """More Stripe records than one report reads: the caller asks for a shorter period."""

    def __init__(self) -> None:
        super().__init__(
            422, "period_too_large", f"more than {MAX_STRIPE_ITEMS:,} Stripe records: choose a shorter period"
        )


def _created(d: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(int(d.get("created") or 0), UTC)


def _records(client: stripe.StripeClient, start: datetime, end: datetime) -> list[StripeRecord]:
    window: Any = {"gte": int(start.timestamp()), "lt": int(end.timestamp())}
    params: Any = {"created": window, "limit": 100}
    out: list[StripeRecord] = []
    for pi in client.v1.payment_intents.list(params=params).auto_paging_iter():
        d = pi.to_dict()
        if d.get("status") == "succeeded" and start <= _created(d) < end:
            wallet = (d.get("metadata") or {}).get("walletId")
            amount = cents_to_micros(int(d.get("amount_received") or 0))
            out.append(StripeRecord("payment", d["id"], amount, wallet, _created(d)))
        if len(out) > MAX_STRIPE_ITEMS:
            raise PeriodTooLarge
    for re in client.v1.refunds.list(params=params).auto_paging_iter():
        d = re.to_dict()
        if d.get("status") == "succeeded" and start <= _created(d) < end:
            amount = cents_to_micros(int(d.get("amount") or 0))
            out.append(StripeRecord("refund", d["id"], amount, None, _created(d)))
        if len(out) > MAX_STRIPE_ITEMS:
            raise PeriodTooLarge
    return out


def stripe_records(client: stripe.StripeClient, start: datetime, end: datetime) -> list[StripeRecord]:
    """Stripe's own records of ``[start, end)``: succeeded PaymentIntents and refunds (all pages)."""
    try:
        return _call(lambda: _records(client, start, end))
    except (KeyError, TypeError, ValueError, OverflowError) as error:  # an answer not shaped as Stripe's
        raise StripeUnavailable(f"unexpected list answer from Stripe ({type(error).__name__}: {error})") from None


def stripe_reconciliation(conn: Connection, client: stripe.StripeClient, start: datetime, end: datetime) -> Report:
    """Ledger top-ups and refunds of ``[start, end)`` against Stripe's records. Rows: status
    (matched, missing_in_ledger, missing_in_stripe, amount_mismatch), kind, stripeId, walletId,
    ledgerMicros, stripeMicros; summary (camelCase): from, to, matched, missingInLedger,
    missingInStripe, amountMismatch. Stripe is asked before the ledger is read, so a record
    Stripe lists is already in the ledger if the service has it."""
    theirs = stripe_records(client, start, end)
    mine = reports.ledger_stripe_records(conn, start, end)
    return reports.reconcile(mine, theirs, start, end)
