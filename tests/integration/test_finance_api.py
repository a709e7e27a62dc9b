"""/finance/... over HTTP (finance scope), against the real database and the fake Stripe."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from consumers.http.app import create_app
from ledger.db import unit_of_work
from ledger.events import LOG_EVENT_ADAPTER, event_to_json
from projections.processor import Incoming, process_batch
from tests.factories import make_event
from tests.fake_stripe import FakeStripe
from tests.integration.http_support import FINANCE_TOKEN, WALLET_AUTH, Clock, make_settings

pytestmark = pytest.mark.integration
FINANCE = {"Authorization": f"Bearer {FINANCE_TOKEN}"}


@pytest.fixture(scope="module")
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
def client(app_engine: Engine, fake_stripe: FakeStripe) -> Iterator[TestClient]:
    app: FastAPI = create_app(app_engine, make_settings(), stripe_client=fake_stripe.client(), clock=Clock())
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def process(engine: Engine, events: list) -> None:
    with unit_of_work(engine) as uow:
        process_batch(uow.pg, [Incoming(e, event_to_json(e)) for e in events], now=datetime.now(UTC))
        uow.commit()


def test_finance_needs_the_finance_scope(client: TestClient) -> None:
    assert client.get("/finance/trial-balance").status_code == 401
    r = client.get("/finance/trial-balance", headers=WALLET_AUTH)
    assert r.status_code == 403
    assert r.json()["error"] == "insufficient_scope"


def test_trial_balance_has_the_contract_shape_and_sums_to_zero(
    client: TestClient, app_engine: Engine, unique: str
) -> None:
    w = f"w{unique[-39:]}"
    process(
        app_engine,
        [
            make_event(
                "wallet.adjusted",
                {"walletId": w, "amountMicros": 7_000_000, "reason": "c", "operator": "o"},
                time=datetime.now(UTC) - timedelta(minutes=1),
            )
        ],
    )
    r = client.get("/finance/trial-balance", headers=FINANCE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"at", "accounts", "totalMicros"}
    assert body["totalMicros"] == 0
    assert {"account": f"wallet:{w}", "balanceMicros": 7_000_000} in body["accounts"]
    csv_r = client.get("/finance/trial-balance?format=csv", headers=FINANCE)
    assert csv_r.headers["content-type"].startswith("text/csv")
    assert csv_r.text.splitlines()[0] == "account,balanceMicros"
    assert f"wallet:{w},7000000" in csv_r.text


def test_statement_revenue_and_debts(client: TestClient, app_engine: Engine, unique: str) -> None:
    w, p = f"w{unique[-39:]}", f"p{unique[-39:]}"
    t = datetime.now(UTC) - timedelta(minutes=40)
    process(
        app_engine,
        [
            make_event(
                "wallet.adjusted", {"walletId": w, "amountMicros": 1_000_000, "reason": "c", "operator": "o"}, time=t
            ),
            make_event(
                "gpu.rental.started",
                {
                    "walletId": w,
                    "resourceId": p,
                    "resourceKind": "pod",
                    "gpuType": "H100",
                    "gpuCount": 1,
                    "tier": "spot",
                    "pricePerHourMicros": 3_600_000,
                },
                time=t,
            ),
            make_event(
                "gpu.rental.ended",
                {"walletId": w, "resourceId": p, "uptimeSecondsTotal": 1500, "reason": "stopped"},
                time=t + timedelta(seconds=1500),
            ),
        ],
    )
    frm, to = (t - timedelta(seconds=1)).isoformat(), datetime.now(UTC).isoformat()
    r = client.get(f"/finance/statements/{w}", params={"from": frm, "to": to}, headers=FINANCE)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["openingBalanceMicros"] == 0
    assert s["chargesMicros"] == -1_500_000
    assert s["adjustmentsMicros"] == 1_000_000
    assert s["closingBalanceMicros"] == -500_000
    rv = client.get("/finance/revenue", params={"from": frm, "to": to, "groupBy": "product,gpuType"}, headers=FINANCE)
    assert rv.status_code == 200
    assert {"product": "pod_spot", "gpuType": "H100"}.items() <= next(
        row for row in rv.json()["rows"] if row["product"] == "pod_spot" and row["gpuType"] == "H100"
    ).items()
    d = client.get("/finance/debts", headers=FINANCE).json()
    assert {"walletId": w, "balanceMicros": -500_000} in d["wallets"]
    bad = client.get("/finance/revenue", params={"groupBy": "colour"}, headers=FINANCE)
    assert bad.status_code == 422
    assert "groupBy" in bad.json()["detail"]
    assert client.get("/finance/revenue", params={"from": "yesterday"}, headers=FINANCE).status_code == 422


def test_unknown_wallet_statement_is_404_and_revenue_groups_by_month(
    client: TestClient, app_engine: Engine, unique: str
) -> None:
    """As on the CLI: an unknown wallet is an error (not an all-zero statement), and revenue takes
    month (YYYY-MM) as a grouping, but not together with day."""
    nobody = f"n{unique[-39:]}"
    r = client.get(f"/finance/statements/{nobody}", headers=FINANCE)
    assert r.status_code == 404, r.text
    assert r.json() == {
        "error": "wallet_not_found",
        "detail": f"no wallet {nobody} is known: it has had no top-up, usage or admission yet",
    }
    w, p = f"m{unique[-39:]}", f"q{unique[-39:]}"
    t = datetime.now(UTC) - timedelta(minutes=30)
    started = {
        "walletId": w,
        "resourceId": p,
        "resourceKind": "pod",
        "gpuType": "A100",
        "gpuCount": 1,
        "tier": "spot",
        "pricePerHourMicros": 3_600_000,
    }
    ended = {"walletId": w, "resourceId": p, "uptimeSecondsTotal": 600, "reason": "stopped"}
    process(
        app_engine,
        [
            make_event("gpu.rental.started", started, time=t),
            make_event("gpu.rental.ended", ended, time=t + timedelta(seconds=600)),
        ],
    )
    known = client.get(f"/finance/statements/{w}", headers=FINANCE)
    assert known.status_code == 200, known.text  # a wallet known only by its charges has a statement
    assert known.json()["chargesMicros"] == -600_000
    period = {"from": (t - timedelta(seconds=1)).isoformat(), "to": datetime.now(UTC).isoformat()}
    by_month = client.get("/finance/revenue", params={**period, "groupBy": "month,product"}, headers=FINANCE)
    assert by_month.status_code == 200, by_month.text
    rows = by_month.json()["rows"]
    months = {row["month"] for row in rows}
    assert months <= {t.strftime("%Y-%m"), datetime.now(UTC).strftime("%Y-%m")}, months
    by_day = client.get("/finance/revenue", params={**period, "groupBy": "day"}, headers=FINANCE).json()["rows"]
    assert sum(r["revenueMicros"] for r in rows) == sum(r["revenueMicros"] for r in by_day) >= 600_000
    both = client.get("/finance/revenue", params={"groupBy": "day,month"}, headers=FINANCE)
    assert both.status_code == 422
    assert both.json()["error"] == "invalid_group_by"


def test_stripe_reconciliation_against_stripes_own_records(
    client: TestClient, app_engine: Engine, fake_stripe: FakeStripe, unique: str
) -> None:
    w = f"w{unique[-39:]}"
    start = datetime.now(UTC) - timedelta(seconds=5)
    matched = fake_stripe.succeed(fake_stripe.create_payment_intent(2500, metadata={"walletId": w})["id"])
    missing_in_ledger = fake_stripe.succeed(fake_stripe.create_payment_intent(1000, metadata={"walletId": w})["id"])
    mismatch = fake_stripe.succeed(fake_stripe.create_payment_intent(3000, metadata={"walletId": w})["id"])

    def fact(pi: dict, micros: int):
        return LOG_EVENT_ADAPTER.validate_json(
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": pi["id"],
                    "source": "stripe",
                    "type": "stripe.payment.succeeded",
                    "time": datetime.now(UTC).isoformat(),
                    "data": {"walletId": w, "paymentIntentId": pi["id"], "amountMicros": micros, "via": "confirm"},
                }
            )
        )

    ghost = LOG_EVENT_ADAPTER.validate_json(
        json.dumps(
            {
                "specversion": "1.0",
                "id": f"pi_ghost{unique[-20:]}",
                "source": "stripe",
                "type": "stripe.payment.succeeded",
                "time": datetime.now(UTC).isoformat(),
                "data": {
                    "walletId": w,
                    "paymentIntentId": f"pi_ghost{unique[-20:]}",
                    "amountMicros": 5_000_000,
                    "via": "confirm",
                },
            }
        )
    )
    process(app_engine, [fact(matched, 25_000_000), fact(mismatch, 31_000_000), ghost])
    r = client.get(
        "/finance/stripe-reconciliation",
        params={"from": start.isoformat(), "to": (datetime.now(UTC) + timedelta(seconds=5)).isoformat()},
        headers=FINANCE,
    )
    assert r.status_code == 200, r.text
    rows = {(x["status"], x["stripeId"]) for x in r.json()["rows"]}
    assert ("matched", matched["id"]) in rows
    assert ("missing_in_ledger", missing_in_ledger["id"]) in rows
    assert ("amount_mismatch", mismatch["id"]) in rows
    assert ("missing_in_stripe", f"pi_ghost{unique[-20:]}") in rows
    body = r.json()
    assert {"matched", "missingInLedger", "missingInStripe", "amountMismatch"} <= set(body)  # camelCase
    assert not [k for k in body if "_" in k]
    assert body["missingInStripe"] >= 1
    assert body["amountMismatch"] >= 1


def test_stripe_failures_during_reconciliation_are_502_with_stripes_message(
    client: TestClient, fake_stripe: FakeStripe
) -> None:
    fake_stripe.fail_next.append(500)
    r = client.get("/finance/stripe-reconciliation", headers=FINANCE)
    assert r.status_code == 502, r.text
    assert r.json()["error"] == "stripe_unavailable"
    assert "fake failure 500" in r.json()["detail"]  # Stripe's own message
    assert r.headers["Retry-After"]
    fake_stripe.fail_next.append(429)
    r = client.get("/finance/stripe-reconciliation", headers=FINANCE)
    assert (r.status_code, r.json()["error"]) == (502, "stripe_unavailable")
    assert "rate-limiting" in r.json()["detail"]


def test_reconciliation_is_one_function_for_the_cli(app_engine: Engine, fake_stripe: FakeStripe, unique: str) -> None:
    from consumers.stripe.gateway import StripeUnavailable
    from consumers.stripe.reconciliation import stripe_reconciliation

    def reconcile_with_stripe(engine: Engine, client: object, start: datetime, end: datetime) -> object:
        with engine.connect() as conn:
            return stripe_reconciliation(conn, client, start, end)  # type: ignore[arg-type]

    start = datetime.now(UTC) - timedelta(seconds=5)
    pi = fake_stripe.succeed(fake_stripe.create_payment_intent(1200, metadata={"walletId": unique})["id"])
    rep = reconcile_with_stripe(app_engine, fake_stripe.client(), start, datetime.now(UTC) + timedelta(seconds=5))
    assert ("missing_in_ledger", "payment", pi["id"], unique, None, 12_000_000) in rep.rows
    assert rep.summary["missingInLedger"] >= 1
    fake_stripe.fail_next.append(503)
    with pytest.raises(StripeUnavailable, match="fake failure 503"):
        reconcile_with_stripe(app_engine, fake_stripe.client(), start, datetime.now(UTC))
