"""Who last owned each durable consumer of billing.in, and whether it let go cleanly.

Written by the intake's ownership (consumers/nats/partitions.py) on the connection holding the consumer's
advisory lock: 'held' by an acquisition token before the first pull, 'released' after a stop that
settled every delivery. A new owner that does not find 'released' lets the previous owner's
un-acked deliveries expire before it pulls anything newer (a wallet's events stay in stream order).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

APP_ROLE = "billing_app"


def upgrade() -> None:
    op.create_table(
        "intake_owners",
        # The consumer: the BILLING_IN stream of a namespace and one of its durables.
        sa.Column("stream", sa.Text, nullable=False),
        sa.Column("durable", sa.Text, nullable=False),
        # <host>:<pid>/<random>: one acquisition of the consumer's lock.
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("stream", "durable", name="pk_intake_owners"),
        sa.CheckConstraint("state IN ('held', 'released')", name="ck_intake_owners_state_known"),
    )
    op.execute("REVOKE ALL ON intake_owners FROM PUBLIC")
    # Operational state, overwritten at every change of owner: no history to protect.
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON intake_owners TO {APP_ROLE}")


def downgrade() -> None:
    op.drop_table("intake_owners")
