"""Golden output of every report table and of the demo's summary and progress, at 80 and 120 columns.

The reports are fixed :class:`Report` objects (fixed instants and ids), so the files under
``tests/golden/`` are stable across runs. After a deliberate change of the layout, regenerate them
with ``BILLING_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_report_tables.py`` and read the diff.
Also here: the command line's dates and the money formatter the tables use.
"""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console, Group

from consumers.cli.report import Format, instant_at, parse_when, period, render, render_to_string
from consumers.runtime.user_errors import UserError
from devtools import demo
from ledger.money import display_usd
from projections.reports import STATEMENT_LINE_COLUMNS, Report

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UPDATE = os.environ.get("BILLING_UPDATE_GOLDEN") == "1"
WIDTHS = (80, 120)


def t(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def line(at: datetime, kind: str, memo: str, amount_micros: int) -> tuple[object, ...]:
    """A statement line of one transaction (not a charge)."""
    return (at, at, kind, None, None, None, memo, 1, amount_micros)


OCTOBER = {"from": "2026-10-01T00:00:00+00:00", "to": "2026-11-01T00:00:00+00:00"}

TRIAL_BALANCE = Report(
    "trial-balance",
    ("account", "balanceMicros"),
    [
        ("adjustments", -25_000_000),
        ("disputes", 10_000_000),
        ("refunds", 3_000_000),
        ("revenue:pod_on_demand", 11_980_000_000),
        ("revenue:serverless", 4_567_891),
        ("stripe:clearing", -12_100_000_000),
        ("wallet:acme-research-lab-0001", 150_000_000),
        ("wallet:w2", -23_567_891),
        ("wallet:w3", 1_000_000),
    ],
    {"at": "2026-10-31T23:59:59.999999+00:00", "totalMicros": 0},
)

STATEMENT = Report(
    "statement",
    STATEMENT_LINE_COLUMNS,
    [
        line(t(2026, 10, 1, 9), "topup", "pi_3QxYzAbCdEfGhIjK via webhook", 100_000_000),
        (
            t(2026, 10, 1, 9, 5),
            t(2026, 10, 1, 17, 59, 30),
            "charge",
            "pod-h100-7f3a9c",
            "pod_on_demand",
            "H100 SXM",
            None,
            534,
            -26_606_500,
        ),
        (
            t(2026, 10, 2, 0, 0, 12),
            t(2026, 10, 2, 0, 0, 12),
            "charge",
            "ep-llama-70b",
            "serverless",
            "ADA_48",
            None,
            1,
            -4_995,
        ),
        line(t(2026, 10, 2, 10), "refund", "re_1Q of pi_3QxYzAbCdEfGhIjK", -5_000_000),
        line(t(2026, 10, 2, 11), "dispute_hold", "dp_1 of pi_3QxYzAbCdEfGhIjK", -10_000_000),
        line(t(2026, 10, 3, 11), "adjustment", "goodwill credit after outage (by finance/alice)", 2_500_000),
    ],
    {
        "walletId": "acme-research-lab-0001",
        **OCTOBER,
        "openingBalanceMicros": 12_000_000,
        "topupsMicros": 100_000_000,
        "chargesMicros": -26_611_495,
        "refundsMicros": -5_000_000,
        "disputesMicros": -10_000_000,
        "adjustmentsMicros": 2_500_000,
        "closingBalanceMicros": 72_888_505,
    },
)

EMPTY_STATEMENT = Report(
    "statement",
    STATEMENT_LINE_COLUMNS,
    [],
    {
        "walletId": "w2",
        **OCTOBER,
        **dict.fromkeys(("topupsMicros", "chargesMicros", "refundsMicros", "disputesMicros", "adjustmentsMicros"), 0),
        "openingBalanceMicros": -23_567_891,
        "closingBalanceMicros": -23_567_891,
    },
)

REVENUE = Report(
    "revenue",
    ("month", "product", "gpuType", "revenueMicros"),
    [
        ("2026-10", "cluster", "H100 SXM", 8_071_200_000),
        ("2026-10", "pod_on_demand", "H100 SXM", 11_980_000_000),
        ("2026-10", "pod_spot", "RTX 4090", 123_456_789),
        ("2026-10", "serverless", "ADA_48", 4_567_891),
    ],
    {**OCTOBER, "totalMicros": 20_179_224_680},
)

DEBTS = Report(
    "debts",
    ("walletId", "balanceMicros"),
    [("w2", -23_567_891), ("demo-a1b2c3-w0299-with-a-rather-long-wallet-identifier-0000001", -4_166)],
    {"wallets": 2, "totalMicros": -23_572_057},
)

REJECTED = Report(
    "rejected",
    ("reason", "count", "first", "last"),
    [
        ("invalid_json", 1_204, "2026-10-01T00:00:03.123000+00:00", "2026-10-31T23:59:59+00:00"),
        ("reserved_source", 2, "2026-10-12T08:00:00+00:00", "2026-10-12T08:00:01+00:00"),
    ],
    {**OCTOBER, "total": 1_206},
)

RECONCILIATION = Report(
    "stripe-reconciliation",
    ("status", "kind", "stripeId", "walletId", "ledgerMicros", "stripeMicros"),
    [
        ("matched", "payment", "pi_3QxYzAbCdEfGhIjK", "acme-research-lab-0001", 100_000_000, 100_000_000),
        ("amount_mismatch", "payment", "pi_3QxYzAbCdEfGhIjL", "w2", 31_000_000, 30_000_000),
        ("missing_in_ledger", "payment", "pi_3QxYzAbCdEfGhIjM", "w3", None, 10_000_000),
        ("missing_in_stripe", "refund", "re_1QxYzAbCdEfGhIjN", None, 5_000_000, None),
    ],
    {**OCTOBER, "matched": 1, "missingInLedger": 1, "missingInStripe": 1, "amountMismatch": 1},
)

CASES = {
    "trial_balance": (TRIAL_BALANCE, {}),
    "trial_balance_detail": (TRIAL_BALANCE, {"detail": True}),
    "statement": (STATEMENT, {}),
    "statement_micros": (STATEMENT, {"exact": True}),
    "statement_empty": (EMPTY_STATEMENT, {}),
    "revenue": (REVENUE, {}),
    "debts": (DEBTS, {"exact": True}),
    "rejected": (REJECTED, {}),
    "stripe_reconciliation": (RECONCILIATION, {}),
}


def console(width: int) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(width=width, file=buf, color_system=None, legacy_windows=False), buf


def check_golden(name: str, text: str, width: int) -> None:
    lines = [line.rstrip() for line in text.splitlines()]
    assert max(len(line) for line in lines) <= width, f"{name}: a line is wider than {width} columns"
    got = "\n".join(lines) + "\n"
    path = GOLDEN / f"{name}.txt"
    if UPDATE or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
        if not UPDATE:
            pytest.fail(f"{path} did not exist: written; check it and run again")
    assert got == path.read_text(), f"{name} differs from {path} (BILLING_UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_report_table_golden(case: str, width: int) -> None:
    report, options = CASES[case]
    c, buf = console(width)
    render(report, Format.table, console=c, **options)  # type: ignore[arg-type]
    check_golden(f"{case}_{width}", buf.getvalue(), width)


CHECKS = (
    "every good event is in the ledger",
    "every malformed message is dead-lettered",
    "charged exactly what the readings and jobs cost",
    "the dry wallet's rental was stopped and paused",
    "every stop command was answered",
    "every ended rental was settled",
    "trial balance total is 0",
)


def demo_summary() -> demo.Summary:
    s = demo.Summary(run_id="a1b2c3", wallets=300, simulated_minutes=60, real_seconds=47.3)
    s.topped_up_micros, s.malformed_published = 31_525_000_000, 24
    s.events_published = s.events_in_ledger = 48_213
    s.dead_letters = {"invalid_json": 6, "out_of_range": 6, "subject_mismatch": 6, "unknown_type": 6}
    s.dead_letters_expected = dict(s.dead_letters)
    s.rentals_started = {"cluster": 2, "marketplace": 41, "pod": 187}
    s.rental_admissions = {"admitted": 230, "refused": 3}
    s.serverless_admissions = {"admitted": 5_210, "refused (balance)": 3, "refused (rate limit)": 12}
    s.jobs_completed, s.spot_preemptions, s.user_pauses, s.stops_issued, s.stops_answered = 5_210, 14, 9, 2, 2
    s.dry_wallet, s.dry_rental, s.dry_rental_status = "demo-a1b2c3-w0299", "demo-a1b2c3-pod-0231", "paused"
    s.dry_wallet_balance_micros, s.notices = -12_345, {"exhausted": 1, "low_balance": 4}
    s.settlements_received = s.settlements_expected = 61
    s.charged_micros = s.expected_charges_micros = 1_234_567_891
    s.trial_balance_accounts, s.trial_balance_total_micros = 312, 0
    s.checks = dict.fromkeys(CHECKS, True)
    return s


@pytest.mark.parametrize("width", WIDTHS)
def test_demo_summary_and_progress_golden(width: int) -> None:
    c, buf = console(width)
    summary = demo_summary()
    c.print(Group(demo.summary_title(summary), demo.summary_table(summary)))
    progress = demo.demo_progress(c, get_time=lambda: 1_000.0)  # a fixed clock: fixed spinner and times
    funding = progress.add_task("funding wallets", total=300, info="")
    progress.update(funding, completed=300)
    hour = progress.add_task("simulated time 00:41:00", total=60, info="")
    progress.update(hour, completed=41, info="events 31,234 · running 182 · jobs 3,456 · stops 1")
    drain = progress.add_task("ledger catching up", total=48_213, info="")
    progress.update(drain, completed=40_000, info="dead letters 20 of 24 · settlements 55 of 61")
    c.print(Group(*progress.get_renderables()))
    out = buf.getvalue()
    check_golden(f"demo_{width}", out, width)
    assert "$1,234.567891 / $1,234.567891" in out
    assert "$31,525.00" in out
    assert "40000/48213" in out
    assert "events 31,234 · running 182" in out


def test_json_and_csv_keep_integer_micros_and_camel_case() -> None:
    import json

    body = json.loads(render_to_string(STATEMENT, Format.json))
    assert body["closingBalanceMicros"] == 72_888_505
    assert body["rows"][1]["amountMicros"] == -26_606_500
    assert body["rows"][1]["until"] == "2026-10-01T17:59:30+00:00"
    assert all(k[0].islower() and "_" not in k for k in (*body, *body["rows"][0]))
    tb = json.loads(render_to_string(TRIAL_BALANCE, Format.json))
    assert tb["subtotals"][0] == {"type": "wallets", "accounts": 3, "balanceMicros": 127_432_109}
    assert len(tb["rows"]) == len(TRIAL_BALANCE.rows)
    rec = json.loads(render_to_string(RECONCILIATION, Format.json))
    assert {"matched", "missingInLedger", "missingInStripe", "amountMismatch"} <= set(rec)
    csv_lines = render_to_string(STATEMENT, Format.csv).splitlines()
    assert csv_lines[0] == "line,at,until,kind,resourceId,product,gpuType,detail,entries,amountMicros"
    assert csv_lines[1] == "opening,2026-10-01T00:00:00+00:00,,,,,,,,12000000"
    assert csv_lines[-1] == "closing,2026-11-01T00:00:00+00:00,,,,,,,,72888505"
    assert "total,,,charge,,,,,535,-26611495" in csv_lines
    assert render_to_string(REVENUE, Format.csv).splitlines()[1] == "2026-10,cluster,H100 SXM,8071200000"


# --------------------------------------------------------------------------------- dates and money

NOW = t(2026, 12, 3, 12)


@pytest.mark.parametrize(
    ("value", "end", "expected"),
    [
        ("2026-10", False, t(2026, 10, 1)),
        ("2026-10", True, t(2026, 11, 1)),
        ("2026-12", True, t(2027, 1, 1)),
        ("2026-10-31", False, t(2026, 10, 31)),
        ("2026-10-31", True, t(2026, 11, 1)),
        ("2026-10-31T12:30:00Z", True, t(2026, 10, 31, 12, 30)),
        ("2026-10-31T12:30:00+02:00", False, t(2026, 10, 31, 10, 30)),
        ("2026-10-31T12:30", False, t(2026, 10, 31, 12, 30)),
    ],
)
def test_dates_of_the_command_line(value: str, end: bool, expected: datetime) -> None:
    assert parse_when(value, "--to" if end else "--from", end=end) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("yesterday", None, None), "--from 'yesterday' is not a date; use YYYY-MM-DD, YYYY-MM or an ISO instant"),
        (("2026-13", None, None), "--from '2026-13': no such month"),
        (("2026-02-30", None, None), "--from '2026-02-30' is not a date"),
        ((None, "9999-12", None), "--to '9999-12': the month after it does not exist"),
        (("2026-11-01", "2026-10-01", None), "--from 2026-11-01 is after --to 2026-10-01"),
        ((None, None, "2026-10-01"), "--month '2026-10-01' is not a month; use YYYY-MM"),
        (("2026-10-01", None, "2026-10"), "--month cannot be combined with --from/--to"),
    ],
)
def test_date_mistakes_are_one_line_naming_the_flag(args: tuple[str | None, ...], message: str) -> None:
    with pytest.raises(UserError) as info:
        period(*args, NOW)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_periods_and_instants() -> None:
    assert period(None, None, None, NOW) == (NOW - timedelta(days=30), NOW)
    assert period(None, None, "2026-02", NOW) == (t(2026, 2, 1), t(2026, 3, 1))
    assert period("2026-10-01", "2026-10-01", None, NOW) == (t(2026, 10, 1), t(2026, 10, 2))  # that whole day
    assert period(None, "0001-01-05", None, NOW)[0] == datetime.min.replace(tzinfo=UTC)
    assert instant_at("2026-10", None, NOW) == t(2026, 11, 1) - timedelta(microseconds=1)
    assert instant_at(None, "2026-10", NOW) == t(2026, 11, 1) - timedelta(microseconds=1)
    assert instant_at("2026-10-31T12:00:00Z", None, NOW) == t(2026, 10, 31, 12)
    assert instant_at(None, None, NOW) == NOW
    with pytest.raises(UserError, match="--month cannot be combined with --at"):
        instant_at("2026-10-01", "2026-10", NOW)


@pytest.mark.parametrize(
    ("micros", "cents", "exact"),
    [
        (0, "$0.00", "$0.000000"),
        (1_234_567_891, "$1,234.57", "$1,234.567891"),
        (-11_980_000_000, "-$11,980.00", "-$11,980.000000"),
        (5_000, "$0.01", "$0.005000"),  # half a cent rounds away from zero
        (4_999, "$0.00", "$0.004999"),
        (-5_000, "-$0.01", "-$0.005000"),
        (-4_166, "-$0.00", "-$0.004166"),  # a debt of a few micros still reads as a debt
        (999_995_000, "$1,000.00", "$999.995000"),
    ],
)
def test_display_usd(micros: int, cents: str, exact: str) -> None:
    assert display_usd(micros) == cents
    assert display_usd(micros, exact=True) == exact
