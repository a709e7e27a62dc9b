"""Finance views for reports and BI, and the read-only role that may read them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

READONLY_ROLE = "billing_readonly"
APP_ROLE = "billing_app"

VIEWS = {
    # One row per journal entry with its transaction's attributes: what every report reads.
    "ledger_entries": """
        SELECT event_position, txn_no, entry_no, account, amount_micros,
               kind, wallet_id, resource_id, product, gpu_type, booked_at
          FROM journal_entries
    """,
    "ledger_account_balances": """
        SELECT account, sum(amount_micros)::bigint AS balance_micros, count(*) AS entries
          FROM journal_entries GROUP BY account
    """,
    "ledger_debts": """
        SELECT substr(account, 8) AS wallet_id, balance_micros
          FROM account_balances WHERE account LIKE 'wallet:%' AND balance_micros < 0
    """,
    "ledger_revenue_daily": """
        SELECT (booked_at AT TIME ZONE 'UTC')::date AS day, product, gpu_type,
               sum(amount_micros)::bigint AS revenue_micros
          FROM journal_entries
         WHERE account LIKE 'revenue:%'
         GROUP BY 1, 2, 3
    """,
}


def upgrade() -> None:
    # The Stripe reconciliation reads the Stripe facts of a period: a small partial index.
    op.create_index(
        "ix_events_stripe_event_time",
        "events",
        ["event_time"],
        postgresql_where=sa.text("source = 'stripe'"),
    )
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")
    op.execute(
        f"""
        DO $$
        BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
            BEGIN
              CREATE ROLE {READONLY_ROLE} NOLOGIN;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
            END;
          END IF;
        END $$;
        """
    )
    for name in VIEWS:
        op.execute(f"GRANT SELECT ON {name} TO {READONLY_ROLE}, {APP_ROLE}")
    for table in ("events", "journal_transactions", "journal_entries", "account_balances", "rejected_inputs"):
        op.execute(f"GRANT SELECT ON {table} TO {READONLY_ROLE}")


def downgrade() -> None:
    op.drop_index("ix_events_stripe_event_time", table_name="events")
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
