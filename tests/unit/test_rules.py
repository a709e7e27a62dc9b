"""The wallet rules (DESIGN sections 1 and 2) through the pure deciders of projections.rules."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ledger.events import EVENT_ADAPTER, Event, RejectReason
from ledger.invariants import InvariantViolation
from ledger.journal import ADJUSTMENTS, JournalTxn, revenue_account, wallet_account
from ledger.money import rental_cost_micros
from projections.rules import (
    Decision,
    EndpointState,
    Hold,
    RentalState,
    WalletState,
    accrued_unmetered_micros,
    admit_rental,
    admit_serverless,
    apply,
    available_micros,
    burn_micros_per_hour,
    check_topup,
    due_stops,
    empty_wallet,
    holds_micros,
    mark_stops_issued,
    next_wakeup,
    product_for,
    projected_low_at,
    projected_zero_at,
    stop_backoff,
    tick,
    wallet_status,
)

pytestmark = pytest.mark.unit

VECTORS = Path(__file__).resolve().parents[1] / "data" / "charging.json"
T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
_ids = itertools.count()


def sec(n: int) -> timedelta:
    return timedelta(seconds=n)


def make(kind: str, data: dict[str, Any], at: datetime = T0, event_id: str | None = None) -> Event:
    """An event from its type and camelCase data, read from JSON as the parser reads it."""
    envelope = {
        "specversion": "1.0",
        "id": event_id or f"e{next(_ids)}",
        "source": "tests/rules",
        "type": kind,
        "time": at.isoformat(),
        "data": data,
    }
    return EVENT_ADAPTER.validate_json(json.dumps(envelope), by_name=False)


def credit(w: str, amount: int, at: datetime = T0) -> Event:
    return make("wallet.adjusted", {"walletId": w, "amountMicros": amount, "reason": "credit", "operator": "ops"}, at)


def start(
    w: str,
    r: str,
    price: int,
    at: datetime = T0,
    *,
    kind: str = "pod",
    tier: str = "on_demand",
    admission_id: str | None = None,
) -> Event:
    data: dict[str, Any] = {
        "walletId": w,
        "resourceId": r,
        "resourceKind": kind,
        "gpuType": "A100",
        "gpuCount": 1,
        "tier": tier,
        "pricePerHourMicros": price,
    }
    if admission_id is not None:
        data["admissionId"] = admission_id
    return make("gpu.rental.started", data, at)


def reading(w: str, r: str, seconds: int, at: datetime = T0) -> Event:
    return make("gpu.rental.metered", {"walletId": w, "resourceId": r, "uptimeSecondsTotal": seconds}, at)


def pause(w: str, r: str, seconds: int, at: datetime = T0) -> Event:
    return make("gpu.rental.paused", {"walletId": w, "resourceId": r, "uptimeSecondsTotal": seconds}, at)


def resume(w: str, r: str, at: datetime = T0, admission_id: str | None = None) -> Event:
    data: dict[str, Any] = {"walletId": w, "resourceId": r}
    if admission_id is not None:
        data["admissionId"] = admission_id
    return make("gpu.rental.resumed", data, at)


def end(w: str, r: str, seconds: int, at: datetime = T0, reason: str = "stopped") -> Event:
    data = {"walletId": w, "resourceId": r, "uptimeSecondsTotal": seconds, "reason": reason}
    return make("gpu.rental.ended", data, at)


def job(w: str, endpoint: str, job_id: str, ms: int, price: int, status: str = "completed") -> Event:
    data = {
        "walletId": w,
        "endpointId": endpoint,
        "jobId": job_id,
        "gpuType": "AMPERE_24",
        "computeMs": ms,
        "pricePerSecondMicros": price,
        "status": status,
    }
    return make("serverless.job.completed", data)


def run(
    events: list[Event], state: WalletState | None = None, now: datetime | None = None
) -> tuple[WalletState, list[Decision]]:
    """Apply events in order; ``now`` is each event's own time unless given."""
    s = state if state is not None else empty_wallet(events[0].wallet_id)
    decisions = []
    for e in events:
        s, d = apply(s, e, now or e.time)
        decisions.append(d)
    return s, decisions


def txns_of(decisions: list[Decision]) -> list[JournalTxn]:
    return [t for d in decisions for t in d.txns]


def revenue(decisions: list[Decision]) -> Counter[str]:
    totals: Counter[str] = Counter()
    for t in txns_of(decisions):
        for p in t.postings:
            if p.account.startswith("revenue:"):
                totals[p.account.removeprefix("revenue:")] += p.amount_micros
    return totals


def funded(w: str, amount: int) -> WalletState:
    return apply(empty_wallet(w), credit(w, amount), T0)[0]


# ------------------------------------------------------------------------------------ section 1


def test_section1_hour_of_one_second_readings_costs_exactly_the_hourly_price() -> None:
    events = [credit("w", 10_000_000), start("w", "p", 510_000)]
    events += [reading("w", "p", n, T0 + sec(n)) for n in range(1, 3601)]
    state, decisions = run(events)
    assert sum(t.postings[1].amount_micros for t in txns_of(decisions) if t.kind == "charge") == 510_000
    assert state.balance_micros == 9_490_000
    assert state.rentals["p"].charged_micros == 510_000


def test_section1_older_and_repeated_readings_charge_nothing() -> None:
    state, _ = run([credit("w", 1_000_000), start("w", "p", 1_000_003), reading("w", "p", 120)])
    for seconds in (120, 60, 0):
        d = apply(state, reading("w", "p", seconds), T0)[1]
        assert d.outcome == "noop"
        assert d.txns == ()
        assert apply(state, reading("w", "p", seconds), T0)[0] == state


def test_section1_charge_is_cumulative_cost_minus_charged() -> None:
    state, _ = run([credit("w", 1_000_000), start("w", "p", 1_000_003), reading("w", "p", 1)])
    assert state.rentals["p"].charged_micros == 277  # floor(1_000_003 / 3600)
    d = apply(state, reading("w", "p", 2), T0)[1]
    assert [t.postings[1].amount_micros for t in d.txns] == [rental_cost_micros(2, 1_000_003) - 277]


def test_section1_serverless_fractions_carry_per_endpoint_and_wallet() -> None:
    events = [credit("w", 1_000_000)] + [job("w", "e", f"j{n}", 1500, 333) for n in range(10)]
    state, decisions = run(events)
    assert sum(t.postings[1].amount_micros for t in txns_of(decisions) if t.kind == "charge") == 4_995
    assert state.endpoints["e"] == EndpointState("e", exact_millimicros_total=4_995_000, charged_micros=4_995)
    # Another endpoint of the same wallet carries its own fraction.
    state, d = apply(state, job("w", "e2", "j0", 1500, 333), T0)
    assert d.txns[0].postings[1].amount_micros == 499


def test_section1_serverless_job_charged_once_and_every_status_charged() -> None:
    state = funded("w", 1_000_000)
    state, d1 = apply(state, job("w", "e", "j1", 1000, 100, status="failed"), T0)
    state, d2 = apply(state, job("w", "e", "j2", 1000, 100, status="cancelled"), T0)
    state, d3 = apply(state, job("w", "e", "j1", 1000, 100, status="failed"), T0)
    assert [len(d.txns) for d in (d1, d2, d3)] == [1, 1, 0]
    assert d3.outcome == "noop"
    assert state.balance_micros == 1_000_000 - 200
    assert ("e", "j1") in state.jobs_seen
    assert d1.txns[0].postings[1].account == revenue_account("serverless")


def test_section1_charges_are_integers_and_journal_balanced() -> None:
    state, decisions = run([credit("w", 5_000_000), start("w", "p", 999_999), reading("w", "p", 7)])
    for t in txns_of(decisions):
        assert sum(p.amount_micros for p in t.postings) == 0
        assert all(type(p.amount_micros) is int for p in t.postings)
    assert state.balance_micros == 5_000_000 - rental_cost_micros(7, 999_999)


# ------------------------------------------------------------------------------------------ R1


def test_R1_topup_below_five_dollars_refused_with_a_message() -> None:
    message = check_topup(4_990_000)
    assert message is not None
    assert "$5" in message
    assert "4.99" in message


def test_R1_messages_show_money_as_the_tables_do() -> None:
    """ledger.money.display_usd, the one formatter: cents, and every micro when not whole cents."""
    assert check_topup(4_990_000) == (
        "The minimum top-up is $5.00; you asked for $4.99. Choose at least $5 (for example $5, $10, $25, $50, $100)."
    )
    assert "you asked for $4.999999." in (check_topup(4_999_999) or "")
    assert (check_topup(10_000_000_001) or "").startswith(
        "The maximum top-up is $10,000.00; you asked for $10,000.000001."
    )


def test_R1_topup_bounds() -> None:
    assert check_topup(5_000_000) is None
    assert check_topup(10_000_000_000) is None
    assert check_topup(10_000_000_001) is not None
    assert check_topup(100_000_000, max_micros=50_000_000) is not None
    assert check_topup(0) is not None


# ------------------------------------------------------------------------------------------ R2


def test_R2_rental_admitted_only_with_one_hour_of_price_available() -> None:
    state = funded("w", 2_000_000)
    answer, _ = admit_rental(state, "p", 2_000_001, "a1", T0)
    assert not answer.admitted
    assert answer.available_micros == 2_000_000
    assert "insufficient_balance" in answer.reason
    answer, after = admit_rental(state, "p", 2_000_000, "a1", T0)
    assert answer.admitted
    assert answer.admission_id == "a1"
    assert after.holds == (Hold("a1", "p", 2_000_000, T0 + sec(120)),)
    assert available_micros(after, T0) == 0


def test_R2_running_burn_counts_against_admission() -> None:
    state, _ = run([credit("w", 3_600_000), start("w", "p", 3_600_000)])
    # After 30 minutes of unmetered burn, 1.8 $ are available: a 2 $/h pod does not fit.
    answer, _ = admit_rental(state, "q", 2_000_000, "a", T0 + sec(1800))
    assert not answer.admitted
    assert answer.available_micros == 1_800_000
    answer, _ = admit_rental(state, "q", 1_800_000, "a", T0 + sec(1800))
    assert answer.admitted


def test_R2_resume_counts_as_a_start() -> None:
    state, _ = run([credit("w", 2_000_000), start("w", "p", 1_000_000), pause("w", "p", 60)])
    answer, held = admit_rental(state, "p", 1_000_000, "ar", T0 + sec(100))
    assert answer.admitted
    assert holds_micros(held, T0 + sec(100)) == 1_000_000
    resumed, d = apply(held, resume("w", "p", T0 + sec(101), admission_id="ar"), T0 + sec(101))
    assert d.outcome == "applied"
    assert resumed.holds == ()
    assert resumed.rentals["p"].status == "running"
    assert resumed.rentals["p"].last_reading_at == T0 + sec(101)
    # Not enough for another hour: a resume is refused like a start.
    poor, _ = run([credit("w", 500_000), start("w", "p", 1_000_000), pause("w", "p", 60)])
    assert not admit_rental(poor, "p", 1_000_000, "ar", T0 + sec(100))[0].admitted


# ------------------------------------------------------------------------------------------ R3


def test_R3_available_is_balance_minus_accrued_minus_holds() -> None:
    state, _ = run([credit("w", 10_000_000), start("w", "p", 3_600_000), reading("w", "p", 60, T0 + sec(60))])
    _, state = admit_rental(state, "q", 1_000_000, "aq", T0 + sec(60))
    now = T0 + sec(90) + timedelta(microseconds=500_000)  # 30.5 s after the last reading
    assert accrued_unmetered_micros(state, now) == 30_500
    assert holds_micros(state, now) == 1_000_000
    assert available_micros(state, now) == 10_000_000 - 60_000 - 30_500 - 1_000_000
    assert available_micros(state, now) <= state.balance_micros


def test_R3_accrual_uses_integer_microseconds_and_floors() -> None:
    state, _ = run([credit("w", 10_000_000), start("w", "p", 1_000_003)])
    # 1 µs at 1_000_003 µ$/h is 0.00000027 µ$: floored to 0; 3.6 s is 1000.003 µ$ -> 1000.
    assert accrued_unmetered_micros(state, T0 + US) == 0
    assert accrued_unmetered_micros(state, T0 + timedelta(milliseconds=3600)) == 1000
    # A reading stamped in the future (clock skew) accrues nothing until then, never a credit.
    ahead, _ = run([reading("w", "p", 0, T0 + sec(60))], state)
    assert accrued_unmetered_micros(ahead, T0 + sec(30)) == 0


def test_R3_hold_ends_on_started_with_its_admission_id_or_after_120_s() -> None:
    state = funded("w", 5_000_000)
    _, state = admit_rental(state, "p", 1_000_000, "a1", T0)
    _, state = admit_rental(state, "q", 1_000_000, "a2", T0)
    assert holds_micros(state, T0) == 2_000_000
    after, _ = apply(state, start("w", "p", 1_000_000, T0 + sec(5), admission_id="a1"), T0 + sec(5))
    assert [h.admission_id for h in after.holds] == ["a2"]
    # Expiry: no longer counted from 120 s on, and dropped from the state by the next decision.
    assert holds_micros(after, T0 + sec(120) - US) == 1_000_000
    assert holds_micros(after, T0 + sec(120)) == 0
    later, _ = tick(after, T0 + sec(121))
    assert later.holds == ()


def test_R3_hold_without_admission_id_ends_by_resource() -> None:
    _, state = admit_rental(funded("w", 5_000_000), "p", 1_000_000, "a1", T0)
    after = apply(state, start("w", "p", 1_000_000, T0 + sec(1)), T0 + sec(1))[0]
    assert after.holds == ()


def test_R3_admission_is_idempotent_and_replaces_a_previous_hold_of_the_resource() -> None:
    state = funded("w", 1_500_000)
    _, state = admit_rental(state, "p", 1_000_000, "a1", T0)
    again, state2 = admit_rental(state, "p", 1_000_000, "a1", T0 + sec(1))
    assert again.admitted
    assert state2.holds == state.holds  # same hold, same expiry
    other, state3 = admit_rental(state2, "p", 1_000_000, "a2", T0 + sec(2))
    assert other.admitted  # the old hold of p is not counted against its replacement
    assert [h.admission_id for h in state3.holds] == ["a2"]


# ------------------------------------------------------------------------------------------ R4


def test_R4_projected_zero_at_is_exact_to_the_microsecond() -> None:
    state, _ = run([credit("w", 1_000_000), start("w", "p", 3_600_000)])  # 1 µ$ per ms
    zero = projected_zero_at(state, T0)
    assert zero == T0 + sec(1000)
    assert available_micros(state, zero) == 0
    assert available_micros(state, zero - US) == 1


def test_R4_projected_zero_at_with_odd_prices_stops_early_never_late() -> None:
    state, _ = run([credit("w", 1_234_567), start("w", "p", 777_777), start("w", "q", 1_000_003, T0 + sec(7))])
    now = T0 + sec(10)
    zero = projected_zero_at(state, now)
    assert zero is not None
    assert available_micros(state, zero) <= 0 < available_micros(state, zero - US)
    assert projected_zero_at(state, zero) == zero
    assert projected_zero_at(empty_wallet("w"), now) is None  # no burn


def test_R4_projected_zero_at_accounts_for_a_hold_expiring_first() -> None:
    state, _ = run([credit("w", 2_000_000), start("w", "p", 3_600_000)])
    _, held = admit_rental(state, "q", 0, "a", T0)  # a zero hold changes nothing
    assert projected_zero_at(held, T0) == projected_zero_at(state, T0)
    big = replace(state, holds=(Hold("a", "q", 1_500_000, T0 + sec(120)),))
    # With the hold, 0.5 $ is left: zero at 500 s would be after the hold expires at 120 s,
    # when available jumps back up, so the zero instant is the one without the hold.
    assert projected_zero_at(big, T0) == T0 + sec(2000)
    bigger = replace(state, holds=(Hold("a", "q", 1_950_000, T0 + sec(120)),))
    assert projected_zero_at(bigger, T0) == T0 + sec(50)


def test_R4_stop_commands_for_every_running_rental_at_zero() -> None:
    state, _ = run(
        [
            credit("w", 1_000_000),
            start("w", "a", 1_800_000),
            start("w", "b", 1_800_000, kind="cluster"),
            start("w", "c", 1_800_000),
            pause("w", "c", 0),
        ]
    )
    zero = projected_zero_at(state, T0)
    assert zero == T0 + sec(1000)
    assert due_stops(state, zero - US) == ()
    commands = due_stops(state, zero)
    assert [(c.resource_id, c.resource_kind) for c in commands] == [("a", "pod"), ("b", "cluster")]
    assert all(c.action == "pause" and c.reason == "balance_exhausted" and c.issued_at == zero for c in commands)
    assert [c.command_id for c in commands] == ["stop-w-a-1", "stop-w-b-1"]
    # The scheduler's tick issues the same commands, records them and says exhausted once.
    after, d = tick(state, zero)
    assert d.commands == commands
    assert [n.kind for n in d.notices] == ["exhausted"]
    assert after.status == "exhausted"
    assert after.last_notice == "exhausted"
    assert tick(after, zero)[1].commands == ()


def test_R4_stop_is_reissued_with_backoff_until_paused() -> None:
    state, _ = run([credit("w", 1_000_000), start("w", "p", 3_600_000)])
    t = T0 + sec(1000)
    state, d = tick(state, t)
    issued = [c.command_id for c in d.commands]
    for delay in (5, 10, 20, 40, 60, 60):
        assert tick(state, t + sec(delay) - US)[1].commands == ()
        t = t + sec(delay)
        assert next_wakeup(state, t - sec(delay)) == t
        state, d = tick(state, t)
        assert len(d.commands) == 1
        issued.append(d.commands[0].command_id)
    assert issued == [f"stop-w-p-{n}" for n in range(1, 8)]
    assert [stop_backoff(n).seconds for n in range(1, 8)] == [5, 10, 20, 40, 60, 60, 60]
    # The rental reports paused: no more re-issue, whatever the time.
    state, d = apply(state, pause("w", "p", 1100, t + sec(1)), t + sec(1))
    assert d.commands == ()
    assert tick(state, t + sec(3600))[1].commands == ()
    assert state.rentals["p"].stop_attempts == 0


def test_R4_stop_decided_in_the_same_decision_as_the_charge_that_exhausts() -> None:
    state, _ = run([credit("w", 5_000_000), start("w", "p", 5_000_000), start("w", "q", 1_000)])
    d = apply(state, reading("w", "p", 3600, T0 + sec(3600)), T0 + sec(3600))[1]
    assert [c.resource_id for c in d.commands] == ["p", "q"]
    assert [n.kind for n in d.notices] == ["exhausted"]


def test_R4_notices_once_per_state_change_and_replenished_after_credit() -> None:
    state, _ = run([credit("w", 2_000_000), start("w", "p", 1_000_000)])
    assert state.status == "active"
    low_at = projected_low_at(state, T0)
    # Less than 1 $ left once floor(t * 1 $/h) > 1 $: at 3600.0036 s, not at 3600 s.
    assert low_at == T0 + sec(3600) + 3600 * US
    assert wallet_status(state, low_at - US) == "active"
    state, d = tick(state, low_at)
    assert [(n.kind, n.projected_zero_at) for n in d.notices] == [("low_balance", T0 + sec(7200))]
    # Another reading in the same state: no second notice.
    state, d = apply(state, reading("w", "p", 3700, T0 + sec(3700)), T0 + sec(3700))
    assert d.notices == ()
    zero = projected_zero_at(state, T0 + sec(3700))
    assert zero is not None
    state, d = tick(state, zero)
    assert [n.kind for n in d.notices] == ["exhausted"]
    assert d.notices[0].balance_micros == state.balance_micros
    assert d.notices[0].projected_zero_at == zero
    state, d = apply(state, credit("w", 5_000_000, zero + sec(1)), zero + sec(1))
    assert [n.kind for n in d.notices] == ["replenished"]
    assert state.status == "active"
    assert d.commands == ()


def test_R4_replenished_wallet_cancels_outstanding_stop() -> None:
    state, _ = run([credit("w", 1_000_000), start("w", "p", 3_600_000)])
    state, d = tick(state, T0 + sec(1000))
    assert len(d.commands) == 1
    state = apply(state, credit("w", 10_000_000, T0 + sec(1001)), T0 + sec(1001))[0]
    assert state.rentals["p"].stop_attempts == 0
    assert tick(state, T0 + sec(1010))[1].commands == ()
    # Running dry again starts a new episode with a new command id.
    zero = projected_zero_at(state, T0 + sec(1010))
    assert zero is not None
    assert [c.command_id for c in tick(state, zero)[1].commands] == ["stop-w-p-2"]


def test_R4_next_wakeup_and_burn() -> None:
    state, _ = run([credit("w", 10_000_000), start("w", "p", 1_000_000), start("w", "q", 1_000_000)])
    assert burn_micros_per_hour(state) == 2_000_000
    assert next_wakeup(state, T0) == projected_low_at(state, T0) == T0 + sec(4 * 3600) + 3600 * US
    assert next_wakeup(empty_wallet("w"), T0) is None
    _, held = admit_rental(funded("w", 10_000_000), "p", 1_000_000, "a", T0)
    assert next_wakeup(held, T0) == T0 + sec(120)


def test_R4_mark_stops_issued_refuses_a_command_for_a_paused_rental() -> None:
    state, _ = run([credit("w", 1), start("w", "p", 3_600_000)])
    commands = due_stops(state, T0 + sec(1))
    paused = apply(state, pause("w", "p", 0), T0)[0]
    with pytest.raises(InvariantViolation):
        mark_stops_issued(paused, commands)


# ------------------------------------------------------------------------------------------ R5


def test_R5_serverless_needs_ten_cents_available() -> None:
    answer, _ = admit_serverless(funded("w", 99_999), "e", T0)
    assert not answer.admitted
    assert "insufficient_balance" in answer.reason
    answer, state = admit_serverless(funded("w", 100_000), "e", T0)
    assert answer.admitted
    assert answer.available_micros == 100_000
    assert state.serverless_admissions == (T0,)


def test_R5_at_most_60_admissions_per_rolling_minute() -> None:
    state = funded("w", 10_000_000)
    for n in range(60):
        answer, state = admit_serverless(state, "e", T0 + timedelta(milliseconds=500 * n))
        assert answer.admitted
    refused, state = admit_serverless(state, "e", T0 + sec(59))
    assert not refused.admitted
    assert "rate_limited" in refused.reason
    # The first admission (at T0) leaves the window at T0 + 60 s; refusals were not counted.
    answer, _ = admit_serverless(state, "e", T0 + sec(60))
    assert answer.admitted


# ------------------------------------------------------------------------------------------ R6


def test_R6_spot_preemption_settles_at_termination_reading_and_books_pod_spot() -> None:
    state, decisions = run([credit("w", 5_000_000), start("w", "s", 250_000, tier="spot"), reading("w", "s", 600)])
    preempt = make(
        "gpu.spot.preempted",
        {
            "walletId": "w",
            "resourceId": "s",
            "noticedAt": "2026-11-28T10:00:00Z",
            "terminatedAt": "2026-11-28T10:05:00Z",
            "uptimeSecondsTotal": 900,
        },
        T0 + sec(3900),
    )
    state, d = apply(state, preempt, T0 + sec(3900))
    decisions.append(d)
    assert revenue(decisions) == {"pod_spot": 62_500}
    (settlement,) = d.settlements
    assert (settlement.reason, settlement.billable_seconds, settlement.cost_micros) == (
        "preempted",
        900,
        62_500,
    )
    assert settlement.ended_at == datetime(2026, 11, 28, 10, 5, tzinfo=UTC)
    assert state.rentals["s"].status == "ended"


def test_R6_products() -> None:
    assert product_for("pod", "on_demand") == "pod_on_demand"
    assert product_for("pod", "spot") == "pod_spot"
    assert product_for("marketplace", "spot") == "marketplace"
    assert product_for("cluster", "spot") == "cluster"
    state, _ = run([credit("w", 5_000_000), start("w", "m", 3600, kind="marketplace", tier="spot")])
    d = apply(state, reading("w", "m", 10), T0)[1]
    assert d.txns[0].product == "marketplace"
    assert "tier=spot" in d.txns[0].memo


# ------------------------------------------------------------------------------------------ R7


def test_R7_usage_after_zero_is_charged_into_debt() -> None:
    state, _ = run([credit("w", 1_000), start("w", "p", 3_600_000), reading("w", "p", 2)])
    assert state.balance_micros == -1_000
    assert state.status == "exhausted"
    state, d = apply(state, end("w", "p", 10, reason="auto_stopped"), T0)
    assert d.txns[0].postings[1].amount_micros == 8_000
    assert state.balance_micros == -9_000
    state, d = apply(state, job("w", "e", "j", 1000, 100), T0)  # serverless too
    assert state.balance_micros == -9_100


def test_R7_adjustments_both_ways_go_through_adjustments() -> None:
    state, d = apply(empty_wallet("w"), credit("w", 700), T0)
    assert [(p.account, p.amount_micros) for p in d.txns[0].postings] == [
        (ADJUSTMENTS, -700),
        ("wallet:w", 700),
    ]
    state, d = apply(state, credit("w", -1_000), T0)
    assert [(p.account, p.amount_micros) for p in d.txns[0].postings] == [
        ("wallet:w", -1_000),
        (ADJUSTMENTS, 1_000),
    ]
    assert state.balance_micros == -300


# ------------------------------------------------------------------------------------------ R8


def test_R8_end_settles_with_total_seconds_and_cost() -> None:
    state, _ = run([credit("w", 5_000_000), start("w", "p", 1_234_567), reading("w", "p", 100)])
    state, d = apply(state, end("w", "p", 400, T0 + sec(400), reason="destroyed"), T0 + sec(400))
    (s,) = d.settlements
    assert (s.resource_id, s.billable_seconds, s.cost_micros, s.reason) == ("p", 400, 137_174, "destroyed")
    assert s.ended_at == T0 + sec(400)
    rental = state.rentals["p"]
    assert (rental.status, rental.end_reason, rental.ended_at) == ("ended", "destroyed", T0 + sec(400))
    assert burn_micros_per_hour(state) == 0


def test_R8_after_settlement_lower_reading_is_noop_higher_is_rejected() -> None:
    state, _ = run([credit("w", 5_000_000), start("w", "p", 1_000_000), end("w", "p", 400)])
    for e in (reading("w", "p", 400), reading("w", "p", 10), pause("w", "p", 400), end("w", "p", 300)):
        assert apply(state, e, T0)[1].outcome == "noop"
    d = apply(state, reading("w", "p", 401), T0)[1]
    assert d.outcome == "rejected"
    assert d.rejection is not None
    assert d.rejection[0] == RejectReason.reading_after_settlement
    assert d.txns == ()
    assert apply(state, reading("w", "p", 401), T0)[0] == state
    assert apply(state, end("w", "p", 500), T0)[1].rejection is not None


def test_R8_end_below_highest_reading_keeps_the_highest() -> None:
    state, _ = run([credit("w", 5_000_000), start("w", "p", 3_600_000), reading("w", "p", 100)])
    state, d = apply(state, end("w", "p", 50), T0)
    assert d.txns == ()
    assert d.settlements[0].billable_seconds == 100
    assert d.settlements[0].cost_micros == 100_000


# -------------------------------------------------------------------------------- transitions


def test_reading_for_unknown_resource_is_not_started() -> None:
    state = funded("w", 1_000_000)
    for e in (reading("w", "x", 10), pause("w", "x", 10), resume("w", "x"), end("w", "x", 10)):
        d = apply(state, e, T0)[1]
        assert d.outcome == "not_started"
        assert d.rejection is None
        assert d.txns == ()
        assert apply(state, e, T0)[0] == state


def test_second_start_is_rejected_already_started_even_after_end() -> None:
    state, _ = run([credit("w", 5_000_000), start("w", "p", 1_000)])
    d = apply(state, start("w", "p", 1_000), T0)[1]
    assert d.outcome == "rejected"
    assert d.rejection is not None
    assert d.rejection[0] == RejectReason.already_started
    ended = apply(state, end("w", "p", 10), T0)[0]
    assert apply(ended, start("w", "p", 1_000), T0)[1].rejection is not None


def test_resume_transitions() -> None:
    state, _ = run([credit("w", 5_000_000), start("w", "p", 1_000)])
    assert apply(state, resume("w", "p"), T0)[1].outcome == "noop"  # already running
    ended = apply(state, end("w", "p", 10), T0)[0]
    d = apply(ended, resume("w", "p"), T0)[1]
    assert d.rejection is not None
    assert d.rejection[0] == RejectReason.invalid_transition


def test_paused_rental_does_not_accrue_and_late_reading_is_still_charged() -> None:
    state, _ = run([credit("w", 5_000_000), start("w", "p", 3_600_000), pause("w", "p", 100, T0 + sec(100))])
    assert accrued_unmetered_micros(state, T0 + sec(5000)) == 0
    assert apply(state, pause("w", "p", 100), T0)[1].outcome == "noop"
    state, d = apply(state, reading("w", "p", 120, T0 + sec(120)), T0 + sec(120))
    assert d.txns[0].postings[1].amount_micros == 20_000
    assert state.rentals["p"].status == "paused"


def test_stale_pause_or_resume_does_not_flip_a_rental_that_moved_on() -> None:
    state, _ = run([credit("w", 5_000_000), start("w", "p", 3_600_000), reading("w", "p", 200, T0 + sec(200))])
    # A pause older than the reading the state holds (lower counter) does not pause.
    assert apply(state, pause("w", "p", 100, T0 + sec(100)), T0 + sec(300))[1].outcome == "noop"
    paused = apply(state, pause("w", "p", 250, T0 + sec(250)), T0 + sec(300))[0]
    assert paused.rentals["p"].status == "paused"
    # A resume older than that pause does not resume.
    assert apply(paused, resume("w", "p", T0 + sec(240)), T0 + sec(300))[1].outcome == "noop"
    assert apply(paused, resume("w", "p", T0 + sec(250)), T0 + sec(300))[0].rentals["p"].status == "running"


def test_R4_projected_zero_at_is_none_past_the_year_9999() -> None:
    state, _ = run([credit("w", 1_000_000_000_000), start("w", "p", 1)])
    assert projected_zero_at(state, T0) is None
    assert projected_low_at(state, T0) is None


def test_apply_is_a_function_of_its_arguments_and_does_not_mutate() -> None:
    state, _ = run([credit("w", 5_000_000), start("w", "p", 3_600_000)])
    e = reading("w", "p", 100, T0 + sec(100))
    snapshot = replace(state)
    assert apply(state, e, T0 + sec(200)) == apply(state, e, T0 + sec(200))
    assert state == snapshot


def test_invariants_are_checked() -> None:
    with pytest.raises(InvariantViolation):
        RentalState("p", "w", "pod", "on_demand", "A100", 3600, "pod_on_demand", "running", T0, T0, 10, 11)
    with pytest.raises(InvariantViolation):
        EndpointState("e", exact_millimicros_total=1999, charged_micros=2)
    with pytest.raises(InvariantViolation):
        apply(empty_wallet("other"), credit("w", 1), T0)
    with pytest.raises(InvariantViolation):
        available_micros(empty_wallet("w"), datetime(2026, 1, 1))  # naive time


# ------------------------------------------------------------------------------------ vectors


def _vector_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(VECTORS.read_text())["cases"]
    return cases


@pytest.mark.parametrize("case", _vector_cases(), ids=lambda c: c["name"][:60])
def test_charging_vectors(case: dict[str, Any]) -> None:
    wallets: dict[str, WalletState] = {}
    decisions: list[Decision] = []
    for n, raw in enumerate(case["events"]):
        at = T0 + sec(n)
        e = make(raw["type"], raw["data"], at, event_id=f"v{n}")
        state = wallets.get(e.wallet_id) or empty_wallet(e.wallet_id)
        wallets[e.wallet_id], d = apply(state, e, at)
        decisions.append(d)
    expect = case["expect"]

    for wallet_id, balance in expect["wallets"].items():
        assert wallets[wallet_id].balance_micros == balance
        postings = [p for t in txns_of(decisions) for p in t.postings if p.account == wallet_account(wallet_id)]
        assert sum(p.amount_micros for p in postings) == balance
    for resource_id, want in expect.get("rentals", {}).items():
        (rental,) = [w.rentals[resource_id] for w in wallets.values() if resource_id in w.rentals]
        assert (rental.billable_seconds, rental.charged_micros, rental.status) == (
            want["billableSeconds"],
            want["costMicros"],
            want["state"],
        )
    settlements = [
        {
            "resourceId": s.resource_id,
            "billableSeconds": s.billable_seconds,
            "costMicros": s.cost_micros,
            "reason": s.reason,
        }
        for d in decisions
        for s in d.settlements
    ]
    if "settlements" in expect:
        assert settlements == expect["settlements"]
    for product, amount in expect.get("revenue", {}).items():
        assert revenue(decisions)[product] == amount
    assert sum(d.outcome == "rejected" for d in decisions) == expect.get("rejected", 0)
    assert sum(p.amount_micros for t in txns_of(decisions) for p in t.postings) == 0
