"""Stripe facts in any order: no order creates or destroys money, every order ends the same."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.events import LOG_EVENT_ADAPTER, parse_event
from ledger.journal import DISPUTES, REFUNDS, STRIPE_CLEARING, wallet_account
from projections.rules import apply, empty_wallet

pytestmark = pytest.mark.property

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
W = "w1"


def fact(type_: str, id_: str, data: dict[str, object]):
    return LOG_EVENT_ADAPTER.validate_json(
        json.dumps(
            {
                "specversion": "1.0",
                "id": id_,
                "source": "stripe",
                "type": type_,
                "time": T0.isoformat(),
                "data": {"walletId": W, "paymentIntentId": "pi_1", **data},
            }
        )
    )


@st.composite
def stripe_stories(draw):
    paid = draw(st.integers(5_000_000, 100_000_000))
    refunds = draw(st.lists(st.integers(1, 2_000_000), max_size=3))
    disputed = draw(st.one_of(st.none(), st.integers(1, paid)))
    won = draw(st.booleans())
    facts = [fact("stripe.payment.succeeded", "pi_1", {"amountMicros": paid, "via": "webhook"})]
    facts += [
        fact("stripe.refund.succeeded", f"re_{i}", {"refundId": f"re_{i}", "amountMicros": a})
        for i, a in enumerate(refunds)
    ]
    if disputed is not None:
        facts.append(fact("stripe.dispute.opened", "dp_1.opened", {"disputeId": "dp_1", "amountMicros": disputed}))
        facts.append(
            fact("stripe.dispute.closed", "dp_1.closed", {"disputeId": "dp_1", "amountMicros": disputed, "won": won})
        )
    order = draw(st.permutations(facts))
    expected = paid - sum(refunds) - (disputed if disputed is not None and not won else 0)
    return order, expected, sum(refunds), disputed, won


def run(order):
    state = empty_wallet(W)
    accounts: dict[str, int] = {}
    for ev in order:
        state, decision = apply(state, ev, T0 + timedelta(minutes=1))
        for txn in decision.txns:
            assert sum(p.amount_micros for p in txn.postings) == 0
            for p in txn.postings:
                accounts[p.account] = accounts.get(p.account, 0) + p.amount_micros
    return state, accounts


@given(stripe_stories())
@settings(max_examples=300)
def test_any_order_of_stripe_facts_ends_in_the_same_money(story) -> None:
    order, expected, refunded, disputed, won = story
    state, accounts = run(order)
    assert state.balance_micros == expected
    assert accounts.get(wallet_account(W), 0) == expected
    assert sum(accounts.values()) == 0
    assert accounts.get(REFUNDS, 0) == refunded
    assert accounts.get(DISPUTES, 0) == 0  # closed: nothing stays held
    lost = disputed if disputed is not None and not won else 0
    paid = state.payments["pi_1"].credited_micros
    assert accounts.get(STRIPE_CLEARING, 0) == -paid + lost
    assert state.payments["pi_1"].pending == ()


@given(stripe_stories())
@settings(max_examples=200)
def test_before_the_payment_no_money_moves(story) -> None:
    order, *_ = story
    state = empty_wallet(W)
    for ev in order:
        if ev.type == "stripe.payment.succeeded":
            break
        state, decision = apply(state, ev, T0)
        assert decision.txns == ()
        assert state.balance_micros == 0


def test_dispute_open_holds_and_lost_dispute_debits() -> None:
    state, _ = run([fact("stripe.payment.succeeded", "pi_1", {"amountMicros": 10_000_000, "via": "confirm"})])
    state, d = apply(state, fact("stripe.dispute.opened", "dp.o", {"disputeId": "dp", "amountMicros": 4_000_000}), T0)
    assert state.balance_micros == 6_000_000
    assert [(p.account, p.amount_micros) for p in d.txns[0].postings] == [
        (wallet_account(W), -4_000_000),
        (DISPUTES, 4_000_000),
    ]
    state, d = apply(
        state, fact("stripe.dispute.closed", "dp.c", {"disputeId": "dp", "amountMicros": 4_000_000, "won": False}), T0
    )
    assert state.balance_micros == 6_000_000
    assert [(p.account, p.amount_micros) for p in d.txns[0].postings] == [
        (DISPUTES, -4_000_000),
        (STRIPE_CLEARING, 4_000_000),
    ]


def test_captured_payment_below_minimum_is_still_credited_and_flagged() -> None:
    state, _ = run([fact("stripe.payment.succeeded", "pi_1", {"amountMicros": 1_000_000, "via": "webhook"})])
    assert state.balance_micros == 1_000_000
    _, d = apply(
        empty_wallet(W), fact("stripe.payment.succeeded", "pi_1", {"amountMicros": 1_000_000, "via": "webhook"}), T0
    )
    assert "below_minimum_topup" in d.txns[0].memo


def test_stripe_facts_are_refused_on_the_nats_subject() -> None:
    raw = json.dumps(
        {
            "specversion": "1.0",
            "id": "pi_9",
            "source": "stripe",
            "type": "stripe.payment.succeeded",
            "time": T0.isoformat(),
            "data": {"walletId": W, "paymentIntentId": "pi_9", "amountMicros": 5_000_000, "via": "webhook"},
        }
    ).encode()
    rejection = parse_event(raw, now=T0)
    assert getattr(rejection, "reason", None) == "unknown_type"
