"""`billing verify`: rebuild the journal and every projection from the event log alone, and compare.

DESIGN section 4: rebuilding every projection from ``events`` alone gives the same journal and
balances. This module checks it on a real database:

1. As the owner (the URL's login), in **one** ``REPEATABLE READ`` transaction: take the snapshot of
   the live schema (``current_schema()``, normally ``public``), create a scratch schema
   ``verify_<random>`` and run the Alembic migrations into it, with ``search_path`` set (for this
   transaction only) to the scratch schema alone. Every unqualified name of the migrations lands
   there: tables, sequences, views, ``alembic_version`` and the two trigger functions, so the
   scratch tables carry the same append-only and zero-sum triggers and the replay is held to the
   same database-enforced rules as the live intake. The migrations' grants name the scratch tables
   and are inert (no role but the owner has ``USAGE`` on the scratch schema); the roles they create
   if missing are cluster-wide and already exist. The live schema must be at the same revision as
   the code (else :class:`VerifyError`: run ``billing migrate``).
2. Read the live ``events`` in position order, in chunks, parse each stored payload back with the
   log's own parser (``parse_log_event``: billing.in events and Stripe facts alike) and feed the
   chunk through the real :func:`projections.processor.process_batch`, the live intake's unit of
   work, with each event's original ``position`` and ``received_at``. Every event of the log must be
   accepted again; one refused or "not started" on replay means the log's order or content
   contradicts what the intake decided.
3. Compare live and rebuilt row by row (``EXCEPT ALL`` both ways, joined on the primary key so a
   changed row shows both sides) over every column the migrations give the table, less the
   exclusions below: ``events``, ``journal_transactions``, ``journal_entries``, ``account_balances``,
   ``rentals``, ``serverless_endpoints``, ``serverless_jobs``, ``stripe_payments``. Check the
   invariants on both sides: every journal transaction sums to zero (hence all entries do), each
   wallet balance equals the sum of its entries and its ``last_position`` the last one (the shared
   accounts, revenue, clearing and the like, have no balance row: they are derived on read).
4. Roll the transaction back, which drops the scratch schema with everything in it, even if the
   process dies half-way: nothing to clean up by hand. With ``keep`` it is committed instead, for a
   person to look at (``DROP SCHEMA verify_... CASCADE`` when done).

The snapshot makes the comparison exact on a running system: the service may go on writing; verify
sees the log and the projections as of one instant.

Not compared, because they are not facts of the log (see :data:`NOT_COMPARED`): the stop-command
bookkeeping of ``rentals`` (``stop_seq``, ``stop_attempts``, ``stop_issued_at``: when the scheduler
ticked, its clock), ``wallets`` (status, notices, admission holds, serverless admissions, next
wake-up), the ``outbox``, ``rejected_inputs`` (refused events are not in the log, so they are not
replayed), ``stripe_webhook_events`` (deliveries as received), ``intake_owners`` (who pulls each
intake durable). A table the migrations add that is in
neither list is named in the report, so a new projection is not silently left out.

With ``wallet_ids`` the rebuild is limited to those wallets' events and the comparison to their rows
(their transactions and entries, their ``wallet:<id>`` balances): cheap enough to run every few steps
of a test. Accounts shared by all wallets (revenue, clearing, adjustments) only a full verify compares.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg import sql
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, create_engine, pool

from ledger.events import parse_log_event
from ledger.invariants import InvariantViolation, fail, require
from ledger.journal import wallet_account
from ledger.migrate import alembic_config
from projections.processor import MAX_BATCH, BatchResult, Disposition, Incoming, process_batch

SCRATCH_PREFIX: Final = "verify_"
DEFAULT_CHUNK: Final = 1_000
"""Events per replayed batch."""
DEFAULT_SAMPLE_LIMIT: Final = 10
"""Differing rows kept (and printed) per table or invariant."""

_SCHEMA_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class VerifyError(Exception):
    """Verify cannot run (not a difference): e.g. the live schema is at another revision."""


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    scope: str
    """Predicate on alias ``x`` limiting the rows to the wallets in scope (``{s}``: the schema)."""
    exclude: tuple[str, ...] = ()


_BY_WALLET: Final = "x.wallet_id = ANY(%(wallets)s)"
_WALLET_ACCOUNTS: Final = wallet_account("%")
"""The accounts ``account_balances`` holds (a LIKE pattern); the shared ones are derived on read."""

COMPARED: Final[tuple[_Table, ...]] = (
    _Table("events", _BY_WALLET),
    _Table("journal_transactions", _BY_WALLET),
    _Table(
        "journal_entries",
        "EXISTS (SELECT 1 FROM {s}.journal_transactions t WHERE t.event_position = x.event_position"
        " AND t.txn_no = x.txn_no AND t.wallet_id = ANY(%(wallets)s))",
    ),
    _Table("account_balances", "x.account = ANY(%(accounts)s)"),
    _Table("rentals", _BY_WALLET, exclude=("stop_seq", "stop_attempts", "stop_issued_at")),
    _Table("serverless_endpoints", _BY_WALLET),
    _Table("serverless_jobs", _BY_WALLET),
    _Table("stripe_payments", _BY_WALLET),
)
"""The tables that are functions of the log, and the columns that are not (the scheduler's clock)."""

NOT_COMPARED: Final[dict[str, str]] = {
    "rentals.stop_seq/stop_attempts/stop_issued_at": "stop-command bookkeeping: when the scheduler ticked",
    "wallets": "status, notices, admission holds, serverless admissions, next wake-up: not facts of the log",
    "outbox": "messages (commands, notices, settlements), not state",
    "rejected_inputs": "refused events are not in the log and are not replayed",
    "stripe_webhook_events": "Stripe deliveries as received; the facts they carried are events of the log",
    "intake_owners": "which instance holds each intake durable, and whether it let go cleanly: not a fact of the log",
    "alembic_version": "the schema's revision (checked equal before the replay)",
}


# ----------------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class RowDiff:
    """One key whose row differs: only live (``rebuilt`` None), only rebuilt (``live`` None), or on
    both sides with different values. Rows are column -> value, as JSON would show them."""

    key: dict[str, Any]
    live: dict[str, Any] | None
    rebuilt: dict[str, Any] | None

    @property
    def changed_columns(self) -> tuple[str, ...]:
        if self.live is None or self.rebuilt is None:
            return ()
        return tuple(c for c in self.live if self.live.get(c) != self.rebuilt.get(c))


@dataclass(frozen=True, slots=True)
class TableComparison:
    table: str
    columns: tuple[str, ...]
    """The columns compared (the table's, less the excluded ones)."""
    live_rows: int
    rebuilt_rows: int
    differing: int
    """Keys whose rows differ (all of them, not only the samples)."""
    samples: tuple[RowDiff, ...] = ()

    @property
    def ok(self) -> bool:
        return self.differing == 0


@dataclass(frozen=True, slots=True)
class InvariantCheck:
    name: str
    side: str
    """``live`` or ``rebuilt``."""
    violations: int
    samples: tuple[dict[str, Any], ...] = ()

    @property
    def ok(self) -> bool:
        return self.violations == 0


@dataclass(frozen=True, slots=True)
class ReplayProblem:
    """An event of the log that the replay did not accept as the live intake did."""

    position: int
    source: str
    event_id: str
    type: str
    outcome: str
    """``rejected``, ``retry`` (not started), ``duplicate``, ``unparseable`` or ``error``."""
    detail: str


@dataclass(frozen=True, slots=True)
class VerifyResult:
    schema: str
    live_schema: str
    revision: str
    kept: bool
    wallet_ids: tuple[str, ...] | None
    events: int
    """Events read from the log (in scope)."""
    replayed: int
    """Events accepted again by the replay."""
    batches: int
    seconds: float
    tables: tuple[TableComparison, ...]
    invariants: tuple[InvariantCheck, ...]
    replay_problems: tuple[ReplayProblem, ...]
    replay_stopped_at: int | None = None
    """Position of the event whose replay raised; later events were not replayed."""
    unknown_tables: tuple[str, ...] = ()
    """Tables of the schema that verify neither compares nor knows to leave out."""
    not_compared: dict[str, str] = field(default_factory=lambda: dict(NOT_COMPARED))

    @property
    def ok(self) -> bool:
        return (
            not self.replay_problems
            and self.replay_stopped_at is None
            and all(t.ok for t in self.tables)
            and all(i.ok for i in self.invariants)
        )

    @property
    def differences(self) -> int:
        """Differing rows, invariant violations and replay problems, counted together."""
        return (
            sum(t.differing for t in self.tables)
            + sum(i.violations for i in self.invariants)
            + len(self.replay_problems)
        )

    def table(self, name: str) -> TableComparison:
        return next(t for t in self.tables if t.table == name)

    def report(self, limit: int = DEFAULT_SAMPLE_LIMIT) -> str:
        return format_report(self, limit)


# ------------------------------------------------------------------------------------------ verify


def verify(
    url_or_engine: str | Engine,
    *,
    wallet_ids: Sequence[str] | None = None,
    keep: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    sample_limit: int = DEFAULT_SAMPLE_LIMIT,
    schema: str | None = None,
) -> VerifyResult:
    """Rebuild from the log into a scratch schema and compare (see the module docstring).

    ``url_or_engine``: the owner's URL (or an engine of it); the login needs CREATE on the database
    and SELECT on the live tables. ``wallet_ids``: limit to these wallets (None: everything).
    ``keep``: commit the scratch schema instead of dropping it. ``schema``: the scratch schema's
    name (default ``verify_<random>``); it must not exist.
    """
    require(0 < chunk_size <= MAX_BATCH, f"chunk size {chunk_size}")
    require(sample_limit >= 0, f"sample limit {sample_limit}")
    scratch = schema or f"{SCRATCH_PREFIX}{secrets.token_hex(6)}"
    require(_SCHEMA_RE.match(scratch) is not None, f"bad scratch schema name {scratch!r}")
    scope = None if wallet_ids is None else tuple(sorted(set(wallet_ids)))
    owned = isinstance(url_or_engine, str)
    engine = create_engine(url_or_engine, poolclass=pool.NullPool) if isinstance(url_or_engine, str) else url_or_engine
    started_s = time.perf_counter()
    try:
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            conn.begin()
            try:
                result = _verify_in(conn, scratch, scope, chunk_size, sample_limit, keep, started_s)
                if keep:
                    conn.commit()
                return result
            finally:
                if conn.in_transaction():
                    conn.rollback()  # drops the scratch schema and everything in it
    finally:
        if owned:
            engine.dispose()


def _verify_in(
    conn: Connection,
    scratch: str,
    scope: tuple[str, ...] | None,
    chunk_size: int,
    sample_limit: int,
    keep: bool,
    started_s: float,
) -> VerifyResult:
    pg = conn.connection.driver_connection
    if not isinstance(pg, psycopg.Connection):
        fail("verify needs the psycopg driver")
    with pg.cursor() as cur:
        # The first statement fixes the snapshot: the log and the live projections as of now.
        cur.execute("SELECT current_schema()")
        row = cur.fetchone()
        live = str(row[0]) if row and row[0] else "public"
        live_revision = _revision(cur, live)
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(scratch)))
        # Only the scratch schema (pg_catalog is always searched implicitly).
        cur.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(scratch)))
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    from alembic import command  # here: the CLI starts faster without it

    command.upgrade(cfg, "head")
    with pg.cursor() as cur:
        revision = _revision(cur, scratch)
    if live_revision != revision:
        raise VerifyError(
            f"the live schema {live} is at revision {live_revision}, the code at {revision}: "
            "run `billing migrate` first"
        )
    events, replayed, batches, problems, stopped_at = _replay(pg, live, scope, chunk_size)
    params = _scope_params(scope)
    present = _tables(pg, scratch)
    tables = tuple(
        _compare(pg, t, _columns(pg, scratch, t), live, scratch, scope, params, sample_limit)
        for t in COMPARED
        if t.name in present
    )
    invariants = (
        *_invariants(pg, live, "live", scope, params, sample_limit),
        *_invariants(pg, scratch, "rebuilt", scope, params, sample_limit),
    )
    known = {t.name for t in COMPARED} | set(NOT_COMPARED)
    return VerifyResult(
        schema=scratch,
        live_schema=live,
        revision=revision,
        kept=keep,
        wallet_ids=scope,
        events=events,
        replayed=replayed,
        batches=batches,
        seconds=time.perf_counter() - started_s,
        tables=tables,
        invariants=invariants,
        replay_problems=tuple(problems),
        replay_stopped_at=stopped_at,
        unknown_tables=tuple(sorted(present - known)),
    )


def _revision(cur: psycopg.Cursor[Any], schema: str) -> str:
    cur.execute(
        sql.SQL("SELECT string_agg(version_num, ',' ORDER BY version_num) FROM {}.alembic_version").format(
            sql.Identifier(schema)
        )
    )
    row = cur.fetchone()
    return str(row[0]) if row and row[0] else "(none)"


def _tables(pg: psycopg.Connection[Any], schema: str) -> set[str]:
    with pg.cursor() as cur:
        cur.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'p')",
            (schema,),
        )
        return {r[0] for r in cur.fetchall()}


def _columns(pg: psycopg.Connection[Any], schema: str, table: _Table) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(key columns, compared columns) of a table as the migrations made it, in column order."""
    with pg.cursor() as cur:
        cur.execute(
            "SELECT a.attname, coalesce(a.attnum = ANY(i.indkey::int2[]), false)"
            "  FROM pg_attribute a"
            "  LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary"
            " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped"
            " ORDER BY a.attnum",
            (f'"{schema}"."{table.name}"',),
        )
        rows = cur.fetchall()
    key = tuple(name for name, is_key in rows if is_key)
    columns = tuple(name for name, _ in rows if name not in table.exclude)
    require(bool(key), f"{table.name} has no primary key")
    return key, columns


def _scope_params(scope: tuple[str, ...] | None) -> dict[str, Any]:
    if scope is None:
        return {}
    return {"wallets": list(scope), "accounts": [wallet_account(w) for w in scope]}


# ------------------------------------------------------------------------------------------ replay


@dataclass(frozen=True, slots=True)
class _Logged:
    position: int
    source: str
    event_id: str
    type: str
    received_at: datetime
    payload: str


class _ReplayError(Exception):
    def __init__(self, event: _Logged, detail: str, accepted: int) -> None:
        super().__init__(detail)
        self.event = event
        self.detail = detail
        self.accepted = accepted


def _read_chunk(
    pg: psycopg.Connection[Any], live: str, scope: tuple[str, ...] | None, after: int, limit: int
) -> list[_Logged]:
    query = sql.SQL(
        "SELECT position, source, event_id, type, received_at, payload::text FROM {}.events"
        " WHERE position > %(after)s {scope} ORDER BY position LIMIT %(limit)s"
    ).format(
        sql.Identifier(live),
        scope=sql.SQL("AND wallet_id = ANY(%(wallets)s)" if scope is not None else ""),
    )
    with pg.cursor() as cur:
        cur.execute(query, {"after": after, "limit": limit, **_scope_params(scope)})
        return [_Logged(*r) for r in cur.fetchall()]


def _replay(
    pg: psycopg.Connection[Any], live: str, scope: tuple[str, ...] | None, chunk_size: int
) -> tuple[int, int, int, list[ReplayProblem], int | None]:
    """Feed the log through process_batch. Returns (events read, accepted, batches, problems,
    position where an error stopped the replay)."""
    problems: list[ReplayProblem] = []
    events = replayed = batches = 0
    after = 0
    while True:
        chunk = _read_chunk(pg, live, scope, after, chunk_size)
        if not chunk:
            return events, replayed, batches, problems, None
        after = chunk[-1].position
        events += len(chunk)
        incoming: list[Incoming] = []
        logged: list[_Logged] = []
        for ev in chunk:
            try:
                event = parse_log_event(ev.payload)
            except ValidationError as error:
                problems.append(_problem(ev, "unparseable", str(error).replace("\n", " ")[:500]))
                continue
            raw = ev.payload.encode()
            incoming.append(Incoming(event, raw, last_attempt=True, received_at=ev.received_at, position=ev.position))
            logged.append(ev)
        if not incoming:
            continue
        batches += 1
        try:
            replayed += _replay_batch(pg, incoming, logged, problems)
        except _ReplayError as error:
            replayed += error.accepted
            problems.append(_problem(error.event, "error", error.detail))
            return events, replayed, batches, problems, error.event.position


def _run(pg: psycopg.Connection[Any], incoming: Sequence[Incoming]) -> BatchResult | str:
    """process_batch in a savepoint: its result, or the error (the savepoint rolled back)."""
    now = max(i.received_at for i in incoming if i.received_at is not None)
    with pg.cursor() as cur:
        cur.execute("SAVEPOINT verify_batch")
        try:
            result = process_batch(pg, incoming, now=now)
        except (InvariantViolation, psycopg.Error, ValueError) as error:
            cur.execute("ROLLBACK TO SAVEPOINT verify_batch")
            return f"{type(error).__name__}: {error}"[:1000]
        cur.execute("RELEASE SAVEPOINT verify_batch")
    return result


def _replay_batch(
    pg: psycopg.Connection[Any], incoming: list[Incoming], logged: list[_Logged], problems: list[ReplayProblem]
) -> int:
    outcome = _run(pg, incoming)
    if isinstance(outcome, str):
        # Find the event that raised: replay the chunk one event at a time up to it.
        accepted = 0
        for i, item in enumerate(incoming):
            single = _run(pg, [item])
            if isinstance(single, str):
                raise _ReplayError(logged[i], single, accepted)
            accepted += _note(single, logged[i : i + 1], problems)
        # The whole chunk failed but each event alone passed: report the chunk's first event.
        raise _ReplayError(logged[0], f"batch failed, each event alone passed: {outcome}", accepted)
    return _note(outcome, logged, problems)


_NO_REJECTION_DETAIL: Final = {
    Disposition.retry: "its resource has not started at this point of the log",
    Disposition.duplicate: "the same (source, id) is earlier in the log",
}


def _note(result: BatchResult, logged: Sequence[_Logged], problems: list[ReplayProblem]) -> int:
    """Record every event the replay did not accept; return how many it accepted."""
    accepted = 0
    for idx, disposition in enumerate(result.dispositions):
        if disposition == Disposition.accepted:
            accepted += 1
            continue
        rejection = result.rejections.get(idx)
        detail = (
            f"{rejection.reason.value}: {rejection.detail}"
            if rejection is not None
            else _NO_REJECTION_DETAIL.get(disposition, str(disposition))
        )
        problems.append(_problem(logged[idx], str(disposition), detail))
    return accepted


def _problem(ev: _Logged, outcome: str, detail: str) -> ReplayProblem:
    return ReplayProblem(ev.position, ev.source, ev.event_id, ev.type, outcome, detail)


# -------------------------------------------------------------------------------------- comparison


def _compare(
    pg: psycopg.Connection[Any],
    table: _Table,
    shape: tuple[tuple[str, ...], tuple[str, ...]],
    live: str,
    scratch: str,
    scope: tuple[str, ...] | None,
    params: dict[str, Any],
    limit: int,
) -> TableComparison:
    key, columns = shape

    def side(schema: str) -> sql.Composable:
        where = sql.SQL(table.scope.replace("{s}", "{schema}")).format(schema=sql.Identifier(schema))
        return sql.SQL("SELECT {cols} FROM {schema}.{table} AS x WHERE {where}").format(
            cols=sql.SQL(", ").join(sql.SQL("x.{}").format(sql.Identifier(c)) for c in columns),
            schema=sql.Identifier(schema),
            table=sql.Identifier(table.name),
            where=where if scope is not None else sql.SQL("TRUE"),
        )

    keys = [sql.Identifier(k) for k in key]
    query = sql.SQL(
        "WITH l AS ({live}), r AS ({rebuilt}),"
        " lo AS (SELECT * FROM l EXCEPT ALL SELECT * FROM r),"
        " ro AS (SELECT * FROM r EXCEPT ALL SELECT * FROM l),"
        " d AS (SELECT {coalesced},"
        "        CASE WHEN lo.{first} IS NULL THEN NULL ELSE to_jsonb(lo) END AS live,"
        "        CASE WHEN ro.{first} IS NULL THEN NULL ELSE to_jsonb(ro) END AS rebuilt"
        "         FROM lo FULL JOIN ro ON {join})"
        " SELECT (SELECT count(*) FROM l), (SELECT count(*) FROM r), (SELECT count(*) FROM d),"
        "        (SELECT coalesce(jsonb_agg(jsonb_build_array(s.live, s.rebuilt)), '[]'::jsonb)"
        "           FROM (SELECT live, rebuilt FROM d ORDER BY {order} LIMIT %(limit)s) AS s)"
    ).format(
        live=side(live),
        rebuilt=side(scratch),
        coalesced=sql.SQL(", ").join(sql.SQL("coalesce(lo.{k}, ro.{k}) AS {k}").format(k=k) for k in keys),
        first=keys[0],
        join=sql.SQL(" AND ").join(sql.SQL("lo.{k} = ro.{k}").format(k=k) for k in keys),
        order=sql.SQL(", ").join(keys),
    )
    with pg.cursor() as cur:
        cur.execute(query, {**params, "limit": limit})
        row = cur.fetchone()
    if row is None:
        fail(f"no comparison row for {table.name}")
    live_rows, rebuilt_rows, differing, pairs = row
    samples = tuple(_row_diff(key, columns, a, b) for a, b in pairs)
    return TableComparison(table.name, columns, int(live_rows), int(rebuilt_rows), int(differing), samples)


def _row_diff(
    key: tuple[str, ...], columns: tuple[str, ...], live: dict[str, Any] | None, rebuilt: dict[str, Any] | None
) -> RowDiff:
    """Both sides with their columns in the table's order (jsonb orders keys its own way)."""
    either = live if live is not None else rebuilt
    if either is None:
        fail("a differing row with neither side")
    return RowDiff(
        key={k: either[k] for k in key},
        live=None if live is None else {c: live[c] for c in columns},
        rebuilt=None if rebuilt is None else {c: rebuilt[c] for c in columns},
    )


def _invariants(
    pg: psycopg.Connection[Any],
    schema: str,
    side: str,
    scope: tuple[str, ...] | None,
    params: dict[str, Any],
    limit: int,
) -> tuple[InvariantCheck, ...]:
    s = sql.Identifier(schema)
    in_scope = sql.SQL(
        "JOIN {s}.journal_transactions t USING (event_position, txn_no) WHERE t.wallet_id = ANY(%(wallets)s)"
        if scope is not None
        else ""
    ).format(s=s)
    unbalanced = sql.SQL(
        "WITH bad AS (SELECT e.event_position, e.txn_no, sum(e.amount_micros) AS total"
        "               FROM {s}.journal_entries e {scope} GROUP BY e.event_position, e.txn_no"
        "             HAVING sum(e.amount_micros) <> 0)"
        " SELECT (SELECT count(*) FROM bad),"
        "        (SELECT coalesce(jsonb_agg(to_jsonb(b)), '[]'::jsonb) FROM"
        "          (SELECT * FROM bad ORDER BY event_position, txn_no LIMIT %(limit)s) AS b)"
    ).format(s=s, scope=in_scope)
    total = sql.SQL("SELECT count(*), coalesce(sum(e.amount_micros), 0) FROM {s}.journal_entries e {scope}").format(
        s=s, scope=in_scope
    )
    # Only wallet accounts have a balance row: the shared ones are derived on read (migration 0007).
    account_scope = sql.SQL(
        "WHERE account = ANY(%(accounts)s)" if scope is not None else "WHERE account LIKE %(wallet_accounts)s"
    )
    balances = sql.SQL(
        "WITH sums AS (SELECT account, sum(amount_micros) AS entries_sum, max(event_position) AS last_entry"
        "                FROM {s}.journal_entries {ascope} GROUP BY account),"
        " bal AS (SELECT account, balance_micros, last_position FROM {s}.account_balances {ascope}),"
        " bad AS (SELECT coalesce(b.account, x.account) AS account, b.balance_micros, x.entries_sum,"
        "                b.last_position, x.last_entry"
        "           FROM bal b FULL JOIN sums x ON b.account = x.account"
        "          WHERE b.balance_micros IS DISTINCT FROM x.entries_sum"
        "             OR b.last_position IS DISTINCT FROM x.last_entry)"
        " SELECT (SELECT count(*) FROM bad),"
        "        (SELECT coalesce(jsonb_agg(to_jsonb(b)), '[]'::jsonb) FROM"
        "          (SELECT * FROM bad ORDER BY account LIMIT %(limit)s) AS b)"
    ).format(s=s, ascope=account_scope)
    checks: list[InvariantCheck] = []
    with pg.cursor() as cur:
        cur.execute(unbalanced, {**params, "limit": limit})
        n, samples = _one(cur)
        checks.append(InvariantCheck("every journal transaction sums to zero", side, int(n), tuple(samples)))
        cur.execute(total, params)
        entries, entries_sum = _one(cur)
        checks.append(
            InvariantCheck(
                f"all entries sum to zero ({entries} entries)",
                side,
                0 if entries_sum == 0 else 1,
                () if entries_sum == 0 else ({"sum_micros": int(entries_sum)},),
            )
        )
        cur.execute(balances, {**params, "limit": limit, "wallet_accounts": _WALLET_ACCOUNTS})
        n, samples = _one(cur)
        checks.append(
            InvariantCheck(
                "each wallet balance equals the sum of its entries (last_position their last)",
                side,
                int(n),
                tuple(samples),
            )
        )
    return tuple(checks)


def _one(cur: psycopg.Cursor[Any]) -> tuple[Any, Any]:
    row = cur.fetchone()
    if row is None:
        fail("aggregate query returned no row")
    return row[0], row[1]


# ------------------------------------------------------------------------------------------ report


def _cell(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= 240 else text[:237] + "..."


def format_report(result: VerifyResult, limit: int = DEFAULT_SAMPLE_LIMIT) -> str:
    """A report for people: what was rebuilt, counts compared per table, the first differing rows
    with both sides, the invariants, what is not compared, and the verdict."""
    scope = "all wallets" if result.wallet_ids is None else f"{len(result.wallet_ids)} wallet(s)"
    lines = [
        f"billing verify: {result.events} events of schema {result.live_schema} ({scope}, revision "
        f"{result.revision}) replayed in {result.batches} batch(es) into {result.schema} in "
        f"{result.seconds:.2f} s" + (" (schema kept)" if result.kept else " (schema dropped)"),
        "",
        f"{'table':<22} {'live':>10} {'rebuilt':>10} {'differing':>10}",
    ]
    for t in result.tables:
        mark = "" if t.ok else "  <-- DIFFERS"
        lines.append(f"{t.table:<22} {t.live_rows:>10} {t.rebuilt_rows:>10} {t.differing:>10}{mark}")
    for t in result.tables:
        if t.ok:
            continue
        lines += ["", f"{t.table}: {t.differing} differing row(s), first {min(limit, len(t.samples))}:"]
        for d in t.samples[:limit]:
            lines.append(f"  key {_cell(d.key)}")
            if d.live is None:
                lines.append(f"    only rebuilt: {_cell(d.rebuilt)}")
            elif d.rebuilt is None:
                lines.append(f"    only live:    {_cell(d.live)}")
            else:
                live_row, rebuilt_row = d.live, d.rebuilt
                lines += [
                    f"    {c}: live {_cell(live_row.get(c))}  rebuilt {_cell(rebuilt_row.get(c))}"
                    for c in d.changed_columns
                ]
    lines += ["", "invariants:"]
    for i in result.invariants:
        lines.append(f"  {'ok  ' if i.ok else 'FAIL'} [{i.side}] {i.name}" + ("" if i.ok else f": {i.violations}"))
        lines += [f"         {_cell(sample)}" for sample in i.samples[:limit]]
    order_ok = not result.replay_problems and result.replay_stopped_at is None
    lines.append(
        f"  {'ok  ' if order_ok else 'FAIL'} [log] every event replays, in position order, as the intake accepted it"
        + ("" if order_ok else f": {len(result.replay_problems)} not accepted")
    )
    lines += [
        f"         position {p.position} {p.type} ({p.source}, {p.event_id}): {p.outcome}: {p.detail}"
        for p in result.replay_problems[:limit]
    ]
    if result.replay_stopped_at is not None:
        lines.append(f"         replay stopped at position {result.replay_stopped_at}: later events not replayed")
    lines += ["", "not compared:", *(f"  {k}: {v}" for k, v in result.not_compared.items())]
    if result.unknown_tables:
        lines.append(
            f"  NOTE: tables verify does not know (neither compared nor listed): {', '.join(result.unknown_tables)}"
        )
    lines.append("")
    if result.ok:
        lines.append(f"OK: the log rebuilds the journal and the projections exactly ({result.replayed} events)")
    else:
        lines.append(f"DIFFERENCES: {result.differences} (see above)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI


def verify_command(
    database_url: str | None,
    *,
    keep: bool = False,
    wallets: Sequence[str] = (),
    limit: int = DEFAULT_SAMPLE_LIMIT,
    chunk_size: int = DEFAULT_CHUNK,
) -> int:
    """`billing verify`: print the report; the exit status: 0 when nothing differs, 1 when something
    does, 2 when verify cannot run (no database URL, schema not at the code's revision)."""
    if not database_url:
        print("BILLING_DATABASE_URL is not set (or pass --database-url).", file=sys.stderr)
        return 2
    try:
        result = verify(
            database_url, wallet_ids=list(wallets) or None, keep=keep, sample_limit=limit, chunk_size=chunk_size
        )
    except VerifyError as error:
        print(f"billing verify: {error}", file=sys.stderr)
        return 2
    print(result.report(limit))
    return 0 if result.ok else 1
