"""Ledger core: event log, double-entry journal, balances, rejected inputs; append-only enforced.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APP_ROLE = "billing_app"
APPEND_ONLY = ("events", "journal_transactions", "journal_entries")


def _service_role() -> None:
    """The role the service runs as."""
    # The service role. Roles are cluster-wide: create it if missing (needs CREATEROLE; on a managed
    # server where the migrator lacks it, an operator creates the role once, see README).
    op.execute(
        f"""
        DO $$
        BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
            BEGIN
              CREATE ROLE {APP_ROLE} NOLOGIN;
            EXCEPTION
              WHEN duplicate_object OR unique_violation THEN NULL;  -- another migrator won the race
              WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'role {APP_ROLE} does not exist and % may not create it', current_user
                  USING HINT = 'as a superuser: CREATE ROLE {APP_ROLE} NOLOGIN; '
                               'GRANT {APP_ROLE} TO <service login>;';
            END;
          END IF;
        END $$;
        """
    )


def _event_log() -> None:
    """The log: every accepted event, with its position."""
    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("wallet_id", sa.Text, nullable=False),
        sa.Column("resource_id", sa.Text, nullable=True),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", postgresql.JSONB, nullable=False),
        sa.PrimaryKeyConstraint("position", name="pk_events"),
        sa.UniqueConstraint("source", "event_id", name="uq_events_source_event_id"),
    )
    op.create_index("ix_events_wallet_id_position", "events", ["wallet_id", "position"])


def _journal() -> None:
    """The double-entry journal: transactions and their entries."""
    op.create_table(
        "journal_transactions",
        sa.Column("event_position", sa.BigInteger, nullable=False),
        sa.Column("txn_no", sa.SmallInteger, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("wallet_id", sa.Text, nullable=False),
        sa.Column("resource_id", sa.Text, nullable=True),
        sa.Column("product", sa.Text, nullable=True),
        sa.Column("gpu_type", sa.Text, nullable=True),
        sa.Column("memo", sa.Text, nullable=False, server_default=""),
        sa.Column("booked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_position", "txn_no", name="pk_journal_transactions"),
        sa.ForeignKeyConstraint(
            ["event_position"], ["events.position"], name="fk_journal_transactions_event_position_events"
        ),
        sa.CheckConstraint("txn_no >= 0", name="ck_journal_transactions_txn_no_nonnegative"),
    )
    op.create_index("ix_journal_transactions_wallet_id_booked_at", "journal_transactions", ["wallet_id", "booked_at"])
    op.create_index("ix_journal_transactions_booked_at", "journal_transactions", ["booked_at"])

    op.create_table(
        "journal_entries",
        sa.Column("event_position", sa.BigInteger, nullable=False),
        sa.Column("txn_no", sa.SmallInteger, nullable=False),
        sa.Column("entry_no", sa.SmallInteger, nullable=False),
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("amount_micros", sa.BigInteger, nullable=False),
        # Copies of the transaction's attributes, written by the same statement: reports over
        # millions of entries scan one table instead of joining two.
        sa.Column("booked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("wallet_id", sa.Text, nullable=False),
        sa.Column("resource_id", sa.Text, nullable=True),
        sa.Column("product", sa.Text, nullable=True),
        sa.Column("gpu_type", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("event_position", "txn_no", "entry_no", name="pk_journal_entries"),
        sa.ForeignKeyConstraint(
            ["event_position", "txn_no"],
            ["journal_transactions.event_position", "journal_transactions.txn_no"],
            name="fk_journal_entries_event_position_journal_transactions",
        ),
        sa.CheckConstraint("amount_micros <> 0", name="ck_journal_entries_amount_nonzero"),
        sa.CheckConstraint("entry_no >= 0", name="ck_journal_entries_entry_no_nonnegative"),
    )
    op.create_index("ix_journal_entries_account_event_position", "journal_entries", ["account", "event_position"])


def _balances_and_rejections() -> None:
    """Balances (a projection of the journal) and refused inputs."""
    op.create_table(
        "account_balances",
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("balance_micros", sa.BigInteger, nullable=False),
        sa.Column("last_position", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("account", name="pk_account_balances"),
    )

    op.create_table(
        "rejected_inputs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=True),
        sa.Column("source", sa.Text, nullable=True),
        sa.Column("event_id", sa.Text, nullable=True),
        sa.Column("event_type", sa.Text, nullable=True),
        sa.Column("wallet_id", sa.Text, nullable=True),
        sa.Column("delivery_count", sa.Integer, nullable=True),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rejected_inputs"),
    )
    op.create_index("ix_rejected_inputs_reason_received_at", "rejected_inputs", ["reason", "received_at"])


def _append_only() -> None:
    """Triggers that refuse UPDATE, DELETE and TRUNCATE of the log and the journal."""
    # Append-only, enforced by the database: row triggers refuse UPDATE and DELETE, a statement
    # trigger refuses TRUNCATE. They hold even for the owner (who could drop them: only the owner
    # can, and the service never runs as the owner).
    op.execute(
        """
        CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'correct the ledger with a new event (wallet.adjusted), never by editing it';
        END $$;
        """
    )
    for table in APPEND_ONLY:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change()"
        )


def _double_entry() -> None:
    """The statement trigger that checks each transaction sums to zero."""
    # Double entry, enforced by the database: the entries each statement inserts must sum to zero
    # per transaction. A statement trigger with a transition table checks a whole batch in one
    # query (a row trigger would cost a query per entry). Since every statement's part of a
    # transaction balances, so does the whole transaction, however many statements wrote it.
    op.execute(
        """
        CREATE FUNCTION ledger_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
          bad record;
        BEGIN
          SELECT event_position, txn_no, sum(amount_micros) AS total INTO bad
            FROM new_entries GROUP BY event_position, txn_no
            HAVING sum(amount_micros) <> 0 LIMIT 1;
          IF FOUND THEN
            RAISE EXCEPTION 'journal transaction (%, %) does not balance: its entries sum to %',
              bad.event_position, bad.txn_no, bad.total
              USING ERRCODE = 'check_violation';
          END IF;
          RETURN NULL;
        END $$;
        """
    )
    op.execute(
        "CREATE TRIGGER journal_entries_balanced AFTER INSERT ON journal_entries "
        "REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_balanced()"
    )


def _privileges() -> None:
    """What the service role may do: read and append, never rewrite."""
    # Privileges: the service role may read and append, never rewrite.
    tables = (*APPEND_ONLY, "account_balances", "rejected_inputs")
    for table in tables:
        op.execute(f"REVOKE ALL ON {table} FROM PUBLIC")
    for table in APPEND_ONLY:
        op.execute(f"GRANT SELECT, INSERT ON {table} TO {APP_ROLE}")
    op.execute(f"GRANT SELECT, INSERT ON rejected_inputs TO {APP_ROLE}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON account_balances TO {APP_ROLE}")
    op.execute(f"GRANT USAGE ON SEQUENCE events_position_seq, rejected_inputs_id_seq TO {APP_ROLE}")
    # `billing up` checks the revision as the service's login.
    op.execute(f"GRANT SELECT ON alembic_version TO {APP_ROLE}")
    op.execute("REVOKE EXECUTE ON FUNCTION ledger_refuse_change(), ledger_check_balanced() FROM PUBLIC")


def upgrade() -> None:
    _service_role()
    _event_log()
    _journal()
    _balances_and_rejections()
    _append_only()
    _double_entry()
    _privileges()


def downgrade() -> None:
    # Dropping the ledger is an operator's decision, never a migration's.
    raise RuntimeError("the ledger core cannot be downgraded")
