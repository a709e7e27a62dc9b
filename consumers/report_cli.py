"""`billing report <name>`: the finance reports as a readable table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from projections import reports
from projections.reports import Report

report_app = typer.Typer(no_args_is_help=True, help="Finance reports from the ledger (table, JSON or CSV).")


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def _money(value: Any, column: str) -> str:
    if column.endswith("Micros") and isinstance(value, int):
        sign = "-" if value < 0 else ""
        whole, frac = divmod(abs(value), 1_000_000)
        return f"{sign}{whole:,}.{frac:06d}"
    return "" if value is None else str(value)


def render(report: Report, fmt: Format, out: Any = None) -> None:
    out = out or sys.stdout
    if fmt == Format.json:
        out.write(json.dumps({"report": report.name, **report.summary, "rows": report.as_dicts()}, default=str))
        out.write("\n")
        return
    if fmt == Format.csv:
        w = csv.writer(out)
        w.writerow(report.columns)
        w.writerows(report.rows)
        return
    table = Table(title=report.name, show_lines=False)
    for c in report.columns:
        table.add_column(c, justify="right" if c.endswith("Micros") or c in ("count", "entries") else "left")
    for r in report.rows:
        table.add_row(*(_money(v, c) for v, c in zip(r, report.columns, strict=True)))
    console = Console(file=out if out is not sys.stdout else None, width=140)
    console.print(table)
    for k, v in report.summary.items():
        console.print(f"{k}: {_money(v, k)}")


def _time(value: str | None, default: datetime) -> datetime:
    if not value:
        return default
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _run(fn: Callable[..., Report], fmt: Format, *args: Any) -> None:
    from consumers.runtime_db import report_connection

    with report_connection() as conn:
        render(fn(conn, *args), fmt)


FMT = typer.Option(Format.table, "--format", "-f", help="table, json or csv")
FROM = typer.Option(None, "--from", help="ISO instant (default: 30 days ago)")
TO = typer.Option(None, "--to", help="ISO instant (default: now)")


@report_app.command("trial-balance")
def trial_balance_cmd(
    at: str = typer.Option(None, "--at", help="ISO instant (default: now)"), fmt: Format = FMT
) -> None:
    """Every account's balance at an instant; the total is zero."""
    _run(reports.trial_balance, fmt, _time(at, datetime.now(UTC)))


@report_app.command("statement")
def statement_cmd(wallet_id: str, start: str = FROM, end: str = TO, fmt: Format = FMT) -> None:
    """A wallet's opening balance, movements and closing balance over a period."""
    now = datetime.now(UTC)
    _run(reports.statement, fmt, wallet_id, _time(start, now - timedelta(days=30)), _time(end, now))


@report_app.command("revenue")
def revenue_cmd(
    start: str = FROM,
    end: str = TO,
    group_by: str = typer.Option("day,product,gpuType", "--group-by", help="any of day,product,gpuType"),
    fmt: Format = FMT,
) -> None:
    """Recognised revenue grouped by day, product and GPU type."""
    now = datetime.now(UTC)
    keys = [k for k in group_by.split(",") if k]
    _run(reports.revenue, fmt, _time(start, now - timedelta(days=30)), _time(end, now), keys)


@report_app.command("debts")
def debts_cmd(fmt: Format = FMT) -> None:
    """Wallets below zero."""
    _run(reports.debts, fmt)


@report_app.command("rejected")
def rejected_cmd(start: str = FROM, end: str = TO, fmt: Format = FMT) -> None:
    """Rejected inputs by reason."""
    now = datetime.now(UTC)
    _run(reports.rejected_inputs, fmt, _time(start, now - timedelta(days=30)), _time(end, now))


def render_to_string(report: Report, fmt: Format) -> str:
    buf = io.StringIO()
    render(report, fmt, buf)
    return buf.getvalue()


# --- `billing report anomalies` (owner: http; the query is projections/anomalies.py) ---------------
@report_app.command("anomalies")
def anomalies_cmd(start: str = FROM, end: str = TO, fmt: Format = FMT) -> None:
    """Stripe facts applied as Stripe said but flagged for finance: a refund or dispute larger than
    what its payment had (exceeds_payment), or a webhook time far from the clock, booked at receipt
    (event_time)."""
    from projections import anomalies

    now = datetime.now(UTC)
    _run(anomalies.anomalies, fmt, _time(start, now - timedelta(days=30)), _time(end, now))
