"""Table definitions (SQLAlchemy Core): the one place the code takes column lists from (queries,
and the store's COPYs through :func:`copy_statement`). Migrations under ledger/migrations are the
source of the DDL; ``test_migrations_match_the_table_definitions`` (tests/integration/
test_ledger_store.py) checks that both agree.

Append-only tables: events, journal_transactions, journal_entries (triggers refuse UPDATE, DELETE
and TRUNCATE; the service role is granted only SELECT and INSERT). account_balances is an inline
projection of the journal for wallet accounts only, rebuilt by `billing verify`; the balances of the
shared accounts (revenue, clearing, ...) are derived on read (view ``ledger_account_balances``).

What the write path pays for each index, constraint and trigger: bench/bench_store.py, and
migration 0007 for what was cut and why. References between the journal's tables are checked by
statement-level triggers (one query a COPY), not foreign keys (a query and a parent-row lock per
inserted row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

# Alembic and SQLAlchemy name constraints by this convention, so migrations can refer to them.
NAMING_CONVENTION: Final = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

APP_ROLE: Final = "billing_app"

metadata = MetaData(naming_convention=NAMING_CONVENTION)

events = Table(
    "events",
    metadata,
    # Global position: the order of the log. BY DEFAULT (not ALWAYS) so a bulk COPY can reserve
    # positions with nextval(); the service never supplies one.
    Column("position", BigInteger, primary_key=True, autoincrement=True),
    Column("source", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("wallet_id", Text, nullable=False),
    Column("resource_id", Text, nullable=True),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("payload", JSONB, nullable=False),
    UniqueConstraint("source", "event_id"),
    Index("ix_events_stripe_event_time", "event_time", postgresql_where=text("source = 'stripe'")),
)

journal_transactions = Table(
    "journal_transactions",
    metadata,
    # A transaction is identified by the event that caused it and its number within that event,
    # so the journal is a pure function of the log: a rebuild gives the same keys.
    Column("event_position", BigInteger, primary_key=True),
    Column("txn_no", SmallInteger, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("wallet_id", Text, nullable=False),
    Column("resource_id", Text, nullable=True),
    Column("product", Text, nullable=True),
    Column("gpu_type", Text, nullable=True),
    Column("memo", Text, nullable=False, server_default=""),
    # booked_at is the event's time (the store writes it so): a query for a period of Stripe
    # transactions finds them through ix_events_stripe_event_time.
    Column("booked_at", DateTime(timezone=True), nullable=False),
    # event_position references events.position: checked per statement (journal_transactions_checked).
    CheckConstraint("txn_no >= 0", name="txn_no_nonnegative"),
)

journal_entries = Table(
    "journal_entries",
    metadata,
    Column("event_position", BigInteger, primary_key=True),
    Column("txn_no", SmallInteger, primary_key=True),
    Column("entry_no", SmallInteger, primary_key=True),
    Column("account", Text, nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    # Copies of the transaction's attributes (same statement): reports scan one table.
    Column("booked_at", DateTime(timezone=True), nullable=False),
    Column("kind", Text, nullable=False),
    Column("wallet_id", Text, nullable=False),
    Column("resource_id", Text, nullable=True),
    Column("product", Text, nullable=True),
    Column("gpu_type", Text, nullable=True),
    # (event_position, txn_no) references journal_transactions: checked per statement, with the
    # sum to zero (journal_entries_balanced).
    CheckConstraint("amount_micros <> 0", name="amount_nonzero"),
    CheckConstraint("entry_no >= 0", name="entry_no_nonnegative"),
    Index("ix_journal_entries_account_event_position", "account", "event_position"),
)

account_balances = Table(
    "account_balances",
    metadata,
    Column("account", Text, primary_key=True),
    Column("balance_micros", BigInteger, nullable=False),
    Column("last_position", BigInteger, nullable=False),
    # Shared accounts are not rows every writer would lock: derived on read (migration 0007).
    CheckConstraint("account LIKE 'wallet:%'", name="wallet_only"),
)

rejected_inputs = Table(
    "rejected_inputs",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("subject", Text, nullable=True),
    Column("source", Text, nullable=True),
    Column("event_id", Text, nullable=True),
    Column("event_type", Text, nullable=True),
    Column("wallet_id", Text, nullable=True),
    Column("delivery_count", Integer, nullable=True),
    # The bytes exactly as received, so a replay after the fix sees what the producer sent.
    Column("raw", LargeBinary, nullable=False),
    Index("ix_rejected_inputs_reason_received_at", "reason", "received_at"),
)

APPEND_ONLY_TABLES: Final = ("events", "journal_transactions", "journal_entries")

wallets = Table(
    "wallets",
    metadata,
    Column("wallet_id", Text, primary_key=True),
    Column("status", Text, nullable=False, server_default="active"),
    Column("last_notice", Text, nullable=True),
    Column("holds", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("serverless_admissions", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("next_wakeup_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Bumped by every writer of the wallet (migration 0008): the intake owner's cache checks it.
    Column("version", BigInteger, nullable=False, server_default=text("0")),
    CheckConstraint("status IN ('active', 'low', 'exhausted')", name="status_known"),
    Index("ix_wallets_next_wakeup_at", "next_wakeup_at", postgresql_where=text("next_wakeup_at IS NOT NULL")),
)

rentals = Table(
    "rentals",
    metadata,
    Column("resource_id", Text, primary_key=True),
    Column("wallet_id", Text, nullable=False),
    Column("resource_kind", Text, nullable=False),
    Column("tier", Text, nullable=False),
    Column("gpu_type", Text, nullable=False),
    Column("price_per_hour_micros", BigInteger, nullable=False),
    Column("product", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("last_reading_at", DateTime(timezone=True), nullable=False),
    Column("billable_seconds", BigInteger, nullable=False),
    Column("charged_micros", BigInteger, nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("end_reason", Text, nullable=True),
    Column("stop_seq", Integer, nullable=False, server_default="0"),
    Column("stop_attempts", Integer, nullable=False, server_default="0"),
    Column("stop_issued_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("status IN ('running', 'paused', 'ended')", name="status_known"),
    CheckConstraint("billable_seconds >= 0 AND charged_micros >= 0 AND price_per_hour_micros >= 0", name="nonnegative"),
    Index("ix_rentals_wallet_id_open", "wallet_id", postgresql_where=text("status <> 'ended'")),
)

serverless_endpoints = Table(
    "serverless_endpoints",
    metadata,
    Column("wallet_id", Text, primary_key=True),
    Column("endpoint_id", Text, primary_key=True),
    Column("exact_millimicros_total", BigInteger, nullable=False),
    Column("charged_micros", BigInteger, nullable=False),
    CheckConstraint("charged_micros = exact_millimicros_total / 1000", name="drift_free"),
)

serverless_jobs = Table(
    "serverless_jobs",
    metadata,
    Column("wallet_id", Text, primary_key=True),
    Column("endpoint_id", Text, primary_key=True),
    Column("job_id", Text, primary_key=True),
    Column("event_position", BigInteger, nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("subject", Text, nullable=False),
    Column("msg_id", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
)

Index(
    "uq_rejected_inputs_source_event_id_reason",
    rejected_inputs.c.source,
    rejected_inputs.c.event_id,
    rejected_inputs.c.reason,
    unique=True,
    postgresql_where=text("source IS NOT NULL AND event_id IS NOT NULL"),
)

stripe_payments = Table(
    "stripe_payments",
    metadata,
    Column("payment_intent_id", Text, primary_key=True),
    Column("wallet_id", Text, nullable=False),
    Column("seen", Boolean, nullable=False),
    Column("credited_micros", BigInteger, nullable=False),
    Column("refunded_micros", BigInteger, nullable=False),
    Column("disputes", JSONB, nullable=False),
    Column("pending", JSONB, nullable=False),
    CheckConstraint("credited_micros >= 0 AND refunded_micros >= 0", name="nonnegative"),
    Index("ix_stripe_payments_wallet_id", "wallet_id"),
)

stripe_webhook_events = Table(
    "stripe_webhook_events",
    metadata,
    Column("id", Text, primary_key=True),
    Column("type", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("handled", Boolean, nullable=False),
    Column("payload", JSONB, nullable=False),
    Index("ix_stripe_webhook_events_received_at", "received_at"),
)

intake_owners = Table(
    "intake_owners",
    metadata,
    # One row per durable consumer of BILLING_IN (consumers/nats/partitions.py): its last owner, and
    # whether that owner let go cleanly (every delivery settled) or not.
    Column("stream", Text, primary_key=True),
    Column("durable", Text, primary_key=True),
    Column("owner", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("changed_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("state IN ('held', 'released')", name="state_known"),
)


# ------------------------------------------------------------------------------ column lists

_PG_TYPE_NAMES: Final = {
    BigInteger: "int8",
    SmallInteger: "int2",
    Integer: "int4",
    Text: "text",
    Boolean: "bool",
    LargeBinary: "bytea",
    JSONB: "jsonb",
}


def pg_type_name(column: Column[Any]) -> str:
    """The PostgreSQL name of a column's type, as psycopg's binary COPY wants it (``set_types``)."""
    if isinstance(column.type, DateTime):
        return "timestamptz" if column.type.timezone else "timestamp"
    for sa_type, name in _PG_TYPE_NAMES.items():
        if type(column.type) is sa_type:
            return name
    raise TypeError(f"{column.table.name}.{column.name}: no COPY type for {column.type!r}")


@dataclass(frozen=True, slots=True)
class CopyStatement:
    """A binary COPY into every column of a table, in the table's order: the column list and the
    types come from the table definition above, never from a hand-written list."""

    sql: str
    types: tuple[str, ...]
    columns: tuple[str, ...]


def copy_statement(table: Table) -> CopyStatement:
    columns = tuple(c.name for c in table.columns)
    return CopyStatement(
        sql=f"COPY {table.name} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)",
        types=tuple(pg_type_name(c) for c in table.columns),
        columns=columns,
    )
