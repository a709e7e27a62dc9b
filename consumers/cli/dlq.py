"""`billing dlq list|show|replay`: the dead letters kept in ``rejected_inputs``.

Every refused input is a row of ``rejected_inputs`` (append-only: its reason, a detail a person can
act on, the subject in a printable reversible form (``ledger.text``) and the body's bytes exactly
as received) and a message on ``billing.dlq.<reason>``. Once the cause is fixed (a producer's bug, a
rental whose start finally arrived), ``replay`` sends the stored bytes back to
``billing.in.<walletId>``; nothing in the table is marked. On a partitioned deployment the server's
mapping puts them into the wallet's partition like any producer's publish. The replayed input is
then accepted (charged once: the ``(source, id)`` key makes a repeat a no-op) or refused again, and
``replay`` says which for each (it waits, bounded, for the intake to settle it). A refusal is kept
once per ``(source, id, reason)``.

``--accept-old`` is the deliberate backfill of ``too_old`` dead letters: each is sent with the header
``Billing-Accept-Old: <row id>``, and the intake skips the age check only for the replay of that very
row (``consumers.nats.intake.verify_accept_old``).

With ``BILLING_DATABASE_URL`` / ``BILLING_NATS_URL`` unset, the commands use the embedded servers
of the running ``billing up`` in the data dir (``runtime.json``), or start them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Connection, Engine

from consumers.nats.names import NatsNames, partition_of
from consumers.runtime.settings import Settings, nats_servers
from consumers.runtime.user_errors import UserError
from ledger.events import ID_PATTERN, RejectReason
from ledger.invariants import require
from ledger.text import printable, unprintable
from projections import rejected
from projections.rejected import in_log, latest_refusal, max_rejected_id, read_rejected

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: inputs refused with a reason, and their replay.")

DEFAULT_LIST_LIMIT: Final = 50
DEFAULT_REPLAY_LIMIT: Final = 1000
DEFAULT_WAIT_S: Final = 15.0
PUBLISH_TIMEOUT_S: Final = 5.0
POLL_S: Final = 0.25
# How much of a body `show` prints as text (the rest is summarised; --format json has all of it).
SHOW_TEXT_BYTES: Final = 16_384
# Narrower than this, `dlq list` prints a record per dead letter instead of a table.
TABLE_MIN_COLUMNS: Final = 120
ACCEPT_OLD_HEADER: Final = "Billing-Accept-Old"  # consumers.nats.intake.ACCEPT_OLD_HEADER (not imported: slow)

_REASONS: Final = [r.value for r in RejectReason]
_WALLET_RE: Final = re.compile(ID_PATTERN)


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

    def to_json(self, *, with_raw: bool) -> dict[str, Any]:
        """camelCase, like every JSON of the service; the subject's bytes and the body as base64 when
        they are not UTF-8 text."""
        out: dict[str, Any] = {
            "id": self.id,
            "receivedAt": self.received_at.isoformat(),
            "reason": self.reason,
            "detail": self.detail,
            "subject": self.subject,
            "source": self.source,
            "eventId": self.event_id,
            "eventType": self.event_type,
            "walletId": self.wallet_id,
            "deliveryCount": self.delivery_count,
            "rawBytes": len(self.raw),
        }
        if self.subject is not None and _text_of(unprintable(self.subject)) is None:
            out["subjectBase64"] = base64.b64encode(unprintable(self.subject)).decode()
        if with_raw:
            body = _text_of(self.raw)
            out["raw"] = body
            out["rawBase64"] = base64.b64encode(self.raw).decode() if body is None else None
        return out


_ROW_FIELDS: Final = tuple(DeadLetterRow.__dataclass_fields__)


def _text_of(raw: bytes) -> str | None:
    """The bytes as text if they are UTF-8 and hold nothing a terminal would act on, else None."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return decoded if all(ch.isprintable() or ch in "\t\n\r" for ch in decoded) else None


def _check_reason(reason: str | None) -> str | None:
    if reason is not None and reason not in _REASONS:
        raise UserError(f"--reason {reason!r} is not a dead-letter reason; use one of: {', '.join(_REASONS)}")
    return reason


def _check_format(fmt: str, allowed: tuple[str, ...]) -> str:
    if fmt not in allowed:
        raise UserError(f"--format {fmt!r} is not known; use one of: {', '.join(allowed)}")
    return fmt


def read_dead_letters(
    conn: Connection, *, reason: str | None = None, ids: list[int] | None = None, limit: int
) -> list[DeadLetterRow]:
    """Rows of ``rejected_inputs``, oldest first, filtered by reason and/or ids."""
    rows = read_rejected(conn, reason=reason, ids=ids, limit=limit)
    require(rejected.COLUMNS == _ROW_FIELDS, "rejected_inputs and DeadLetterRow differ")
    return [DeadLetterRow(*r) for r in rows]


def wallet_of(row: DeadLetterRow) -> str | None:
    """Where a replay goes: the wallet recorded with the refusal, else the one in the raw JSON; None
    when neither is a wallet id that can be a subject token (``^[A-Za-z0-9_-]{1,64}$``, whole)."""
    if row.wallet_id and _WALLET_RE.fullmatch(row.wallet_id):
        return row.wallet_id
    try:
        document: Any = json.loads(row.raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    data = document.get("data") if isinstance(document, dict) else None
    wallet = data.get("walletId") if isinstance(data, dict) else None
    # fullmatch: "$" of the pattern also matches before a final newline, which is no subject token.
    return wallet if isinstance(wallet, str) and _WALLET_RE.fullmatch(wallet) else None


def _console() -> Console:
    """A terminal's own width; piped, COLUMNS if set (e.g. COLUMNS=80), else wide enough for a line
    per row."""
    if sys.stdout.isatty():
        return Console()
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) >= 40 else 200)


# ------------------------------------------------------------------------------------------- list


@dlq_app.command("list")
def list_(
    reason: str | None = typer.Option(None, "--reason", help=f"Only this reason ({', '.join(_REASONS)})."),
    limit: int = typer.Option(DEFAULT_LIST_LIMIT, "--limit", min=1, help="At most this many rows."),
    fmt: str = typer.Option("table", "--format", help="table or json (one object per dead letter, camelCase)."),
) -> None:
    """Print the dead letters, oldest first (`billing dlq show ID` for one in full)."""
    from consumers.runtime.db import report_connection

    _check_reason(reason)
    _check_format(fmt, ("table", "json"))
    with report_connection() as conn:
        rows = read_dead_letters(conn, reason=reason, limit=limit)
    if fmt == "json":
        typer.echo(json.dumps([r.to_json(with_raw=False) for r in rows], indent=2))
        return
    console = _console()
    if console.width >= TABLE_MIN_COLUMNS:
        console.print(dead_letter_table(rows))
    else:  # a table of 9 columns in 80 would be all wrapping: one record per dead letter instead
        for r in rows:
            for line in dead_letter_record(r, console.width):
                console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"{len(rows)} dead letter(s){f' with reason {reason}' if reason else ''}")


def dead_letter_table(rows: list[DeadLetterRow]) -> Table:
    """A row per dead letter, the detail wrapped (never cut), for terminals of TABLE_MIN_COLUMNS+."""
    table = Table(title="dead letters (rejected_inputs)")
    for column in ("id", "received (UTC)", "reason", "wallet", "source", "event id", "type", "tries", "detail"):
        table.add_column(column, justify="right" if column in ("id", "tries") else "left", overflow="fold")
    for r in map(_shown, rows):
        table.add_row(
            str(r.id),
            r.received_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.reason,
            r.wallet_id or "",
            r.source or "",
            r.event_id or "",
            r.event_type or "",
            "" if r.delivery_count is None else str(r.delivery_count),
            r.detail,
        )
    return table


def _shown(r: DeadLetterRow) -> DeadLetterRow:
    """The row with its identity printable: a source may hold bidi controls (U+202E) that would
    garble a terminal; the detail and the subject are stored printable already."""

    def shown(value: str | None) -> str | None:
        return None if value is None else printable(value, reversible=False)

    return replace(r, source=shown(r.source), event_id=shown(r.event_id), event_type=shown(r.event_type))


def dead_letter_record(r: DeadLetterRow, width: int) -> Iterator[str]:
    """One dead letter as a few lines for a narrow terminal: id, time, reason and wallet first, then
    the identity, the subject and the detail, each wrapped to ``width`` (never cut)."""
    r = _shown(r)
    indent = " " * 8

    def wrap(line: str, first: str = indent, rest: str = indent + "  ") -> list[str]:
        return textwrap.wrap(line, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)

    tries = "" if r.delivery_count is None else f"  delivery {r.delivery_count}"
    when = r.received_at.strftime("%Y-%m-%d %H:%M:%S")
    yield from wrap(f"{r.id:>6}  {when}  {r.reason}  wallet {r.wallet_id or '-'}{tries}", "", indent)
    if r.source or r.event_id or r.event_type:
        yield from wrap(f"event {r.source or '?'} {r.event_id or '?'} {r.event_type or ''}".rstrip())
    if r.subject is not None:
        yield from wrap(f"subject {r.subject}")
    yield from wrap(r.detail, indent, indent)
    yield ""


# ------------------------------------------------------------------------------------------- show


@dlq_app.command("show")
def show(
    row_id: int = typer.Argument(..., metavar="ID", help="The dead letter's id (the first column of `dlq list`)."),
    fmt: str = typer.Option("text", "--format", help="text or json (the whole input, base64 if not UTF-8)."),
) -> None:
    """Print one dead letter in full: reason, detail, identity, subject, and the input as received."""
    from consumers.runtime.db import report_connection

    _check_format(fmt, ("text", "json"))
    with report_connection() as conn:
        rows = read_dead_letters(conn, ids=[row_id], limit=1)
    if not rows:
        raise UserError(f"no dead letter with id {row_id}; `billing dlq list` shows the ids")
    row = rows[0]
    if fmt == "json":
        typer.echo(json.dumps(row.to_json(with_raw=True), indent=2))
        return
    for line in show_lines(row):
        typer.echo(line)


def show_lines(row: DeadLetterRow) -> Iterator[str]:
    fields = row.to_json(with_raw=False)
    yield f"dead letter {row.id}: {row.reason}"
    for label, key in (
        ("received", "receivedAt"),
        ("subject", "subject"),
        ("subject bytes (base64)", "subjectBase64"),
        ("wallet", "walletId"),
        ("source", "source"),
        ("event id", "eventId"),
        ("event type", "eventType"),
        ("deliveries", "deliveryCount"),
    ):
        if fields.get(key) is not None:
            yield f"  {label + ':':<24}{fields[key]}"
    yield f"  {'detail:':<24}{row.detail}"
    body = _text_of(row.raw)
    yield f"  input ({len(row.raw)} bytes, {'UTF-8 text' if body is not None else 'not UTF-8 text'}):"
    if body is not None:
        shown = body[:SHOW_TEXT_BYTES]
        yield from (f"    {line}" for line in (shown.splitlines() or [""]))
        if len(body) > SHOW_TEXT_BYTES:
            yield f"    ... {len(body) - SHOW_TEXT_BYTES} more characters (--format json has all of it)"
        return
    yield f"    printable: {printable(row.raw[:SHOW_TEXT_BYTES].decode('utf-8', 'surrogateescape'))}"
    if len(row.raw) > SHOW_TEXT_BYTES:
        yield f"    ... {len(row.raw) - SHOW_TEXT_BYTES} more bytes (--format json has all of it)"
    yield f"    base64: {base64.b64encode(row.raw[:SHOW_TEXT_BYTES]).decode()}"


# ----------------------------------------------------------------------------------------- replay


@dataclass(frozen=True, slots=True)
class _Sent:
    row: DeadLetterRow
    stream_seq: int
    durable: str
    known: bool
    """Its (source, id) was already in the log before the replay: a duplicate, a no-op."""


@dlq_app.command("replay")
def replay(
    reason: str | None = typer.Option(None, "--reason", help="Only this reason."),
    ids: list[int] = typer.Option(None, "--id", help="Only these rows (repeatable)."),  # noqa: B008
    limit: int = typer.Option(DEFAULT_REPLAY_LIMIT, "--limit", min=1, help="At most this many rows."),
    accept_old: bool = typer.Option(
        False, "--accept-old", help="Backfill: let too_old dead letters in despite BILLING_EVENT_MAX_AGE_S."
    ),
    wait_s: float = typer.Option(
        DEFAULT_WAIT_S, "--wait-s", min=0, help="How long to wait for the outcome of each (0: do not wait)."
    ),
) -> None:
    """Send dead letters back to billing.in.<walletId> as received, and say what became of each
    (accepted, duplicate, refused again with its reason, or still pending).

    Oldest first, all reasons unless filtered; the table is not marked (it is append-only). A dead
    letter with no wallet id that can be a subject is skipped and reported, as is one whose publish
    fails; the others are replayed all the same."""
    from consumers.runtime.instance import client_services
    from ledger.db import make_engine

    _check_reason(reason)
    settings = Settings()
    names = NatsNames(settings.nats_namespace)
    with client_services(settings) as urls:
        engine = make_engine(urls.database_url, role=settings.database_role or None, pool_size=1)
        try:
            with engine.connect() as conn:
                rows = read_dead_letters(conn, reason=reason, ids=ids, limit=limit)
                before = max_rejected_id(conn)
            run = _replay(
                urls.nats_url, names, settings, engine, rows, accept_old=accept_old, wait_s=wait_s, before=before
            )
            sent, skipped = asyncio.run(run)
        finally:
            engine.dispose()
    for row, why in skipped:
        typer.echo(f"skipped {row.id} ({row.reason}): {why}")
    typer.echo(
        f"replayed {sent} of {len(rows)} dead letter(s) to {names.subject('billing.in.<walletId>')}"
        + (f"; {len(skipped)} skipped" if skipped else "")
    )
    if ids:
        missing = sorted(set(ids) - {r.id for r in rows})
        if missing:
            typer.echo(f"no dead letter with id {', '.join(map(str, missing))}", err=True)


def _in_log(conn: Connection, row: DeadLetterRow) -> bool:
    return row.source is not None and row.event_id is not None and in_log(conn, row.source, row.event_id)


def _durable_of(settings: Settings, wallet: str) -> str:
    if settings.intake_partitions:
        return f"{settings.intake_durable}-{partition_of(wallet, settings.intake_partitions)}"
    return settings.intake_durable


async def _replay(
    nats_url: str,
    names: NatsNames,
    settings: Settings,
    engine: Engine,
    rows: list[DeadLetterRow],
    *,
    accept_old: bool,
    wait_s: float,
    before: int,
) -> tuple[int, list[tuple[DeadLetterRow, str]]]:
    import nats

    from consumers.nats import safety as nats_safety

    nats_safety.install()
    try:
        # BILLING_NATS_URL may list a cluster's servers separated by commas.
        nc = await nats.connect(servers=nats_servers(nats_url), connect_timeout=5, max_reconnect_attempts=3)
    except Exception as exc:
        raise UserError(f"BILLING_NATS_URL: cannot reach NATS at {nats_url} ({type(exc).__name__}: {exc})") from None
    try:
        js = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        sent: list[_Sent] = []
        skipped: list[tuple[DeadLetterRow, str]] = []
        for row in rows:
            wallet = wallet_of(row)
            if wallet is None:
                skipped.append((row, "no wallet id that can be a subject, in the record or in the input"))
                continue
            headers = {"Billing-Replay-Of": str(row.id), "Billing-Replayed-Reason": row.reason}
            if accept_old and row.reason == RejectReason.too_old.value:
                headers[ACCEPT_OLD_HEADER] = str(row.id)
            with engine.connect() as conn:
                known = _in_log(conn, row)
            try:
                ack = await js.publish(names.in_subject(wallet), row.raw, stream=names.in_stream, headers=headers)
            except Exception as exc:  # one that cannot be sent does not stop the others
                skipped.append((row, f"not sent: {type(exc).__name__}: {printable(str(exc), reversible=False)}"))
                continue
            sent.append(_Sent(row, ack.seq, _durable_of(settings, wallet), known))
        if sent and wait_s > 0:
            await _report_outcomes(js, names, engine, sent, wait_s=wait_s, before=before)
        return len(sent), skipped
    finally:
        await nc.close()


async def _report_outcomes(
    js: Any, names: NatsNames, engine: Engine, sent: list[_Sent], *, wait_s: float, before: int
) -> None:
    """Wait (at most ``wait_s``) until the intake has settled each replayed message, and print what
    became of it. Settled: in the log, or a new refusal recorded, or acked by the intake's durable
    (its ack floor passed the message: then a refusal with a reason already recorded, kept once)."""
    pending = {s.row.id: s for s in sent}
    deadline = time.monotonic() + wait_s
    while pending:
        floors = await _ack_floors(js, names, {s.durable for s in pending.values()})
        with engine.connect() as conn:
            for row_id, s in list(pending.items()):
                outcome = _outcome(conn, s, floors.get(s.durable, 0), before)
                if outcome is not None:
                    typer.echo(f"{row_id} ({s.row.reason}): {outcome}")
                    del pending[row_id]
        if not pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    for row_id, s in pending.items():
        typer.echo(
            f"{row_id} ({s.row.reason}): no outcome within {wait_s:g} s (a reading whose rental has not started "
            "is retried with a delay; see `billing dlq list` later)"
        )


async def _ack_floors(js: Any, names: NatsNames, durables: set[str]) -> dict[str, int]:
    floors = {}
    for durable in durables:
        try:
            info = await js.consumer_info(names.in_stream, durable)
        except Exception:  # the intake is not running (yet): no floor, the database may still tell
            floors[durable] = 0
        else:
            floors[durable] = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
    return floors


def _outcome(conn: Connection, s: _Sent, ack_floor: int, before: int) -> str | None:
    row = s.row
    if _in_log(conn, row):
        return "duplicate: already in the log, nothing charged twice" if s.known else "accepted"
    refused = latest_refusal(conn, after_id=before, source=row.source, event_id=row.event_id, raw=row.raw)
    if refused is not None:
        return f"refused again: {refused[0]}: {refused[1]}"
    if ack_floor >= s.stream_seq:
        if row.source is None or row.event_id is None:
            return "settled by the intake (refused again; nothing to identify it by in the log)"
        return f"refused again: {row.reason} (as before, recorded once per source, id and reason)"
    return None
