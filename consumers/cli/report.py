"""`billing report <name>`: the finance reports as a readable table, JSON or CSV.

Tables are for people: money as ``$1,234.56`` (``--precision micros`` for every micro), headers in
words with their unit, the terminal's own width (80 columns and up; long ids fold, amounts never
break). JSON and CSV are for programs: the integer ``...Micros`` fields of the contract, camelCase
keys, ISO 8601 instants. CSV rows all have the report's own columns, except the statement's, which
carries a leading ``line`` column (opening, movement, total, closing) so that its opening, closing
and totals are in the file too.

Dates (``--from``, ``--to``, ``--at``, ``--month``) are ``YYYY-MM-DD``, ``YYYY-MM`` or a full ISO
instant, in UTC unless the instant says otherwise. Periods are half-open ``[from, to)``: a date or
month given to ``--to`` (or ``--at``) includes that whole day or month.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

import typer
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from consumers.runtime.user_errors import UserError
from ledger.money import display_usd
from projections import reports
from projections.reports import Report

report_app = typer.Typer(no_args_is_help=True, help="Finance reports from the ledger (table, JSON or CSV).")

DEFAULT_PERIOD: Final = timedelta(days=30)
DATE_FORMS: Final = "use YYYY-MM-DD, YYYY-MM or an ISO instant such as 2026-10-01T12:00:00Z"
_MONTH_RE: Final = re.compile(r"^(\d{4})-(\d{2})$")
_DAY_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ONE_MICROSECOND: Final = timedelta(microseconds=1)  # PostgreSQL's timestamptz resolution


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


class Precision(StrEnum):
    cents = "cents"
    micros = "micros"


# ------------------------------------------------------------------------------------------- dates


def _month_start(value: str, flag: str) -> datetime | None:
    m = _MONTH_RE.match(value)
    if m is None:
        return None
    year, month = int(m[1]), int(m[2])
    if not (1 <= month <= 12 and year >= 1):
        forms = "use YYYY-MM, e.g. 2026-10" if flag == "--month" else DATE_FORMS
        raise UserError(f"{flag} {value!r}: no such month; {forms}")
    return datetime(year, month, 1, tzinfo=UTC)


def _next_month(t: datetime, flag: str, value: str) -> datetime:
    if t.year == 9999 and t.month == 12:
        raise UserError(f"{flag} {value!r}: the month after it does not exist; give an earlier date")
    return t.replace(year=t.year + 1, month=1) if t.month == 12 else t.replace(month=t.month + 1)


def parse_when(value: str, flag: str, *, end: bool = False) -> datetime:
    """A date of the command line as an aware instant. ``YYYY-MM`` and ``YYYY-MM-DD`` are the start
    of that month or day; with ``end`` (for ``--to``) the start of the next one, so the whole month
    or day is inside the half-open period. An instant without offset is UTC."""
    text = value.strip()
    month = _month_start(text, flag)
    if month is not None:
        return _next_month(month, flag, value) if end else month
    try:
        if _DAY_RE.match(text):
            day = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
            return day + timedelta(days=1) if end else day
        t = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise UserError(f"{flag} {value!r} is not a date; {DATE_FORMS}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def parse_month(value: str, flag: str = "--month") -> tuple[datetime, datetime]:
    """``YYYY-MM`` as the half-open period of that month."""
    start = _month_start(value.strip(), flag)
    if start is None:
        raise UserError(f"{flag} {value!r} is not a month; use YYYY-MM, e.g. 2026-10")
    return start, _next_month(start, flag, value)


def period(start: str | None, end: str | None, month: str | None, now: datetime) -> tuple[datetime, datetime]:
    """The ``[from, to)`` of ``--from``/``--to``/``--month``; default the 30 days up to now."""
    if month is not None:
        if start is not None or end is not None:
            raise UserError("--month cannot be combined with --from/--to; give one or the other")
        return parse_month(month)
    e = parse_when(end, "--to", end=True) if end else now
    if start:
        s = parse_when(start, "--from")
    else:  # e - 30 days does not exist in the first days of year 1
        earliest = datetime.min.replace(tzinfo=UTC)
        s = e - DEFAULT_PERIOD if e - earliest > DEFAULT_PERIOD else earliest
    if s > e:
        raise UserError(f"--from {start} is after --to {end or 'now'}; give a --from before the --to")
    return s, e


def instant_at(at: str | None, month: str | None, now: datetime) -> datetime:
    """``--at``/``--month`` of the trial balance: an instant, or the end of a day or month (its last
    microsecond, since the trial balance includes what is booked at the instant itself)."""
    if month is not None:
        if at is not None:
            raise UserError("--month cannot be combined with --at; give one or the other")
        return parse_month(month)[1] - ONE_MICROSECOND
    if at is None:
        return now
    whole_period = _MONTH_RE.match(at.strip()) or _DAY_RE.match(at.strip())
    t = parse_when(at, "--at", end=True)
    return t - ONE_MICROSECOND if whole_period else t


def _shown_time(value: Any) -> str:
    """An instant as a table shows it: ``2026-10-01 14:22`` UTC (seconds when not on the minute)."""
    t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%d %H:%M" if t.second == 0 else "%Y-%m-%d %H:%M:%S")


# ------------------------------------------------------------------------------------ table cells

# Headers in words with their unit; a column not listed gets its camelCase split into words.
LABELS: Final = {
    "account": "Account",
    "type": "Type",
    "accounts": "Accounts",
    "balanceMicros": "Balance (USD)",
    "amountMicros": "Amount (USD)",
    "revenueMicros": "Revenue (USD)",
    "ledgerMicros": "Ledger (USD)",
    "stripeMicros": "Stripe (USD)",
    "walletId": "Wallet",
    "resourceId": "Resource",
    "gpuType": "GPU type",
    "stripeId": "Stripe id",
    "day": "Day",
    "month": "Month",
    "product": "Product",
    "entries": "Entries",
    "count": "Count",
    "reason": "Reason",
    "first": "First (UTC)",
    "last": "Last (UTC)",
    "status": "Status",
    "kind": "Kind",
}
_COUNT_COLUMNS: Final = frozenset({"count", "entries", "accounts"})
_TIME_COLUMNS: Final = frozenset({"first", "last"})
KIND_LABELS: Final = {
    "topup": "top-up",
    "dispute_hold": "dispute held",
    "dispute_release": "dispute won",
    "dispute_lost": "dispute lost",
}


def label(column: str) -> str:
    if column in LABELS:
        return LABELS[column]
    if column.endswith("Micros"):
        return f"{label(column[: -len('Micros')])} (USD)"
    words = re.sub(r"(?<=[a-z0-9])([A-Z])", r" \1", column).lower()
    return words[:1].upper() + words[1:]


def is_money(column: str) -> bool:
    return column.endswith("Micros")


def cell(value: Any, column: str, exact: bool) -> str:
    """One value as a table shows it."""
    if value is None:
        return ""
    if is_money(column) and isinstance(value, int):
        return display_usd(value, exact=exact)
    if column in _COUNT_COLUMNS and isinstance(value, int):
        return f"{value:,}"
    if column in _TIME_COLUMNS:
        return _shown_time(value)
    if column == "status":  # the reconciliation's enum values, in words: "missing in ledger"
        return str(value).replace("_", " ").replace("stripe", "Stripe")
    return str(value)


def heading(title: str) -> Text:
    """A report's title: its own line above the table, wrapped at the console's width (a table's
    title is only as wide as the table)."""
    return Text(title, style="bold")


def new_table(columns: Sequence[str]) -> Table:
    """A table that fits the console: amounts and counts never wrap, long ids fold."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for c in columns:
        if is_money(c) or c in _COUNT_COLUMNS:
            table.add_column(label(c), justify="right", no_wrap=True)
        elif c in ("status", "kind"):
            table.add_column(label(c), no_wrap=True)
        else:
            table.add_column(label(c), overflow="fold")
    return table


def add_rows(table: Table, report: Report, exact: bool) -> None:
    for r in report.rows:
        # Text, not str: a value such as "[red]" is data, not rich markup.
        table.add_row(*(Text(cell(v, c, exact)) for v, c in zip(r, report.columns, strict=True)))


def total_row(table: Table, columns: Sequence[str], totals: dict[str, Any], exact: bool) -> None:
    """The bold total row: ``Total`` in the first column, the given figures under their columns.
    A table of one column (revenue without grouping) is its own total."""
    if len(columns) < 2:
        return
    table.add_section()
    values = [Text(cell(totals.get(c), c, exact), style="bold") for c in columns]
    values[0] = Text("Total", style="bold")
    table.add_row(*values)


def _shown_at(value: Any) -> str:
    t = datetime.fromisoformat(str(value)).astimezone(UTC)
    if t.microsecond == 999_999:  # instant_at's last microsecond of a day or month
        return f"the end of {t:%Y-%m-%d} UTC"
    return f"{_shown_time(t)} UTC"


def period_title(summary: dict[str, Any]) -> str:
    """``month 2026-10``, ``2026-10-01 to 2026-10-03 (whole days, UTC)``, else both instants (the
    second excluded: periods are half-open)."""
    start = datetime.fromisoformat(str(summary["from"])).astimezone(UTC)
    end = datetime.fromisoformat(str(summary["to"])).astimezone(UTC)
    midnight = datetime.min.time()
    if start.time() == midnight and end.time() == midnight and end > start:
        if start.day == 1 and end.day == 1 and (end.year * 12 + end.month) - (start.year * 12 + start.month) == 1:
            return f"month {start:%Y-%m} (UTC)"
        last = end - timedelta(days=1)
        if last == start:
            return f"{start:%Y-%m-%d} (the whole day, UTC)"
        return f"{start:%Y-%m-%d} to {last:%Y-%m-%d} (whole days, UTC)"
    return f"{_shown_time(start)} to {_shown_time(end)} UTC (excluded)"


# ------------------------------------------------------------------------------- machine formats


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime | date) else value


def _rows_as_dicts(report: Report) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in row.items()} for row in report.as_dicts()]


def render_json(report: Report, out: Any) -> None:
    body: dict[str, Any] = {"report": report.name, **report.summary, "rows": _rows_as_dicts(report)}
    if report.name == "trial-balance":
        body["subtotals"] = reports.trial_balance_by_type(report).as_dicts()
    out.write(json.dumps(body, default=str))
    out.write("\n")


def _statement_csv(report: Report) -> Iterator[list[Any]]:
    s, n = report.summary, len(report.columns)
    money = report.columns.index("amountMicros")

    def line(kind: str, at: Any, amount: int, *, what: str = "", entries: Any = "") -> list[Any]:
        row: list[Any] = ["" for _ in range(n)]
        row[0], row[2], row[money - 1], row[money] = at, what, entries, amount
        return [kind, *row]

    yield ["line", *report.columns]
    yield line("opening", s["from"], s["openingBalanceMicros"])
    for r in report.rows:
        yield ["movement", *(_plain(v) for v in r)]
    counts: dict[str, int] = {}
    sums: dict[str, int] = {}
    for r in report.rows:
        counts[r[2]] = counts.get(r[2], 0) + int(r[-2])
        sums[r[2]] = sums.get(r[2], 0) + int(r[-1])
    for kind in reports.STATEMENT_KINDS:
        if kind in sums:
            yield line("total", "", sums[kind], what=kind, entries=counts[kind])
    yield line("closing", s["to"], s["closingBalanceMicros"])


def render_csv(report: Report, out: Any) -> None:
    w = csv.writer(out, lineterminator="\n")
    if report.name == "statement" and report.columns == reports.STATEMENT_LINE_COLUMNS:
        w.writerows(_statement_csv(report))
        return
    w.writerow(report.columns)
    w.writerows([_plain(v) for v in r] for r in report.rows)


# ------------------------------------------------------------------------------------------ tables

SIGN_CONVENTION: Final = (
    ("wallets", "+ prepaid credit the platform owes its customers; - a customer's debt (usage past $0)"),
    ("revenue", "+ revenue recognised from charges"),
    ("clearing", "- money received through Stripe (top-ups); + disputes lost, taken back by Stripe"),
    ("refunds", "+ money refunded to customers"),
    ("disputes", "+ money held while disputes are open"),
    ("adjustments", "- net credit granted by finance; + net amount finance took back"),
)


def sign_convention() -> Group:
    """Printed under the trial balance: what the sign of each type of account means."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style="bold")
    grid.add_column(overflow="fold")
    for kind, meaning in SIGN_CONVENTION:
        grid.add_row(kind, meaning)
    intro = Text(
        "Sign convention: every posting adds its amount to its account and every transaction sums to zero,"
        " so the total is zero.",
        style="dim",
    )
    return Group(intro, grid)


def trial_balance_table(report: Report, exact: bool, detail: bool) -> Any:
    shown = report if detail else reports.trial_balance_by_type(report)
    what = "every account" if detail else "by type of account; --detail for every account"
    table = new_table(shown.columns)
    add_rows(table, shown, exact)
    totals = {"balanceMicros": report.summary["totalMicros"], "accounts": len(report.rows)}
    total_row(table, shown.columns, totals, exact)
    return Group(heading(f"Trial balance at {_shown_at(report.summary['at'])} ({what})"), table, sign_convention())


# Below this width the statement folds its entry count into the detail: the detail keeps room to read.
WIDE_STATEMENT_COLUMNS: Final = 100


def _statement_line(r: Sequence[Any], exact: bool, wide: bool) -> list[Text]:
    at, until, kind, resource, product, gpu, memo, entries, amount = r
    day, time = _shown_time(at)[:10], _shown_time(at)[11:16]
    if kind == "charge" and until is not None and _shown_time(until)[11:16] != time:
        time += f"-{_shown_time(until)[11:16]}"  # a charge line spans its first to last charge of the day
    if kind == "charge":
        what = " · ".join(str(p) for p in (resource, product, gpu) if p)
        what += "" if wide else f" ({entries:,} charge{'s' if entries != 1 else ''})"
    else:
        what = memo or ""
    cells = [day, time, KIND_LABELS.get(kind, kind), what]
    cells += [f"{entries:,}"] if wide else []
    return [Text(c) for c in [*cells, display_usd(amount, exact=exact)]]


STATEMENT_TOTALS: Final = (
    ("openingBalanceMicros", "Opening balance"),
    ("topupsMicros", "Top-ups"),
    ("chargesMicros", "Charges"),
    ("refundsMicros", "Refunds"),
    ("disputesMicros", "Disputes"),
    ("adjustmentsMicros", "Adjustments"),
)


def statement_table(report: Report, exact: bool, width: int) -> Group:
    """Dated lines, then opening, totals by kind and closing (the closing is opening plus the lines)."""
    s = report.summary
    wide = width >= WIDE_STATEMENT_COLUMNS
    lines = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    lines.add_column("Date (UTC)", no_wrap=True)
    lines.add_column("Time", no_wrap=True)
    lines.add_column("Kind", no_wrap=True)
    lines.add_column("Detail", overflow="fold")
    if wide:
        lines.add_column("Entries", justify="right", no_wrap=True)
    lines.add_column("Amount (USD)", justify="right", no_wrap=True)
    for r in report.rows:
        lines.add_row(*_statement_line(r, exact, wide))
    if not report.rows:
        empty: list[Text] = [Text("") for _ in range(6 if wide else 5)]
        empty[3] = Text("no movements in the period", style="dim")
        lines.add_row(*empty)
    totals = Table(box=box.SIMPLE_HEAD, show_header=False, pad_edge=False)
    totals.add_column("what")
    totals.add_column("amount", justify="right", no_wrap=True)
    for key, what in STATEMENT_TOTALS:
        totals.add_row(what, display_usd(s[key], exact=exact))
    totals.add_section()
    closing = display_usd(s["closingBalanceMicros"], exact=exact)
    totals.add_row(Text("Closing balance", style="bold"), Text(closing, style="bold"))
    return Group(heading(f"Statement of wallet {s['walletId']}, {period_title(s)}"), lines, totals)


def reconciliation_table(report: Report, exact: bool) -> Group:
    """One row per Stripe id with its wallet under it: an id does not fold at 80 columns. The kind is
    the id's prefix (pi_ a payment, re_ a refund); JSON and CSV carry it as a column."""
    s = report.summary
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Status", no_wrap=True)
    table.add_column("Stripe id, wallet", overflow="fold")
    table.add_column("Ledger (USD)", justify="right", no_wrap=True)
    table.add_column("Stripe (USD)", justify="right", no_wrap=True)
    for status, _kind, stripe_id, wallet, ledger, theirs in report.rows:
        who = Text(str(stripe_id))
        if wallet:
            who.append(f"\n{wallet}", style="dim")
        table.add_row(
            Text(cell(status, "status", exact)),
            who,
            cell(ledger, "ledgerMicros", exact),
            cell(theirs, "stripeMicros", exact),
        )
    keys = ("matched", "missingInLedger", "missingInStripe", "amountMismatch")
    counts = ", ".join(f"{s[k]:,} {label(k).lower().replace('stripe', 'Stripe')}" for k in keys)
    return Group(heading(f"Stripe reconciliation, {period_title(s)}"), table, Text(counts))


def generic_table(report: Report, exact: bool) -> Any:
    """Revenue, debts, rejected inputs: the rows, then a total row."""
    s = report.summary
    titles = {
        "revenue": "Revenue",
        "debts": "Wallets below zero (most owed first)",
        "rejected": "Rejected inputs by reason",
        "anomalies": "Stripe facts flagged for finance",
    }
    title = titles.get(report.name, report.name) + (f", {period_title(s)}" if "from" in s else "")
    table = new_table(report.columns)
    add_rows(table, report, exact)
    if report.name in ("revenue", "debts"):
        total_row(table, report.columns, {report.columns[-1]: s["totalMicros"]}, exact)
    elif report.name == "rejected":
        total_row(table, report.columns, {"count": s["total"]}, exact)
    return Group(heading(title), table)


def render(
    report: Report,
    fmt: Format,
    out: Any = None,
    *,
    exact: bool = False,
    detail: bool = False,
    width: int | None = None,
    console: Console | None = None,
) -> None:
    """Print ``report``; a table is as wide as the terminal (or ``width``, or the given console's);
    every table is readable from 80 columns."""
    out = out or sys.stdout
    if fmt == Format.json:
        render_json(report, out)
        return
    if fmt == Format.csv:
        render_csv(report, out)
        return
    # width None: the terminal's width (COLUMNS, else 80 off a terminal).
    console = console or Console(file=out, width=width)
    if report.name == "trial-balance":
        renderable: Any = trial_balance_table(report, exact, detail)
    elif report.name == "statement" and report.columns == reports.STATEMENT_LINE_COLUMNS:
        renderable = statement_table(report, exact, console.width)
    elif report.name == "stripe-reconciliation":
        renderable = reconciliation_table(report, exact)
    else:
        renderable = generic_table(report, exact)
    console.print(renderable)


def render_to_string(report: Report, fmt: Format, **kwargs: Any) -> str:
    buf = io.StringIO()
    render(report, fmt, buf, **kwargs)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- commands

FMT = typer.Option(Format.table, "--format", "-f", help="table (for people), json or csv (for programs)")
PRECISION = typer.Option(
    Precision.cents, "--precision", help="cents ($1,234.57) or micros ($1,234.567891, exact) in tables"
)
FROM = typer.Option(None, "--from", help="YYYY-MM-DD, YYYY-MM or ISO instant (default: 30 days before --to)")
TO = typer.Option(None, "--to", help="YYYY-MM-DD, YYYY-MM (that day or month included) or ISO instant (default: now)")
MONTH = typer.Option(None, "--month", help="YYYY-MM: the whole month, instead of --from/--to")


def _now() -> datetime:
    return datetime.now(UTC)


def _run(fn: Callable[..., Report], fmt: Format, precision: Precision, *args: Any, detail: bool = False) -> None:
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    from consumers.runtime.db import report_connection

    try:
        with report_connection() as conn:
            report = fn(conn, *args)
    except (NoSuchModuleError, ArgumentError):
        raise UserError(
            "BILLING_DATABASE_URL is not a URL the service can use; use postgresql+psycopg://user@host:5432/db"
        ) from None
    except OperationalError as exc:
        reason = " ".join(str(exc.orig or exc).split())[:200]
        raise UserError(f"BILLING_DATABASE_URL: the database cannot be reached or failed: {reason}") from None
    render(report, fmt, exact=precision == Precision.micros, detail=detail)


@report_app.command("trial-balance")
def trial_balance_cmd(
    at: str = typer.Option(None, "--at", help="YYYY-MM-DD or YYYY-MM (at its end) or ISO instant (default: now)"),
    month: str = typer.Option(None, "--month", help="YYYY-MM: at the end of that month"),
    detail: bool = typer.Option(False, "--detail", help="Every account, not the subtotals by type"),
    fmt: Format = FMT,
    precision: Precision = PRECISION,
) -> None:
    """Every account's balance at an instant, by type of account; the total is zero."""
    _run(reports.trial_balance, fmt, precision, instant_at(at, month, _now()), detail=detail)


def _statement(conn: Any, wallet_id: str, start: datetime, end: datetime) -> Report:
    if not reports.wallet_known(conn, wallet_id):
        raise UserError(
            f"wallet {wallet_id!r} is not in the ledger; check the WALLET_ID (billing report trial-balance --detail"
            " lists every wallet)"
        )
    try:
        return reports.statement_lines(conn, wallet_id, start, end)
    except reports.StatementTooLong as exc:
        raise UserError(f"--from/--to: {exc}") from None


@report_app.command("statement")
def statement_cmd(
    wallet_id: str = typer.Argument(..., metavar="WALLET_ID"),
    start: str = FROM,
    end: str = TO,
    month: str = MONTH,
    fmt: Format = FMT,
    precision: Precision = PRECISION,
) -> None:
    """A wallet's opening balance, dated lines (charges per resource and day, every top-up, refund,
    dispute and adjustment), totals and closing balance over a period."""
    s, e = period(start, end, month, _now())
    _run(_statement, fmt, precision, wallet_id, s, e)


def group_keys(group_by: str) -> list[str]:
    keys = [k.strip() for k in group_by.split(",") if k.strip()]
    unknown = [k for k in keys if k not in reports.GROUP_KEYS]
    if unknown:
        raise UserError(f"--group-by: unknown {', '.join(unknown)}; choose from {', '.join(reports.GROUP_KEYS)}")
    if "day" in keys and "month" in keys:
        raise UserError("--group-by: day and month together group by day; give one of them")
    return keys


@report_app.command("revenue")
def revenue_cmd(
    start: str = FROM,
    end: str = TO,
    month: str = MONTH,
    group_by: str = typer.Option(
        "day,product,gpuType", "--group-by", help="comma-separated: day or month, product, gpuType ('' for one total)"
    ),
    fmt: Format = FMT,
    precision: Precision = PRECISION,
) -> None:
    """Recognised revenue grouped by day or month, product and GPU type, with a total row."""
    keys = group_keys(group_by)
    s, e = period(start, end, month, _now())
    _run(reports.revenue, fmt, precision, s, e, keys)


@report_app.command("debts")
def debts_cmd(fmt: Format = FMT, precision: Precision = PRECISION) -> None:
    """Wallets below zero, most owed first."""
    _run(reports.debts, fmt, precision)


@report_app.command("rejected")
def rejected_cmd(
    start: str = FROM, end: str = TO, month: str = MONTH, fmt: Format = FMT, precision: Precision = PRECISION
) -> None:
    """Rejected inputs by reason."""
    s, e = period(start, end, month, _now())
    _run(reports.rejected_inputs, fmt, precision, s, e)


def stripe_client() -> Any:
    """The Stripe client of the settings (BILLING_STRIPE_API_KEY, BILLING_STRIPE_API_BASE)."""
    from consumers.runtime.settings import Settings
    from consumers.stripe.gateway import client_from_settings

    client = client_from_settings(Settings())
    if client is None:
        raise UserError(
            "BILLING_STRIPE_API_KEY is not set: the reconciliation reads Stripe's own records; set it"
            " (and BILLING_STRIPE_API_BASE for a local fake)"
        )
    return client


def _reconciliation(conn: Any, client: Any, start: datetime, end: datetime) -> Report:
    from consumers.stripe.gateway import StripeRefused, StripeUnavailable
    from consumers.stripe.reconciliation import PeriodTooLarge, stripe_reconciliation

    try:
        return stripe_reconciliation(conn, client, start, end)
    except PeriodTooLarge as exc:
        raise UserError(f"--from/--to: {exc.detail}") from None
    except (StripeUnavailable, StripeRefused) as exc:
        raise UserError(f"Stripe: {exc.detail} (BILLING_STRIPE_API_BASE, BILLING_STRIPE_API_KEY)") from None


@report_app.command("stripe-reconciliation")
def stripe_reconciliation_cmd(
    start: str = FROM, end: str = TO, month: str = MONTH, fmt: Format = FMT, precision: Precision = PRECISION
) -> None:
    """Ledger top-ups and refunds against Stripe's own records: matched, missing in the ledger,
    missing in Stripe, amount mismatch."""
    s, e = period(start, end, month, _now())
    _run(_reconciliation, fmt, precision, stripe_client(), s, e)


# ------------------------------------------------------------------- commands added by other helpers


@report_app.command("anomalies")
def anomalies_cmd(
    start: str = FROM, end: str = TO, month: str = MONTH, fmt: Format = FMT, precision: Precision = PRECISION
) -> None:
    """Stripe facts applied as Stripe said but flagged for finance: a refund or dispute larger than
    what its payment had (exceeds_payment), or a webhook time far from the clock, booked at receipt
    (event_time)."""
    from projections import anomalies

    s, e = period(start, end, month, _now())
    _run(anomalies.anomalies, fmt, precision, s, e)
