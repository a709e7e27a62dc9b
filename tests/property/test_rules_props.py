"""Properties of the wallet rules (projections.rules) under random interleavings of events."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.events import EVENT_ADAPTER, Event
from ledger.journal import wallet_account
from ledger.money import rental_cost_micros
from projections.rules import (
    Hold,
    RentalState,
    WalletState,
    _first_instant_at_or_below,
    _first_instant_one_rental,
    _first_instant_searched,
    _to_us,
    apply,
    available_micros,
    burn_micros_per_hour,
    due_stops,
    empty_wallet,
    product_for,
    projected_low_at,
    projected_zero_at,
    running_rentals,
)

pytestmark = pytest.mark.property

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
W = "w"
INITIAL = 50_000_000
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(kind: str, data: dict[str, Any], at: datetime, n: int) -> Event:
    envelope = {
        "specversion": "1.0",
        "id": f"p{n}",
        "source": "tests/props",
        "type": kind,
        "time": at.isoformat(),
    }
    return EVENT_ADAPTER.validate_json(json.dumps({**envelope, "data": data}), by_name=False)


# ------------------------------------------------------------------------------ rental sequences

resources = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=20_000_000) | st.sampled_from([510_000, 1_000_003, 1_234_567]),
        st.sampled_from([("pod", "on_demand"), ("pod", "spot"), ("marketplace", "on_demand"), ("cluster", "spot")]),
    ),
    min_size=1,
    max_size=3,
)
seconds = st.integers(min_value=0, max_value=4000)
op = st.one_of(
    st.tuples(st.just("read"), st.integers(0, 2), seconds),
    st.tuples(st.just("read"), st.integers(0, 2), seconds),
    st.tuples(st.just("pause"), st.integers(0, 2), seconds),
    st.tuples(st.just("resume"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("end"), st.integers(0, 2), seconds),
    st.tuples(st.just("preempt"), st.integers(0, 2), seconds),
    st.tuples(st.just("again"), st.integers(0, 1000), st.just(0)),  # an earlier event arrives again
)
steps = st.lists(st.tuples(op, st.integers(0, 90), st.integers(0, 15)), max_size=40)


@dataclass
class Model:
    """The reference: per rental, the highest reading up to its end, and whether it ended."""

    max_seen: int = 0
    ended: bool = False


def _event_for(kind: str, rid: str, secs: int, at: datetime, n: int) -> Event:
    base = {"walletId": W, "resourceId": rid}
    if kind == "read":
        return make("gpu.rental.metered", {**base, "uptimeSecondsTotal": secs}, at, n)
    if kind == "pause":
        return make("gpu.rental.paused", {**base, "uptimeSecondsTotal": secs}, at, n)
    if kind == "resume":
        return make("gpu.rental.resumed", base, at, n)
    if kind == "end":
        return make("gpu.rental.ended", {**base, "uptimeSecondsTotal": secs, "reason": "destroyed"}, at, n)
    data = {**base, "uptimeSecondsTotal": secs, "noticedAt": at.isoformat(), "terminatedAt": at.isoformat()}
    return make("gpu.spot.preempted", data, at, n)


@PROPS
@given(resources=resources, steps=steps)
def test_random_interleavings_charge_exactly_the_highest_reading_up_to_the_end(
    resources: list[tuple[int, tuple[str, str]]], steps: list[tuple[tuple[str, int, int], int, int]]
) -> None:
    at = T0
    n = 0
    state = empty_wallet(W)
    log: list[Event] = []
    decisions = []

    def step(event: Event, now: datetime) -> str:
        nonlocal state
        new_state, decision = apply(state, event, now)
        state = new_state
        decisions.append(decision)
        log.append(event)
        return decision.outcome

    step(
        make(
            "wallet.adjusted",
            {"walletId": W, "amountMicros": INITIAL, "reason": "credit", "operator": "ops"},
            at,
            n,
        ),
        at,
    )
    models: dict[str, Model] = {}
    prices: dict[str, int] = {}
    for i, (price, (kind, tier)) in enumerate(resources):
        rid = f"r{i}"
        data = {
            "walletId": W,
            "resourceId": rid,
            "resourceKind": kind,
            "gpuType": "A100",
            "gpuCount": 1,
            "tier": tier,
            "pricePerHourMicros": price,
        }
        n += 1
        assert step(make("gpu.rental.started", data, at, n), at) == "applied"
        models[rid] = Model()
        prices[rid] = price

    expected_rejections = 0
    for (kind, index, secs), advance, lag in steps:
        at += timedelta(seconds=advance)
        now = at + timedelta(seconds=lag)
        n += 1
        if kind == "again":
            event = log[index % len(log)]
            if event.type in ("wallet.adjusted", "gpu.rental.started"):
                continue
            kind = {
                "gpu.rental.metered": "read",
                "gpu.rental.paused": "pause",
                "gpu.rental.resumed": "resume",
                "gpu.rental.ended": "end",
                "gpu.spot.preempted": "preempt",
            }[event.type]
            rid = event.data.resource_id  # type: ignore[union-attr]
            secs = getattr(event.data, "uptime_seconds_total", 0)
        else:
            rid = f"r{index % len(resources)}"
            event = _event_for(kind, rid, secs, at, n)
        model = models[rid]
        outcome = step(event, now)
        if model.ended:
            expect_rejected = kind == "resume" or secs > model.max_seen
            expected_rejections += expect_rejected
            assert outcome == ("rejected" if expect_rejected else "noop")
            continue
        assert outcome in ("applied", "noop")
        if kind != "resume":
            model.max_seen = max(model.max_seen, secs)
        if kind in ("end", "preempt"):
            model.ended = True
        # available never exceeds the balance when there are no holds.
        assert available_micros(state, now) <= state.balance_micros

    txns = [t for d in decisions for t in d.txns]
    charged_per_rental: Counter[str] = Counter()
    for t in txns:
        assert sum(p.amount_micros for p in t.postings) == 0
        if t.kind == "charge":
            assert t.postings[1].amount_micros > 0
            assert t.resource_id is not None
            charged_per_rental[t.resource_id] += t.postings[1].amount_micros
    for rid, model in models.items():
        rental = state.rentals[rid]
        expected = rental_cost_micros(model.max_seen, prices[rid])
        assert rental.billable_seconds == model.max_seen
        assert rental.charged_micros == expected == charged_per_rental[rid]
        assert (rental.status == "ended") == model.ended
        assert rental.product == product_for(rental.resource_kind, rental.tier)
        settlements = [s for d in decisions for s in d.settlements if s.resource_id == rid]
        assert len(settlements) == (1 if model.ended else 0)
        for s in settlements:
            assert (s.billable_seconds, s.cost_micros) == (model.max_seen, expected)
    assert sum(p.amount_micros for t in txns for p in t.postings) == 0
    assert state.balance_micros == INITIAL - sum(charged_per_rental.values())
    wallet_postings = [p.amount_micros for t in txns for p in t.postings if p.account == wallet_account(W)]
    assert sum(wallet_postings) == state.balance_micros
    assert sum(d.outcome == "rejected" for d in decisions) == expected_rejections


# ------------------------------------------------------------------------------------ serverless


@PROPS
@given(
    jobs=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 8), st.integers(0, 100_000), st.integers(0, 10_000)),
        max_size=40,
    )
)
def test_serverless_each_job_once_and_per_endpoint_floor_of_exact_sum(
    jobs: list[tuple[int, int, int, int]],
) -> None:
    state = empty_wallet(W)
    exact: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    charged: Counter[str] = Counter()
    for n, (e, j, ms, price) in enumerate(jobs):
        data = {
            "walletId": W,
            "endpointId": f"e{e}",
            "jobId": f"j{j}",
            "gpuType": "AMPERE_24",
            "computeMs": ms,
            "pricePerSecondMicros": price,
            "status": "completed",
        }
        state, d = apply(state, make("serverless.job.completed", data, T0, n), T0)
        if (f"e{e}", f"j{j}") not in seen:
            seen.add((f"e{e}", f"j{j}"))
            exact[f"e{e}"] += ms * price
        for t in d.txns:
            assert t.resource_id is not None
            charged[t.resource_id] += t.postings[1].amount_micros
    for endpoint, total in exact.items():
        assert charged[endpoint] == total // 1000 == state.endpoints[endpoint].charged_micros
    assert state.balance_micros == -sum(charged.values())  # R7: no money, still charged


# ------------------------------------------------------------------------------- projected zero


def _rental(i: int, price: int, last_offset_us: int) -> RentalState:
    last = T0 + last_offset_us * US
    return RentalState(
        resource_id=f"r{i}",
        wallet_id=W,
        resource_kind="pod",
        tier="on_demand",
        gpu_type="A100",
        price_per_hour_micros=price,
        product="pod_on_demand",
        status="running",
        started_at=last,
        last_reading_at=last,
    )


wallet_states = st.builds(
    lambda balance, rentals, holds: WalletState(
        wallet_id=W,
        balance_micros=balance,
        rentals={r.resource_id: r for r in (_rental(i, p, o) for i, (p, o) in enumerate(rentals))},
        holds=tuple(Hold(f"a{i}", f"h{i}", amount, T0 + off * US) for i, (amount, off) in enumerate(holds)),
    ),
    st.integers(-1_000_000, 1_000_000_000),
    st.lists(
        st.tuples(
            # >= 1000 micros/h when not free: with at most $1,000 the zero is within ~114 years
            # (past the year 9999 projected_zero_at says None).
            st.integers(1_000, 100_000_000) | st.sampled_from([0, 1_000, 1_000_003, 3_600_000]),
            st.integers(-7_200_000_000, 300_000_000),
        ),
        max_size=4,
    ),
    st.lists(st.tuples(st.integers(0, 50_000_000), st.integers(-10_000_000, 200_000_000)), max_size=3),
)


@PROPS
@given(state=wallet_states, samples=st.lists(st.fractions(0, 1), max_size=5))
def test_projected_zero_at_is_the_first_microsecond_with_nothing_available(
    state: WalletState, samples: list[Any]
) -> None:
    """Guarantee: ``p = projected_zero_at(s, now)`` is exact to the microsecond: available at p is
    <= 0, one microsecond earlier (if p > now) it is > 0, and at every instant in [now, p) it is > 0
    (holds expiring on the way included). None exactly when nothing burns."""
    now = T0
    p = projected_zero_at(state, now)
    if burn_micros_per_hour(state) == 0:
        assert p is None
        return
    assert p is not None
    assert p >= now
    assert available_micros(state, p) <= 0
    assert len(due_stops(state, p)) == len([r for r in state.rentals.values() if r.status == "running"])
    if p > now:
        assert available_micros(state, p - US) > 0
        assert due_stops(state, p - US) == ()
        span_us = (p - now) // US
        for f in samples:
            t = now + (span_us * f.numerator // f.denominator) * US
            if t < p:
                assert available_micros(state, t) > 0


@PROPS
@given(state=wallet_states)
def test_projected_low_at_is_the_first_microsecond_with_less_than_an_hour_left(state: WalletState) -> None:
    burn = burn_micros_per_hour(state)
    low = projected_low_at(state, T0)
    if burn == 0:
        assert low is None
        return
    assert low is not None
    assert available_micros(state, low) < burn
    if low > T0:
        assert available_micros(state, low - US) >= burn
    zero = projected_zero_at(state, T0)
    assert zero is not None
    assert low <= zero


@PROPS
@given(
    balance=st.integers(-1_000_000, 10_000_000_000),
    price=st.integers(1, 200_000_000),
    last_offset_us=st.integers(-7_200_000_000, 300_000_000),
    threshold=st.integers(-1, 100_000_000),
)
def test_one_rental_closed_form_is_the_search(balance: int, price: int, last_offset_us: int, threshold: int) -> None:
    """The closed form used for one running rental without holds gives the instant the general
    search gives (both exact to the microsecond), for the zero and the low thresholds alike."""
    state = WalletState(wallet_id=W, balance_micros=balance, rentals={"r0": _rental(0, price, last_offset_us)})
    running = running_rentals(state)
    now_us = _to_us(T0)
    if available_micros(state, T0) <= threshold:
        return  # both answer ``now`` before either is reached
    fast = _first_instant_one_rental(balance - threshold, running[0])
    assert fast == _first_instant_searched(state, running, now_us, threshold)
    assert fast == _first_instant_at_or_below(state, T0, threshold)
