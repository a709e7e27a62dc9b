"""The HTTP API against the real PostgreSQL (as the service role) and a local fake Stripe spoken to
by the official stripe library: auth, R1, top-ups, confirm, webhooks (signatures, exactly-once
credits under concurrency, refunds, disputes, unhandled types) and the reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from consumers.http.app import create_app
from consumers.http.auth import parse_api_tokens
from ledger.db import unit_of_work
from ledger.events import event_to_json
from ledger.journal import DISPUTES, REFUNDS, STRIPE_CLEARING
from projections.processor import Incoming, process_batch
from projections.wallet_store import lock_wallets
from tests.factories import T0, adjusted, make_event, metered
from tests.fake_stripe import FakeStripe
from tests.integration.http_support import (
    BOTH_TOKEN,
    FINANCE_TOKEN,
    WALLET_AUTH,
    WALLET_TOKEN,
    WEBHOOK_SECRET,
    Clock,
    count,
    entries_sum,
    live_server,
    make_settings,
    signed,
    stripe_events,
    topup_txns,
    wallet_balance,
    webhook_row,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(app_engine: Engine, fake_stripe: FakeStripe, clock: Clock) -> FastAPI:
    return create_app(app_engine, make_settings(), stripe_client=fake_stripe.client(), clock=clock)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def paid_intent(fake: FakeStripe, wallet_id: str, cents: int = 2500) -> dict[str, Any]:
    pi = fake.create_payment_intent(cents, metadata={"walletId": wallet_id})
    return fake.succeed(pi["id"])


def post_event(client: TestClient, event: dict[str, Any], **kw: Any) -> httpx.Response:
    body, headers = signed(event, **kw)
    return client.post("/stripe/webhook", content=body, headers=headers)


def get_wallet(client: TestClient, wallet_id: str) -> dict[str, Any]:
    r = client.get(f"/wallets/{wallet_id}", headers=WALLET_AUTH)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------ auth


def test_no_token_is_401_with_www_authenticate(client: TestClient) -> None:
    for r in (
        client.post("/wallet/create-intent", json={"walletId": "w", "amount": 10}),
        client.get("/wallets/w"),
        client.get("/rentals/r", headers={"Authorization": "Basic dXNlcjpwYXNz"}),
        client.post("/wallet/confirm", json={"paymentIntentId": "pi_1"}, headers={"Authorization": "Bearer"}),
    ):
        assert r.status_code == 401, r.text
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["error"] == "unauthenticated"
        assert "Authorization: Bearer" in r.json()["detail"]


def test_unknown_token_is_401(client: TestClient) -> None:
    for token in ("nope", WALLET_TOKEN + "x", WALLET_TOKEN[:-1], "tök€n"):
        r = client.get("/wallets/w", headers={"Authorization": f"Bearer {token}".encode()})  # type: ignore[dict-item]
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "invalid_token"
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
        assert token not in r.text


def test_wrong_scope_is_403(client: TestClient) -> None:
    r = client.get("/wallets/w", headers={"Authorization": f"Bearer {FINANCE_TOKEN}"})
    assert r.status_code == 403
    assert r.json()["error"] == "insufficient_scope"
    assert "'wallet'" in r.json()["detail"]
    assert FINANCE_TOKEN not in r.text
    # A token with both scopes passes (404: the wallet is unknown, not an auth failure).
    assert client.get("/wallets/w", headers={"Authorization": f"Bearer {BOTH_TOKEN}"}).status_code == 404
    # The scheme is case-insensitive (RFC 6750).
    assert client.get("/wallets/w", headers={"Authorization": f"bearer {WALLET_TOKEN}"}).status_code == 404


@pytest.mark.unit
def test_token_configuration_is_parsed_and_errors_never_show_tokens() -> None:
    tokens = parse_api_tokens(" a1:wallet ; b2:finance,wallet;;a1:finance ")
    assert {t.secret: t.scopes for t in tokens} == {
        b"a1": frozenset({"wallet", "finance"}),
        b"b2": frozenset({"wallet", "finance"}),
    }
    assert parse_api_tokens("") == ()
    for bad in ("secret_tok", "secret_tok:", "secret_tok:admin", ":wallet", "sec ret:wallet"):
        with pytest.raises(ValueError) as err:
            parse_api_tokens(bad)
        assert "secret_tok" not in str(err.value)
        assert "sec ret" not in str(err.value)


def test_unknown_paths_and_methods_answer_in_the_error_shape(client: TestClient) -> None:
    r = client.get("/no/such/path")
    assert r.status_code == 404
    assert set(r.json()) == {"error", "detail"}
    r = client.get("/wallet/confirm", headers=WALLET_AUTH)
    assert r.status_code == 405
    assert r.json()["error"] == "method_not_allowed"


# ------------------------------------------------------------------------ create-intent and R1


@pytest.mark.parametrize(
    ("amount", "cents"),
    [(10, 1000), ("12.50", 1250), ("5", 500), (100, 10000), ("10000", 1_000_000)],
)
def test_create_intent_makes_a_usd_payment_intent_in_cents(
    client: TestClient, fake_stripe: FakeStripe, unique: str, amount: Any, cents: int
) -> None:
    r = client.post("/wallet/create-intent", json={"walletId": unique, "amount": amount}, headers=WALLET_AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    pi = fake_stripe.payment_intents[body["paymentIntentId"]]
    assert pi["amount"] == cents
    assert pi["currency"] == "usd"
    assert pi["metadata"] == {"walletId": unique}
    assert body["clientSecret"] == pi["client_secret"]
    assert body["amountMicros"] == cents * 10_000
    assert body["walletId"] == unique
    sent = next(req for req in reversed(fake_stripe.requests) if req.method == "POST")
    assert sent.params["amount"] == str(cents)
    assert sent.params["metadata"] == {"walletId": unique}
    assert sent.idempotency_key  # every create carries an idempotency key


def test_json_numbers_with_a_fraction_are_read_exactly(
    client: TestClient, fake_stripe: FakeStripe, unique: str
) -> None:
    # 12.5 and 19.99 are not exact binary floats; read as Decimal they are exact cents.
    for raw, cents in ((b"12.5", 1250), (b"19.99", 1999), (b"0.2e2", 2000), (b"1234.56", 123456)):
        r = client.post(
            "/wallet/create-intent",
            content=b'{"walletId": "' + unique.encode() + b'", "amount": ' + raw + b"}",
            headers={**WALLET_AUTH, "Content-Type": "application/json"},
        )
        assert r.status_code == 200, r.text
        assert fake_stripe.payment_intents[r.json()["paymentIntentId"]]["amount"] == cents


@pytest.mark.parametrize(
    ("amount", "error", "words"),
    [
        (4.99, "amount_out_of_range", ["minimum top-up is $5", "$5, $10, $25, $50, $100"]),
        (0, "amount_out_of_range", ["minimum top-up is $5"]),
        ("4.999999", "invalid_amount", ["whole number of cents"]),
        (10000.01, "amount_out_of_range", ["maximum top-up is $10,000", "$5, $10, $25, $50, $100"]),
        (10**9, "amount_out_of_range", ["maximum"]),
        ("12.345", "invalid_amount", ["whole number of cents", "2 decimal places"]),
        (12.3456789, "invalid_request", ["more than 6 decimal places"]),
        (-10, "invalid_request", ["negative"]),
        ("ten", "invalid_request", ["plain decimal number"]),
        ("", "invalid_request", ["empty"]),
        (True, "invalid_request", ["boolean"]),
        (None, "invalid_request", ["amount"]),
        ([10], "invalid_request", ["amount"]),
        ("1e999999", "invalid_request", ["more than"]),
        ("NaN", "invalid_request", ["plain decimal"]),
        ("0E1000000000000000000", "invalid_request", ["amount"]),  # found by the fuzzer: Decimal() raised
        ("1e1000000000000000000", "invalid_request", ["amount"]),
    ],
)
def test_r1_and_bad_amounts_are_422_with_a_message_to_act_on(
    client: TestClient, fake_stripe: FakeStripe, unique: str, amount: Any, error: str, words: list[str]
) -> None:
    before = fake_stripe.count("POST", "/v1/payment_intents")
    r = client.post("/wallet/create-intent", json={"walletId": unique, "amount": amount}, headers=WALLET_AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == error
    for word in words:
        assert word in r.json()["detail"], r.json()
    assert fake_stripe.count("POST", "/v1/payment_intents") == before  # nothing reached Stripe


def test_configured_maximum_applies(app_engine: Engine, fake_stripe: FakeStripe, clock: Clock, unique: str) -> None:
    app = create_app(app_engine, make_settings(max_topup_micros=50_000_000), stripe_client=fake_stripe.client())
    with TestClient(app) as c:
        assert c.post("/wallet/create-intent", json={"walletId": unique, "amount": 50}, headers=WALLET_AUTH).is_success
        r = c.post("/wallet/create-intent", json={"walletId": unique, "amount": "50.01"}, headers=WALLET_AUTH)
        assert r.status_code == 422
        assert "maximum top-up is $50" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"amount": 10},
        {"walletId": "bad id!", "amount": 10},
        {"walletId": "x" * 65, "amount": 10},
        {"walletId": "w", "amount": 10, "extra": 1},
        {"wallet_id": "w", "amount": 10},
        [1, 2],
        "text",
    ],
)
def test_invalid_bodies_are_422(client: TestClient, body: Any) -> None:
    r = client.post("/wallet/create-intent", json=body, headers=WALLET_AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request"


def test_unreadable_bodies_are_4xx_never_500(client: TestClient) -> None:
    for content in (
        b"{",
        b"\xff\xfe",
        b"{}" * 10,
        b'{"walletId": "w", "amount": 1e1000000000000000000}',
        b'{"walletId": "w", "amount": 1' + b"0" * 5000 + b"}",
        b"[" * 100_000,
    ):
        r = client.post(
            "/wallet/create-intent", content=content, headers={**WALLET_AUTH, "Content-Type": "application/json"}
        )
        assert 400 <= r.status_code < 500, (content[:20], r.status_code, r.text)
        assert set(r.json()) >= {"error", "detail"}
    r = client.post("/wallet/create-intent", content=b'{"walletId": "w", "amount": 10}', headers=WALLET_AUTH)
    assert r.status_code == 422  # no content type: not read as JSON


def test_idempotency_key_returns_the_same_payment_intent(
    client: TestClient, fake_stripe: FakeStripe, unique: str
) -> None:
    headers = {**WALLET_AUTH, "Idempotency-Key": f"order-{unique}"}
    first = client.post("/wallet/create-intent", json={"walletId": unique, "amount": 25}, headers=headers)
    again = client.post("/wallet/create-intent", json={"walletId": unique, "amount": 25}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json()["paymentIntentId"] == again.json()["paymentIntentId"]
    other = client.post("/wallet/create-intent", json={"walletId": unique, "amount": 50}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"] == "idempotency_key_reused"
    # Without a key, two top-ups of the same amount are two PaymentIntents.
    a = client.post("/wallet/create-intent", json={"walletId": unique, "amount": 25}, headers=WALLET_AUTH)
    b = client.post("/wallet/create-intent", json={"walletId": unique, "amount": 25}, headers=WALLET_AUTH)
    assert a.json()["paymentIntentId"] != b.json()["paymentIntentId"]


def test_stripe_down_is_502_not_500(client: TestClient, fake_stripe: FakeStripe, unique: str) -> None:
    fake_stripe.fail_next.append(500)
    r = client.post("/wallet/create-intent", json={"walletId": unique, "amount": 25}, headers=WALLET_AUTH)
    assert r.status_code == 502
    assert r.json()["error"] == "stripe_unavailable"
    assert "Retry-After" in r.headers


def test_stripe_not_configured_is_503(app_engine: Engine, unique: str) -> None:
    with TestClient(create_app(app_engine, make_settings())) as c:
        r = c.post("/wallet/create-intent", json={"walletId": unique, "amount": 25}, headers=WALLET_AUTH)
        assert r.status_code == 503
        assert "BILLING_STRIPE_API_KEY" in r.json()["detail"]


def test_stripe_client_from_settings_uses_the_api_base(
    app_engine: Engine, fake_stripe: FakeStripe, unique: str
) -> None:
    from pydantic import SecretStr

    settings = make_settings(stripe_api_key=SecretStr(fake_stripe.api_key), stripe_api_base=fake_stripe.url + "/")
    with TestClient(create_app(app_engine, settings)) as c:
        r = c.post("/wallet/create-intent", json={"walletId": unique, "amount": 25}, headers=WALLET_AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["paymentIntentId"] in fake_stripe.payment_intents


# --------------------------------------------------------------------------------------- confirm


def test_confirm_credits_once(client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str) -> None:
    r = client.post("/wallet/create-intent", json={"walletId": unique, "amount": "12.50"}, headers=WALLET_AUTH)
    pi_id = r.json()["paymentIntentId"]

    r = client.post("/wallet/confirm", json={"paymentIntentId": pi_id}, headers=WALLET_AUTH)
    assert r.status_code == 409
    assert "requires_payment_method" in r.json()["detail"]
    assert wallet_balance(app_engine, unique) == 0

    fake_stripe.succeed(pi_id)
    first = client.post("/wallet/confirm", json={"paymentIntentId": pi_id}, headers=WALLET_AUTH)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "walletId": unique,
        "paymentIntentId": pi_id,
        "credited": True,
        "amountMicros": 12_500_000,
        "balanceMicros": 12_500_000,
        "balanceUsd": "12.500000",
    }
    for _ in range(3):
        again = client.post("/wallet/confirm", json={"paymentIntentId": pi_id}, headers=WALLET_AUTH)
        assert again.status_code == 200
        assert again.json()["credited"] is False
        assert again.json()["balanceMicros"] == 12_500_000
    assert wallet_balance(app_engine, unique) == 12_500_000
    assert topup_txns(app_engine, unique) == 1
    assert stripe_events(app_engine, pi_id) == 1


def test_confirm_credits_amount_received(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    pi = fake_stripe.create_payment_intent(2500, metadata={"walletId": unique})
    fake_stripe.succeed(pi["id"], amount_received=300)  # captured less than asked: below $5, still credited (R1)
    r = client.post("/wallet/confirm", json={"paymentIntentId": pi["id"]}, headers=WALLET_AUTH)
    assert r.status_code == 200
    assert r.json()["balanceMicros"] == 3_000_000
    memo = count(
        app_engine,
        "SELECT count(*) FROM journal_transactions WHERE wallet_id = :w AND memo LIKE '%below_minimum_topup%'",
        w=unique,
    )
    assert memo == 1


def test_confirm_errors(client: TestClient, fake_stripe: FakeStripe) -> None:
    r = client.post("/wallet/confirm", json={"paymentIntentId": "pi_doesnotexist"}, headers=WALLET_AUTH)
    assert r.status_code == 404
    assert r.json()["error"] == "payment_intent_not_found"

    foreign = fake_stripe.succeed(fake_stripe.create_payment_intent(2500)["id"])  # not created by the service
    r = client.post("/wallet/confirm", json={"paymentIntentId": foreign["id"]}, headers=WALLET_AUTH)
    assert r.status_code == 422
    assert "metadata.walletId" in r.json()["detail"]

    euro = fake_stripe.create_payment_intent(2500, currency="eur", metadata={"walletId": "w_eur"})
    fake_stripe.succeed(euro["id"])
    r = client.post("/wallet/confirm", json={"paymentIntentId": euro["id"]}, headers=WALLET_AUTH)
    assert r.status_code == 422
    assert "USD" in r.json()["detail"]

    bad_wallet = fake_stripe.create_payment_intent(2500, metadata={"walletId": "not a wallet"})
    fake_stripe.succeed(bad_wallet["id"])
    r = client.post("/wallet/confirm", json={"paymentIntentId": bad_wallet["id"]}, headers=WALLET_AUTH)
    assert r.status_code == 422

    for bad in ("", "ch_123", "pi_", "pi_a b", "pi_" + "x" * 300):
        r = client.post("/wallet/confirm", json={"paymentIntentId": bad}, headers=WALLET_AUTH)
        assert r.status_code == 422, bad


# -------------------------------------------------------------------------------- exactly once


def test_webhook_and_confirm_concurrently_credit_exactly_once(
    app: FastAPI, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    """100 concurrent deliveries of one PaymentIntent over real HTTP: 50 confirms, 25 deliveries of
    one webhook event (Stripe's retries) and 25 distinct events naming the same PaymentIntent."""
    pi = paid_intent(fake_stripe, unique, cents=2500)
    retried = fake_stripe.event("payment_intent.succeeded", pi)
    requests: list[tuple[str, bytes | dict, dict]] = []
    for i in range(100):
        if i % 2 == 0:
            requests.append(("/wallet/confirm", {"paymentIntentId": pi["id"]}, WALLET_AUTH))
        else:
            event = retried if i % 4 == 1 else fake_stripe.event("payment_intent.succeeded", pi)
            body, headers = signed(event)
            requests.append(("/stripe/webhook", body, headers))
    start = threading.Barrier(len(requests))

    with live_server(app) as base:

        def send(item: tuple[str, bytes | dict, dict]) -> httpx.Response:
            path, body, headers = item
            with httpx.Client(base_url=base, timeout=60) as http:
                start.wait()
                if isinstance(body, dict):
                    return http.post(path, json=body, headers=headers)
                return http.post(path, content=body, headers=headers)

        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            responses = list(pool.map(send, requests))

    assert [r.status_code for r in responses] == [200] * 100, [r.text for r in responses if r.status_code != 200]
    credits = sum(1 for r in responses if r.json().get("credited") is True)
    credits += sum(r.json().get("applied", 0) for r in responses)
    assert credits == 1
    assert wallet_balance(app_engine, unique) == 25_000_000
    assert topup_txns(app_engine, unique) == 1
    assert stripe_events(app_engine, pi["id"]) == 1
    assert entries_sum(app_engine, f"wallet:{unique}") == 25_000_000
    assert all(r.json()["balanceMicros"] == 25_000_000 for r in responses if "balanceMicros" in r.json())
    # Each distinct Stripe event is recorded once, the retried one included.
    recorded = count(
        app_engine,
        "SELECT count(*) FROM stripe_webhook_events WHERE payload->'data'->'object'->>'id' = :pi",
        pi=pi["id"],
    )
    assert recorded == 26
    duplicates = [r.json() for r in responses if r.json().get("duplicate")]
    assert len(duplicates) == 24


def test_repeated_webhook_is_recorded_once_and_credits_once(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    pi = paid_intent(fake_stripe, unique, cents=1000)
    event = fake_stripe.event("payment_intent.succeeded", pi)
    first = post_event(client, event)
    assert first.status_code == 200
    assert first.json()["handled"] is True
    assert first.json()["applied"] == 1
    for _ in range(3):
        again = post_event(client, event)
        assert again.json()["duplicate"] is True
        assert again.json()["handled"] is True
    row = webhook_row(app_engine, event["id"])
    assert row is not None
    assert row["type"] == "payment_intent.succeeded"
    assert row["handled"] is True
    assert row["payload"] == event
    assert wallet_balance(app_engine, unique) == 10_000_000
    # The confirm after the webhook finds it credited.
    r = client.post("/wallet/confirm", json={"paymentIntentId": pi["id"]}, headers=WALLET_AUTH)
    assert r.json()["credited"] is False
    assert r.json()["balanceMicros"] == 10_000_000


# ---------------------------------------------------------------------------------- refunds


def test_partial_and_repeated_refunds_debit_once_per_refund(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    pi = paid_intent(fake_stripe, unique, cents=5000)
    assert post_event(client, fake_stripe.event("payment_intent.succeeded", pi)).json()["applied"] == 1

    fake_stripe.refund(pi["id"], 1000)
    first = fake_stripe.event("charge.refunded", fake_stripe.charge_of(pi["id"]))
    assert post_event(client, first).json()["applied"] == 1
    assert wallet_balance(app_engine, unique) == 40_000_000

    fake_stripe.refund(pi["id"], 500)
    fake_stripe.refund(pi["id"], 200, status="pending")  # not money moved yet: not debited
    second = fake_stripe.event("charge.refunded", fake_stripe.charge_of(pi["id"]))  # lists all refunds so far
    r = post_event(client, second).json()
    assert (r["facts"], r["applied"]) == (2, 1)
    assert wallet_balance(app_engine, unique) == 35_000_000

    assert post_event(client, first).json()["duplicate"] is True  # Stripe redelivers the first event
    replayed = fake_stripe.event("charge.refunded", fake_stripe.charge_of(pi["id"]))  # new id, same refunds
    assert post_event(client, replayed).json()["applied"] == 0
    assert wallet_balance(app_engine, unique) == 35_000_000
    assert entries_sum(app_engine, REFUNDS) >= 15_000_000
    assert (
        count(
            app_engine, "SELECT count(*) FROM journal_transactions WHERE wallet_id = :w AND kind = 'refund'", w=unique
        )
        == 2
    )


def test_refunds_not_embedded_are_listed_from_stripe_across_pages(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    pi = paid_intent(fake_stripe, unique, cents=50_000)
    client.post("/wallet/confirm", json={"paymentIntentId": pi["id"]}, headers=WALLET_AUTH)
    for _ in range(105):  # more than one page of 100
        fake_stripe.refund(pi["id"], 10)
    lists_before = fake_stripe.count("GET", "/v1/refunds")
    event = fake_stripe.event("charge.refunded", fake_stripe.charge_of(pi["id"], embed_refunds=False))
    r = post_event(client, event).json()
    assert (r["facts"], r["applied"]) == (105, 105)
    assert fake_stripe.count("GET", "/v1/refunds") - lists_before == 2  # two pages
    assert wallet_balance(app_engine, unique) == 500_000_000 - 105 * 100_000


def test_refund_before_payment_never_creates_or_destroys_money(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    pi = paid_intent(fake_stripe, unique, cents=3000)
    fake_stripe.refund(pi["id"], 1000)
    clearing_before = entries_sum(app_engine, STRIPE_CLEARING)
    refunds_before = entries_sum(app_engine, REFUNDS)

    early = post_event(client, fake_stripe.event("charge.refunded", fake_stripe.charge_of(pi["id"])))
    assert early.json()["handled"] is True
    assert wallet_balance(app_engine, unique) == 0  # nothing moves before the payment
    assert entries_sum(app_engine, STRIPE_CLEARING) == clearing_before
    assert entries_sum(app_engine, REFUNDS) == refunds_before

    r = client.post("/wallet/confirm", json={"paymentIntentId": pi["id"]}, headers=WALLET_AUTH)
    assert r.json()["balanceMicros"] == 20_000_000  # paid 30, refunded 10: applied when the payment came
    assert entries_sum(app_engine, STRIPE_CLEARING) - clearing_before == -30_000_000
    assert entries_sum(app_engine, REFUNDS) - refunds_before == 10_000_000
    assert post_event(client, fake_stripe.event("payment_intent.succeeded", pi)).json()["applied"] == 0
    assert wallet_balance(app_engine, unique) == 20_000_000


# --------------------------------------------------------------------------------- disputes


@pytest.mark.parametrize("won", [True, False])
def test_dispute_holds_then_releases_or_loses(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str, won: bool
) -> None:
    pi = paid_intent(fake_stripe, unique, cents=4000)
    client.post("/wallet/confirm", json={"paymentIntentId": pi["id"]}, headers=WALLET_AUTH)
    disputes_before = entries_sum(app_engine, DISPUTES)

    dispute = fake_stripe.dispute(pi["id"], 1500)
    pi_reads = fake_stripe.count("GET", f"/v1/payment_intents/{pi['id']}")
    opened = post_event(client, fake_stripe.event("charge.dispute.created", dispute))
    assert opened.json()["applied"] == 1
    # The ledger knew the PaymentIntent's wallet: Stripe was not asked again.
    assert fake_stripe.count("GET", f"/v1/payment_intents/{pi['id']}") == pi_reads
    assert wallet_balance(app_engine, unique) == 25_000_000
    assert entries_sum(app_engine, DISPUTES) - disputes_before == 15_000_000
    assert stripe_events(app_engine, f"{dispute['id']}.opened") == 1

    closed = fake_stripe.close_dispute(dispute["id"], won=won)
    event = fake_stripe.event("charge.dispute.closed", closed)
    assert post_event(client, event).json()["applied"] == 1
    assert post_event(client, event).json()["duplicate"] is True
    assert wallet_balance(app_engine, unique) == (40_000_000 if won else 25_000_000)
    assert entries_sum(app_engine, DISPUTES) == disputes_before
    assert stripe_events(app_engine, f"{dispute['id']}.closed") == 1


def test_dispute_of_an_unknown_payment_asks_stripe_for_the_wallet(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    pi = paid_intent(fake_stripe, unique, cents=4000)
    dispute = fake_stripe.dispute(pi["id"])
    before = fake_stripe.count("GET", f"/v1/payment_intents/{pi['id']}")
    r = post_event(client, fake_stripe.event("charge.dispute.created", dispute))
    assert r.json()["handled"] is True
    assert fake_stripe.count("GET", f"/v1/payment_intents/{pi['id']}") == before + 1
    assert wallet_balance(app_engine, unique) == 0  # pending until the payment arrives
    r = client.post("/wallet/confirm", json={"paymentIntentId": pi["id"]}, headers=WALLET_AUTH)
    assert r.json()["balanceMicros"] == 0  # paid 40, 40 held by the open dispute


def test_webhook_that_needs_stripe_while_it_is_down_is_5xx_and_changes_nothing(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    pi = paid_intent(fake_stripe, unique)
    event = fake_stripe.event("charge.dispute.created", fake_stripe.dispute(pi["id"]))
    fake_stripe.fail_next.append(500)
    r = post_event(client, event)
    assert r.status_code == 502  # Stripe retries the webhook
    assert webhook_row(app_engine, event["id"]) is None
    assert post_event(client, event).json()["handled"] is True  # the retry works


# ------------------------------------------------------------------------------- signatures


def test_bad_stale_and_future_signatures_are_400_and_change_nothing(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    pi = paid_intent(fake_stripe, unique)
    event = fake_stripe.event("payment_intent.succeeded", pi)
    body, good = signed(event)
    now = int(time.time())
    cases: list[tuple[bytes, dict[str, Any]]] = [
        (body, signed(event, secret="whsec_wrong")[1]),
        (body.replace(b"2500", b"9999"), good),  # tampered body
        # Margins of 30 s past the 300 s tolerance: the wall clock moves while a loaded machine runs
        # the cases (test_signature_window_follows_the_service_clock pins the exact edges).
        (body, signed(event, timestamp=now - 330)[1]),  # stale
        (body, signed(event, timestamp=now + 330)[1]),  # future: refused although stripe would accept it
        (body, signed(event, timestamp=now + 10**6)[1]),
        (body, {}),
        (body, {"Stripe-Signature": "garbage"}),
        (body, {"Stripe-Signature": "t=abc,v1=00"}),
        (body, {"Stripe-Signature": f"t={now},v0=" + "0" * 64}),
        (body, {"Stripe-Signature": f"t={now},v1=".encode() + "é".encode() * 32}),  # not ASCII
        (body, {"Stripe-Signature": "t=" + "9" * 5000 + ",v1=00"}),
        (b"\xff" + body, good),
    ]
    for content, headers in cases:
        r = client.post("/stripe/webhook", content=content, headers=headers)
        assert r.status_code == 400, (headers, r.text)
        assert r.json()["error"] == "invalid_signature"
    assert webhook_row(app_engine, event["id"]) is None
    assert wallet_balance(app_engine, unique) == 0
    assert stripe_events(app_engine, pi["id"]) == 0
    # Within the tolerance either way, the same event is accepted.
    r = client.post("/stripe/webhook", content=body, headers=signed(event, timestamp=now + 240)[1])
    assert r.status_code == 200
    assert wallet_balance(app_engine, unique) == 25_000_000


def test_signature_window_follows_the_service_clock(
    client: TestClient, clock: Clock, fake_stripe: FakeStripe, unique: str
) -> None:
    clock.at = datetime(2030, 1, 1, tzinfo=UTC)
    event = fake_stripe.event("ping", {"id": "x"})
    at = int(clock.at.timestamp())
    assert post_event(client, event, timestamp=at - 300).status_code == 200
    assert post_event(client, event, timestamp=at + 299).status_code == 200  # duplicate, but verified first
    assert post_event(client, event, timestamp=at - 301).status_code == 400
    assert post_event(client, event, timestamp=int(time.time())).status_code == 400  # years before the clock


def test_signed_bodies_that_are_not_events_are_400(client: TestClient, app_engine: Engine) -> None:
    for doc in ([1], {"id": "evt_1"}, {"id": "evt 1", "type": "x", "data": {"object": {}}}, "x"):
        body, headers = signed(doc)  # type: ignore[arg-type]
        r = client.post("/stripe/webhook", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid_event"
    from tests.fake_stripe import sign_webhook

    for text in ('{"id": "evt_x", "type": "x", "data": {"object": {"a": 1e1000000000000000000}}}', "{", "[NaN]"):
        r = client.post(
            "/stripe/webhook", content=text, headers={"Stripe-Signature": sign_webhook(text, WEBHOOK_SECRET)}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid_event"


def test_webhook_secret_not_configured_is_503(app_engine: Engine, fake_stripe: FakeStripe) -> None:
    from pydantic import SecretStr

    settings = make_settings(stripe_webhook_secret=SecretStr(""))
    with TestClient(create_app(app_engine, settings, stripe_client=fake_stripe.client())) as c:
        body, headers = signed({"id": "evt_x", "type": "ping", "data": {"object": {}}})
        assert c.post("/stripe/webhook", content=body, headers=headers).status_code == 503


def test_oversized_webhook_is_413(client: TestClient) -> None:
    r = client.post("/stripe/webhook", content=b"x" * 1_048_577, headers={"Stripe-Signature": "t=1,v1=00"})
    assert r.status_code == 413


# ------------------------------------------------------------------------ other event types


def test_unhandled_types_are_200_and_recorded(client: TestClient, fake_stripe: FakeStripe, app_engine: Engine) -> None:
    for type_ in ("customer.created", "payment_intent.created", "charge.refund.updated", "invoice.paid"):
        event = fake_stripe.event(type_, {"id": "obj_1", "object": "x"})
        r = post_event(client, event)
        assert r.status_code == 200
        assert (r.json()["handled"], r.json()["duplicate"]) == (False, False)
        row = webhook_row(app_engine, event["id"])
        assert row is not None
        assert (row["type"], row["handled"], row["payload"]) == (type_, False, event)


def test_handled_types_that_name_no_wallet_are_recorded_not_handled(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    foreign = fake_stripe.succeed(fake_stripe.create_payment_intent(2500)["id"])  # no metadata.walletId
    euro = fake_stripe.succeed(
        fake_stripe.create_payment_intent(2500, currency="eur", metadata={"walletId": unique})["id"]
    )
    weird = fake_stripe.event("payment_intent.succeeded", {"id": "pi_x", "amount": "lots"})
    nul = fake_stripe.event("charge.refunded", {"id": "ch_1", "description": "nul \x00 here", "payment_intent": None})
    for event in (
        fake_stripe.event("payment_intent.succeeded", foreign),
        fake_stripe.event("payment_intent.succeeded", euro),
        weird,
        nul,
    ):
        r = post_event(client, event)
        assert r.status_code == 200, r.text
        assert r.json()["handled"] is False
        row = webhook_row(app_engine, event["id"])
        assert row is not None
        assert row["handled"] is False
    assert wallet_balance(app_engine, unique) == 0


# ------------------------------------------------------------------------------------ reads


def test_wallet_read_is_live_and_rental_read(client: TestClient, clock: Clock, app_engine: Engine, unique: str) -> None:
    w, pod = unique, f"{unique[-40:]}_pod"
    started = make_event(
        "gpu.rental.started",
        {
            "walletId": w,
            "resourceId": pod,
            "resourceKind": "pod",
            "gpuType": "A100",
            "gpuCount": 1,
            "tier": "on_demand",
            "pricePerHourMicros": 3_600_000,
        },
        time=T0,
    )
    events = [adjusted(w, 10_000_000, time=T0), started, metered(w, pod, 600, time=T0 + timedelta(minutes=10))]
    with unit_of_work(app_engine) as uow:
        process_batch(uow.pg, [Incoming(e, event_to_json(e)) for e in events], now=T0 + timedelta(minutes=10))
        uow.commit()

    clock.at = T0 + timedelta(minutes=20)
    body = get_wallet(client, w)
    assert body == {
        "walletId": w,
        "balanceMicros": 9_400_000,
        "balanceUsd": "9.400000",
        "availableMicros": 8_800_000,  # 600 s accrued since the reading at 1,000 micros/s
        "availableUsd": "8.800000",
        "holdsMicros": 0,
        "accruedMicros": 600_000,
        "burnMicrosPerHour": 3_600_000,
        "projectedZeroAt": "2026-11-28T12:46:40Z",  # 8,800 s after 10:20
        "state": "active",
        "runningRentals": 1,
        "at": "2026-11-28T10:20:00Z",
    }
    clock.at = T0 + timedelta(hours=2)  # computed at request time: 1h50 of burn since the reading
    later = get_wallet(client, w)
    assert (later["availableMicros"], later["state"]) == (9_400_000 - 6_600_000, "low")
    clock.at = T0 + timedelta(hours=3)
    assert get_wallet(client, w)["state"] == "exhausted"

    r = client.get(f"/rentals/{pod}", headers=WALLET_AUTH)
    assert r.status_code == 200
    assert r.json() == {
        "resourceId": pod,
        "walletId": w,
        "resourceKind": "pod",
        "tier": "on_demand",
        "gpuType": "A100",
        "state": "running",
        "billableSeconds": 600,
        "costMicros": 600_000,
        "costUsd": "0.600000",
        "pricePerHourMicros": 3_600_000,
        "startedAt": "2026-11-28T10:00:00Z",
        "endedAt": None,
        "endReason": None,
    }


def test_reads_404_and_422(client: TestClient, unique: str) -> None:
    r = client.get(f"/wallets/{unique}", headers=WALLET_AUTH)
    assert (r.status_code, r.json()["error"]) == (404, "wallet_not_found")
    r = client.get(f"/rentals/{unique}", headers=WALLET_AUTH)
    assert (r.status_code, r.json()["error"]) == (404, "rental_not_found")
    for bad in ("a%20b", "x" * 65, "%E2%82%AC"):
        assert client.get(f"/wallets/{bad}", headers=WALLET_AUTH).status_code == 422
        assert client.get(f"/rentals/{bad}", headers=WALLET_AUTH).status_code == 422


def test_reads_take_no_lock(client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str) -> None:
    """A writer holds the wallet's lock (as a batch does); a read still answers at once."""
    pi = paid_intent(fake_stripe, unique, cents=1000)
    client.post("/wallet/confirm", json={"paymentIntentId": pi["id"]}, headers=WALLET_AUTH)
    answers: list[dict[str, Any]] = []
    with unit_of_work(app_engine) as writer:
        lock_wallets(writer.pg, [unique])  # held until the end of this block
        reader = threading.Thread(target=lambda: answers.append(get_wallet(client, unique)))
        reader.start()
        reader.join(timeout=10)
        assert not reader.is_alive(), "the read waited for the writer's lock"
    assert answers[0]["balanceMicros"] == 10_000_000


def test_payloads_jsonb_cannot_hold_are_stored_cleaned_or_refused(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine
) -> None:
    event = fake_stripe.event("customer.updated", {"id": "cus_1", "name": "nul \x00 and lone \ud800 here", "n": 1.5})
    r = post_event(client, event)
    assert r.status_code == 200, r.text
    row = webhook_row(app_engine, event["id"])
    assert row is not None
    assert row["payload"]["data"]["object"]["name"] == "nul \ufffd and lone \ufffd here"
    assert row["payload"]["data"]["object"]["n"] == 1.5

    from tests.fake_stripe import sign_webhook

    body = '{"id": "evt_hugenumber", "type": "ping", "data": {"object": {"n": 1e200000}}}'
    r = client.post("/stripe/webhook", content=body, headers={"Stripe-Signature": sign_webhook(body, WEBHOOK_SECRET)})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_event"
    assert webhook_row(app_engine, "evt_hugenumber") is None


def test_nul_anywhere_in_a_signed_webhook_is_never_a_5xx_and_books_nothing_wrong(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, unique: str
) -> None:
    """PostgreSQL refuses \\u0000 in jsonb and NUL in text: in an identity it is 400 invalid_event,
    in a wallet id or an object id it is recorded, not handled; elsewhere the payload is stored
    cleaned and a real payment is credited once. Never a 500 (Stripe would retry it for days)."""
    paid = paid_intent(fake_stripe, unique)
    paid["description"] = "nul \x00 here"
    odd_wallet = {**paid_intent(fake_stripe, f"{unique}b"), "metadata": {"walletId": f"{unique}b\x00"}}
    refused = {
        "id": fake_stripe.event("customer.updated", {"id": "cus_1"}, event_id="evt_\x00x"),
        "type": fake_stripe.event("payment_intent.succeeded\x00", paid),
    }
    unhandled = {
        "object id": fake_stripe.event("payment_intent.succeeded", {**paid, "id": "pi_\x00"}),
        "wallet id": fake_stripe.event("payment_intent.succeeded", odd_wallet),
        "currency": fake_stripe.event(
            "payment_intent.succeeded", {**paid, "id": f"{paid['id']}x", "currency": "usd\x00"}
        ),
        "charge id": fake_stripe.event("charge.refunded", {"id": "ch_\x00", "payment_intent": paid["id"]}),
        "key": fake_stripe.event("customer.updated", {"id": "cus_1", "a\x00b": 1}),
    }
    for what, event in refused.items():
        r = post_event(client, event)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_event"), (what, r.text)
        assert "not a Stripe event" in r.json()["detail"], what
    for what, event in unhandled.items():
        r = post_event(client, event)
        assert r.status_code == 200, (what, r.text)
        assert (r.json()["handled"], r.json()["applied"]) == (False, 0), (what, r.text)
        assert webhook_row(app_engine, event["id"]) is not None, what
    assert (wallet_balance(app_engine, unique), wallet_balance(app_engine, f"{unique}b")) == (0, 0)
    credit = fake_stripe.event("payment_intent.succeeded", paid)
    for _ in range(2):
        assert post_event(client, credit).status_code == 200
    assert wallet_balance(app_engine, unique) == 25_000_000
    assert topup_txns(app_engine, unique) == 1
    row = webhook_row(app_engine, credit["id"])
    assert row is not None
    assert row["payload"]["data"]["object"]["description"] == "nul \ufffd here"


def test_the_router_keeps_its_error_shape_in_any_app(app_engine: Engine, fake_stripe: FakeStripe) -> None:
    """The runtime includes the router in its own app, maybe without install_error_handlers."""
    from consumers.http.app import build_api
    from consumers.http.context import create_context

    bare = FastAPI()
    bare.include_router(build_api(create_context(app_engine, make_settings(), stripe_client=fake_stripe.client())))
    with TestClient(bare) as c:
        r = c.post("/wallet/create-intent", json={"walletId": "w"})
        assert r.status_code == 401
        assert set(r.json()) == {"error", "detail"}
        r = c.post("/wallet/create-intent", json={"walletId": "w"}, headers=WALLET_AUTH)
        assert r.status_code == 422
        assert set(r.json()) == {"error", "detail"}
        r = c.post("/wallet/create-intent", content=b"{", headers={**WALLET_AUTH, "Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]) == (422, "invalid_request")
