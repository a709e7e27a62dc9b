"""The statement-level reference checks of 0007 look each reference up by its index, always.

0007 replaced the journal's foreign keys by one query per COPY over the transition table. Those
queries are plpgsql's: planned once per connection and the plan cached, with the transition table's
row count of that first statement baked in. After a first large batch (the intake's usual case) the
cached plan of ``NOT EXISTS (... journal_transactions ...)`` was a hash anti join over a sequential
scan of the *whole* table, for every later statement of that connection: a batch's check cost grew
with the journal, not with the batch (measured with ``bench/bench_writer.py``'s small-batch probe on
100k events: a batch of 5 events took 31.5 ms at the median, 26 of them in this check; 6.7 ms after
this migration).

``OFFSET 0`` keeps each ``NOT EXISTS`` a correlated subquery, which PostgreSQL does not pull up into
a join: one primary-key probe per row of the transition table, whatever the first batch was. Same
checks, same errors.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _check_balanced(probe_limit: str) -> str:
    return f"""
CREATE OR REPLACE FUNCTION ledger_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  bad record;
BEGIN
  SELECT * INTO bad
    FROM (SELECT n.event_position, n.txn_no, n.total,
                 NOT EXISTS (SELECT 1 FROM journal_transactions t
                              WHERE t.event_position = n.event_position AND t.txn_no = n.txn_no{probe_limit}) AS orphan
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


def _check_transactions(probe_limit: str) -> str:
    return f"""
CREATE OR REPLACE FUNCTION ledger_check_transactions() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  bad record;
BEGIN
  SELECT t.event_position, t.txn_no INTO bad
    FROM new_transactions t
   WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.position = t.event_position{probe_limit})
   LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'journal transaction (%, %): no event at position %',
      bad.event_position, bad.txn_no, bad.event_position
      USING ERRCODE = 'foreign_key_violation';
  END IF;
  RETURN NULL;
END $$;
"""


def upgrade() -> None:
    # CREATE OR REPLACE keeps the functions' owner and grants (EXECUTE revoked from PUBLIC in 0001/0007).
    op.execute(_check_balanced(" OFFSET 0"))
    op.execute(_check_transactions(" OFFSET 0"))


def downgrade() -> None:
    op.execute(_check_balanced(""))
    op.execute(_check_transactions(""))
