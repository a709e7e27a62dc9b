"""A version on every wallet row, bumped by every writer of the wallet (the intake's cache).

The intake's partition owner keeps its wallets' state in memory (projections.wallet_store.WalletCache).
Every other writer of a wallet (scheduler ticks, admission holds, Stripe facts, adjustments, a rebuild)
bumps ``version`` when it locks the row; the owner locks its batch's rows, reads only their versions
and reloads the wallets whose version is not the one it holds. Its own write-through bumps it too.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("wallets", sa.Column("version", sa.BigInteger, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    op.drop_column("wallets", "version")
