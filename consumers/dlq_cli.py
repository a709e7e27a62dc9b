"""`billing dlq list` and `billing dlq replay`: the dead letters kept in ``rejected_inputs``.

Every refused input is a row of ``rejected_inputs`` (append-only: its reason, a detail a person can
act on, and the bytes exactly as received) and a message on ``billing.dlq.<reason>``. Once the
cause is fixed (a producer's bug, a rental whose start finally arrived), ``replay`` sends the stored
bytes back to ``billing.in.<walletId>``; nothing in the table is marked. On a partitioned deployment
the server's mapping puts them into the wallet's partition like any producer's publish. The replayed input is then
either accepted (charged once: the ``(source, id)`` key makes a repeat a no-op) or refused again,
and a refusal is kept once per ``(source, id, reason)``.

With ``BILLING_DATABASE_URL`` / ``BILLING_NATS_URL`` unset, the commands use the embedded servers
of the running ``billing up`` in the data dir (``runtime.json``), or start them.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Connection, text

from consumers.names import NatsNames
from consumers.settings import Settings, nats_servers
from ledger.events import ID_PATTERN, RejectReason

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: inputs refused with a reason, and their replay.")

DEFAULT_LIST_LIMIT: Final = 50
DEFAULT_REPLAY_LIMIT: Final = 1000
PUBLISH_TIMEOUT_S: Final = 5.0
DETAIL_CHARS: Final = 80

_ID_RE: Final = re.compile(ID_PATTERN)
_REASONS: Final = [r.value for r in RejectReason]


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    id: int
    received_at: datetime
    reason: str
    detail: str
    subject: str | None
    source: str | None
    event_id: str | None
    event_type: str | None
    wallet_id: str | None
    delivery_count: int | None
    raw: bytes


def _check_reason(reason: str | None) -> str | None:
    if reason is not None and reason not in _REASONS:
        raise typer.BadParameter(f"unknown reason {reason!r}; one of: {', '.join(_REASONS)}", param_hint="--reason")
    return reason


def read_dead_letters(
    conn: Connection, *, reason: str | None = None, ids: list[int] | None = None, limit: int
) -> list[DeadLetterRow]:
    """Rows of ``rejected_inputs``, oldest first, filtered by reason and/or ids."""
    clauses: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    if reason is not None:
        clauses.append("reason = :reason")
        params["reason"] = reason
    if ids:
        clauses.append("id = ANY(:ids)")
        params["ids"] = list(ids)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        text(
            "SELECT id, received_at, reason, detail, subject, source, event_id, event_type, wallet_id,"
            f" delivery_count, raw FROM rejected_inputs {where} ORDER BY id LIMIT :limit"
        ),
        params,
    ).all()
    return [
        DeadLetterRow(
            id=r.id,
            received_at=r.received_at,
            reason=r.reason,
            detail=r.detail,
            subject=r.subject,
            source=r.source,
            event_id=r.event_id,
            event_type=r.event_type,
            wallet_id=r.wallet_id,
            delivery_count=r.delivery_count,
            raw=bytes(r.raw),
        )
        for r in rows
    ]


def wallet_of(row: DeadLetterRow) -> str | None:
    """Where a replay goes: the wallet recorded with the refusal, else the one in the raw JSON."""
    if row.wallet_id and _ID_RE.match(row.wallet_id):
        return row.wallet_id
    try:
        document: Any = json.loads(row.raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    data = document.get("data") if isinstance(document, dict) else None
    wallet = data.get("walletId") if isinstance(data, dict) else None
    return wallet if isinstance(wallet, str) and _ID_RE.match(wallet) else None


@dlq_app.command("list")
def list_(
    reason: str | None = typer.Option(None, "--reason", help=f"Only this reason ({', '.join(_REASONS)})."),
    limit: int = typer.Option(DEFAULT_LIST_LIMIT, "--limit", min=1, help="At most this many rows."),
) -> None:
    """Print the dead letters, oldest first."""
    from consumers.runtime_db import report_connection

    _check_reason(reason)
    with report_connection(Settings()) as conn:
        rows = read_dead_letters(conn, reason=reason, limit=limit)
    table = Table(title="dead letters (rejected_inputs)")
    for column in ("id", "received", "reason", "wallet", "source", "event id", "type", "deliveries", "detail"):
        table.add_column(column, justify="right" if column in ("id", "deliveries") else "left", overflow="fold")
    for r in rows:
        detail = r.detail if len(r.detail) <= DETAIL_CHARS else r.detail[: DETAIL_CHARS - 3] + "..."
        table.add_row(
            str(r.id),
            r.received_at.isoformat(timespec="seconds"),
            r.reason,
            r.wallet_id or "",
            r.source or "",
            r.event_id or "",
            r.event_type or "",
            "" if r.delivery_count is None else str(r.delivery_count),
            detail,
        )
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
    console.print(f"{len(rows)} dead letter(s){f' with reason {reason}' if reason else ''}")


@dlq_app.command("replay")
def replay(
    reason: str | None = typer.Option(None, "--reason", help="Only this reason."),
    ids: list[int] = typer.Option(None, "--id", help="Only these rows (repeatable)."),  # noqa: B008
    limit: int = typer.Option(DEFAULT_REPLAY_LIMIT, "--limit", min=1, help="At most this many rows."),
) -> None:
    """Send dead letters back to billing.in.<walletId> as received; each is accepted or refused again.

    Oldest first, all reasons unless filtered; the table is not marked (it is append-only)."""
    from consumers.runtime import client_services
    from ledger.db import make_engine

    _check_reason(reason)
    settings = Settings()
    names = NatsNames(settings.nats_namespace)
    with client_services(settings) as urls:
        engine = make_engine(urls.database_url, role=settings.database_role or None, pool_size=1)
        try:
            with engine.connect() as conn:
                rows = read_dead_letters(conn, reason=reason, ids=ids, limit=limit)
        finally:
            engine.dispose()
        sent, skipped = asyncio.run(_republish(urls.nats_url, names, rows))
    for row in skipped:
        typer.echo(f"skipped {row.id} ({row.reason}): no wallet id in the record or in the input; cannot route it")
    typer.echo(f"replayed {sent} of {len(rows)} dead letter(s) to {names.subject('billing.in.<walletId>')}")
    if ids:
        missing = sorted(set(ids) - {r.id for r in rows})
        if missing:
            typer.echo(f"no dead letter with id {', '.join(map(str, missing))}", err=True)


async def _republish(nats_url: str, names: NatsNames, rows: list[DeadLetterRow]) -> tuple[int, list[DeadLetterRow]]:
    import nats

    # BILLING_NATS_URL may list a cluster's servers separated by commas.
    nc = await nats.connect(servers=nats_servers(nats_url), connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        sent, skipped = 0, []
        for row in rows:
            wallet = wallet_of(row)
            if wallet is None:
                skipped.append(row)
                continue
            await js.publish(
                names.in_subject(wallet),
                row.raw,
                stream=names.in_stream,
                headers={"Billing-Replay-Of": str(row.id), "Billing-Replayed-Reason": row.reason},
            )
            sent += 1
        return sent, skipped
    finally:
        await nc.close()
