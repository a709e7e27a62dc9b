"""Migration 0007 (the lean journal): the references and zero sums the database still checks, per
statement; shared accounts derived on read, not booked; the migration's round trip; the column
lists that come from ledger.schema; and the migrations' step functions within the 70-line limit."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, pool, text

from ledger import schema
from ledger.db import unit_of_work
from ledger.journal import revenue_account, wallet_account
from ledger.migrate import MIGRATIONS_DIR, alembic_config, upgrade
from ledger.store import append_new, apply_balances
from tests.conftest import migrated_database
from tests.integration.test_ledger_store import charge_item, credit_item

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
MAX_FUNCTION_LINES = 70


def _append(engine: Engine, items: list) -> dict:
    with unit_of_work(engine) as uow:
        result = append_new(uow.pg, items, received_at=NOW)
        apply_balances(uow.pg, result.balance_deltas)
        uow.commit()
    return result.positions


def test_a_transaction_without_its_event_is_refused(app_engine: Engine) -> None:
    with app_engine.connect() as conn, pytest.raises(Exception, match="no event at position") as err:
        conn.execute(
            text(
                "INSERT INTO journal_transactions (event_position, txn_no, kind, wallet_id, booked_at)"
                " VALUES (-5, 0, 'forged', 'w', now())"
            )
        )
    assert isinstance(err.value.orig, psycopg.errors.ForeignKeyViolation)  # type: ignore[attr-defined]


def test_entries_without_their_transaction_are_refused(app_engine: Engine, unique: str) -> None:
    w = f"o{unique}"[:64]
    (pos,) = _append(app_engine, [credit_item(w, 1_000_000)]).values()
    with app_engine.connect() as conn, pytest.raises(Exception, match="no such journal transaction") as err:
        conn.execute(
            text(
                "INSERT INTO journal_entries (event_position, txn_no, entry_no, account, amount_micros,"
                " booked_at, kind, wallet_id)"
                " VALUES (:p, 5, 0, :a, 100, now(), 'forged', 'w'),"
                " (:p, 5, 1, 'adjustments', -100, now(), 'forged', 'w')"
            ),
            {"p": pos, "a": wallet_account(w)},
        )
    assert isinstance(err.value.orig, psycopg.errors.ForeignKeyViolation)  # type: ignore[attr-defined]


def test_shared_accounts_are_derived_on_read_not_booked(app_engine: Engine, unique: str) -> None:
    """A charge books the wallet's balance row; revenue is the sum of its entries (the view), never
    a row of account_balances, which the database refuses."""
    w = f"d{unique}"[:64]
    _append(app_engine, [credit_item(w, 9_000_000), charge_item(w, f"p{unique}"[:60], 60, 4_000)])
    revenue = revenue_account("pod_on_demand")
    with app_engine.connect() as conn:
        booked = dict(conn.execute(text("SELECT account, balance_micros FROM account_balances")).all())
        derived = conn.execute(
            text("SELECT balance_micros FROM ledger_account_balances WHERE account = :a"), {"a": revenue}
        ).scalar_one()
        summed = conn.execute(
            text("SELECT sum(amount_micros) FROM journal_entries WHERE account = :a"), {"a": revenue}
        ).scalar_one()
    assert booked[wallet_account(w)] == 9_000_000 - 4_000
    assert all(a.startswith("wallet:") for a in booked)
    assert derived == summed >= 4_000
    with app_engine.connect() as conn, pytest.raises(Exception, match="ck_account_balances_wallet_only"):
        conn.execute(text("INSERT INTO account_balances VALUES ('revenue:pod_spot', 1, 1)"))


@pytest.fixture
def scratch_url(pg_server: tuple[str, str]) -> Iterator[str]:
    with migrated_database(pg_server[0], "lean") as url:
        yield url


def _downgrade(url: str, revision: str) -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    engine.dispose()


def test_0007_downgrades_and_upgrades_again_with_the_shared_balances(scratch_url: str) -> None:
    """Down to 0006 the shared accounts come back as rows (from the sums of their entries), the
    foreign keys and indexes too; up again, the schema equals ledger.schema."""
    from ledger.db import make_engine

    app = make_engine(scratch_url, role=schema.APP_ROLE)
    _append(app, [credit_item("wdown", 5_000_000), charge_item("wdown", "pdown", 60, 7_000)])
    app.dispose()
    _downgrade(scratch_url, "0006")
    owner = create_engine(scratch_url, poolclass=pool.NullPool)
    with owner.connect() as conn:
        rows = dict(conn.execute(text("SELECT account, balance_micros FROM account_balances")).all())
        fks = conn.execute(text("SELECT count(*) FROM pg_constraint WHERE contype = 'f'")).scalar_one()
    assert rows == {
        wallet_account("wdown"): 5_000_000 - 7_000,
        revenue_account("pod_on_demand"): 7_000,
        "adjustments": -5_000_000,
    }
    assert fks == 2
    upgrade(scratch_url)
    with owner.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
        rows = dict(conn.execute(text("SELECT account, balance_micros FROM account_balances")).all())
    owner.dispose()
    assert diff == []
    assert rows == {wallet_account("wdown"): 5_000_000 - 7_000}


def _seq_scans_of_a_small_append_after_a_large_one(url: str) -> dict[str, int]:
    """On one connection: a large first append (plpgsql plans the checks then, with that statement's
    row count, and keeps the plan for the session), then a one-event append; the sequential scans
    of the journal's parents during the small one (this transaction's own counters)."""
    owner = create_engine(url, poolclass=pool.NullPool)
    big = [charge_item(f"wseq{i:05d}", f"pseq{i:05d}", 60, 7_000) for i in range(3_000)]
    with owner.connect() as conn:
        pg = conn.connection.driver_connection
        assert isinstance(pg, psycopg.Connection)
        append_new(pg, big, received_at=NOW)
        conn.commit()
        append_new(pg, [credit_item("wseq-small", 5_000_000)], received_at=NOW)
        rows = pg.execute(
            "SELECT relname, seq_scan FROM pg_stat_xact_user_tables WHERE relname IN ('events', 'journal_transactions')"
        ).fetchall()
        conn.rollback()
    owner.dispose()
    return {str(name): int(n) for name, n in rows}


def test_the_reference_checks_probe_by_index_whatever_the_first_batch_was(scratch_url: str) -> None:
    """Migration 0009: after a large first batch, a small batch's reference checks probe the primary
    keys instead of scanning the journal (its cost follows the batch, not the journal's size)."""
    assert _seq_scans_of_a_small_append_after_a_large_one(scratch_url) == {"events": 0, "journal_transactions": 0}


def test_the_checks_before_0009_scan_the_whole_journal(scratch_url: str) -> None:
    """The same probe on 0008's functions does scan: so the test above can fail."""
    _downgrade(scratch_url, "0008")
    scans = _seq_scans_of_a_small_append_after_a_large_one(scratch_url)
    assert scans["journal_transactions"] > 0


def test_the_store_copies_every_column_of_its_tables_in_order() -> None:
    for table in (schema.events, schema.journal_transactions, schema.journal_entries):
        statement = schema.copy_statement(table)
        assert statement.columns == tuple(c.name for c in table.columns)
        assert len(statement.types) == len(statement.columns)
        assert statement.sql.startswith(f"COPY {table.name} (")


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.name}:{node.name} ({(node.end_lineno or node.lineno) - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_migration_function_is_over_70_lines() -> None:
    long = [f for path in sorted((MIGRATIONS_DIR / "versions").glob("0*.py")) for f in _long_functions(path)]
    assert long == []
