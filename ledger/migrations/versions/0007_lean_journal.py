"""A journal that costs what it must: the write path keeps only what reads and invariants need.

Measured by bench/bench_store.py (one run, every object removed in turn; see bench/README.md):

* The two foreign keys (entries -> transactions -> events) were the dearest objects of the write
  path: a row trigger per inserted row, each a query that also locks the parent row FOR KEY SHARE
  (and so writes to the parent's page). They become statement-level checks with transition tables,
  one query per COPY: ``ledger_check_balanced()`` (entries: every transaction sums to zero *and*
  exists) and ``ledger_check_transactions()`` (transactions: their event exists). Deleting a parent
  is refused anyway (append-only triggers), so the references hold as the foreign keys held them.
* Indexes no read needs: ``ix_journal_transactions_booked_at`` and
  ``ix_journal_transactions_wallet_id_booked_at`` (reports read entries by account; the Stripe
  anomalies find their transactions through the Stripe events' own partial index, since a
  transaction is booked at its event's time) and ``ix_events_wallet_id_position`` (only a
  wallet-scoped ``billing verify``, a test and debugging tool, read events by wallet; it scans).
* Shared accounts (``revenue:<product>``, ``stripe:clearing``, ``refunds``, ``disputes``,
  ``adjustments``) were a row of ``account_balances`` that nearly every batch updated, so the first
  writer to book one held it until its commit and concurrent writers (the intake's partitions)
  queued behind it. Their balances are now derived on read (the ``ledger_account_balances`` view,
  the sum of their entries); ``account_balances`` holds wallet balances only, which a check
  constraint enforces. Its fillfactor leaves room on each page so that a balance update is a HOT
  update (no new index entry).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_FK_ENTRIES = "fk_journal_entries_event_position_journal_transactions"
_FK_TRANSACTIONS = "fk_journal_transactions_event_position_events"
_WALLET_ONLY = "ck_account_balances_wallet_only"
_BALANCES_FILLFACTOR = 50

_CHECK_BALANCED_0001 = """
CREATE OR REPLACE FUNCTION ledger_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
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

# One query for the balance and the reference: the transition table is read once per statement.
_CHECK_BALANCED_0007 = """
CREATE OR REPLACE FUNCTION ledger_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  bad record;
BEGIN
  SELECT * INTO bad
    FROM (SELECT n.event_position, n.txn_no, n.total,
                 NOT EXISTS (SELECT 1 FROM journal_transactions t
                              WHERE t.event_position = n.event_position AND t.txn_no = n.txn_no) AS orphan
            FROM (SELECT event_position, txn_no, sum(amount_micros) AS total
                    FROM new_entries GROUP BY event_position, txn_no) AS n) AS x
   WHERE x.total <> 0 OR x.orphan
   LIMIT 1;
  IF FOUND AND bad.total <> 0 THEN
    RAISE EXCEPTION 'journal transaction (%, %) does not balance: its entries sum to %',
      bad.event_position, bad.txn_no, bad.total
      USING ERRCODE = 'check_violation';
  END IF;
  IF FOUND THEN
    RAISE EXCEPTION 'journal entries of (%, %): no such journal transaction',
      bad.event_position, bad.txn_no
      USING ERRCODE = 'foreign_key_violation';
  END IF;
  RETURN NULL;
END $$;
"""

_CHECK_TRANSACTIONS = """
CREATE FUNCTION ledger_check_transactions() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  bad record;
BEGIN
  SELECT t.event_position, t.txn_no INTO bad
    FROM new_transactions t
   WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.position = t.event_position)
   LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'journal transaction (%, %): no event at position %',
      bad.event_position, bad.txn_no, bad.event_position
      USING ERRCODE = 'foreign_key_violation';
  END IF;
  RETURN NULL;
END $$;
"""


def _references_checked_by_statement() -> None:
    op.drop_constraint(op.f(_FK_ENTRIES), "journal_entries", type_="foreignkey")
    op.drop_constraint(op.f(_FK_TRANSACTIONS), "journal_transactions", type_="foreignkey")
    op.execute(_CHECK_BALANCED_0007)
    op.execute(_CHECK_TRANSACTIONS)
    op.execute(
        "CREATE TRIGGER journal_transactions_checked AFTER INSERT ON journal_transactions "
        "REFERENCING NEW TABLE AS new_transactions FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_transactions()"
    )
    op.execute("REVOKE EXECUTE ON FUNCTION ledger_check_transactions() FROM PUBLIC")


def _unread_indexes_dropped() -> None:
    op.drop_index("ix_journal_transactions_booked_at", table_name="journal_transactions")
    op.drop_index("ix_journal_transactions_wallet_id_booked_at", table_name="journal_transactions")
    op.drop_index("ix_events_wallet_id_position", table_name="events")


def _wallet_balances_only() -> None:
    op.execute("DELETE FROM account_balances WHERE account NOT LIKE 'wallet:%'")
    op.create_check_constraint(op.f(_WALLET_ONLY), "account_balances", sa.text("account LIKE 'wallet:%'"))
    op.execute(f"ALTER TABLE account_balances SET (fillfactor = {_BALANCES_FILLFACTOR})")


def upgrade() -> None:
    _references_checked_by_statement()
    _unread_indexes_dropped()
    _wallet_balances_only()


def downgrade() -> None:
    op.execute("ALTER TABLE account_balances RESET (fillfactor)")
    op.drop_constraint(op.f(_WALLET_ONLY), "account_balances", type_="check")
    op.execute(
        "INSERT INTO account_balances (account, balance_micros, last_position)"
        " SELECT account, sum(amount_micros), max(event_position) FROM journal_entries"
        " WHERE account NOT LIKE 'wallet:%' GROUP BY account"
    )
    op.create_index("ix_events_wallet_id_position", "events", ["wallet_id", "position"])
    op.create_index("ix_journal_transactions_wallet_id_booked_at", "journal_transactions", ["wallet_id", "booked_at"])
    op.create_index("ix_journal_transactions_booked_at", "journal_transactions", ["booked_at"])
    op.execute("DROP TRIGGER journal_transactions_checked ON journal_transactions")
    op.execute("DROP FUNCTION ledger_check_transactions()")
    op.execute(_CHECK_BALANCED_0001)
    op.create_foreign_key(op.f(_FK_TRANSACTIONS), "journal_transactions", "events", ["event_position"], ["position"])
    op.create_foreign_key(
        op.f(_FK_ENTRIES),
        "journal_entries",
        "journal_transactions",
        ["event_position", "txn_no"],
        ["event_position", "txn_no"],
    )
