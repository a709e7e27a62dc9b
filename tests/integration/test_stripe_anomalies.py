"""Signed webhooks Stripe would never send (issue 13 item 8): applied as Stripe says, booked at
receipt when their time is implausible, flagged for finance (GET /finance/anomalies, the metric,
``billing report anomalies``), and rebuilt byte for byte by ``billing verify``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Engine, text

from consumers.http.app import create_app
from projections.verify import verify
from tests.fake_stripe import FakeStripe
from tests.integration.http_support import FINANCE_TOKEN, Clock, make_settings, signed, wallet_balance

pytestmark = pytest.mark.integration
FINANCE = {"Authorization": f"Bearer {FINANCE_TOKEN}"}


@pytest.fixture(scope="module")
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(app_engine: Engine, fake_stripe: FakeStripe, registry: CollectorRegistry) -> Iterator[TestClient]:
    app = create_app(app_engine, make_settings(), stripe_client=fake_stripe.client(), clock=Clock(), registry=registry)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, event: dict[str, Any]) -> dict[str, Any]:
    body, headers = signed(event)
    r = client.post("/stripe/webhook", content=body, headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def journal(engine: Engine, wallet_id: str) -> list[tuple[str, str, datetime]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT kind, memo, booked_at FROM journal_transactions WHERE wallet_id = :w ORDER BY event_position"),
            {"w": wallet_id},
        ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def anomaly_rows(client: TestClient, wallet_id: str) -> list[dict[str, Any]]:
    r = client.get("/finance/anomalies", headers=FINANCE)
    assert r.status_code == 200, r.text
    return [row for row in r.json()["rows"] if row["walletId"] == wallet_id]


def metric(registry: CollectorRegistry, kind: str) -> float:
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(f'billing_stripe_anomalies_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no billing_stripe_anomalies_total for {kind}")


def test_a_refund_larger_than_the_payment_is_applied_as_stripe_says_and_flagged(
    client: TestClient,
    fake_stripe: FakeStripe,
    app_engine: Engine,
    registry: CollectorRegistry,
    database: Any,
    unique: str,
) -> None:
    pi = fake_stripe.succeed(fake_stripe.create_payment_intent(1000, metadata={"walletId": unique})["id"])
    assert post(client, fake_stripe.event("payment_intent.succeeded", pi))["applied"] == 1
    assert wallet_balance(app_engine, unique) == 10_000_000  # $10

    refund = fake_stripe.refund(pi["id"], 1_000_000)  # a signed $10,000 refund of a $10 payment
    before = datetime.now(UTC)
    answer = post(client, fake_stripe.event("charge.refunded", fake_stripe.charge_of(pi["id"])))
    assert answer["applied"] == 1
    assert "flagged for finance (exceeds_payment x1)" in answer["note"]
    # Stripe moved the money: the wallet is debited all of it, and owes $9,990.
    assert wallet_balance(app_engine, unique) == 10_000_000 - 10_000_000_000
    kind, memo, booked_at = journal(app_engine, unique)[-1]
    assert (kind, memo) == ("refund", f"{refund['id']} of {pi['id']} exceeds_payment")
    assert before - timedelta(seconds=5) <= booked_at <= datetime.now(UTC)

    rows = anomaly_rows(client, unique)
    assert [(r["kind"], r["stripeId"], r["entryKind"], r["amountMicros"]) for r in rows] == [
        ("exceeds_payment", refund["id"], "refund", 10_000_000_000)
    ]
    assert metric(registry, "exceeds_payment") == 1
    # A second dispute of what is left (nothing) is flagged too; a redelivery is not counted again.
    dispute = fake_stripe.dispute(pi["id"], 500)
    event = fake_stripe.event("charge.dispute.created", dispute)
    assert "exceeds_payment x1" in post(client, event)["note"]
    assert post(client, event)["duplicate"] is True
    assert metric(registry, "exceeds_payment") == 2
    assert wallet_balance(app_engine, unique) == 10_000_000 - 10_000_000_000 - 5_000_000

    result = verify(database.url, wallet_ids=[unique])
    assert result.ok, result.report()


@pytest.mark.parametrize("offset_s", [None, -86_400 * 40, 3_600])
def test_a_webhook_dated_far_from_the_clock_is_booked_at_receipt_and_flagged(
    client: TestClient,
    fake_stripe: FakeStripe,
    app_engine: Engine,
    registry: CollectorRegistry,
    database: Any,
    unique: str,
    offset_s: int | None,
) -> None:
    created = 1 if offset_s is None else int(time.time()) + offset_s  # 1970, 40 days ago, in an hour
    pi = fake_stripe.succeed(fake_stripe.create_payment_intent(2500, metadata={"walletId": unique})["id"])
    received = datetime.now(UTC)
    answer = post(client, fake_stripe.event("payment_intent.succeeded", pi, created=created))
    assert answer["applied"] == 1
    assert "event_time x1" in answer["note"]
    assert wallet_balance(app_engine, unique) == 25_000_000  # the money is credited all the same
    (kind, _memo, booked_at), *_ = journal(app_engine, unique)
    assert kind == "topup"
    assert received - timedelta(seconds=5) <= booked_at <= datetime.now(UTC)  # this period, not 1970
    with app_engine.connect() as conn:
        data = conn.execute(
            text("SELECT payload->'data' FROM events WHERE source = 'stripe' AND event_id = :i"), {"i": pi["id"]}
        ).scalar_one()
    assert data["stripeCreated"] == created
    (row,) = anomaly_rows(client, unique)
    assert row["kind"] == "event_time"
    assert row["stripeCreatedAt"] == datetime.fromtimestamp(created, UTC).isoformat()
    assert row["amountMicros"] == 25_000_000
    assert metric(registry, "event_time") == 1
    assert verify(database.url, wallet_ids=[unique]).ok


def test_a_plausible_webhook_is_booked_at_stripes_time_and_not_flagged(
    client: TestClient, fake_stripe: FakeStripe, app_engine: Engine, registry: CollectorRegistry, unique: str
) -> None:
    created = int(time.time()) - 200  # within the 300 s tolerance
    pi = fake_stripe.succeed(fake_stripe.create_payment_intent(2500, metadata={"walletId": unique})["id"])
    answer = post(client, fake_stripe.event("payment_intent.succeeded", pi, created=created))
    assert "flagged" not in answer["note"]
    (_kind, memo, booked_at), *_ = journal(app_engine, unique)
    assert booked_at == datetime.fromtimestamp(created, UTC)
    assert "exceeds_payment" not in memo
    assert anomaly_rows(client, unique) == []
    assert metric(registry, "event_time") == metric(registry, "exceeds_payment") == 0


def test_a_created_beyond_int64_is_not_a_stripe_event(client: TestClient, fake_stripe: FakeStripe) -> None:
    pi = fake_stripe.succeed(fake_stripe.create_payment_intent(2500, metadata={"walletId": "w_big"})["id"])
    body, headers = signed(fake_stripe.event("payment_intent.succeeded", pi, created=2**64))
    r = client.post("/stripe/webhook", content=body, headers=headers)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_event"


def test_anomalies_as_csv_and_the_finance_scope(client: TestClient) -> None:
    assert client.get("/finance/anomalies").status_code == 401
    r = client.get("/finance/anomalies", params={"format": "csv"}, headers=FINANCE)
    assert r.status_code == 200
    assert r.text.splitlines()[0].split(",")[:3] == ["kind", "bookedAt", "walletId"]
    summary = client.get("/finance/anomalies", headers=FINANCE).json()
    assert {"from", "to", "exceedsPayment", "eventTime", "rows"} <= set(summary)
    json.dumps(summary)


def test_billing_report_anomalies_lists_them(
    client: TestClient, fake_stripe: FakeStripe, database: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from consumers.cli.report import report_app

    pi = fake_stripe.succeed(fake_stripe.create_payment_intent(1000, metadata={"walletId": unique})["id"])
    post(client, fake_stripe.event("payment_intent.succeeded", pi, created=1))
    monkeypatch.setenv("BILLING_DATABASE_URL", database.url)
    result = CliRunner().invoke(report_app, ["anomalies", "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["report"] == "anomalies"
    mine = [r for r in doc["rows"] if r["walletId"] == unique]
    assert [(r["kind"], r["stripeId"], r["stripeCreatedAt"]) for r in mine] == [
        ("event_time", pi["id"], "1970-01-01T00:00:01+00:00")
    ]
