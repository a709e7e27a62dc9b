"""Inline projections (wallets, rentals, serverless endpoints and jobs) and the outbox.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

APP_ROLE = "billing_app"


def _wallets_and_rentals() -> None:
    """Wallets and rentals: inline projections of the log."""
    op.create_table(
        "wallets",
        sa.Column("wallet_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="active"),
        sa.Column("last_notice", sa.Text, nullable=True),
        # Admission holds and serverless admission instants: short-lived, not facts of the log.
        sa.Column("holds", postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("serverless_admissions", postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        # When the scheduler must look at this wallet next (predicted zero, low, re-issue, expiry).
        sa.Column("next_wakeup_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("wallet_id", name="pk_wallets"),
        sa.CheckConstraint("status IN ('active', 'low', 'exhausted')", name="ck_wallets_status_known"),
    )
    op.create_index(
        "ix_wallets_next_wakeup_at",
        "wallets",
        ["next_wakeup_at"],
        postgresql_where=sa.text("next_wakeup_at IS NOT NULL"),
    )

    op.create_table(
        "rentals",
        sa.Column("resource_id", sa.Text, nullable=False),
        sa.Column("wallet_id", sa.Text, nullable=False),
        sa.Column("resource_kind", sa.Text, nullable=False),
        sa.Column("tier", sa.Text, nullable=False),
        sa.Column("gpu_type", sa.Text, nullable=False),
        sa.Column("price_per_hour_micros", sa.BigInteger, nullable=False),
        sa.Column("product", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_reading_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("billable_seconds", sa.BigInteger, nullable=False),
        sa.Column("charged_micros", sa.BigInteger, nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.Text, nullable=True),
        sa.Column("stop_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("stop_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("stop_issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("resource_id", name="pk_rentals"),
        sa.CheckConstraint("status IN ('running', 'paused', 'ended')", name="ck_rentals_status_known"),
        sa.CheckConstraint(
            "billable_seconds >= 0 AND charged_micros >= 0 AND price_per_hour_micros >= 0",
            name="ck_rentals_nonnegative",
        ),
    )
    op.create_index(
        "ix_rentals_wallet_id_open",
        "rentals",
        ["wallet_id"],
        postgresql_where=sa.text("status <> 'ended'"),
    )


def _serverless() -> None:
    """Serverless endpoints and the jobs already charged."""
    op.create_table(
        "serverless_endpoints",
        sa.Column("wallet_id", sa.Text, nullable=False),
        sa.Column("endpoint_id", sa.Text, nullable=False),
        # Thousandths of a micro: the exact cost so far, sum(computeMs * pricePerSecondMicros).
        sa.Column("exact_millimicros_total", sa.BigInteger, nullable=False),
        sa.Column("charged_micros", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("wallet_id", "endpoint_id", name="pk_serverless_endpoints"),
        sa.CheckConstraint(
            "charged_micros = exact_millimicros_total / 1000", name="ck_serverless_endpoints_drift_free"
        ),
    )

    op.create_table(
        "serverless_jobs",
        sa.Column("wallet_id", sa.Text, nullable=False),
        sa.Column("endpoint_id", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("event_position", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("wallet_id", "endpoint_id", "job_id", name="pk_serverless_jobs"),
    )


def _outbox_and_rejections() -> None:
    """The outbox, and one rejected input per (source, id, reason)."""
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("msg_id", sa.Text, nullable=False),
        sa.Column("payload", postgresql.JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
    )
    op.create_index("ix_outbox_unpublished", "outbox", ["id"], postgresql_where=sa.text("published_at IS NULL"))

    # A rejected input is recorded once per (source, id, reason): a redelivery adds nothing.
    op.create_index(
        "uq_rejected_inputs_source_event_id_reason",
        "rejected_inputs",
        ["source", "event_id", "reason"],
        unique=True,
        postgresql_where=sa.text("source IS NOT NULL AND event_id IS NOT NULL"),
    )


def _privileges() -> None:
    """What the service role may do with the projections and the outbox."""
    for table in ("wallets", "rentals", "serverless_endpoints"):
        op.execute(f"REVOKE ALL ON {table} FROM PUBLIC")
        op.execute(f"GRANT SELECT, INSERT, UPDATE ON {table} TO {APP_ROLE}")
    op.execute("REVOKE ALL ON serverless_jobs FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT ON serverless_jobs TO {APP_ROLE}")
    op.execute("REVOKE ALL ON outbox FROM PUBLIC")
    # DELETE: old published rows may be pruned; the log and the journal keep the facts.
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO {APP_ROLE}")
    op.execute(f"GRANT USAGE ON SEQUENCE outbox_id_seq TO {APP_ROLE}")


def upgrade() -> None:
    _wallets_and_rentals()
    _serverless()
    _outbox_and_rejections()
    _privileges()


def downgrade() -> None:
    for index in ("uq_rejected_inputs_source_event_id_reason",):
        op.drop_index(index, table_name="rejected_inputs")
    for table in ("outbox", "serverless_jobs", "serverless_endpoints", "rentals", "wallets"):
        op.drop_table(table)
