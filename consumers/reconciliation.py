"""The Stripe reconciliation as one function, for every caller (the CLI; the HTTP route can use it too):
Stripe's own records of a period (its list APIs, all pages) matched against the ledger's.

Stripe's failures come out as :class:`consumers.stripe_gateway.StripeUnavailable` or
``StripeRefused`` (one line each, Stripe's message included); a period with more records than
:data:`MAX_STRIPE_ITEMS` as :class:`PeriodTooLarge`. Nothing here knows HTTP or the terminal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import stripe
from sqlalchemy import Connection

from consumers.stripe_gateway import _call
from ledger.money import cents_to_micros
from projections import reports
from projections.reports import Report, StripeRecord

# Stripe list pages are at most 100 items; a bound keeps one report from paging for ever.
MAX_STRIPE_ITEMS: Final = 100_000


class PeriodTooLarge(ValueError):
    """More Stripe records than one report reads: the caller asks for a shorter period."""


def _created(d: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(int(d.get("created") or 0), UTC)


def stripe_records(client: stripe.StripeClient, start: datetime, end: datetime) -> list[StripeRecord]:
    """Stripe's own records of ``[start, end)``: succeeded PaymentIntents and refunds (all pages)."""
    window: Any = {"gte": int(start.timestamp()), "lt": int(end.timestamp())}
    params: Any = {"created": window, "limit": 100}

    def fetch() -> list[StripeRecord]:
        out: list[StripeRecord] = []
        for pi in client.v1.payment_intents.list(params=params).auto_paging_iter():
            d = pi.to_dict()
            if d.get("status") == "succeeded" and start <= _created(d) < end:
                wallet = (d.get("metadata") or {}).get("walletId")
                amount = cents_to_micros(int(d.get("amount_received") or 0))
                out.append(StripeRecord("payment", d["id"], amount, wallet, _created(d)))
            if len(out) > MAX_STRIPE_ITEMS:
                raise PeriodTooLarge(f"more than {MAX_STRIPE_ITEMS:,} Stripe records: choose a shorter period")
        for re in client.v1.refunds.list(params=params).auto_paging_iter():
            d = re.to_dict()
            if d.get("status") == "succeeded" and start <= _created(d) < end:
                amount = cents_to_micros(int(d.get("amount") or 0))
                out.append(StripeRecord("refund", d["id"], amount, None, _created(d)))
            if len(out) > MAX_STRIPE_ITEMS:
                raise PeriodTooLarge(f"more than {MAX_STRIPE_ITEMS:,} Stripe records: choose a shorter period")
        return out

    return _call(fetch)


def stripe_reconciliation(conn: Connection, client: stripe.StripeClient, start: datetime, end: datetime) -> Report:
    """Ledger top-ups and refunds of ``[start, end)`` against Stripe's records (Stripe read first)."""
    theirs = stripe_records(client, start, end)
    mine = reports.ledger_stripe_records(conn, start, end)
    return reports.reconcile(mine, theirs, start, end)
