"""The wallet rules (DESIGN sections 1, 2, 5) as pure functions of state, event and ``now``.

All money of the service is computed here and only here. Nothing in this module does I/O, reads a
clock or draws a random number: ``now`` is always a parameter, state is plain frozen dataclasses
with integer money, and the result of a call is a function of its arguments alone.

Entry points
------------
- :func:`apply_fact`: one event against one wallet's state, without the housekeeping (the batch
  writer's call, followed by one :func:`tick` per wallet); :func:`apply`: one event with the
  housekeeping at ``now`` (the same fact, then what :func:`tick` would decide).
- :func:`tick`: the scheduler's call (no event): expired holds, auto-stop commands and their
  re-issue, status notices. :func:`next_wakeup` says when to call it next.
- :func:`admit_rental` (R2/R3), :func:`admit_serverless` (R5), :func:`check_topup` (R1).
- Queries: :func:`available_micros`, :func:`accrued_unmetered_micros`, :func:`holds_micros`,
  :func:`burn_micros_per_hour`, :func:`projected_zero_at`, :func:`due_stops`, :func:`wallet_status`.

What the caller must load into :class:`WalletState`
---------------------------------------------------
- ``balance_micros``: the sum of the ``wallet:<id>`` postings.
- ``rentals``: every *running* rental of the wallet (accrual, burn and auto-stop need all of them),
  plus every rental (in any status, ended included) that the events in hand name. A rental absent
  from the map is "not started" for this module.
- ``endpoints``: the endpoint states of the serverless jobs in hand; ``jobs_seen``: which of the
  ``(endpoint_id, job_id)`` pairs in hand were already charged. An absent endpoint starts at zero
  and an absent pair is a new job, so a missing load would charge twice: load them.
- ``holds``, ``serverless_admissions``, ``status``, ``last_notice`` as last stored.

Replay: journal transactions and settlements depend only on the events and the state built from
earlier events (never on ``now``, holds or admissions), so rebuilding from the log gives the same
journal. ``now`` only drives holds, accrual, auto-stop and notices.

Choices where the contract is silent
------------------------------------
- A resource id starts once: a second ``started`` is ``already_started`` even after the end.
- After a settlement, a reading (metered/paused/ended/preempted) at or below the final one is a
  noop, a higher one ``reading_after_settlement``; a resume of an ended rental is
  ``invalid_transition``. Reading, pause, resume or end of an unknown rental: ``not_started``.
- A pause with a lower counter (or the same counter, older than the last reading/resume) still
  charges but does not pause a rental that moved on; likewise an older resume does not resume.
- Spot marketplace rentals and cluster instances book to ``marketplace``/``cluster`` (memo
  ``tier=spot``); only spot pods book to ``pod_spot``. A preemption settles whatever the tier.
- Serverless jobs are charged for every status: failed and cancelled jobs used compute.
- ``status`` is the last notified status; one notice per change of status: to ``low``
  ``low_balance``, to ``exhausted`` ``exhausted``, upward (out of ``exhausted``, or low to active)
  ``replenished``. A new wallet starts ``active``.
- Stop commands: one per running rental when available <= 0, re-issued after 5, 10, 20, 40 s, then
  every 60 s while unanswered; each issue has its own id ``stop-<wallet>-<resource>-<n>``. A wallet
  that is replenished before the answer stops the re-issue.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TypeVar

from ledger.events import (
    LogEvent,
    RejectReason,
    RentalEndedEvent,
    RentalMeteredEvent,
    RentalPausedEvent,
    RentalResumedEvent,
    RentalStartedEvent,
    ServerlessJobCompletedEvent,
    SpotPreemptedEvent,
    StripeDisputeClosedEvent,
    StripeDisputeOpenedEvent,
    StripePaymentSucceededEvent,
    StripeRefundSucceededEvent,
    WalletAdjustedEvent,
)
from ledger.invariants import fail, require, require_int
from ledger.journal import (
    ADJUSTMENTS,
    DISPUTES,
    REFUNDS,
    STRIPE_CLEARING,
    JournalTxn,
    Product,
    revenue_account,
    transfer,
    wallet_account,
)
from ledger.money import (
    MICROS_PER_CENT,
    display_usd,
    rental_cost_micros,
    serverless_cost_micros,
    serverless_exact_millimicros,
)

RentalStatus = Literal["running", "paused", "ended"]
EndReason = Literal["stopped", "destroyed", "auto_stopped", "failed", "preempted"]
WalletStatus = Literal["active", "low", "exhausted"]
NoticeKind = Literal["low_balance", "exhausted", "replenished"]
Outcome = Literal["applied", "noop", "not_started", "rejected"]

# R1
MIN_TOPUP_MICROS: Final = 5_000_000
DEFAULT_MAX_TOPUP_MICROS: Final = 10_000_000_000
TOPUP_PRESETS_USD: Final = (5, 10, 25, 50, 100)
# R3
HOLD_TTL: Final = timedelta(seconds=120)
# R5
SERVERLESS_MIN_AVAILABLE_MICROS: Final = 100_000
SERVERLESS_MAX_ADMISSIONS: Final = 60
SERVERLESS_WINDOW: Final = timedelta(seconds=60)
# R4: re-issue backoff of an unanswered stop command: 5 s, 10 s, 20 s, 40 s, then every 60 s.
STOP_BACKOFF_BASE_SECONDS: Final = 5
STOP_BACKOFF_CAP_SECONDS: Final = 60
STOP_ACTION: Final = "pause"
STOP_REASON: Final = "balance_exhausted"

_MICROS_PER_HOUR_OF_TIME: Final = 3_600_000_000  # microseconds of time in an hour
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_HORIZON_US: Final = (datetime(9999, 1, 1, tzinfo=UTC) - _EPOCH) // _US


# --------------------------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class RentalState:
    """One rental (pod, marketplace rental, cluster instance) of a wallet.

    ``billable_seconds`` is the highest cumulative reading seen; ``charged_micros`` is always
    ``rental_cost_micros(billable_seconds, price_per_hour_micros)``. ``last_reading_at`` is the event
    time of the last start, resume or reading that did not go backwards: accrual runs from there.
    ``stop_seq`` counts every stop command ever issued for the rental (command ids are derived from
    it); ``stop_attempts``/``stop_issued_at`` describe the outstanding, unanswered one (0/None when
    there is none).
    """

    resource_id: str
    wallet_id: str
    resource_kind: str
    tier: str
    gpu_type: str
    price_per_hour_micros: int
    product: Product
    status: RentalStatus
    started_at: datetime
    last_reading_at: datetime
    billable_seconds: int = 0
    charged_micros: int = 0
    ended_at: datetime | None = None
    end_reason: EndReason | None = None
    stop_seq: int = 0
    stop_attempts: int = 0
    stop_issued_at: datetime | None = None

    def __post_init__(self) -> None:
        require_int(self.price_per_hour_micros, "price_per_hour_micros")
        require_int(self.billable_seconds, "billable_seconds")
        require_int(self.charged_micros, "charged_micros")
        if not (self.price_per_hour_micros >= 0):
            fail(f"{self.resource_id}: negative price")
        if not (self.billable_seconds >= 0):
            fail(f"{self.resource_id}: negative billable seconds")
        if self.charged_micros != rental_cost_micros(self.billable_seconds, self.price_per_hour_micros):
            fail(f"{self.resource_id}: charged {self.charged_micros} != cost of {self.billable_seconds} s")
        if (self.status == "ended") != (self.end_reason is not None):
            fail(f"{self.resource_id}: end reason")
        if (self.status == "ended") != (self.ended_at is not None):
            fail(f"{self.resource_id}: ended_at")
        if not (0 <= self.stop_attempts <= self.stop_seq):
            fail(f"{self.resource_id}: stop bookkeeping")
        if (self.stop_attempts == 0) != (self.stop_issued_at is None):
            fail(f"{self.resource_id}: stop issued_at")
        _require_aware(self.started_at, "started_at")
        _require_aware(self.last_reading_at, "last_reading_at")


@dataclass(frozen=True, slots=True)
class EndpointState:
    """Serverless usage of one endpoint by one wallet (exact cost in thousandths of a micro)."""

    endpoint_id: str
    exact_millimicros_total: int = 0
    charged_micros: int = 0

    def __post_init__(self) -> None:
        require_int(self.exact_millimicros_total, "exact_millimicros_total")
        require_int(self.charged_micros, "charged_micros")
        if not (self.exact_millimicros_total >= 0):
            fail(f"{self.endpoint_id}: negative exact total")
        if self.charged_micros != serverless_cost_micros(self.exact_millimicros_total):
            fail(
                f"{self.endpoint_id}: charged {self.charged_micros}"
                f" != floor of {self.exact_millimicros_total} millimicros"
            )


@dataclass(frozen=True, slots=True)
class Hold:
    """An admission hold (R3): one hour of the rental's price until started/resumed or expiry."""

    admission_id: str
    resource_id: str
    amount_micros: int
    expires_at: datetime

    def __post_init__(self) -> None:
        require_int(self.amount_micros, "amount_micros")
        if not (self.amount_micros >= 0):
            fail(f"hold {self.admission_id}: negative amount")
        _require_aware(self.expires_at, "expires_at")


@dataclass(frozen=True, slots=True)
class PendingStripeFact:
    """A refund or dispute fact that arrived before its payment: kept, applied when it comes."""

    kind: Literal["refund", "dispute_opened", "dispute_closed"]
    fact_id: str
    amount_micros: int
    dispute_id: str | None = None
    won: bool | None = None


@dataclass(frozen=True, slots=True)
class PaymentState:
    """One Stripe PaymentIntent of the wallet: what was credited, refunded and is disputed.

    Stripe's webhooks arrive in any order. A refund or dispute of a payment not seen yet moves no
    money (it is kept as pending); the payment applies them when it arrives. So no order of
    arrival creates or destroys money, and every order ends in the same balances.
    """

    payment_intent_id: str
    seen: bool = False
    credited_micros: int = 0
    refunded_micros: int = 0
    disputes: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    """dispute id -> (status ``open``/``won``/``lost``, amount held while open)."""
    pending: tuple[PendingStripeFact, ...] = ()


@dataclass(frozen=True, slots=True)
class WalletState:
    """What the rules need to know about one wallet (see the module doc for what to load)."""

    wallet_id: str
    balance_micros: int = 0
    holds: tuple[Hold, ...] = ()
    rentals: Mapping[str, RentalState] = field(default_factory=dict)
    endpoints: Mapping[str, EndpointState] = field(default_factory=dict)
    jobs_seen: frozenset[tuple[str, str]] = frozenset()
    serverless_admissions: tuple[datetime, ...] = ()
    status: WalletStatus = "active"
    last_notice: NoticeKind | None = None
    payments: Mapping[str, PaymentState] = field(default_factory=dict)
    """The PaymentIntents the events in hand name (load them like rentals)."""

    def __post_init__(self) -> None:
        require_int(self.balance_micros, "balance_micros")
        for rid, rental in self.rentals.items():
            if rid != rental.resource_id:
                fail(f"rental keyed {rid!r} is {rental.resource_id!r}")
            if rental.wallet_id != self.wallet_id:
                fail(f"rental {rid} belongs to {rental.wallet_id}")
        for eid, endpoint in self.endpoints.items():
            if eid != endpoint.endpoint_id:
                fail(f"endpoint keyed {eid!r} is {endpoint.endpoint_id!r}")


def empty_wallet(wallet_id: str) -> WalletState:
    return WalletState(wallet_id=wallet_id)


# ------------------------------------------------------------------------------------------ outputs


@dataclass(frozen=True, slots=True)
class StopCommand:
    """``compute.commands.stop`` body (section 5); publish with ``Nats-Msg-Id`` = ``command_id``."""

    command_id: str
    wallet_id: str
    resource_id: str
    resource_kind: str
    issued_at: datetime
    action: str = STOP_ACTION
    reason: str = STOP_REASON


@dataclass(frozen=True, slots=True)
class Notice:
    """``billing.out.notices.<walletId>`` body."""

    wallet_id: str
    kind: NoticeKind
    balance_micros: int
    projected_zero_at: datetime | None


@dataclass(frozen=True, slots=True)
class Settlement:
    """``billing.out.settlements.<walletId>`` body (R8)."""

    wallet_id: str
    resource_id: str
    billable_seconds: int
    cost_micros: int
    ended_at: datetime
    reason: EndReason


@dataclass(frozen=True, slots=True)
class Decision:
    """What one event (or one scheduler tick) decides.

    ``outcome``: ``applied`` (state changed by the fact), ``noop`` (nothing to do: repeated or older
    reading, job already charged, ...), ``not_started`` (a reading, pause, resume or end for a
    rental the state does not hold: the intake naks it with a delay and dead-letters it at the end),
    ``rejected`` (``rejection`` says why; record it and dead-letter it, never drop it silently).
    """

    outcome: Outcome
    txns: tuple[JournalTxn, ...] = ()
    commands: tuple[StopCommand, ...] = ()
    notices: tuple[Notice, ...] = ()
    settlements: tuple[Settlement, ...] = ()
    rejection: tuple[RejectReason, str] | None = None


@dataclass(frozen=True, slots=True)
class AdmissionAnswer:
    """``billing.admission.rental`` answer. ``available_micros`` is the figure the answer was based on
    (before the new hold)."""

    admitted: bool
    admission_id: str
    reason: str
    available_micros: int


@dataclass(frozen=True, slots=True)
class ServerlessAdmissionAnswer:
    """``billing.admission.serverless`` answer."""

    admitted: bool
    reason: str
    available_micros: int


# -------------------------------------------------------------------------------------------- R1


def check_topup(amount_micros: int, max_micros: int = DEFAULT_MAX_TOPUP_MICROS) -> str | None:
    """R1 for a requested top-up: ``None`` if acceptable, else a message a person can act on.

    (Money Stripe actually captured is credited whatever its amount; this check is for requests.)
    """
    require_int(amount_micros, "amount_micros")
    require_int(max_micros, "max_micros")
    presets = ", ".join(f"${p}" for p in TOPUP_PRESETS_USD)
    if amount_micros < MIN_TOPUP_MICROS:
        return (
            f"The minimum top-up is {_usd(MIN_TOPUP_MICROS)}; you asked for {_usd(amount_micros)}. "
            f"Choose at least $5 (for example {presets})."
        )
    if amount_micros > max_micros:
        return (
            f"The maximum top-up is {_usd(max_micros)}; you asked for {_usd(amount_micros)}. "
            "Choose a smaller amount or top up in several payments."
        )
    return None


def _usd(micros: int) -> str:
    """The one money formatter (``$5.00``), every micro shown for an amount that is not whole cents
    (``$4.999999`` must not read as the ``$5.00`` it was refused against)."""
    return display_usd(micros, exact=micros % MICROS_PER_CENT != 0)


# ---------------------------------------------------------------------------------- queries (R3/R4)


def product_for(resource_kind: str, tier: str) -> Product:
    """Revenue product of a rental: spot pods book to ``pod_spot`` (R6).

    Marketplace rentals and cluster instances keep their own product whatever the tier (the
    product list has no spot account for them); their charges carry ``memo`` ``tier=spot`` so
    finance can still tell spot revenue apart.
    """
    if resource_kind == "pod":
        return "pod_spot" if tier == "spot" else "pod_on_demand"
    if resource_kind == "marketplace":
        return "marketplace"
    if resource_kind == "cluster":
        return "cluster"
    fail(f"unknown resource kind {resource_kind!r}")


# The last answer of running_rentals, by the identity of the rentals mapping it was computed from:
# tick and next_wakeup ask about the same state about ten times in a row. Safe because a state's
# rentals mapping is never changed after the state is made (every change makes a new mapping), and
# the reference held here keeps that mapping alive, so its identity cannot be reused meanwhile. One
# tuple, replaced whole: threads sharing it read either the old pair or the new one.
_running_cache: tuple[Mapping[str, RentalState], tuple[RentalState, ...]] | None = None


def running_rentals(state: WalletState) -> tuple[RentalState, ...]:
    """Running rentals in resource id order (a stable order for commands)."""
    global _running_cache
    cached = _running_cache
    if cached is not None and cached[0] is state.rentals:
        return cached[1]
    running = tuple(sorted((r for r in state.rentals.values() if r.status == "running"), key=_rid))
    _running_cache = (state.rentals, running)
    return running


def burn_micros_per_hour(state: WalletState) -> int:
    """Sum of the hourly prices of the running rentals."""
    return sum(r.price_per_hour_micros for r in running_rentals(state))


def accrued_unmetered_micros(state: WalletState, now: datetime) -> int:
    """Usage accrued since each running rental's last reading, not yet metered (R3)."""
    return _accrued_at(running_rentals(state), _to_us(now))


def holds_micros(state: WalletState, now: datetime) -> int:
    """Open admission holds at ``now`` (a hold is open while ``now < expires_at``)."""
    now_us = _to_us(now)
    return sum(h.amount_micros for h in state.holds if _to_us(h.expires_at) > now_us)


def available_micros(state: WalletState, now: datetime) -> int:
    """R3: ledger balance - accrued unmetered usage - open holds. May be negative."""
    return _available_at(state, running_rentals(state), _to_us(now))


def wallet_status(state: WalletState, now: datetime) -> WalletStatus:
    """``exhausted`` when available <= 0, ``low`` when less than one hour of running burn is left,
    else ``active``."""
    available = available_micros(state, now)
    if available <= 0:
        return "exhausted"
    if available < burn_micros_per_hour(state):
        return "low"
    return "active"


def projected_zero_at(state: WalletState, now: datetime) -> datetime | None:
    """R4: the first instant ``t >= now`` at which ``available_micros(state, t) <= 0``.

    Exact to the microsecond with integer math (the floors of each rental's accrual included), so
    ``available_micros(state, t) <= 0`` and, when ``t > now``, ``available_micros(state,
    t - 1 µs) > 0``. Holds expiring on the way are taken into account. ``now`` itself when
    available is already <= 0. ``None`` when nothing is running (burn 0) or when zero would only
    come after the year 9999.
    """
    return _first_instant_at_or_below(state, now, 0)


def projected_low_at(state: WalletState, now: datetime) -> datetime | None:
    """The first instant ``t >= now`` at which less than one hour of burn is left (same guarantees
    as :func:`projected_zero_at`)."""
    burn = burn_micros_per_hour(state)
    if burn == 0:
        return None
    return _first_instant_at_or_below(state, now, burn - 1)


def stop_backoff(attempts: int) -> timedelta:
    """Delay before re-issuing a stop command already issued ``attempts`` times (>= 1)."""
    if not (attempts >= 1):
        fail(f"backoff after {attempts} attempts")
    exponent = min(attempts - 1, 8)  # bounded: 5 * 2**8 is already past the cap
    return timedelta(seconds=min(STOP_BACKOFF_BASE_SECONDS * 2**exponent, STOP_BACKOFF_CAP_SECONDS))


def stop_command_id(wallet_id: str, resource_id: str, seq: int) -> str:
    """Deterministic id of the ``seq``-th stop command ever issued for a rental (1-based).

    Every issue and re-issue gets its own id, so JetStream's duplicate window does not swallow a
    re-issue, while a relay that republishes the same outbox row reuses it.
    """
    return f"stop-{wallet_id}-{resource_id}-{seq}"


def due_stops(state: WalletState, now: datetime) -> tuple[StopCommand, ...]:
    """R4: stop commands to issue at ``now``.

    When available <= 0 at ``now``: a command for every running rental that has none outstanding,
    and a re-issue for every running rental whose outstanding command has waited its backoff
    (:func:`stop_backoff`). Nothing when available > 0. Pure: record the commands with
    :func:`mark_stops_issued` (``tick``/``apply`` do both).
    """
    if available_micros(state, now) > 0:
        return ()
    now_us = _to_us(now)
    commands: list[StopCommand] = []
    for r in running_rentals(state):
        if r.stop_issued_at is not None:
            due_us = _to_us(r.stop_issued_at + stop_backoff(r.stop_attempts))
            if now_us < due_us:
                continue
        commands.append(
            StopCommand(
                command_id=stop_command_id(state.wallet_id, r.resource_id, r.stop_seq + 1),
                wallet_id=state.wallet_id,
                resource_id=r.resource_id,
                resource_kind=r.resource_kind,
                issued_at=now,
            )
        )
    return tuple(commands)


def mark_stops_issued(state: WalletState, commands: tuple[StopCommand, ...]) -> WalletState:
    """Record issued stop commands in the rentals' stop bookkeeping."""
    if not commands:
        return state
    rentals = dict(state.rentals)
    for c in commands:
        r = rentals[c.resource_id]
        if r.status != "running":
            fail(f"stop command for {r.status} rental {r.resource_id}")
        require(c.command_id == stop_command_id(state.wallet_id, r.resource_id, r.stop_seq + 1), "stop seq")
        rentals[c.resource_id] = _replace(
            r, stop_seq=r.stop_seq + 1, stop_attempts=r.stop_attempts + 1, stop_issued_at=c.issued_at
        )
    return _replace(state, rentals=rentals)


def next_wakeup(state: WalletState, now: datetime) -> datetime | None:
    """When the scheduler should call :func:`tick` next (``now`` if something is due already).

    The earliest of: the predicted zero instant (unless already exhausted), the instant less than an
    hour of burn is left (while active), the re-issue of an outstanding stop command, the expiry of
    an open hold. ``None`` when nothing is pending. Recompute after every change of the wallet.
    """
    if not state.holds and not running_rentals(state):
        # Nothing burns and nothing is held: no zero, no low instant, no stop, no expiry (the
        # serverless-only wallets of the intake's batches; every branch below would say so).
        return None
    candidates: list[datetime] = []
    if state.status != "exhausted":
        zero = projected_zero_at(state, now)
        if zero is not None:
            candidates.append(zero)
    if state.status == "active":
        low = projected_low_at(state, now)
        if low is not None:
            candidates.append(low)
    if available_micros(state, now) <= 0:
        for r in running_rentals(state):
            if r.stop_issued_at is None:
                candidates.append(now)
            else:
                candidates.append(max(now, r.stop_issued_at + stop_backoff(r.stop_attempts)))
    now_us = _to_us(now)
    candidates.extend(h.expires_at for h in state.holds if _to_us(h.expires_at) > now_us)
    if any(_to_us(h.expires_at) <= now_us for h in state.holds):
        candidates.append(now)
    return min(candidates, key=_to_us) if candidates else None


# ------------------------------------------------------------------------------- admissions (R2/R5)


def admit_rental(
    state: WalletState, resource_id: str, price_per_hour_micros: int, admission_id: str, now: datetime
) -> tuple[AdmissionAnswer, WalletState]:
    """R2/R3: admit a start or resume iff available >= one hour of the rental's price.

    An admitted answer places a hold of one hour's price until ``now + 120 s``; a started/resumed
    event with this ``admission_id`` (or, without one, for this resource) ends it. Asking again for
    the same resource replaces that resource's previous hold (it is not counted against itself);
    asking again with the same ``admission_id`` while its hold is open is idempotent.
    Expired holds are dropped from the returned state.
    """
    require_int(price_per_hour_micros, "price_per_hour_micros")
    now_us = _to_us(now)
    holds = tuple(h for h in state.holds if _to_us(h.expires_at) > now_us)
    existing = next((h for h in holds if h.admission_id == admission_id), None)
    if existing is not None and existing.resource_id == resource_id:
        available = available_micros(_replace(state, holds=_without(holds, existing)), now)
        answer = AdmissionAnswer(True, admission_id, "admitted", available)
        return answer, _replace(state, holds=holds)
    pruned = _replace(state, holds=holds)
    if price_per_hour_micros < 0:
        return AdmissionAnswer(False, admission_id, "invalid_price", available_micros(pruned, now)), pruned
    others = tuple(h for h in holds if h.resource_id != resource_id)
    available = available_micros(_replace(state, holds=others), now)
    need = rental_cost_micros(3600, price_per_hour_micros)
    if available < need:
        reason = (
            f"insufficient_balance: starting needs one hour of its price ({need} micros) available, "
            f"the wallet has {available}"
        )
        return AdmissionAnswer(False, admission_id, reason, available), pruned
    hold = Hold(admission_id, resource_id, amount_micros=need, expires_at=now + HOLD_TTL)
    return AdmissionAnswer(True, admission_id, "admitted", available), _replace(state, holds=(*others, hold))


def admit_serverless(
    state: WalletState, endpoint_id: str, now: datetime
) -> tuple[ServerlessAdmissionAnswer, WalletState]:
    """R5: admit a job iff available >= 100,000 micros and fewer than 60 jobs of the wallet were
    admitted in the 60 s before ``now`` (instants in ``(now - 60 s, now]``). An admitted job is
    recorded; refusals are not counted. Admissions older than the window are dropped from the state.
    """
    now_us = _to_us(now)
    window_start_us = _to_us(now - SERVERLESS_WINDOW)
    recent = tuple(t for t in state.serverless_admissions if _to_us(t) > window_start_us)
    pruned = _replace(state, serverless_admissions=recent)
    available = available_micros(state, now)
    if available < SERVERLESS_MIN_AVAILABLE_MICROS:
        reason = (
            f"insufficient_balance: serverless jobs need at least {SERVERLESS_MIN_AVAILABLE_MICROS} micros "
            f"available, the wallet has {available}"
        )
        return ServerlessAdmissionAnswer(False, reason, available), pruned
    if len(recent) >= SERVERLESS_MAX_ADMISSIONS:
        reason = f"rate_limited: at most {SERVERLESS_MAX_ADMISSIONS} jobs per minute (endpoint {endpoint_id})"
        return ServerlessAdmissionAnswer(False, reason, available), pruned
    require(all(_to_us(t) <= now_us for t in recent), "serverless admission in the future")
    return ServerlessAdmissionAnswer(True, "admitted", available), _replace(state, serverless_admissions=(*recent, now))


# ---------------------------------------------------------------------------------- events: facts


@dataclass(frozen=True, slots=True)
class _Fact:
    state: WalletState
    outcome: Outcome
    txns: tuple[JournalTxn, ...] = ()
    settlements: tuple[Settlement, ...] = ()
    rejection: tuple[RejectReason, str] | None = None


def _apply_fact(state: WalletState, event: LogEvent) -> _Fact:
    """The money and rental-state effect of one event. Independent of ``now`` (replay-safe)."""
    if event.wallet_id != state.wallet_id:
        fail(f"event {event.id} of wallet {event.wallet_id} applied to {state.wallet_id}")
    _require_aware(event.time, "event time")
    if isinstance(event, WalletAdjustedEvent):
        return _adjusted(state, event)
    if isinstance(
        event,
        StripePaymentSucceededEvent | StripeRefundSucceededEvent | StripeDisputeOpenedEvent | StripeDisputeClosedEvent,
    ):
        return _stripe_fact(state, event)
    if isinstance(event, ServerlessJobCompletedEvent):
        return _job_completed(state, event)
    if isinstance(event, RentalStartedEvent):
        return _started(state, event)
    rental = state.rentals.get(event.data.resource_id)
    if rental is None:
        return _Fact(state, "not_started")
    if isinstance(event, RentalResumedEvent):
        return _resumed(state, rental, event)
    if isinstance(event, RentalMeteredEvent):
        return _reading(state, rental, event, event.data.uptime_seconds_total, None, event.time)
    if isinstance(event, RentalPausedEvent):
        return _reading(state, rental, event, event.data.uptime_seconds_total, "paused", event.time)
    if isinstance(event, RentalEndedEvent):
        return _reading(state, rental, event, event.data.uptime_seconds_total, event.data.reason, event.time)
    if isinstance(event, SpotPreemptedEvent):
        ended_at = event.data.terminated_at
        return _reading(state, rental, event, event.data.uptime_seconds_total, "preempted", ended_at)
    fail(f"unhandled event type {event.type!r}")


def _adjusted(state: WalletState, event: WalletAdjustedEvent) -> _Fact:
    amount = require_int(event.data.amount_micros, "amount_micros")
    if amount == 0:
        return _Fact(state, "noop")
    wallet = wallet_account(state.wallet_id)
    debit, credit = (ADJUSTMENTS, wallet) if amount > 0 else (wallet, ADJUSTMENTS)
    txn = transfer(
        "adjustment",
        wallet_id=state.wallet_id,
        debit=debit,
        credit=credit,
        amount_micros=abs(amount),
        memo=f"{event.data.reason} (by {event.data.operator})",
    )
    return _Fact(_replace(state, balance_micros=state.balance_micros + amount), "applied", txns=(txn,))


def _stripe_fact(
    state: WalletState,
    event: StripePaymentSucceededEvent
    | StripeRefundSucceededEvent
    | StripeDisputeOpenedEvent
    | StripeDisputeClosedEvent,
) -> _Fact:
    """Money Stripe moved: a payment credits the wallet (R1: money actually captured is credited even
    below $5, flagged in the memo); a refund debits it; a dispute holds the amount in ``disputes``
    until it closes (won: back to the wallet; lost: gone to Stripe, the card holder has it)."""
    pi = event.data.payment_intent_id
    payment = state.payments.get(pi) or PaymentState(pi)
    if isinstance(event, StripePaymentSucceededEvent):
        if payment.seen:  # the log's key makes this unreachable for one PaymentIntent; defensive
            return _Fact(state, "noop")
        amount = event.data.amount_micros
        memo = f"{pi} via {event.data.via}" + (" below_minimum_topup" if amount < MIN_TOPUP_MICROS else "")
        txns = [
            transfer(
                "topup",
                wallet_id=state.wallet_id,
                debit=STRIPE_CLEARING,
                credit=wallet_account(state.wallet_id),
                amount_micros=amount,
                memo=memo,
            )
        ]
        payment = _replace(payment, seen=True, credited_micros=amount, pending=())
        for fact in payment_pending(state.payments.get(pi)):
            payment, more = _apply_stripe_money(state.wallet_id, payment, fact)
            txns.extend(more)
        return _with_payment(state, payment, tuple(txns))
    if isinstance(event, StripeRefundSucceededEvent):
        fact = PendingStripeFact("refund", event.data.refund_id, event.data.amount_micros)
    elif isinstance(event, StripeDisputeOpenedEvent):
        fact = PendingStripeFact("dispute_opened", event.id, event.data.amount_micros, event.data.dispute_id)
    else:
        fact = PendingStripeFact(
            "dispute_closed", event.id, event.data.amount_micros, event.data.dispute_id, event.data.won
        )
    if not payment.seen:
        return _with_payment(state, _replace(payment, pending=(*payment.pending, fact)), ())
    payment, txns = _apply_stripe_money(state.wallet_id, payment, fact)
    if not txns and payment == state.payments.get(pi):
        return _Fact(state, "noop")
    return _with_payment(state, payment, tuple(txns))


EXCEEDS_PAYMENT_FLAG: Final = " exceeds_payment"
"""Memo suffix of a refund, dispute hold or lost dispute larger than what its payment had left."""


def payment_remaining_micros(payment: PaymentState) -> int:
    """What the ledger still holds of a payment: credited, less refunds and open dispute holds (a
    lost dispute's amount is not kept in the state; its hold was counted while it was open)."""
    held = sum(amount for status, amount in payment.disputes.values() if status == "open")
    return payment.credited_micros - payment.refunded_micros - held


def payment_pending(payment: PaymentState | None) -> tuple[PendingStripeFact, ...]:
    return () if payment is None else payment.pending


def _with_payment(state: WalletState, payment: PaymentState, txns: tuple[JournalTxn, ...]) -> _Fact:
    wallet = wallet_account(state.wallet_id)
    delta = sum(p.amount_micros for t in txns for p in t.postings if p.account == wallet)
    new_state = _replace(
        state,
        balance_micros=state.balance_micros + delta,
        payments={**state.payments, payment.payment_intent_id: payment},
    )
    return _Fact(new_state, "applied", txns=txns)


def _apply_stripe_money(
    wallet_id: str, payment: PaymentState, fact: PendingStripeFact
) -> tuple[PaymentState, list[JournalTxn]]:
    """A refund or dispute fact against a payment already credited."""
    require(payment.seen, "stripe money before its payment")
    wallet = wallet_account(wallet_id)
    pi = payment.payment_intent_id
    # Money Stripe moved is applied as Stripe says, even beyond what the payment has left in the
    # ledger (a bug or a leaked webhook secret could sign that): flagged in the memo for finance.
    flag = EXCEEDS_PAYMENT_FLAG if fact.amount_micros > payment_remaining_micros(payment) else ""
    if fact.kind == "refund":
        txn = transfer(
            "refund",
            wallet_id=wallet_id,
            debit=wallet,
            credit=REFUNDS,
            amount_micros=fact.amount_micros,
            memo=f"{fact.fact_id} of {pi}{flag}",
        )
        return _replace(payment, refunded_micros=payment.refunded_micros + fact.amount_micros), [txn]
    require(fact.dispute_id is not None, "dispute fact without a dispute id")
    dispute_id = fact.dispute_id or ""
    status, _ = payment.disputes.get(dispute_id, ("none", 0))
    if fact.kind == "dispute_opened":
        if status != "none":  # already open, or closed before its opening arrived
            return payment, []
        txn = transfer(
            "dispute_hold",
            wallet_id=wallet_id,
            debit=wallet,
            credit=DISPUTES,
            amount_micros=fact.amount_micros,
            memo=f"{dispute_id} of {pi}{flag}",
        )
        return _replace(payment, disputes={**payment.disputes, dispute_id: ("open", fact.amount_micros)}), [txn]
    return _dispute_closed(wallet_id, payment, fact, dispute_id, flag)


def _dispute_closed(
    wallet_id: str, payment: PaymentState, fact: PendingStripeFact, dispute_id: str, flag: str
) -> tuple[PaymentState, list[JournalTxn]]:
    """A dispute's closing: the hold released (won) or gone (lost); lost before its opening arrived,
    the money leaves the wallet directly. A second closing does nothing."""
    wallet = wallet_account(wallet_id)
    status, held = payment.disputes.get(dispute_id, ("none", 0))
    if status in ("won", "lost"):
        return payment, []
    outcome = "won" if fact.won else "lost"
    txns: list[JournalTxn] = []
    if status == "open":
        if fact.won:
            txns.append(
                transfer(
                    "dispute_release",
                    wallet_id=wallet_id,
                    debit=DISPUTES,
                    credit=wallet,
                    amount_micros=held,
                    memo=f"{dispute_id} won",
                )
            )
        else:
            txns.append(
                transfer(
                    "dispute_lost",
                    wallet_id=wallet_id,
                    debit=DISPUTES,
                    credit=STRIPE_CLEARING,
                    amount_micros=held,
                    memo=f"{dispute_id} lost",
                )
            )
    elif not fact.won:
        # Closed (lost) before its opening arrived: the money leaves the wallet directly.
        txns.append(
            transfer(
                "dispute_lost",
                wallet_id=wallet_id,
                debit=wallet,
                credit=STRIPE_CLEARING,
                amount_micros=fact.amount_micros,
                memo=f"{dispute_id} lost{flag}",
            )
        )
    return _replace(payment, disputes={**payment.disputes, dispute_id: (outcome, 0)}), txns


def _job_completed(state: WalletState, event: ServerlessJobCompletedEvent) -> _Fact:
    """Each (endpoint, job) once; every status is charged (failed and cancelled jobs used compute)."""
    d = event.data
    key = (d.endpoint_id, d.job_id)
    if key in state.jobs_seen:
        return _Fact(state, "noop")
    before = state.endpoints.get(d.endpoint_id) or EndpointState(d.endpoint_id)
    exact = serverless_exact_millimicros(d.compute_ms, d.price_per_second_micros)
    if not (exact >= 0):
        fail(f"job {d.job_id}: negative exact cost {exact}")
    total = before.exact_millimicros_total + exact
    after = EndpointState(d.endpoint_id, exact_millimicros_total=total, charged_micros=serverless_cost_micros(total))
    charge = after.charged_micros - before.charged_micros
    if not (charge >= 0):
        fail(f"job {d.job_id}: negative charge {charge}")
    txns: tuple[JournalTxn, ...] = ()
    if charge > 0:
        txns = (
            transfer(
                "charge",
                wallet_id=state.wallet_id,
                debit=wallet_account(state.wallet_id),
                credit=revenue_account("serverless"),
                amount_micros=charge,
                resource_id=d.endpoint_id,
                product="serverless",
                gpu_type=d.gpu_type,
                memo=f"job {d.job_id} {d.status} {d.compute_ms} ms",
            ),
        )
    new_state = _replace(
        state,
        balance_micros=state.balance_micros - charge,
        endpoints={**state.endpoints, d.endpoint_id: after},
        jobs_seen=state.jobs_seen | {key},
    )
    return _Fact(new_state, "applied", txns=txns)


def _started(state: WalletState, event: RentalStartedEvent) -> _Fact:
    """A resource id starts once. A second start is rejected whatever the rental's status, ended
    included: its cumulative counter cannot restart under the same id."""
    d = event.data
    known = state.rentals.get(d.resource_id)
    if known is not None:
        detail = f"rental {d.resource_id} already started at {known.started_at.isoformat()} ({known.status})"
        return _Fact(state, "rejected", rejection=(RejectReason.already_started, detail))
    rental = RentalState(
        resource_id=d.resource_id,
        wallet_id=state.wallet_id,
        resource_kind=str(d.resource_kind),
        tier=str(d.tier),
        gpu_type=d.gpu_type,
        price_per_hour_micros=d.price_per_hour_micros,
        product=product_for(str(d.resource_kind), str(d.tier)),
        status="running",
        started_at=event.time,
        last_reading_at=event.time,
    )
    new_state = _replace(
        state,
        rentals={**state.rentals, d.resource_id: rental},
        holds=_release_hold(state.holds, d.admission_id, d.resource_id),
    )
    return _Fact(new_state, "applied")


def _resumed(state: WalletState, rental: RentalState, event: RentalResumedEvent) -> _Fact:
    d = event.data
    holds = _release_hold(state.holds, d.admission_id, d.resource_id)
    if rental.status == "ended":
        detail = f"rental {rental.resource_id} ended ({rental.end_reason}); it cannot resume"
        return _Fact(state, "rejected", rejection=(RejectReason.invalid_transition, detail))
    if rental.status == "running" or event.time < rental.last_reading_at:
        # A repeated resume, or a stale one (older than the pause or reading the state already
        # holds): no transition; the hold it answers still ends.
        return _Fact(_replace(state, holds=holds), "noop" if holds == state.holds else "applied")
    resumed = _replace(rental, status="running", last_reading_at=event.time)
    rentals = {**state.rentals, rental.resource_id: resumed}
    return _Fact(_replace(state, rentals=rentals, holds=holds), "applied")


def _reading(
    state: WalletState,
    rental: RentalState,
    event: LogEvent,
    seconds: int,
    transition: Literal["paused"] | EndReason | None,
    ended_at: datetime,
) -> _Fact:
    """A cumulative reading, optionally pausing (``"paused"``) or ending (an end reason) the rental.

    Charges ``cost(max seen) - charged``; an older or repeated reading charges nothing. On an ended
    rental, a reading at or below the final one is a noop and a higher one is rejected
    (``reading_after_settlement``). A reading above the pause reading of a paused rental is still
    charged (usage is never dropped; the resume may be late); the rental stays paused. A stale
    pause (see below) does not pause a running rental.
    """
    require_int(seconds, "uptime_seconds_total")
    if not (seconds >= 0):
        fail(f"{event.id}: negative reading {seconds}")
    if rental.status == "ended":
        if seconds <= rental.billable_seconds:
            return _Fact(state, "noop")
        detail = (
            f"{event.type} for {rental.resource_id} reads {seconds} s after its settlement at "
            f"{rental.billable_seconds} s ({rental.end_reason})"
        )
        return _Fact(state, "rejected", rejection=(RejectReason.reading_after_settlement, detail))

    # The changes to the rental, made in one replace (each replace re-runs RentalState's checks).
    changes: dict[str, Any] = {}
    txns = _reading_charge(state, rental, event, seconds, changes)
    updated, settlements = _reading_transition(state, rental, event, seconds, transition, ended_at, changes)
    if updated == rental:
        return _Fact(state, "noop")
    charged = sum(t.postings[1].amount_micros for t in txns)
    new_state = _replace(
        state,
        balance_micros=state.balance_micros - charged,
        rentals={**state.rentals, rental.resource_id: updated},
    )
    return _Fact(new_state, "applied", txns=txns, settlements=settlements)


def _reading_charge(
    state: WalletState, rental: RentalState, event: LogEvent, seconds: int, changes: dict[str, Any]
) -> tuple[JournalTxn, ...]:
    """The charge of a reading of a rental not ended: ``cost(seconds) - charged`` when it goes past
    the last one, with the rental's new counters put in ``changes``."""
    txns: tuple[JournalTxn, ...] = ()
    if seconds >= rental.billable_seconds:
        changes["last_reading_at"] = max(rental.last_reading_at, event.time, key=_to_us)
    if seconds > rental.billable_seconds:
        cost = rental_cost_micros(seconds, rental.price_per_hour_micros)
        charge = cost - rental.charged_micros
        if not (charge >= 0):
            fail(f"{rental.resource_id}: negative charge {charge}")
        changes["billable_seconds"] = seconds
        changes["charged_micros"] = cost
        if charge > 0:
            memo = f"{seconds} s" + (" tier=spot" if rental.tier == "spot" else "")
            txns = (
                transfer(
                    "charge",
                    wallet_id=state.wallet_id,
                    debit=wallet_account(state.wallet_id),
                    credit=revenue_account(rental.product),
                    amount_micros=charge,
                    resource_id=rental.resource_id,
                    product=rental.product,
                    gpu_type=rental.gpu_type,
                    memo=memo,
                ),
            )
    return txns


def _reading_transition(
    state: WalletState,
    rental: RentalState,
    event: LogEvent,
    seconds: int,
    transition: Literal["paused"] | EndReason | None,
    ended_at: datetime,
    changes: dict[str, Any],
) -> tuple[RentalState, tuple[Settlement, ...]]:
    """The rental after a reading with its ``changes`` and its pause or end, and the settlement of
    an end."""
    settlements: tuple[Settlement, ...] = ()
    if transition == "paused":
        # A stale pause (a lower counter, or the same counter older than the last resume or
        # reading) still charges its reading but does not pause a rental that has moved on.
        stale = seconds < rental.billable_seconds or (
            seconds == rental.billable_seconds and event.time < rental.last_reading_at
        )
        if not stale:
            changes.update(status="paused", stop_attempts=0, stop_issued_at=None)
        updated = _replace(rental, **changes) if changes else rental
    elif transition is not None:
        changes.update(status="ended", ended_at=ended_at, end_reason=transition, stop_attempts=0, stop_issued_at=None)
        updated = _replace(rental, **changes)
        settlements = (
            Settlement(
                wallet_id=state.wallet_id,
                resource_id=rental.resource_id,
                billable_seconds=updated.billable_seconds,
                cost_micros=updated.charged_micros,
                ended_at=ended_at,
                reason=transition,
            ),
        )
    else:
        updated = _replace(rental, **changes) if changes else rental
    return updated, settlements


# ------------------------------------------------------------------------ housekeeping, decisions


def _housekeeping(state: WalletState, now: datetime) -> tuple[WalletState, tuple[StopCommand, ...], tuple[Notice, ...]]:
    """Time-driven consequences at ``now``: expired holds and admissions dropped, stop commands
    (cancelled while available > 0, issued/re-issued at <= 0), one notice per status change."""
    now_us = _to_us(now)
    window_start_us = _to_us(now - SERVERLESS_WINDOW)
    holds = tuple(h for h in state.holds if _to_us(h.expires_at) > now_us)
    admissions = tuple(t for t in state.serverless_admissions if _to_us(t) > window_start_us)
    if holds != state.holds or admissions != state.serverless_admissions:
        state = _replace(state, holds=holds, serverless_admissions=admissions)

    if any(r.stop_attempts for r in state.rentals.values()) and available_micros(state, now) > 0:
        # Replenished before the compute plane answered: stop re-issuing (a new episode starts
        # with a new command id if the wallet runs dry again).
        state = _replace(
            state,
            rentals={
                rid: _replace(r, stop_attempts=0, stop_issued_at=None) if r.stop_attempts else r
                for rid, r in state.rentals.items()
            },
        )
    commands = due_stops(state, now)
    state = mark_stops_issued(state, commands)

    notices: tuple[Notice, ...] = ()
    status = wallet_status(state, now)
    if status != state.status:
        kind: NoticeKind
        if status == "exhausted":
            kind = "exhausted"
        elif status == "low" and state.status == "active":
            kind = "low_balance"
        else:  # exhausted -> low/active, low -> active
            kind = "replenished"
        notices = (Notice(state.wallet_id, kind, state.balance_micros, projected_zero_at(state, now)),)
        state = _replace(state, status=status, last_notice=kind)
    return state, commands, notices


def apply(state: WalletState, event: LogEvent, now: datetime) -> tuple[WalletState, Decision]:
    """Apply one event at processing instant ``now``: the fact (charges, rental transitions,
    settlements), then, unless it was rejected or is not started yet, the housekeeping at ``now``
    (stop commands, notices). A rejected or not-started event leaves the state unchanged."""
    _require_aware(now, "now")
    fact = _apply_fact(state, event)
    if fact.outcome in ("rejected", "not_started"):
        require(fact.state is state and not fact.txns, "a refused event changed the state")
        return state, Decision(outcome=fact.outcome, rejection=fact.rejection)
    new_state, commands, notices = _housekeeping(fact.state, now)
    _require_consistent(state, new_state, fact.txns)
    decision = Decision(
        outcome=fact.outcome,
        txns=fact.txns,
        commands=commands,
        notices=notices,
        settlements=fact.settlements,
        rejection=None,
    )
    return new_state, decision


def apply_fact(state: WalletState, event: LogEvent) -> tuple[WalletState, Decision]:
    """The fact of one event alone (charges, rental transitions, settlements), without the
    housekeeping at ``now``. A batch writer applies every event of a wallet this way and then
    calls :func:`tick` once at the batch's instant: all events of a batch are processed at the same
    ``now``, so one housekeeping per wallet decides the same stop commands as one per event, minus
    those a later event of the same batch makes moot (a pause, a top-up), and one notice per
    status change of the batch rather than per intermediate state."""
    fact = _apply_fact(state, event)
    if fact.outcome in ("rejected", "not_started"):
        require(fact.state is state and not fact.txns, "a refused event changed the state")
        return state, Decision(outcome=fact.outcome, rejection=fact.rejection)
    _require_consistent(state, fact.state, fact.txns)
    return fact.state, Decision(outcome=fact.outcome, txns=fact.txns, settlements=fact.settlements, rejection=None)


def tick(state: WalletState, now: datetime) -> tuple[WalletState, Decision]:
    """The scheduler's call at ``now`` (no event): due stop commands and re-issues, notices,
    expired holds and admissions dropped. Outcome ``applied`` if the state changed, else ``noop``."""
    _require_aware(now, "now")
    new_state, commands, notices = _housekeeping(state, now)
    _require_consistent(state, new_state, ())
    outcome: Outcome = "noop" if new_state == state else "applied"
    return new_state, Decision(outcome=outcome, commands=commands, notices=notices)


def _require_consistent(before: WalletState, after: WalletState, txns: tuple[JournalTxn, ...]) -> None:
    wallet = wallet_account(before.wallet_id)
    delta = 0
    for txn in txns:
        if sum(p.amount_micros for p in txn.postings) != 0:
            fail(f"unbalanced {txn.kind}")
        for p in txn.postings:
            if p.account == wallet:
                delta += p.amount_micros
        if txn.kind == "charge":
            debit = txn.postings[0]
            if not (debit.account == wallet and debit.amount_micros < 0):
                fail(f"{txn.kind}: not a charge of the wallet")
    require(after.balance_micros == before.balance_micros + delta, "balance does not follow the journal")
    if after.rentals is before.rentals:
        return
    for rid, r in after.rentals.items():
        old = before.rentals.get(rid)
        if r is old:
            continue  # unchanged (states are immutable): checked when it was made
        if r.charged_micros != rental_cost_micros(r.billable_seconds, r.price_per_hour_micros):
            fail(f"{rid}: charged != cost")
        if old is not None and not (r.billable_seconds >= old.billable_seconds):
            fail(f"{rid}: billable seconds went back")


# ------------------------------------------------------------------------------------------- time


_T = TypeVar("_T")
_REPLACERS: dict[type, tuple[operator.attrgetter[Any], dict[str, int]]] = {}


def _replace(obj: _T, /, **changes: Any) -> _T:
    """``dataclasses.replace`` for this module's frozen dataclasses, about twice as fast (see
    bench/README.md; the states are replaced several times per event on the intake's hot path):
    the fields are read by one C ``attrgetter`` instead of a Python loop. Same
    meaning: ``__init__`` and ``__post_init__`` (the invariants) run on the new value."""
    cls = type(obj)
    entry = _REPLACERS.get(cls)
    if entry is None:
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        if not (len(fields) >= 2 and all(f.init for f in fields)):
            fail(f"_replace of {cls.__name__}: needs 2+ fields, all in __init__")
        names = tuple(f.name for f in fields)
        entry = _REPLACERS[cls] = (operator.attrgetter(*names), {n: i for i, n in enumerate(names)})
    getter, index = entry
    values = list(getter(obj))
    for name, value in changes.items():
        values[index[name]] = value  # KeyError for a field that does not exist
    return cls(*values)


def _require_aware(dt: datetime, what: str) -> None:
    if not (dt.tzinfo is not None and dt.utcoffset() is not None):
        fail(f"{what} must be timezone-aware: {dt!r}")


def _to_us(dt: datetime) -> int:
    """Integer microseconds since the epoch (exact); a naive datetime is a bug."""
    if not (dt.tzinfo is not None):
        fail(f"naive datetime {dt!r}: times must be timezone-aware")
    return (dt - _EPOCH) // _US


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _rid(r: RentalState) -> str:
    return r.resource_id


def _without(holds: tuple[Hold, ...], hold: Hold) -> tuple[Hold, ...]:
    return tuple(h for h in holds if h is not hold)


def _release_hold(holds: tuple[Hold, ...], admission_id: str | None, resource_id: str) -> tuple[Hold, ...]:
    """End the hold a start/resume answers: by admission id when given, else by resource id."""
    if admission_id is not None:
        return tuple(h for h in holds if h.admission_id != admission_id)
    return tuple(h for h in holds if h.resource_id != resource_id)


def _accrued_at(running: tuple[RentalState, ...], t_us: int) -> int:
    total = 0
    for r in running:
        elapsed_us = t_us - _to_us(r.last_reading_at)
        if elapsed_us > 0:
            total += elapsed_us * r.price_per_hour_micros // _MICROS_PER_HOUR_OF_TIME
    return total


# The last answer of _available_at, by the identity of the (immutable) state and the instant: a
# batch's housekeeping and next_wakeup ask about the same wallet at the same instant five times
# (stops due, status, zero, low, stops again). Safe for the reasons given at _running_cache (the
# reference held here keeps the state alive, so its identity cannot be reused meanwhile).
_available_cache: tuple[WalletState, int, int] | None = None


def _available_at(state: WalletState, running: tuple[RentalState, ...], t_us: int) -> int:
    """``available`` at ``t_us``; ``running`` is ``running_rentals(state)``."""
    global _available_cache
    cached = _available_cache
    if cached is not None and cached[0] is state and cached[1] == t_us:
        return cached[2]
    held = sum(h.amount_micros for h in state.holds if _to_us(h.expires_at) > t_us) if state.holds else 0
    available = state.balance_micros - _accrued_at(running, t_us) - held
    _available_cache = (state, t_us, available)
    return available


def _first_instant_at_or_below(state: WalletState, now: datetime, threshold: int) -> datetime | None:
    """First microsecond ``t >= now`` with ``available(t) <= threshold`` (``None`` if no burn).

    Between hold expiries ``available`` never increases with time, so each such segment is binary
    searched; the upper bound comes from ``floor(x) > x - 1`` for each running rental.
    """
    running = running_rentals(state)
    burn = sum(r.price_per_hour_micros for r in running)
    if burn == 0:
        return None
    now_us = _to_us(now)
    if _available_at(state, running, now_us) <= threshold:
        return now
    if len(running) == 1 and not state.holds:
        return _first_instant_one_rental(state.balance_micros - threshold, running[0])
    return _first_instant_searched(state, running, now_us, threshold)


def _first_instant_one_rental(need_micros: int, rental: RentalState) -> datetime | None:
    """The common case in closed form: one rental running, no holds. Then ``available(t) =
    balance - floor((t - last) * p / H)`` and, with ``need = balance - threshold`` (> the accrual at
    ``now``, so ``>= 1``), ``floor(x / H) >= need`` iff ``x >= need * H`` for integers: the first
    instant is ``last + ceil(need * H / p)``, exactly what the search finds (a property test checks
    both agree), without its 10-20 evaluations on the intake's hot path."""
    if not (need_micros >= 1 and rental.price_per_hour_micros > 0):
        fail(f"closed form of the projection outside its domain: need {need_micros}, {rental.resource_id}")
    t_us = _to_us(rental.last_reading_at) + -(-need_micros * _MICROS_PER_HOUR_OF_TIME // rental.price_per_hour_micros)
    if t_us > _HORIZON_US:
        return None
    return _from_us(t_us)


def _first_instant_searched(
    state: WalletState, running: tuple[RentalState, ...], now_us: int, threshold: int
) -> datetime | None:
    """:func:`_first_instant_at_or_below` in general (any rentals, holds), once ``available(now) >
    threshold`` is known and something burns."""
    burn = sum(r.price_per_hour_micros for r in running)
    start_us = max([now_us, *(_to_us(r.last_reading_at) for r in running)])
    # available(t) <= balance - sum(floor((t - last_i) * p_i / H)) < balance - (t - start) * burn / H + n
    need = state.balance_micros - threshold + len(running)
    hi_us = start_us + -(-need * _MICROS_PER_HOUR_OF_TIME // burn)
    # Tighter, from the linear accrual real(t) = (t * burn - S) / H (valid from ``start`` on):
    # available(t) < balance - real(t) + n <= threshold once real(t) >= need.
    s_sum = sum(_to_us(r.last_reading_at) * r.price_per_hour_micros for r in running)
    hi_lin_us = -(-(need * _MICROS_PER_HOUR_OF_TIME + s_sum) // burn)
    if start_us <= hi_lin_us < hi_us:
        hi_us = hi_lin_us
    if hi_us > _HORIZON_US:
        hi_us = _HORIZON_US
        if _available_at(state, running, hi_us) > threshold:
            return None
    # Skip the stretch where available is provably above the threshold. From ``start`` on, the
    # accrual without floors is linear: real(t) = (t * burn - S) / H with S = sum(last_i * p_i), and
    # available(t) >= balance - all holds - real(t). So every t <= safe_us is above the threshold,
    # and the binary search below only spans about (n + holds) * H / burn microseconds (a few ms)
    # instead of the whole way from now: 10-20 steps instead of ~40 on the intake's hot path.
    seg_lo = now_us
    x = state.balance_micros - sum(h.amount_micros for h in state.holds) - threshold
    if x > 0:
        safe_us = -(-(x * _MICROS_PER_HOUR_OF_TIME + s_sum) // burn) - 1
        if start_us <= safe_us < hi_us:
            seg_lo = max(now_us, safe_us + 1)
    breaks = sorted({e for e in (_to_us(h.expires_at) for h in state.holds) if seg_lo < e <= hi_us})
    for seg_end in (*breaks, hi_us + 1):
        last = seg_end - 1
        if _available_at(state, running, last) <= threshold:
            lo, hi = seg_lo, last  # available(hi) <= threshold; find the first such instant
            while lo < hi:
                mid = (lo + hi) // 2
                if _available_at(state, running, mid) <= threshold:
                    hi = mid
                else:
                    lo = mid + 1
            return _from_us(lo)
        seg_lo = seg_end
    fail("projected instant not found below its proven upper bound")
