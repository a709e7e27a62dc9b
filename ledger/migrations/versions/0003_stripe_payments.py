"""Stripe PaymentIntents of each wallet: credited, refunded, disputes, facts pending their payment.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

APP_ROLE = "billing_app"


def upgrade() -> None:
    op.create_table(
        "stripe_payments",
        sa.Column("payment_intent_id", sa.Text, nullable=False),
        sa.Column("wallet_id", sa.Text, nullable=False),
        sa.Column("seen", sa.Boolean, nullable=False),
        sa.Column("credited_micros", sa.BigInteger, nullable=False),
        sa.Column("refunded_micros", sa.BigInteger, nullable=False),
        sa.Column("disputes", postgresql.JSONB, nullable=False),
        sa.Column("pending", postgresql.JSONB, nullable=False),
        sa.PrimaryKeyConstraint("payment_intent_id", name="pk_stripe_payments"),
        sa.CheckConstraint("credited_micros >= 0 AND refunded_micros >= 0", name="ck_stripe_payments_nonnegative"),
    )
    op.create_index("ix_stripe_payments_wallet_id", "stripe_payments", ["wallet_id"])
    op.execute("REVOKE ALL ON stripe_payments FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON stripe_payments TO {APP_ROLE}")


def downgrade() -> None:
    op.drop_table("stripe_payments")
