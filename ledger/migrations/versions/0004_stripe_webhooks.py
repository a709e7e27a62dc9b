"""Stripe webhook events as received: each recorded once by Stripe's event id, with its effect.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

APP_ROLE = "billing_app"


def upgrade() -> None:
    op.create_table(
        "stripe_webhook_events",
        # Stripe's event id (evt_...): a redelivery of the same event finds its row and does nothing.
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        # True when the event's type is one the service acts on and its facts went into the ledger
        # (in the same transaction as this row); false when it is only recorded.
        sa.Column("handled", sa.Boolean, nullable=False),
        # The event exactly as Stripe signed it.
        sa.Column("payload", postgresql.JSONB, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stripe_webhook_events"),
    )
    op.create_index("ix_stripe_webhook_events_received_at", "stripe_webhook_events", ["received_at"])
    op.execute("REVOKE ALL ON stripe_webhook_events FROM PUBLIC")
    # A record is evidence of what Stripe sent: the service may add one, never change or remove it.
    op.execute(f"GRANT SELECT, INSERT ON stripe_webhook_events TO {APP_ROLE}")


def downgrade() -> None:
    op.drop_table("stripe_webhook_events")
