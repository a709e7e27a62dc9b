"""Accounts and journal transactions of the double-entry ledger.

A journal transaction is a set of postings that sum to zero. Each transaction is caused by exactly
one event of the log and is identified by ``(event_position, txn_no)``: the journal is therefore a
pure function of the event log, and a rebuild gives the same keys byte for byte.

Sign convention: amounts are integer micro-USD. A posting's amount is added to its account's
balance. ``wallet:<id>`` holds what the platform owes the customer (positive = prepaid credit), so
a charge is ``wallet -x, revenue:<product> +x`` and a top-up is ``stripe:clearing -x, wallet +x``.
The sum of every account's balance is zero at every commit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from ledger.invariants import fail, require_int

Product = Literal["pod_on_demand", "pod_spot", "marketplace", "cluster", "serverless"]
PRODUCTS: Final[tuple[Product, ...]] = ("pod_on_demand", "pod_spot", "marketplace", "cluster", "serverless")

STRIPE_CLEARING: Final = "stripe:clearing"
REFUNDS: Final = "refunds"
DISPUTES: Final = "disputes"
ADJUSTMENTS: Final = "adjustments"

# A transaction has few legs; a bound keeps a bug from writing an unbounded one.
MAX_POSTINGS_PER_TXN: Final = 16
MAX_TXNS_PER_EVENT: Final = 8


def wallet_account(wallet_id: str) -> str:
    return f"wallet:{wallet_id}"


def revenue_account(product: Product) -> str:
    if product not in PRODUCTS:
        fail(f"unknown product {product!r}")
    return f"revenue:{product}"


@dataclass(frozen=True, slots=True)
class Posting:
    account: str
    amount_micros: int

    def __post_init__(self) -> None:
        require_int(self.amount_micros, "amount_micros")
        if self.amount_micros == 0:
            fail(f"zero posting to {self.account}")
        if not (0 < len(self.account) <= 100):
            fail(f"bad account name {self.account!r}")


@dataclass(frozen=True, slots=True)
class JournalTxn:
    """One balanced money movement. ``kind`` says what it is (``charge``, ``topup``, ...)."""

    kind: str
    wallet_id: str
    postings: tuple[Posting, ...]
    resource_id: str | None = None
    product: Product | None = None
    gpu_type: str | None = None
    memo: str = field(default="")

    def __post_init__(self) -> None:
        if not (2 <= len(self.postings) <= MAX_POSTINGS_PER_TXN):
            fail(f"{self.kind}: {len(self.postings)} postings")
        require_balanced(self.postings, self.kind)


def require_balanced(postings: Iterable[Posting], what: str = "transaction") -> None:
    total = 0
    for p in postings:
        total += require_int(p.amount_micros, "amount_micros")
    if total != 0:
        fail(f"{what}: postings sum to {total}, not 0")


def transfer(
    kind: str,
    *,
    wallet_id: str,
    debit: str,
    credit: str,
    amount_micros: int,
    resource_id: str | None = None,
    product: Product | None = None,
    gpu_type: str | None = None,
    memo: str = "",
) -> JournalTxn:
    """Two-leg transaction moving ``amount_micros`` out of ``debit`` into ``credit``."""
    require_int(amount_micros, "amount_micros")
    if not (amount_micros > 0):
        fail(f"{kind}: transfer of {amount_micros}")
    return JournalTxn(
        kind=kind,
        wallet_id=wallet_id,
        postings=(Posting(debit, -amount_micros), Posting(credit, amount_micros)),
        resource_id=resource_id,
        product=product,
        gpu_type=gpu_type,
        memo=memo,
    )
