"""Random platform traffic against the REAL database, through the real units of work (the intake
owner's, consumers.nats.intake.transact, with its wallets in memory: checked against a load after every
step; tick_wallets, admit_rental_request, admit_serverless_request), compared after every
step with a small reference model written here from DESIGN sections 1 and 2 (it does not use
projections.rules).

The machine drives top-ups and debits, rental admissions (and repeats of them), starts with and
without an admission id, early readings (retried until the start arrives), readings in and out of
order, stale pauses and resumes, duplicates (the same source/id delivered again, alone or inside a
batch), another wallet naming a rental, pauses, resumes, ends, spot preemptions, serverless jobs
(the same job again under a new event id), serverless admissions up to the rate limit, Stripe
payments, refunds and disputes in any order, scheduler ticks, and a clock it moves itself (always
aware UTC): now and then straight to the microsecond at which a wallet reaches zero (R4) and through
the re-issue schedule of the unanswered stop commands, one microsecond early and on time.

After every step it compares: each disposition of each batch, every balance, each rental (billable
seconds, charged, status, end, last reading, stop bookkeeping), each serverless endpoint, each Stripe
payment, the open holds and recent serverless admissions, every admission answer, the stop commands
and settlements in the outbox, the revenue, adjustments and Stripe money booked; and checks that the
machine's journal sums to zero and each balance is the sum of its entries. Every few steps, and at
teardown, the log of the machine's wallets is rebuilt (`billing verify` limited to them) and must
equal the projections; at the end of the test the whole database is verified.

The model's choices where the contract is silent are those documented in projections.rules (a
second start is refused, a stale pause does not pause, failed jobs are charged, accrual is floored per
rental to the microsecond, stop commands are re-issued after 5, 10, 20, 40 s then every 60 s, a
refund or dispute before its payment waits for it).
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from consumers.nats.intake import parsed_items, transact
from ledger.db import make_engine, unit_of_work
from ledger.events import (
    STRIPE_SOURCE,
    LogEvent,
    StripeDisputeClosed,
    StripeDisputeClosedEvent,
    StripeDisputeOpened,
    StripeDisputeOpenedEvent,
    StripePaymentSucceeded,
    StripePaymentSucceededEvent,
    StripeRefundSucceeded,
    StripeRefundSucceededEvent,
    event_to_json,
)
from ledger.schema import APP_ROLE
from projections.processor import (
    Disposition,
    Incoming,
    admit_rental_request,
    admit_serverless_request,
    process_batch,
    tick_wallets,
)
from projections.verify import verify
from projections.wallet_store import WalletCache, load_wallets
from tests.conftest import migrated_database
from tests.factories import make_event

Event = LogEvent

pytestmark = [pytest.mark.integration, pytest.mark.property]

# Sized for about a minute in `make test`; a longer hunt: BILLING_STATEFUL_EXAMPLES=500 with
# `pytest --timeout 0`. Shrinking replays every candidate against the database and can take minutes,
# so it runs only with BILLING_STATEFUL_SHRINK=1; without it a failure prints its whole sequence.
MAX_EXAMPLES = int(os.environ.get("BILLING_STATEFUL_EXAMPLES", "60"))
STEPS = int(os.environ.get("BILLING_STATEFUL_STEPS", "50"))
SHRINK = os.environ.get("BILLING_STATEFUL_SHRINK") == "1"
REPLAY_EVERY = 20
"""Steps between two rebuilds of the machine's wallets (and one at teardown)."""

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)

# --- The contract, re-derived (DESIGN sections 1 and 2) --------------------------------------------
US_PER_HOUR = 3_600_000_000
HOLD_TTL = timedelta(seconds=120)
SERVERLESS_MIN_AVAILABLE = 100_000
SERVERLESS_PER_MINUTE = 60
SERVERLESS_WINDOW = timedelta(seconds=60)


def rental_cost(seconds: int, price_per_hour: int) -> int:
    return seconds * price_per_hour // 3600


def stop_backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(5 * 2 ** (attempts - 1), 60))


def us(t: datetime) -> int:
    return (t - EPOCH) // US


def product_of(kind: str, tier: str) -> str:
    if kind == "pod":
        return "pod_spot" if tier == "spot" else "pod_on_demand"
    return kind  # marketplace, cluster (spot or not)


# --- The reference model ---------------------------------------------------------------------------


@dataclass
class MRental:
    rid: str
    wallet: str
    kind: str
    tier: str
    price: int
    started_at: datetime
    last: datetime
    status: str = "running"
    billable: int = 0
    ended_at: datetime | None = None
    end_reason: str | None = None
    stop_seq: int = 0
    attempts: int = 0
    issued: datetime | None = None

    @property
    def charged(self) -> int:
        return rental_cost(self.billable, self.price)


@dataclass
class MHold:
    admission_id: str
    rid: str
    amount: int
    expires: datetime


@dataclass
class MPayment:
    """A Stripe PaymentIntent: refunds and disputes that come before the payment wait for it."""

    wallet: str
    seen: bool = False
    credited: int = 0
    refunded: int = 0
    disputes: dict[str, tuple[str, int]] = field(default_factory=dict)
    """dispute id -> (open/won/lost, amount held while open)"""
    pending: list[Event] = field(default_factory=list)


@dataclass
class MWallet:
    wid: str
    balance: int = 0
    adjusted: int = 0
    holds: list[MHold] = field(default_factory=list)
    admissions: list[datetime] = field(default_factory=list)
    endpoints: dict[str, int] = field(default_factory=dict)
    """endpoint -> exact cost so far, in thousandths of a micro"""
    jobs: set[tuple[str, str]] = field(default_factory=set)


Outcome = tuple[str, str | None]
"""(disposition, rejection reason)"""


class Model:
    def __init__(self, wallet_ids: list[str]) -> None:
        self.wallets = {w: MWallet(w) for w in wallet_ids}
        self.rentals: dict[str, MRental] = {}
        self.log: set[tuple[str, str]] = set()
        self.revenue: Counter[str] = Counter()
        self.commands: list[tuple[str, str, str, datetime]] = []
        self.settlements: list[tuple[str, int, int, str, datetime]] = []
        self.payments: dict[str, MPayment] = {}
        self.booked: Counter[str] = Counter()
        """Stripe money by account (stripe:clearing, refunds, disputes)."""

    # queries
    def running(self, w: str) -> list[MRental]:
        return sorted(
            (r for r in self.rentals.values() if r.wallet == w and r.status == "running"), key=lambda r: r.rid
        )

    def available(self, w: str, now: datetime, holds: list[MHold] | None = None) -> int:
        wallet = self.wallets[w]
        accrued = sum(max(0, us(now) - us(r.last)) * r.price // US_PER_HOUR for r in self.running(w))
        held = sum(h.amount for h in (wallet.holds if holds is None else holds) if h.expires > now)
        return wallet.balance - accrued - held

    def zero_instant(self, w: str, now: datetime) -> datetime | None:
        """R4: the first microsecond ``t >= now`` at which the wallet's available balance is <= 0.
        None when nothing burns, when it is at zero already, or when zero is more than 30 days away.

        Between two hold expiries available only goes down (accrual grows), so each such segment is
        searched by bisection; after the last expiry, zero comes by ``start + (balance + n) * hour /
        burn`` since each rental's floor loses less than one micro."""
        running = [r for r in self.running(w) if r.price > 0]
        if not running or self.available(w, now) <= 0:
            return None
        burn = sum(r.price for r in running)
        expiries = sorted({us(h.expires) for h in self.wallets[w].holds if h.expires > now})
        start = max([us(now), *(us(r.last) for r in running), *expiries])
        end = start + -(-(self.wallets[w].balance + len(running)) * US_PER_HOUR // burn)
        if end - us(now) > 30 * 86_400 * 1_000_000:
            return None

        def at(t: int) -> datetime:
            return EPOCH + t * US

        assert self.available(w, at(end)) <= 0
        lo = us(now)
        for seg_end in [*expiries, end + 1]:
            if self.available(w, at(seg_end - 1)) <= 0:
                hi = seg_end - 1
                while lo < hi:
                    mid = (lo + hi) // 2
                    if self.available(w, at(mid)) <= 0:
                        hi = mid
                    else:
                        lo = mid + 1
                assert self.available(w, at(lo)) <= 0 < self.available(w, at(lo) - US)
                return at(lo)
            lo = seg_end
        raise AssertionError("no zero instant below its bound")

    def issued(self, w: str) -> int:
        """Stop commands issued so far for the rentals of wallet ``w``."""
        return sum(1 for c in self.commands if c[0].startswith(f"stop-{w}-"))

    def next_reissue(self, w: str, now: datetime) -> datetime | None:
        """When the next re-issue of an unanswered stop command falls due (the wallet still at zero)."""
        due = [r.issued + stop_backoff(r.attempts) for r in self.running(w) if r.issued is not None]
        return min(due) if due and self.available(w, now) <= 0 else None

    # the time-driven part: after each accepted event, each tick, each rental admission
    def housekeeping(self, w: str, now: datetime) -> None:
        wallet = self.wallets[w]
        wallet.holds = [h for h in wallet.holds if h.expires > now]
        wallet.admissions = [t for t in wallet.admissions if t > now - SERVERLESS_WINDOW]
        if self.available(w, now) > 0:
            for r in self.rentals.values():
                if r.wallet == w:
                    r.attempts, r.issued = 0, None
            return
        for r in self.running(w):
            if r.issued is None or now >= r.issued + stop_backoff(r.attempts):
                r.stop_seq += 1
                r.attempts += 1
                r.issued = now
                self.commands.append((f"stop-{w}-{r.rid}-{r.stop_seq}", r.rid, r.kind, now))

    # events
    def batch(self, events: list[Event], now: datetime) -> list[Outcome]:
        seen: set[tuple[str, str]] = set()
        out: list[Outcome] = []
        for ev in events:
            key = (ev.source, ev.id)
            if key in self.log or key in seen:
                out.append(("duplicate", None))
                continue
            seen.add(key)
            outcome = self.apply(ev, now)
            if outcome[0] == "accepted":
                self.log.add(key)
                self.housekeeping(ev.wallet_id, now)
            out.append(outcome)
        return out

    def _release(self, wallet: MWallet, admission_id: str | None, rid: str) -> None:
        if admission_id is not None:
            wallet.holds = [h for h in wallet.holds if h.admission_id != admission_id]
        else:
            wallet.holds = [h for h in wallet.holds if h.rid != rid]

    def apply(self, ev: Event, now: datetime) -> Outcome:
        d: Any = ev.data
        w = ev.wallet_id
        wallet = self.wallets[w]
        if ev.type == "wallet.adjusted":
            wallet.balance += d.amount_micros
            wallet.adjusted += d.amount_micros
            return ("accepted", None)
        if ev.type.startswith("stripe."):
            self.stripe(ev)
            return ("accepted", None)
        if ev.type == "serverless.job.completed":
            if (d.endpoint_id, d.job_id) in wallet.jobs:
                return ("accepted", None)  # charged once: a no-op
            wallet.jobs.add((d.endpoint_id, d.job_id))
            before = wallet.endpoints.get(d.endpoint_id, 0)
            after = before + d.compute_ms * d.price_per_second_micros
            wallet.endpoints[d.endpoint_id] = after
            charge = after // 1000 - before // 1000
            wallet.balance -= charge
            self.revenue["serverless"] += charge
            return ("accepted", None)
        rid = d.resource_id
        r = self.rentals.get(rid)
        if r is not None and r.wallet != w:
            return ("rejected", "wallet_mismatch")
        if ev.type == "gpu.rental.started":
            if r is not None:
                return ("rejected", "already_started")
            self.rentals[rid] = MRental(
                rid, w, d.resource_kind, d.tier, d.price_per_hour_micros, started_at=ev.time, last=ev.time
            )
            self._release(wallet, d.admission_id, rid)
            return ("accepted", None)
        if r is None:
            return ("retry", None)
        if ev.type == "gpu.rental.resumed":
            if r.status == "ended":
                return ("rejected", "invalid_transition")
            self._release(wallet, d.admission_id, rid)
            if r.status == "paused" and ev.time >= r.last:
                r.status, r.last = "running", ev.time
            return ("accepted", None)
        seconds = d.uptime_seconds_total
        if r.status == "ended":
            return ("accepted", None) if seconds <= r.billable else ("rejected", "reading_after_settlement")
        stale = seconds < r.billable or (seconds == r.billable and ev.time < r.last)
        if seconds >= r.billable:
            r.last = max(r.last, ev.time)
        if seconds > r.billable:
            charge = rental_cost(seconds, r.price) - rental_cost(r.billable, r.price)
            r.billable = seconds
            wallet.balance -= charge
            self.revenue[product_of(r.kind, r.tier)] += charge
        if ev.type == "gpu.rental.paused" and not stale:
            r.status, r.attempts, r.issued = "paused", 0, None
        elif ev.type in ("gpu.rental.ended", "gpu.spot.preempted"):
            reason = d.reason if ev.type == "gpu.rental.ended" else "preempted"
            ended_at = ev.time if ev.type == "gpu.rental.ended" else d.terminated_at
            r.status, r.ended_at, r.end_reason, r.attempts, r.issued = "ended", ended_at, reason, 0, None
            self.settlements.append((rid, r.billable, r.charged, reason, ended_at))
        return ("accepted", None)

    def move(self, w: str, amount: int, account: str) -> None:
        """Stripe money: ``amount`` into the wallet out of ``account`` (negative: the other way)."""
        self.wallets[w].balance += amount
        self.booked[account] -= amount

    def stripe(self, ev: Event) -> None:
        d: Any = ev.data
        w = ev.wallet_id
        payment = self.payments.setdefault(d.payment_intent_id, MPayment(w))
        if ev.type == "stripe.payment.succeeded":
            payment.seen, payment.credited = True, d.amount_micros
            self.move(w, d.amount_micros, "stripe:clearing")
            waiting, payment.pending = payment.pending, []
            for fact in waiting:
                self.stripe(fact)
            return
        if not payment.seen:
            payment.pending.append(ev)
            return
        if ev.type == "stripe.refund.succeeded":
            payment.refunded += d.amount_micros
            self.move(w, -d.amount_micros, "refunds")
            return
        status, held = payment.disputes.get(d.dispute_id, ("none", 0))
        if ev.type == "stripe.dispute.opened":
            if status == "none":  # (an opening after the closing moves nothing)
                self.move(w, -d.amount_micros, "disputes")
                payment.disputes[d.dispute_id] = ("open", d.amount_micros)
            return
        if status in ("won", "lost"):
            return
        if status == "open":
            # won: the held amount comes back; lost: it goes to the card holder (through Stripe).
            self.booked["disputes"] -= held
            if d.won:
                self.wallets[w].balance += held
            else:
                self.booked["stripe:clearing"] += held
        elif not d.won:  # lost before its opening arrived: straight out of the wallet
            self.move(w, -d.amount_micros, "stripe:clearing")
        payment.disputes[d.dispute_id] = ("won" if d.won else "lost", 0)

    # questions
    def admit_rental(self, w: str, rid: str, price: int, admission_id: str, now: datetime) -> tuple[bool, int]:
        wallet = self.wallets[w]
        holds = [h for h in wallet.holds if h.expires > now]
        same = [h for h in holds if h.admission_id == admission_id and h.rid == rid]
        if same:
            available = self.available(w, now, [h for h in holds if h is not same[0]])
            admitted = True
        else:
            others = [h for h in holds if h.rid != rid]
            available = self.available(w, now, others)
            need = rental_cost(3600, price)  # one hour of its price
            admitted = available >= need
            holds = [*others, MHold(admission_id, rid, need, now + HOLD_TTL)] if admitted else holds
        wallet.holds = holds
        self.housekeeping(w, now)
        return admitted, available

    def admit_serverless(self, w: str, now: datetime) -> tuple[bool, str, int]:
        wallet = self.wallets[w]
        wallet.admissions = [t for t in wallet.admissions if t > now - SERVERLESS_WINDOW]
        available = self.available(w, now)
        if available < SERVERLESS_MIN_AVAILABLE:
            return False, "insufficient_balance", available
        if len(wallet.admissions) >= SERVERLESS_PER_MINUTE:
            return False, "rate_limited", available
        wallet.admissions.append(now)
        return True, "admitted", available


# --- The database of this module -------------------------------------------------------------------


def _plain(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def sdb(pg_server: tuple[str, str]) -> Iterator[str]:
    """A fresh, migrated database of this module, so that the final full verify sees only traffic
    that went through the real units of work (the run's shared database also holds hand-made
    journals of the store's tests)."""
    with migrated_database(pg_server[0], "stateful") as url:
        yield url


# --- The machine -----------------------------------------------------------------------------------

WALLET = st.integers(0, 1)
PRICE = st.sampled_from([0, 1, 333_333, 510_000, 3_600_000, 36_000_000])
AMOUNT = st.sampled_from([1, 999, 100_000, 1_000_000, 5_000_000, 25_000_000, -1, -250_000, -3_000_000])
DELTA = st.sampled_from([0, 1, 59, 60, 61, 600, 3599, 3600])
LAG = st.sampled_from([0, 0, 0, 1, 30])
KIND_TIER = st.sampled_from([("pod", "on_demand"), ("pod", "spot"), ("marketplace", "spot"), ("cluster", "on_demand")])
ADVANCE = st.sampled_from(
    [US, *(timedelta(seconds=s) for s in (1, 4, 5, 10, 20, 40, 59, 60, 61, 119, 120, 121, 600, 1800, 3600))]
)
SOURCE = "compute/stateful"

_DISPOSITION = {
    Disposition.accepted: "accepted",
    Disposition.duplicate: "duplicate",
    Disposition.retry: "retry",
    Disposition.rejected: "rejected",
}


class BillingMachine(RuleBasedStateMachine):
    app: ClassVar[Engine]
    owner_url: ClassVar[str]
    stats: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"s{secrets.token_hex(5)}"
        self.wallet_ids = [f"{self.prefix}w{i}" for i in range(2)]
        self.model = Model(self.wallet_ids)
        # The intake owner's wallets in memory: room for one of the two wallets or for both.
        self.cache = WalletCache(1 + int(self.prefix[-1], 16) % 2)
        self.now = T0
        self.seq = itertools.count()
        self.sent: list[Event] = []
        self.pending_starts: list[tuple[int, str, int, str, str, str]] = []
        """Admitted, not started yet: (wallet, rid, price, admission id, kind, tier)."""
        self.pending_resumes: list[tuple[str, str]] = []
        """Admitted resumes: (rid, admission id)."""
        self.announced: list[tuple[int, str]] = []
        """Resources with an early reading, not started yet: (wallet, rid)."""
        self.jobs: list[tuple[int, str, str]] = []
        self.intents: list[tuple[int, str, int]] = []
        self.paid: set[str] = set()
        self.disputes: list[tuple[str, str]] = []
        self.steps = 0
        with self.app.connect() as conn:
            self.outbox_since = conn.execute(text("SELECT coalesce(max(id), 0) FROM outbox")).scalar_one()
        self.stats["examples"] += 1

    # helpers
    def new_id(self, kind: str) -> str:
        return f"{self.prefix}{kind}{next(self.seq)}"

    def event(self, type_: str, data: dict[str, Any], lag: int = 0) -> Event:
        return make_event(type_, data, id_=self.new_id("-e"), source=SOURCE, time=self.now - timedelta(seconds=lag))

    def send(self, events: list[Event], *, note: str) -> None:
        """Through the intake owner's unit of work (consumers.nats.intake.transact) with its wallets in
        memory, as the intake runs it; the other writers below (ticks, admissions, Stripe facts)
        write the same wallets in between, so the cache must see their writes."""
        expected = self.model.batch(events, self.now)
        incoming = [Incoming(e, event_to_json(e)) for e in events]
        outcome = transact(self.app, parsed_items(incoming), self.now, cache=self.cache)
        got = [
            (_DISPOSITION[Disposition(o.disposition)], o.dead_letter.reason if o.dead_letter else None)
            for o in outcome.outcomes
        ]
        assert got == expected, (note, [(e.type, e.id) for e in events])
        self.sent.extend(events)
        self.stats[note] += 1
        for disposition, reason in got:
            self.stats[f"event {disposition}" + (f" ({reason})" if reason else "")] += 1

    def w(self, i: int) -> str:
        return self.wallet_ids[i]

    def reading(self, type_: str, rid: str, seconds: int, lag: int, **extra: Any) -> Event:
        r = self.model.rentals[rid]
        data = {"walletId": r.wallet, "resourceId": rid, "uptimeSecondsTotal": seconds, **extra}
        return self.event(type_, data, lag)

    def start_event(self, w: str, rid: str, kind: str, tier: str, price: int, lag: int, admission_id: str | None):
        data: dict[str, Any] = {
            "walletId": w,
            "resourceId": rid,
            "resourceKind": kind,
            "gpuType": "H100 SXM",
            "gpuCount": 8 if kind == "cluster" else 1,
            "tier": tier,
            "pricePerHourMicros": price,
        }
        if admission_id is not None:
            data["admissionId"] = admission_id
        return self.event("gpu.rental.started", data, lag)

    def pick_rental(self, data: st.DataObject) -> MRental:
        return self.model.rentals[data.draw(st.sampled_from(sorted(self.model.rentals)), label="rental")]

    # money in and out
    @initialize(a=AMOUNT, b=AMOUNT)
    def opening_balances(self, a: int, b: int) -> None:
        """Both wallets topped up (or, now and then, in debt) before anything runs."""
        for w, amount in enumerate((a, b)):
            body = {"walletId": self.w(w), "amountMicros": abs(amount) * 4, "reason": "top-up", "operator": "ops"}
            self.send([self.event("wallet.adjusted", body)], note="opening balance")

    @initialize(w=WALLET, price=st.sampled_from([510_000, 3_600_000, 36_000_000]), kind_tier=KIND_TIER)
    def something_running(self, w: int, price: int, kind_tier: tuple[str, str]) -> None:
        """A rental burning from the start, so that wallets run dry within the steps."""
        self.send([self.start_event(self.w(w), self.new_id("r"), *kind_tier, price, 0, None)], note="start")

    @rule(w=WALLET, amount=AMOUNT, lag=LAG)
    def adjust(self, w: int, amount: int, lag: int) -> None:
        data = {"walletId": self.w(w), "amountMicros": amount, "reason": "top-up", "operator": "ops"}
        self.send([self.event("wallet.adjusted", data, lag)], note="adjust")

    # admissions
    def admit(self, w: str, rid: str, price: int, admission_id: str) -> bool:
        expected = self.model.admit_rental(w, rid, price, admission_id, self.now)
        with unit_of_work(self.app) as uow:
            answer, _ = admit_rental_request(
                uow.pg,
                wallet_id=w,
                resource_id=rid,
                price_per_hour_micros=price,
                admission_id=admission_id,
                now=self.now,
            )
            uow.commit()
        assert (answer.admitted, answer.available_micros) == expected, (w, rid, price, answer)
        assert answer.admission_id == admission_id
        expected_reason = "admitted" if answer.admitted else "insufficient_balance"
        assert answer.reason.split(":")[0] == expected_reason, answer.reason
        self.stats["admit_rental " + ("admitted" if answer.admitted else "refused")] += 1
        return answer.admitted

    @rule(w=WALLET, price=PRICE, kind_tier=KIND_TIER)
    def admit_start(self, w: int, price: int, kind_tier: tuple[str, str]) -> None:
        rid, admission_id = self.new_id("r"), self.new_id("a")
        if self.admit(self.w(w), rid, price, admission_id):
            self.pending_starts.append((w, rid, price, admission_id, *kind_tier))

    @precondition(lambda self: self.model.rentals)
    @rule(
        data=st.data(),
        resume_after=st.sampled_from([None, timedelta(0), HOLD_TTL - US, HOLD_TTL]),
        with_id=st.booleans(),
    )
    def admit_resume(self, data: st.DataObject, resume_after: timedelta | None, with_id: bool) -> None:
        """Admission before a resume (of a paused rental, if there is one); the resume comes at
        once, just before the hold expires, as it expires, or later (another rule)."""
        paused = sorted(rid for rid, r in self.model.rentals.items() if r.status == "paused")
        r = self.model.rentals[data.draw(st.sampled_from(paused), label="paused")] if paused else self.pick_rental(data)
        admission_id = self.new_id("a")
        if self.admit(r.wallet, r.rid, r.price, admission_id):
            self.pending_resumes.append((r.rid, admission_id))
            if resume_after is not None:
                self.now += resume_after
                self.resume_with(r.rid, admission_id, with_id)

    @precondition(lambda self: self.pending_starts)
    @rule(data=st.data())
    def admit_again(self, data: st.DataObject) -> None:
        """The same question twice (same admission id): the same hold, not a second one."""
        w, rid, price, admission_id, _, _ = data.draw(st.sampled_from(self.pending_starts))
        self.admit(self.w(w), rid, price, admission_id)

    # starts
    @precondition(lambda self: self.pending_starts)
    @rule(data=st.data(), with_id=st.booleans(), lag=LAG)
    def start_admitted(self, data: st.DataObject, with_id: bool, lag: int) -> None:
        item = data.draw(st.sampled_from(self.pending_starts))
        self.pending_starts.remove(item)
        w, rid, price, admission_id, kind, tier = item
        event = self.start_event(self.w(w), rid, kind, tier, price, lag, admission_id if with_id else None)
        self.send([event], note="start with admission" if with_id else "start after admission, no id")

    @rule(w=WALLET, price=PRICE, kind_tier=KIND_TIER, lag=LAG, data=st.data())
    def start(self, w: int, price: int, kind_tier: tuple[str, str], lag: int, data: st.DataObject) -> None:
        rid = self.new_id("r")
        if self.announced and data.draw(st.booleans(), label="start an announced resource"):
            w, rid = data.draw(st.sampled_from(self.announced))
            self.announced.remove((w, rid))
        self.send([self.start_event(self.w(w), rid, *kind_tier, price, lag, None)], note="start")

    @precondition(lambda self: self.model.rentals)
    @rule(data=st.data(), other_wallet=st.booleans())
    def start_again(self, data: st.DataObject, other_wallet: bool) -> None:
        r = self.pick_rental(data)
        w = self.wallet_ids[1 - self.wallet_ids.index(r.wallet)] if other_wallet else r.wallet
        self.send([self.start_event(w, r.rid, r.kind, r.tier, r.price, 0, None)], note="start again")

    # readings
    @rule(w=WALLET, seconds=DELTA)
    def early_reading(self, w: int, seconds: int) -> None:
        """A reading whose start has not arrived: retried (not in the log) until it has."""
        rid = self.new_id("r")
        data = {"walletId": self.w(w), "resourceId": rid, "uptimeSecondsTotal": seconds}
        self.send([self.event("gpu.rental.metered", data)], note="early reading")
        self.announced.append((w, rid))

    @precondition(lambda self: self.model.rentals)
    @rule(data=st.data(), delta=DELTA, lag=LAG)
    def meter(self, data: st.DataObject, delta: int, lag: int) -> None:
        r = self.pick_rental(data)
        self.send([self.reading("gpu.rental.metered", r.rid, r.billable + delta, lag)], note="meter")

    @precondition(lambda self: self.model.rentals)
    @rule(data=st.data(), back=st.sampled_from([1, 60, 3600]), lag=LAG)
    def meter_older(self, data: st.DataObject, back: int, lag: int) -> None:
        r = self.pick_rental(data)
        event = self.reading("gpu.rental.metered", r.rid, max(0, r.billable - back), lag)
        self.send([event], note="older reading")

    @precondition(lambda self: self.model.rentals)
    @rule(data=st.data(), d1=DELTA, d2=DELTA, one_batch=st.booleans())
    def readings_reversed(self, data: st.DataObject, d1: int, d2: int, one_batch: bool) -> None:
        """Two readings delivered in the wrong order (the later one, with an earlier time, first)."""
        r = self.pick_rental(data)
        low = self.reading("gpu.rental.metered", r.rid, r.billable + d1, 1)
        high = self.reading("gpu.rental.metered", r.rid, r.billable + d1 + d2, 0)
        if one_batch:
            self.send([high, low], note="readings reversed, one batch")
        else:
            self.send([high], note="readings reversed, two batches")
            self.send([low], note="readings reversed, two batches")

    @precondition(lambda self: self.model.rentals)
    @rule(data=st.data(), delta=DELTA, lag=LAG)
    def pause(self, data: st.DataObject, delta: int, lag: int) -> None:
        r = self.pick_rental(data)
        self.send([self.reading("gpu.rental.paused", r.rid, r.billable + delta, lag)], note="pause")

    @precondition(lambda self: self.model.rentals)
    @rule(data=st.data(), resume=st.booleans())
    def stale_pause_or_resume(self, data: st.DataObject, resume: bool) -> None:
        """A pause at the counter already read, or a resume, timed before the last reading: late
        news that must not move the rental back."""
        r = self.pick_rental(data)
        at = r.last - US
        if resume:
            event = make_event(
                "gpu.rental.resumed",
                {"walletId": r.wallet, "resourceId": r.rid},
                id_=self.new_id("-e"),
                source=SOURCE,
                time=at,
            )
        else:
            body = {"walletId": r.wallet, "resourceId": r.rid, "uptimeSecondsTotal": r.billable}
            event = make_event("gpu.rental.paused", body, id_=self.new_id("-e"), source=SOURCE, time=at)
        self.send([event], note="stale " + ("resume" if resume else "pause"))

    @precondition(lambda self: self.model.rentals)
    @rule(data=st.data(), lag=LAG)
    def resume(self, data: st.DataObject, lag: int) -> None:
        r = self.pick_rental(data)
        self.send([self.event("gpu.rental.resumed", {"walletId": r.wallet, "resourceId": r.rid}, lag)], note="resume")

    @precondition(lambda self: self.pending_resumes)
    @rule(data=st.data(), with_id=st.booleans())
    def resume_admitted(self, data: st.DataObject, with_id: bool) -> None:
        rid, admission_id = data.draw(st.sampled_from(self.pending_resumes))
        self.resume_with(rid, admission_id, with_id)

    def resume_with(self, rid: str, admission_id: str, with_id: bool) -> None:
        """The resume an admission was for (its hold ends), naming the admission or not."""
        self.pending_resumes.remove((rid, admission_id))
        r = self.model.rentals[rid]
        body = {"walletId": r.wallet, "resourceId": rid, **({"admissionId": admission_id} if with_id else {})}
        self.send([self.event("gpu.rental.resumed", body)], note="resume after admission")

    @precondition(lambda self: self.model.rentals)
    @rule(
        data=st.data(),
        delta=DELTA,
        reason=st.sampled_from(["stopped", "destroyed", "auto_stopped", "failed"]),
        lag=LAG,
    )
    def end(self, data: st.DataObject, delta: int, reason: str, lag: int) -> None:
        r = self.pick_rental(data)
        self.send([self.reading("gpu.rental.ended", r.rid, r.billable + delta, lag, reason=reason)], note="end")

    @precondition(lambda self: self.model.rentals)
    @rule(data=st.data(), delta=DELTA)
    def preempt(self, data: st.DataObject, delta: int) -> None:
        r = self.pick_rental(data)
        noticed = (self.now - timedelta(seconds=300)).isoformat()
        event = self.reading(
            "gpu.spot.preempted", r.rid, r.billable + delta, 0, noticedAt=noticed, terminatedAt=self.now.isoformat()
        )
        self.send([event], note="preempt")

    # serverless
    @rule(
        w=WALLET,
        endpoint=st.integers(0, 1),
        ms=st.sampled_from([0, 1, 1500, 60_000]),
        price=st.sampled_from([0, 1, 333, 1_000]),
        status=st.sampled_from(["completed", "failed", "cancelled"]),
    )
    def job(self, w: int, endpoint: int, ms: int, price: int, status: str) -> None:
        ep, job_id = f"{self.prefix}e{endpoint}", self.new_id("j")
        self.jobs.append((w, ep, job_id))
        self.send([self.job_event(w, ep, job_id, ms, price, status)], note="job")

    def job_event(self, w: int, ep: str, job_id: str, ms: int, price: int, status: str) -> Event:
        data = {
            "walletId": self.w(w),
            "endpointId": ep,
            "jobId": job_id,
            "gpuType": "L4",
            "computeMs": ms,
            "pricePerSecondMicros": price,
            "status": status,
        }
        return self.event("serverless.job.completed", data)

    @rule(w=WALLET, endpoint=st.integers(0, 1), n=st.sampled_from([2, 3, 10]), one_batch=st.booleans())
    def jobs_of_fractional_cost(self, w: int, endpoint: int, n: int, one_batch: bool) -> None:
        """Ten 1.5 s jobs at 333 micros/s cost 4,995 micros, not 10 x 499 (DESIGN section 1)."""
        ep = f"{self.prefix}e{endpoint}"
        events = []
        for _ in range(n):
            job_id = self.new_id("j")
            self.jobs.append((w, ep, job_id))
            events.append(self.job_event(w, ep, job_id, 1500, 333, "completed"))
        for chunk in [events] if one_batch else [[e] for e in events]:
            self.send(chunk, note="jobs of fractional cost")

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), ms=st.sampled_from([1, 1500]))
    def job_again(self, data: st.DataObject, ms: int) -> None:
        """The same job completed again under a new event id: charged once."""
        w, ep, job_id = data.draw(st.sampled_from(self.jobs))
        self.send([self.job_event(w, ep, job_id, ms, 333, "completed")], note="job again, new event id")

    @rule(
        w=WALLET,
        n=st.sampled_from([1, 2, 61]),
        then=st.sampled_from([None, SERVERLESS_WINDOW - US, SERVERLESS_WINDOW]),
    )
    def admit_serverless(self, w: int, n: int, then: timedelta | None) -> None:
        """n jobs asked for at once; then, maybe, one more at the edge of the rolling minute."""
        for _ in range(n):
            self.ask_serverless(self.w(w))
        if then is not None:
            self.now += then
            self.ask_serverless(self.w(w))

    def ask_serverless(self, w: str) -> None:
        expected = self.model.admit_serverless(w, self.now)
        with unit_of_work(self.app) as uow:
            answer = admit_serverless_request(uow.pg, wallet_id=w, endpoint_id=f"{self.prefix}e0", now=self.now)
            uow.commit()
        assert (answer.admitted, answer.reason.split(":")[0], answer.available_micros) == expected
        self.stats[f"admit_serverless {expected[1]}"] += 1

    # Stripe facts (HTTP intake, same log and unit of work): payments, refunds, disputes, in any order
    @rule(w=WALLET, amount=st.sampled_from([1_000_000, 5_000_000, 20_000_000]))
    def stripe_intent(self, w: int, amount: int) -> None:
        """A PaymentIntent exists at Stripe (no fact yet): its facts may come in any order."""
        self.intents.append((w, f"pi_{self.prefix}_{next(self.seq)}", amount))
        self.stats["stripe intent"] += 1

    def stripe_event(self, cls: Any, data: Any, event_id: str) -> Event:
        return cls(specversion="1.0", id=event_id, source=STRIPE_SOURCE, time=self.now, data=data)

    @precondition(lambda self: any(pi not in self.paid for _, pi, _ in self.intents))
    @rule(data=st.data())
    def stripe_payment(self, data: st.DataObject) -> None:
        w, pi, amount = data.draw(st.sampled_from([i for i in self.intents if i[1] not in self.paid]))
        self.paid.add(pi)
        fact = StripePaymentSucceeded(wallet_id=self.w(w), payment_intent_id=pi, amount_micros=amount, via="webhook")
        self.send([self.stripe_event(StripePaymentSucceededEvent, fact, pi)], note="stripe payment")

    @precondition(lambda self: self.intents)
    @rule(data=st.data(), share=st.sampled_from([1, 2, 10]))
    def stripe_refund(self, data: st.DataObject, share: int) -> None:
        w, pi, amount = data.draw(st.sampled_from(self.intents))
        refund_id = f"re_{self.prefix}_{next(self.seq)}"
        fact = StripeRefundSucceeded(
            wallet_id=self.w(w), payment_intent_id=pi, refund_id=refund_id, amount_micros=amount // share
        )
        self.send([self.stripe_event(StripeRefundSucceededEvent, fact, refund_id)], note="stripe refund")

    @precondition(lambda self: self.intents)
    @rule(data=st.data(), closed=st.sampled_from([None, True, False]))
    def stripe_dispute(self, data: st.DataObject, closed: bool | None) -> None:
        """A dispute opened (closed None), or closed won/lost: of a new or of a known dispute."""
        w, pi, amount = data.draw(st.sampled_from(self.intents))
        known = [d for d in self.disputes if d[0] == pi]
        if known and data.draw(st.booleans(), label="a known dispute"):
            _, dispute_id = data.draw(st.sampled_from(known))
        else:
            dispute_id = f"dp_{self.prefix}_{next(self.seq)}"
            self.disputes.append((pi, dispute_id))
        if closed is None:
            opened = StripeDisputeOpened(
                wallet_id=self.w(w), payment_intent_id=pi, dispute_id=dispute_id, amount_micros=amount
            )
            event = self.stripe_event(StripeDisputeOpenedEvent, opened, f"{dispute_id}.opened")
        else:
            shut = StripeDisputeClosed(
                wallet_id=self.w(w), payment_intent_id=pi, dispute_id=dispute_id, amount_micros=amount, won=closed
            )
            event = self.stripe_event(StripeDisputeClosedEvent, shut, f"{dispute_id}.closed")
        self.send([event], note="stripe dispute " + ("opened" if closed is None else "closed"))

    # duplicates
    @precondition(lambda self: self.sent)
    @rule(data=st.data(), k=st.integers(1, 3), with_new=st.booleans())
    def redeliver(self, data: st.DataObject, k: int, with_new: bool) -> None:
        """Events delivered again (the same source and id), alone or around a new one."""
        again = [data.draw(st.sampled_from(self.sent), label="again") for _ in range(k)]
        if with_new:
            body = {"walletId": again[0].wallet_id, "amountMicros": 1_000, "reason": "top-up", "operator": "ops"}
            again.insert(data.draw(st.integers(0, len(again)), label="at"), self.event("wallet.adjusted", body))
        self.send(again, note="redeliver")

    # time
    @rule(step=ADVANCE)
    def advance(self, step: timedelta) -> None:
        self.now += step
        self.stats["advance"] += 1

    @rule(step=ADVANCE)
    def advance_and_tick(self, step: timedelta) -> None:
        """The scheduler wakes up a moment later (it is what issues and re-issues stop commands)."""
        self.now += step
        self.tick()

    @rule(data=st.data(), just_before=st.booleans())
    def advance_to_the_zero_instant(self, data: st.DataObject, just_before: bool) -> None:
        """R4 at the microsecond: the scheduler's wake-up is due by the instant available reaches
        zero; a tick one microsecond before issues nothing, a tick at that instant stops everything
        that runs."""
        instants = {w: self.model.zero_instant(w, self.now) for w in self.wallet_ids}
        burning = sorted(w for w, t in instants.items() if t is not None)
        if not burning:
            self.stats["zero instant: none"] += 1
            return
        w = data.draw(st.sampled_from(burning), label="wallet")
        zero = instants[w]
        assert zero is not None
        with self.app.connect() as conn:
            wakeup = conn.execute(
                text("SELECT next_wakeup_at FROM wallets WHERE wallet_id = :w"), {"w": w}
            ).scalar_one()
        assert wakeup is not None, "a burning wallet without a wake-up"
        assert wakeup <= zero, (wakeup, zero)
        if just_before:
            self.now = zero - US
            self.tick()
        issued = self.model.issued(w)
        self.now = zero
        self.tick()
        assert self.model.issued(w) > issued
        self.stats["zero instant: stopped"] += 1
        # Nobody answers: walk the re-issue schedule, a microsecond early and on time.
        for _ in range(data.draw(st.integers(0, 6), label="re-issues")):
            due = self.model.next_reissue(w, self.now)
            if due is None:
                break
            issued = self.model.issued(w)
            self.now = due - US
            self.tick()
            assert self.model.issued(w) == issued
            self.now = due
            self.tick()
            assert self.model.issued(w) > issued
            self.stats["re-issue after the zero instant"] += 1

    @rule(data=st.data(), early=st.booleans())
    def advance_to_a_reissue(self, data: st.DataObject, early: bool) -> None:
        """R4 re-issue at the microsecond: an unanswered stop command is issued again after 5, 10,
        20, 40 s, then every 60 s; not one microsecond before."""
        due = {w: self.model.next_reissue(w, self.now) for w in self.wallet_ids}
        waiting = sorted(w for w, t in due.items() if t is not None and t - US >= self.now)
        if not waiting:
            self.stats["re-issue: none due"] += 1
            return
        w = data.draw(st.sampled_from(waiting), label="wallet")
        at = due[w]
        assert at is not None
        issued = self.model.issued(w)
        self.now = at - US if early else at
        self.tick()
        assert (self.model.issued(w) > issued) != early
        self.stats["re-issue: " + ("1 µs early" if early else "on time")] += 1

    @rule()
    def tick(self) -> None:
        for w in self.wallet_ids:
            self.model.housekeeping(w, self.now)
        with unit_of_work(self.app) as uow:
            tick_wallets(uow.pg, self.wallet_ids, now=self.now)
            uow.commit()
        self.stats["tick"] += 1

    # checks
    @invariant()
    def database_matches_the_model(self) -> None:
        self.steps += 1
        self.stats["checks"] += 1
        compare(self)
        compare_cache(self)
        if self.steps % REPLAY_EVERY == 0:
            self.replay_equals_projections()

    def replay_equals_projections(self) -> None:
        started = time.perf_counter()
        result = verify(self.owner_url, wallet_ids=self.wallet_ids)
        self.stats["replays"] += 1
        self.stats["replay ms"] += int((time.perf_counter() - started) * 1000)
        assert result.ok, result.report()

    def teardown(self) -> None:
        self.replay_equals_projections()
        self.stats["stop commands"] += len(self.model.commands)
        self.stats["stop re-issues"] += sum(1 for c in self.model.commands if not c[0].endswith("-1"))
        self.stats["settlements"] += len(self.model.settlements)
        self.stats["steps"] += self.steps - 1  # the first check runs before any step


def compare_cache(m: BillingMachine) -> None:
    """Each wallet the writer holds in memory at the row's version is what a load gives (one at
    another version is stale and is reloaded by the writer's next batch: nothing to compare)."""
    with unit_of_work(m.app) as uow:
        for w in m.wallet_ids:
            entry = m.cache.get(w)
            if entry is None:
                continue
            version, cached = entry
            row = uow.pg.execute("SELECT version FROM wallets WHERE wallet_id = %s", (w,)).fetchone()
            assert row is not None
            if row[0] != version:
                m.stats["cache: stale entry"] += 1
                continue
            m.stats["cache: current entry"] += 1
            loaded, _ = load_wallets(
                uow.pg, [w], endpoint_keys=[(w, e) for e in cached.endpoints], payment_ids=list(cached.payments)
            )
            assert loaded[w] == cached, (w, loaded[w], cached)


def compare(m: BillingMachine) -> None:
    model, now, wallets = m.model, m.now, m.wallet_ids
    accounts = [f"wallet:{w}" for w in wallets]
    with m.app.connect() as conn:

        def rows(sql: str, **params: Any) -> list[Any]:
            return list(conn.execute(text(sql), params).all())

        # Balances, and each one the sum of its entries.
        got = {
            a: (b, s)
            for a, b, s in rows(
                "SELECT b.account, b.balance_micros,"
                "       (SELECT coalesce(sum(e.amount_micros), 0) FROM journal_entries e WHERE e.account = b.account)"
                "  FROM account_balances b WHERE b.account = ANY(:a)",
                a=accounts,
            )
        }
        for w in wallets:
            balance, entries = got.get(f"wallet:{w}", (0, 0))
            assert balance == entries, (w, balance, entries)
            assert balance == model.wallets[w].balance, (w, balance, model.wallets[w].balance)
        # The machine's journal sums to zero; revenue and adjustments as the model booked them.
        booked = dict(
            rows(
                "SELECT e.account, sum(e.amount_micros) FROM journal_entries e"
                "  JOIN journal_transactions t USING (event_position, txn_no)"
                " WHERE t.wallet_id = ANY(:w) GROUP BY e.account",
                w=wallets,
            )
        )
        assert sum(booked.values()) == 0, booked
        want = {f"revenue:{p}": v for p, v in model.revenue.items() if v}
        adjusted = sum(x.adjusted for x in model.wallets.values())
        if adjusted:
            want["adjustments"] = -adjusted
        want.update({a: v for a, v in model.booked.items() if v})
        got_other = {a: v for a, v in booked.items() if not a.startswith("wallet:") and v}
        assert got_other == want
        # Rentals.
        got_rentals = {
            r[0]: tuple(r[1:])
            for r in rows(
                "SELECT resource_id, wallet_id, status, billable_seconds, charged_micros, last_reading_at, ended_at,"
                "       end_reason, stop_seq, stop_attempts, stop_issued_at, price_per_hour_micros, product"
                "  FROM rentals WHERE wallet_id = ANY(:w)",
                w=wallets,
            )
        }
        want_rentals = {
            r.rid: (
                r.wallet,
                r.status,
                r.billable,
                r.charged,
                r.last,
                r.ended_at,
                r.end_reason,
                r.stop_seq,
                r.attempts,
                r.issued,
                r.price,
                product_of(r.kind, r.tier),
            )
            for r in model.rentals.values()
        }
        assert got_rentals == want_rentals
        # Serverless endpoints.
        got_endpoints = {
            (w, e): (x, c)
            for w, e, x, c in rows(
                "SELECT wallet_id, endpoint_id, exact_millimicros_total, charged_micros"
                "  FROM serverless_endpoints WHERE wallet_id = ANY(:w)",
                w=wallets,
            )
        }
        want_endpoints = {(w, e): (x, x // 1000) for w in wallets for e, x in model.wallets[w].endpoints.items()}
        assert got_endpoints == want_endpoints
        # Open holds and the serverless admissions of the rolling minute.
        for w, holds, admissions in rows(
            "SELECT wallet_id, holds, serverless_admissions FROM wallets WHERE wallet_id = ANY(:w)", w=wallets
        ):
            got_holds = sorted(
                (h["admissionId"], h["resourceId"], h["amountMicros"], datetime.fromisoformat(h["expiresAt"]))
                for h in holds
                if datetime.fromisoformat(h["expiresAt"]) > now
            )
            want_holds = sorted(
                (h.admission_id, h.rid, h.amount, h.expires) for h in model.wallets[w].holds if h.expires > now
            )
            assert got_holds == want_holds, w
            recent = sorted(t for t in map(datetime.fromisoformat, admissions) if t > now - SERVERLESS_WINDOW)
            assert recent == sorted(t for t in model.wallets[w].admissions if t > now - SERVERLESS_WINDOW), w
        # Stripe payments: what was credited, refunded, disputed, and what waits for its payment.
        got_payments = {
            pi: (w, seen, credited, refunded, {k: tuple(v) for k, v in disputes.items()}, len(pending))
            for pi, w, seen, credited, refunded, disputes, pending in rows(
                "SELECT payment_intent_id, wallet_id, seen, credited_micros, refunded_micros, disputes, pending"
                "  FROM stripe_payments WHERE wallet_id = ANY(:w)",
                w=wallets,
            )
        }
        want_payments = {
            pi: (p.wallet, p.seen, p.credited, p.refunded, p.disputes, len(p.pending))
            for pi, p in model.payments.items()
        }
        assert got_payments == want_payments
        # Stop commands and settlements written to the outbox.
        commands = rows(
            "SELECT msg_id, payload FROM outbox WHERE id > :since AND subject = 'compute.commands.stop'"
            "   AND payload->>'walletId' = ANY(:w) ORDER BY id",
            since=m.outbox_since,
            w=wallets,
        )
        got_commands = sorted(
            (p["commandId"], p["resourceId"], p["resourceKind"], datetime.fromisoformat(p["issuedAt"]))
            for msg_id, p in commands
            if msg_id == p["commandId"] and p["action"] == "pause" and p["reason"] == "balance_exhausted"
        )
        assert len(got_commands) == len(commands)
        assert got_commands == sorted(model.commands)
        settlements = rows(
            "SELECT payload FROM outbox WHERE id > :since AND subject = ANY(:s)",
            since=m.outbox_since,
            s=[f"billing.out.settlements.{w}" for w in wallets],
        )
        got_settlements = sorted(
            (p["resourceId"], p["billableSeconds"], p["costMicros"], p["reason"], datetime.fromisoformat(p["endedAt"]))
            for (p,) in settlements
        )
        assert got_settlements == sorted(model.settlements)


def test_random_traffic_matches_the_reference_model(sdb: str, capsys: pytest.CaptureFixture[str]) -> None:
    app = make_engine(sdb, role=APP_ROLE)
    BillingMachine.app = app
    BillingMachine.owner_url = sdb
    BillingMachine.stats = Counter()
    started = time.perf_counter()
    try:
        run_state_machine_as_test(
            BillingMachine,
            settings=settings(
                max_examples=MAX_EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
            ),
        )
    finally:
        app.dispose()
    machine_seconds = time.perf_counter() - started
    # The whole database, rebuilt from its log: every example's traffic at once.
    full = verify(sdb)
    assert full.ok, full.report()
    stats = BillingMachine.stats
    with capsys.disabled():
        print(
            f"\nstateful: {stats['examples']} examples, {stats['checks']} checked steps, {stats['replays']} replays "
            f"({stats['replay ms']} ms), {machine_seconds:.1f} s; full verify of {full.events} events "
            f"in {full.seconds:.2f} s"
        )
        print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.items()) if k not in ("replay ms",)))


def test_resource_of_another_wallet_is_refused_with_its_owner_in_the_batch(sdb: str) -> None:
    """Found by the machine above (bug 1, fixed in projections/processor.py): with an event of the
    owning wallet in the same batch, another wallet's start of the rental raised InvariantViolation
    (a poison batch: rolled back and redelivered for ever) and its reading was retried as not
    started, instead of both being refused as wallet_mismatch."""
    app = make_engine(sdb, role=APP_ROLE)
    prefix = f"b{secrets.token_hex(4)}"
    a, b, rid = f"{prefix}a", f"{prefix}b", f"{prefix}r"

    def start(w: str) -> Event:
        data = {
            "walletId": w,
            "resourceId": rid,
            "resourceKind": "pod",
            "gpuType": "A100",
            "gpuCount": 1,
            "tier": "on_demand",
            "pricePerHourMicros": 1_000_000,
        }
        return make_event("gpu.rental.started", data, source=SOURCE, time=T0)

    def run(events: list[Event]) -> list[tuple[Disposition, str | None]]:
        with unit_of_work(app) as uow:
            result = process_batch(uow.pg, [Incoming(e, event_to_json(e)) for e in events], now=T0)
            uow.commit()
        return [
            (d, result.rejections[i].reason.value if i in result.rejections else None)
            for i, d in enumerate(result.dispositions)
        ]

    credit = {"walletId": a, "amountMicros": 1_000_000, "reason": "top-up", "operator": "ops"}
    reading = {"walletId": b, "resourceId": rid, "uptimeSecondsTotal": 60}
    try:
        assert run([start(a)]) == [(Disposition.accepted, None)]
        # Alone, the other wallet's start is refused, as it should be.
        assert run([start(b)]) == [(Disposition.rejected, "wallet_mismatch")]
        # With an event of the owner in the batch: a reading is refused (it was retried) ...
        assert run([make_event("wallet.adjusted", credit, time=T0), make_event("gpu.rental.metered", reading)]) == [
            (Disposition.accepted, None),
            (Disposition.rejected, "wallet_mismatch"),
        ]
        # ... and so is a start (it raised InvariantViolation: the whole batch never committed).
        assert run([make_event("wallet.adjusted", credit, time=T0), start(b)]) == [
            (Disposition.accepted, None),
            (Disposition.rejected, "wallet_mismatch"),
        ]
    finally:
        app.dispose()
