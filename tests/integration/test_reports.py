"""Finance reports over ledgers built through the real batch processor (issue 6)."""

from __future__ import annotations

import itertools
import json
import secrets
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from ledger.db import unit_of_work
from ledger.events import LOG_EVENT_ADAPTER, event_to_json
from ledger.money import rental_cost_micros
from projections import reports
from projections.processor import Incoming, process_batch
from projections.reports import StripeRecord
from tests.factories import make_event

pytestmark = pytest.mark.integration

# Each example books in its own day of 1990, so reports over its window see only its own rows.
_day = itertools.count(1)


def stripe_fact(type_: str, id_: str, at: datetime, data: dict[str, object]):
    return LOG_EVENT_ADAPTER.validate_json(
        json.dumps(
            {"specversion": "1.0", "id": id_, "source": "stripe", "type": type_, "time": at.isoformat(), "data": data}
        )
    )


def process(engine: Engine, events: list, now: datetime) -> None:
    with unit_of_work(engine) as uow:
        process_batch(uow.pg, [Incoming(e, event_to_json(e)) for e in events], now=now)
        uow.commit()


@st.composite
def ledgers(draw):
    n_wallets = draw(st.integers(1, 3))
    plan = []
    for _w in range(n_wallets):
        topups = draw(st.lists(st.integers(5, 200), min_size=1, max_size=3))
        refunds = draw(st.lists(st.integers(1, 4), max_size=2))
        pods = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(
                        [("pod", "on_demand"), ("pod", "spot"), ("marketplace", "on_demand"), ("cluster", "on_demand")]
                    ),
                    st.integers(1, 5_000_000),
                    st.lists(st.integers(0, 20_000), min_size=1, max_size=4),
                ),
                max_size=3,
            )
        )
        jobs = draw(st.lists(st.tuples(st.integers(0, 90_000), st.integers(0, 5_000)), max_size=4))
        plan.append((topups, refunds, pods, jobs))
    return plan


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(plan=ledgers())
def test_statement_identities_and_revenue_equals_charges(app_engine: Engine, plan) -> None:
    base = datetime(1990, 1, 1, tzinfo=UTC) + timedelta(days=next(_day))
    end = base + timedelta(hours=12)
    prefix = secrets.token_hex(4)
    expected_balance: dict[str, int] = {}
    expected_revenue: dict[str, int] = defaultdict(int)
    events = []
    t = base
    for w, (topups, refunds, pods, jobs) in enumerate(plan):
        wid = f"{prefix}-w{w}"
        bal = 0
        for i, usd in enumerate(topups):
            t += timedelta(seconds=1)
            events.append(
                stripe_fact(
                    "stripe.payment.succeeded",
                    f"pi_{prefix}_{w}_{i}",
                    t,
                    {
                        "walletId": wid,
                        "paymentIntentId": f"pi_{prefix}_{w}_{i}",
                        "amountMicros": usd * 1_000_000,
                        "via": "webhook",
                    },
                )
            )
            bal += usd * 1_000_000
        for i, usd in enumerate(refunds):
            t += timedelta(seconds=1)
            events.append(
                stripe_fact(
                    "stripe.refund.succeeded",
                    f"re_{prefix}_{w}_{i}",
                    t,
                    {
                        "walletId": wid,
                        "paymentIntentId": f"pi_{prefix}_{w}_0",
                        "refundId": f"re_{prefix}_{w}_{i}",
                        "amountMicros": usd * 1_000_000,
                    },
                )
            )
            bal -= usd * 1_000_000
        for p, ((kind, tier), price, readings) in enumerate(pods):
            rid = f"{prefix}-w{w}-p{p}"
            t += timedelta(seconds=1)
            events.append(
                make_event(
                    "gpu.rental.started",
                    {
                        "walletId": wid,
                        "resourceId": rid,
                        "resourceKind": kind,
                        "gpuType": "A100",
                        "gpuCount": 1,
                        "tier": tier,
                        "pricePerHourMicros": price,
                    },
                    time=t,
                )
            )
            for r in readings:
                t += timedelta(seconds=1)
                events.append(
                    make_event(
                        "gpu.rental.metered", {"walletId": wid, "resourceId": rid, "uptimeSecondsTotal": r}, time=t
                    )
                )
            cost = rental_cost_micros(max(readings), price)
            product = "pod_spot" if (kind, tier) == ("pod", "spot") else ("pod_on_demand" if kind == "pod" else kind)
            expected_revenue[product] += cost
            bal -= cost
        exact = 0
        for j, (ms, pps) in enumerate(jobs):
            t += timedelta(seconds=1)
            events.append(
                make_event(
                    "serverless.job.completed",
                    {
                        "walletId": wid,
                        "endpointId": f"{prefix}e",
                        "jobId": f"j{j}",
                        "gpuType": "ADA_48",
                        "computeMs": ms,
                        "pricePerSecondMicros": pps,
                        "status": "completed",
                    },
                    time=t,
                )
            )
            exact += ms * pps
        expected_revenue["serverless"] += exact // 1000
        bal -= exact // 1000
        expected_balance[wid] = bal
    process(app_engine, events, now=end)

    with app_engine.connect() as conn:
        for wid, bal in expected_balance.items():
            st_rep = reports.statement(conn, wid, base, end)  # checks opening + movements == closing
            s = st_rep.summary
            assert s["openingBalanceMicros"] == 0
            assert s["closingBalanceMicros"] == bal
            assert (
                s["topupsMicros"]
                + s["chargesMicros"]
                + s["refundsMicros"]
                + s["disputesMicros"]
                + s["adjustmentsMicros"]
            ) == bal
        rev = reports.revenue(conn, base, end, ["product"])
        got = {r[0]: r[1] for r in rev.rows}
        assert got == {k: v for k, v in expected_revenue.items() if v}
        assert rev.summary["totalMicros"] == sum(expected_revenue.values())
        tb = reports.trial_balance(conn, end)
        assert tb.summary["totalMicros"] == 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 12),
    drop=st.sets(st.integers(0, 11), max_size=4),
    change=st.sets(st.integers(0, 11), max_size=4),
    extra=st.integers(0, 3),
)
def test_reconciliation_finds_every_planted_discrepancy_and_nothing_else(
    app_engine: Engine, n, drop, change, extra
) -> None:
    base = datetime(1990, 1, 1, tzinfo=UTC) + timedelta(days=next(_day))
    end = base + timedelta(hours=1)
    prefix = secrets.token_hex(4)
    events = [
        stripe_fact(
            "stripe.payment.succeeded",
            f"pi_{prefix}_{i}",
            base + timedelta(seconds=i),
            {
                "walletId": f"{prefix}-w",
                "paymentIntentId": f"pi_{prefix}_{i}",
                "amountMicros": (i + 5) * 1_000_000,
                "via": "confirm",
            },
        )
        for i in range(n)
    ]
    process(app_engine, events, now=end)
    with app_engine.connect() as conn:
        ledger_side = reports.ledger_stripe_records(conn, base, end)
    assert len(ledger_side) == n
    stripe_side = []
    for i, rec in enumerate(ledger_side):
        if i in drop:
            continue
        amount = rec.amount_micros + 10_000 if i in change else rec.amount_micros
        stripe_side.append(StripeRecord(rec.kind, rec.stripe_id, amount, rec.wallet_id, rec.created))
    for k in range(extra):
        stripe_side.append(StripeRecord("payment", f"pi_{prefix}_x{k}", 7_000_000, None, base))
    rep = reports.reconcile(ledger_side, stripe_side, base, end)
    dropped = {i for i in drop if i < n}
    changed = {i for i in change if i < n} - dropped
    assert rep.summary["missingInStripe"] == len(dropped)
    assert rep.summary["amountMismatch"] == len(changed)
    assert rep.summary["missingInLedger"] == extra
    assert rep.summary["matched"] == n - len(dropped) - len(changed)
    flagged = {(r[0], r[2]) for r in rep.rows if r[0] != "matched"}
    assert flagged == (
        {("missing_in_stripe", f"pi_{prefix}_{i}") for i in dropped}
        | {("amount_mismatch", f"pi_{prefix}_{i}") for i in changed}
        | {("missing_in_ledger", f"pi_{prefix}_x{k}") for k in range(extra)}
    )


def test_debts_lists_wallets_below_zero(app_engine: Engine, unique: str) -> None:
    w, p = f"d{unique[-39:]}", f"p{unique[-39:]}"
    t = datetime(1991, 6, 1, tzinfo=UTC)
    process(
        app_engine,
        [
            make_event(
                "wallet.adjusted",
                {"walletId": w, "amountMicros": 5_000_000, "reason": "credit", "operator": "ops"},
                time=t,
            ),
            make_event(
                "gpu.rental.started",
                {
                    "walletId": w,
                    "resourceId": p,
                    "resourceKind": "pod",
                    "gpuType": "H100",
                    "gpuCount": 1,
                    "tier": "on_demand",
                    "pricePerHourMicros": 5_000_000,
                },
                time=t,
            ),
            make_event(
                "gpu.rental.ended",
                {"walletId": w, "resourceId": p, "uptimeSecondsTotal": 3603, "reason": "auto_stopped"},
                time=t,
            ),
        ],
        now=t + timedelta(hours=1),
    )
    with app_engine.connect() as conn:
        rep = reports.debts(conn)
    assert (w, -4166) in rep.rows


def test_views_are_readable_by_the_read_only_role_and_nothing_more(owner_engine: Engine) -> None:
    with owner_engine.connect() as conn:
        conn.execute(text("SET ROLE billing_readonly"))
        for view in ("ledger_entries", "ledger_account_balances", "ledger_debts", "ledger_revenue_daily"):
            conn.execute(text(f"SELECT * FROM {view} LIMIT 1")).all()
        with pytest.raises(Exception, match="permission denied"):
            conn.execute(
                text("INSERT INTO rejected_inputs (received_at, reason, detail, raw) VALUES (now(), 'x', 'x', '')")
            )


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_report_cli_prints_the_trial_balance(database, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from consumers.cli.main import app

    monkeypatch.setenv("BILLING_DATABASE_URL", database.url)
    result = CliRunner().invoke(app, ["report", "trial-balance", "--format", fmt])
    assert result.exit_code == 0, result.output
    if fmt == "json":
        body = json.loads(result.output)
        assert body["totalMicros"] == 0
        assert isinstance(body["rows"], list)
    elif fmt == "csv":
        assert result.output.splitlines()[0] == "account,balanceMicros"
    else:
        assert "Trial balance at" in result.output
        assert "Balance (USD)" in result.output
        assert "Sign convention" in result.output
        total = next(line for line in result.output.splitlines() if line.strip().startswith("Total"))
        assert total.split()[-1] == "$0.00"


# ------------------------------------------------------------------ dated statements and the CLI


def _cli(monkeypatch: pytest.MonkeyPatch, url: str, *args: str, env: dict[str, str] | None = None):
    from typer.testing import CliRunner

    from consumers.cli.main import app

    monkeypatch.setenv("BILLING_DATABASE_URL", url)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return CliRunner().invoke(app, ["report", *args])


def _two_day_wallet(engine: Engine, unique: str) -> tuple[str, str, datetime]:
    """A wallet's top-up, a pod metered over two days, a refund and an adjustment, in 1993."""
    w, p, pi = f"s{unique[-39:]}", f"p{unique[-39:]}", f"pi_s{unique[-30:]}"
    d1 = datetime(1993, 4, 1, 10, 0, tzinfo=UTC)
    d2 = d1 + timedelta(days=1)
    pay = {"walletId": w, "paymentIntentId": pi, "amountMicros": 50_000_000, "via": "webhook"}
    refund = {"walletId": w, "paymentIntentId": pi, "refundId": f"re_s{unique[-30:]}", "amountMicros": 5_000_000}
    started = {
        "walletId": w,
        "resourceId": p,
        "resourceKind": "pod",
        "gpuType": "H100",
        "gpuCount": 1,
        "tier": "on_demand",
        "pricePerHourMicros": 3_600_000,  # 1,000 micros a second
    }

    def metered(total_s: int, at: datetime):
        return make_event(
            "gpu.rental.metered", {"walletId": w, "resourceId": p, "uptimeSecondsTotal": total_s}, time=at
        )

    adjusted = {"walletId": w, "amountMicros": 2_000_000, "reason": "goodwill", "operator": "ops"}
    events = [
        stripe_fact("stripe.payment.succeeded", pi, d1, pay),
        make_event("gpu.rental.started", started, time=d1 + timedelta(minutes=1)),
        metered(600, d1 + timedelta(minutes=2)),
        metered(1200, d1 + timedelta(hours=1)),
        metered(3600, d2 - timedelta(hours=1)),
        stripe_fact("stripe.refund.succeeded", refund["refundId"], d2, refund),
        make_event("wallet.adjusted", adjusted, time=d2 + timedelta(hours=1)),
    ]
    process(engine, events, now=d2 + timedelta(hours=2))
    return w, p, d1


def test_statement_lines_are_dated_one_per_resource_and_day(app_engine: Engine, unique: str) -> None:
    w, p, d1 = _two_day_wallet(app_engine, unique)
    start, end = d1.replace(hour=0), d1.replace(hour=0) + timedelta(days=3)
    with app_engine.connect() as conn:
        rep = reports.statement_lines(conn, w, start, end)
        assert reports.wallet_known(conn, w)
        assert not reports.wallet_known(conn, f"nobody{unique[-30:]}")
    lines = [(r[0], r[2], r[3], r[7], r[8]) for r in rep.as_dicts() and rep.rows]
    assert lines == [
        (d1, "topup", None, 1, 50_000_000),
        (d1 + timedelta(minutes=2), "charge", p, 2, -1_200_000),  # day 1: two readings, one line
        (d1 + timedelta(hours=23), "charge", p, 1, -2_400_000),  # day 2: its own line
        (d1 + timedelta(days=1), "refund", None, 1, -5_000_000),
        (d1 + timedelta(days=1, hours=1), "adjustment", None, 1, 2_000_000),
    ]
    assert rep.rows[1][1] == d1 + timedelta(hours=1)  # the day's last charge
    assert rep.rows[0][6].startswith("pi_s")
    assert rep.rows[4][6] == "goodwill (by ops)"
    s = rep.summary
    assert (s["openingBalanceMicros"], s["closingBalanceMicros"]) == (0, 43_400_000)
    assert (s["topupsMicros"], s["chargesMicros"], s["refundsMicros"], s["adjustmentsMicros"]) == (
        50_000_000,
        -3_600_000,
        -5_000_000,
        2_000_000,
    )
    # The same wallet from day 2 on: day 1 is the opening balance.
    with app_engine.connect() as conn:
        later = reports.statement_lines(conn, w, d1 + timedelta(hours=14), end)
    assert later.summary["openingBalanceMicros"] == 50_000_000 - 1_200_000
    assert later.summary["closingBalanceMicros"] == 43_400_000
    assert [r[2] for r in later.rows] == ["charge", "refund", "adjustment"]


def test_statement_cli_in_every_format(
    database, app_engine: Engine, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, _p, _d1 = _two_day_wallet(app_engine, unique)
    body = json.loads(_cli(monkeypatch, database.url, "statement", w, "--month", "1993-04", "-f", "json").output)
    assert body["from"].startswith("1993-04-01")
    assert body["to"].startswith("1993-05-01")
    assert (body["openingBalanceMicros"], body["closingBalanceMicros"]) == (0, 43_400_000)
    assert [r["kind"] for r in body["rows"]] == ["topup", "charge", "charge", "refund", "adjustment"]
    assert body["rows"][1]["amountMicros"] == -1_200_000
    assert body["rows"][1]["at"].startswith("1993-04-01T10:02")
    csv_out = _cli(monkeypatch, database.url, "statement", w, "--from", "1993-04-01", "--to", "1993-04-02", "-f", "csv")
    rows = [line.split(",") for line in csv_out.output.splitlines()]
    assert rows[0][:2] == ["line", "at"]
    assert rows[0][-1] == "amountMicros"
    assert (rows[1][0], rows[1][-1]) == ("opening", "0")
    assert (rows[-1][0], rows[-1][-1]) == ("closing", "43400000")  # --to 04-02 includes the 2nd
    totals = {r[3]: int(r[-1]) for r in rows if r[0] == "total"}
    assert totals == {"topup": 50_000_000, "charge": -3_600_000, "refund": -5_000_000, "adjustment": 2_000_000}
    table = _cli(monkeypatch, database.url, "statement", w, "--month", "1993-04", env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    out = table.output
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "$50.00" in out
    assert "-$1.20" in out
    assert "-$2.40" in out
    assert "Closing balance" in out
    assert "$43.40" in out
    assert "10:02-11:00" in out
    exact = _cli(monkeypatch, database.url, "statement", w, "--month", "1993-04", "--precision", "micros")
    assert "$43.400000" in exact.output
    wide = _cli(monkeypatch, database.url, "statement", w, "--month", "1993-04", env={"COLUMNS": "120"}).output
    assert "Entries" in wide
    assert "Entries" not in out
    assert max(len(line) for line in wide.splitlines()) > 80


def test_unknown_wallet_and_bad_periods_are_one_line_user_errors(
    database, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumers.runtime.user_errors import UserError

    cases = [
        (["statement", f"nobody{unique[-30:]}"], "is not in the ledger"),
        (["revenue", "--from", "2026-11-01", "--to", "2026-10-01"], "--from 2026-11-01 is after --to 2026-10-01"),
        (["revenue", "--group-by", "colour"], "--group-by: unknown colour"),
        (["revenue", "--from", "yesterday"], "--from 'yesterday' is not a date"),
        (["rejected", "--month", "2026-13"], "--month '2026-13'"),
        (["statement", "x", "--month", "2026-10", "--from", "2026-10-01"], "--month cannot be combined"),
        (["trial-balance", "--at", "31/10/2026"], "--at '31/10/2026' is not a date"),
    ]
    for args, message in cases:
        result = _cli(monkeypatch, database.url, *args)
        assert isinstance(result.exception, UserError), (args, result.output, result.exception)
        assert message in str(result.exception), (args, str(result.exception))
        assert "\n" not in str(result.exception)


def test_revenue_by_month_with_a_total_row(
    database, app_engine: Engine, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = f"m{unique[-39:]}"
    jobs = []
    for i, (month, ms) in enumerate([(1, 10_000), (1, 20_000), (2, 5_000)]):
        data = {
            "walletId": w,
            "endpointId": f"e{unique[-20:]}",
            "jobId": f"j{i}",
            "gpuType": "ADA_48",
            "computeMs": ms,
            "pricePerSecondMicros": 100,  # 1,000 ms at 100 micros a second: 100 micros
            "status": "completed",
        }
        jobs.append(make_event("serverless.job.completed", data, time=datetime(1994, month, 3, tzinfo=UTC)))
    credit = {"walletId": w, "amountMicros": 10_000_000, "reason": "credit", "operator": "ops"}
    process(
        app_engine,
        [make_event("wallet.adjusted", credit, time=datetime(1994, 1, 1, tzinfo=UTC)), *jobs],
        now=datetime(1994, 3, 1, tzinfo=UTC),
    )
    args = ["revenue", "--from", "1994-01", "--to", "1994-02", "--group-by", "month,product"]
    body = json.loads(_cli(monkeypatch, database.url, *args, "-f", "json").output)
    assert body["rows"] == [
        {"month": "1994-01", "product": "serverless", "revenueMicros": 3_000},
        {"month": "1994-02", "product": "serverless", "revenueMicros": 500},
    ]
    assert body["totalMicros"] == 3_500
    table = _cli(monkeypatch, database.url, *args, "--precision", "micros", env={"COLUMNS": "80"}).output
    assert "Revenue (USD)" in table
    assert "1994-02" in table
    total = next(line for line in table.splitlines() if line.strip().startswith("Total"))
    assert total.split()[-1] == "$0.003500"


def test_trial_balance_subtotals_by_type_sum_to_the_accounts(app_engine: Engine) -> None:
    with app_engine.connect() as conn:
        tb = reports.trial_balance(conn, datetime.now(UTC))
    by_type = reports.trial_balance_by_type(tb)
    assert sum(r[2] for r in by_type.rows) == 0
    assert sum(r[1] for r in by_type.rows) == len(tb.rows)
    for t, _n, balance in by_type.rows:
        assert balance == sum(b for a, b in tb.rows if reports.account_type(a) == t)
    assert {r[0] for r in by_type.rows} <= set(reports.ACCOUNT_TYPES) - {"other"}


def test_stripe_reconciliation_cli(database, app_engine: Engine, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from consumers.runtime.user_errors import UserError
    from tests.fake_stripe import FakeStripe

    w = f"r{unique[-39:]}"
    start = datetime.now(UTC) - timedelta(seconds=5)
    with FakeStripe() as fake:
        matched = fake.succeed(fake.create_payment_intent(2500, metadata={"walletId": w})["id"])
        missing = fake.succeed(fake.create_payment_intent(1000, metadata={"walletId": w})["id"])
        pay = {"walletId": w, "paymentIntentId": matched["id"], "amountMicros": 25_000_000, "via": "confirm"}
        process(
            app_engine,
            [stripe_fact("stripe.payment.succeeded", matched["id"], datetime.now(UTC), pay)],
            now=datetime.now(UTC),
        )
        period = ["--from", start.isoformat(), "--to", (datetime.now(UTC) + timedelta(seconds=5)).isoformat()]
        env = {"BILLING_STRIPE_API_KEY": fake.api_key, "BILLING_STRIPE_API_BASE": fake.url, "COLUMNS": "80"}
        result = _cli(monkeypatch, database.url, "stripe-reconciliation", *period, "-f", "json", env=env)
        assert result.exit_code == 0, result.output
        body = json.loads(result.output)
        rows = {(r["status"], r["stripeId"]) for r in body["rows"]}
        assert {("matched", matched["id"]), ("missing_in_ledger", missing["id"])} <= rows
        assert body["matched"] >= 1
        assert body["missingInLedger"] >= 1
        table = _cli(monkeypatch, database.url, "stripe-reconciliation", *period, env=env).output
        assert "Stripe (USD)" in table
        assert "$25.00" in table
        assert "missing in ledger" in table
        fake.fail_next.extend([500] * 5)  # Stripe down: every attempt of the client fails
        down = _cli(monkeypatch, database.url, "stripe-reconciliation", *period, env=env)
        assert isinstance(down.exception, UserError)
        assert "Stripe failed (500)" in str(down.exception)
    monkeypatch.delenv("BILLING_STRIPE_API_KEY")
    no_key = _cli(monkeypatch, database.url, "stripe-reconciliation")
    assert isinstance(no_key.exception, UserError)
    assert "BILLING_STRIPE_API_KEY" in str(no_key.exception)


def test_a_wrong_database_url_is_one_line_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from consumers.runtime.user_errors import UserError

    for url, message in [  # postgres:// is the same server with the service's driver, as for `billing up`
        ("postgres://postgres@127.0.0.1:5432/x_missing", 'cannot connect: database "x_missing" does not exist'),
        ("mysql://postgres@127.0.0.1:5432/x", "unsupported scheme mysql://; use postgresql+psycopg://"),
        ("postgresql+psycopg://postgres@127.0.0.1:1/x", "cannot connect: connection failed"),
    ]:
        result = _cli(monkeypatch, url, "debts")
        assert isinstance(result.exception, UserError), result.output
        assert "BILLING_DATABASE_URL" in str(result.exception)
        assert message in str(result.exception)
