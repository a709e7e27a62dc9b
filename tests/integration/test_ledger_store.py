"""The append-only store against the real PostgreSQL of the test run, as the service role."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, select, text

from ledger import schema
from ledger.db import unit_of_work
from ledger.invariants import InvariantViolation
from ledger.journal import ADJUSTMENTS, JournalTxn, Posting, revenue_account, transfer, wallet_account
from ledger.migrate import upgrade
from ledger.store import AppendItem, EventRecord, append_new, apply_balances
from tests.factories import adjusted, metered

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 28, 10, 0, 5, tzinfo=UTC)


def credit_item(wallet_id: str, amount_micros: int, **kw: object) -> AppendItem:
    ev = adjusted(wallet_id, amount_micros, **kw)  # type: ignore[arg-type]
    return AppendItem(
        EventRecord.from_event(ev),
        (
            transfer(
                "adjustment",
                wallet_id=wallet_id,
                debit=ADJUSTMENTS,
                credit=wallet_account(wallet_id),
                amount_micros=amount_micros,
            ),
        ),
    )


def charge_item(wallet_id: str, resource_id: str, seconds: int, cost_micros: int) -> AppendItem:
    ev = metered(wallet_id, resource_id, seconds)
    return AppendItem(
        EventRecord.from_event(ev),
        (
            transfer(
                "charge",
                wallet_id=wallet_id,
                debit=wallet_account(wallet_id),
                credit=revenue_account("pod_on_demand"),
                amount_micros=cost_micros,
                resource_id=resource_id,
                product="pod_on_demand",
                gpu_type="RTX 4090",
            ),
        ),
    )


def balance(engine: Engine, account: str) -> int | None:
    with engine.connect() as conn:
        return conn.execute(
            select(schema.account_balances.c.balance_micros).where(schema.account_balances.c.account == account)
        ).scalar_one_or_none()


def entries_sum(engine: Engine, account: str | None = None) -> int:
    q = "SELECT coalesce(sum(amount_micros), 0) FROM journal_entries"
    with engine.connect() as conn:
        if account is None:
            return int(conn.execute(text(q)).scalar_one())
        return int(conn.execute(text(q + " WHERE account = :a"), {"a": account}).scalar_one())


def append(engine: Engine, items: list[AppendItem]):
    with unit_of_work(engine) as uow:
        result = append_new(uow.pg, items, received_at=NOW)
        apply_balances(uow.pg, result.balance_deltas)
        uow.commit()
    return result


def test_append_new_copies_events_journal_and_deltas(app_engine: Engine, unique: str) -> None:
    """The COPY path writes events with their payload as a JSON object, the journal in batch order,
    and balance deltas that apply_balances books."""
    w = f"n{unique}"[:64]
    items = [credit_item(w, 10_000_000), charge_item(w, "p1", 60, 8_500), charge_item(w, "p1", 120, 8_500)]
    with unit_of_work(app_engine) as uow:
        result = append_new(uow.pg, items, received_at=NOW)
        apply_balances(uow.pg, result.balance_deltas)
        uow.commit()
    assert result.duplicates == ()
    positions = [result.positions[i.record.key] for i in items]
    assert positions == sorted(positions)  # batch order
    assert result.balance_deltas[wallet_account(w)] == (10_000_000 - 17_000, positions[-1])
    assert sum(d for d, _ in result.balance_deltas.values()) == 0
    assert balance(app_engine, wallet_account(w)) == 10_000_000 - 17_000
    assert entries_sum(app_engine, wallet_account(w)) == 10_000_000 - 17_000
    with app_engine.connect() as conn:
        kinds = conn.execute(
            text("SELECT jsonb_typeof(payload), payload->>'id' FROM events WHERE wallet_id = :w ORDER BY position"),
            {"w": w},
        ).all()
        n_txns = conn.execute(
            text("SELECT count(*) FROM journal_transactions WHERE wallet_id = :w"), {"w": w}
        ).scalar_one()
    assert [k for k, _ in kinds] == ["object"] * 3
    assert [i for _, i in kinds] == [i.record.event_id for i in items]
    assert n_txns == 3


def test_append_new_refuses_an_event_already_in_the_log_and_writes_nothing(app_engine: Engine, unique: str) -> None:
    """Its precondition broken (the event is in the log), the unique index fails the COPY: the
    transaction writes nothing, not even the batch's other, new events."""
    w = f"m{unique}"[:64]
    old = credit_item(w, 5_000_000)
    append(app_engine, [old])

    def append_in_one_transaction(items: list[AppendItem]) -> None:
        with unit_of_work(app_engine) as uow:
            append_new(uow.pg, items, received_at=NOW)
            uow.commit()

    with pytest.raises(psycopg.errors.UniqueViolation):
        append_in_one_transaction([credit_item(w, 1_000_000, id_=f"new{unique}"), old])
    with pytest.raises(InvariantViolation, match="repeats"):
        append_in_one_transaction([credit_item(w, 1, id_=f"r{unique}"), credit_item(w, 1, id_=f"r{unique}")])
    assert balance(app_engine, wallet_account(w)) == 5_000_000
    with app_engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM events WHERE wallet_id = :w"), {"w": w}).scalar_one()
    assert n == 1


def test_rolled_back_unit_of_work_keeps_nothing(app_engine: Engine, unique: str) -> None:
    w = f"w{unique}"[:64]
    with unit_of_work(app_engine) as uow:
        result = append_new(uow.pg, [credit_item(w, 7_000_000)], received_at=NOW)
        apply_balances(uow.pg, result.balance_deltas)
        # no commit: the unit of work rolls back by default
    assert balance(app_engine, wallet_account(w)) is None


@pytest.mark.parametrize("table", schema.APPEND_ONLY_TABLES)
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {t} SET {c} = {c}",
        "DELETE FROM {t}",
        "TRUNCATE {t} CASCADE",
    ],
)
def test_service_role_cannot_rewrite_history(app_engine: Engine, unique: str, table: str, statement: str) -> None:
    append(app_engine, [credit_item(f"w{unique}"[:64], 5_000_000)])
    col = {"events": "type", "journal_transactions": "kind", "journal_entries": "account"}[table]
    with app_engine.connect() as conn, pytest.raises(Exception, match=r"permission denied|append-only"):
        conn.execute(text(statement.format(t=table, c=col)))


@pytest.mark.parametrize("table", schema.APPEND_ONLY_TABLES)
@pytest.mark.parametrize("statement", ["UPDATE {t} SET {c} = {c}", "DELETE FROM {t}", "TRUNCATE {t} CASCADE"])
def test_triggers_refuse_changes_even_for_the_owner(
    owner_engine: Engine, app_engine: Engine, unique: str, table: str, statement: str
) -> None:
    append(app_engine, [credit_item(f"w{unique}"[:64], 5_000_000)])
    col = {"events": "type", "journal_transactions": "kind", "journal_entries": "account"}[table]
    with owner_engine.connect() as conn, pytest.raises(Exception, match="append-only"):
        conn.execute(text(statement.format(t=table, c=col)))


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TRIGGER events_append_only ON events",
        "ALTER TABLE journal_entries DISABLE TRIGGER ALL",
        "ALTER TABLE events ADD COLUMN x int",
        "DROP TABLE journal_entries",
        "DROP FUNCTION ledger_check_balanced() CASCADE",
    ],
)
def test_service_role_cannot_drop_triggers_or_alter_tables(app_engine: Engine, statement: str) -> None:
    with app_engine.connect() as conn, pytest.raises(Exception, match=r"must be owner|permission denied"):
        conn.execute(text(statement))


def test_service_role_cannot_grant_itself_update(app_engine: Engine) -> None:
    # PostgreSQL answers a GRANT without grant option with a warning, not an error: what matters
    # is that the privilege did not appear.
    with app_engine.connect() as conn:
        conn.execute(text("GRANT UPDATE, DELETE ON events TO billing_app"))
        assert conn.execute(text("SELECT has_table_privilege('events', 'UPDATE')")).scalar_one() is False
        assert conn.execute(text("SELECT has_table_privilege('events', 'DELETE')")).scalar_one() is False


def test_database_refuses_unbalanced_entries(app_engine: Engine, unique: str) -> None:
    w = f"w{unique}"[:64]
    result = append(app_engine, [credit_item(w, 5_000_000)])
    (pos,) = result.positions.values()
    with app_engine.connect() as conn:
        conn.execute(
            text(
                "INSERT INTO journal_transactions (event_position, txn_no, kind, wallet_id, booked_at) "
                "VALUES (:p, 7, 'forged', :w, now())"
            ),
            {"p": pos, "w": w},
        )
        with pytest.raises(Exception, match="does not balance"):
            conn.execute(
                text(
                    "INSERT INTO journal_entries (event_position, txn_no, entry_no, account, amount_micros,"
                    " booked_at, kind, wallet_id) "
                    "VALUES (:p, 7, 0, :a, 100, now(), 'forged', 'w'),"
                    " (:p, 7, 1, 'revenue:serverless', -99, now(), 'forged', 'w')"
                ),
                {"p": pos, "a": wallet_account(w)},
            )


def test_store_refuses_unbalanced_transaction_before_sql() -> None:
    from ledger.invariants import InvariantViolation

    with pytest.raises(InvariantViolation):
        JournalTxn("forged", "w", (Posting("wallet:w", 100), Posting("revenue:serverless", -99)))


def test_migrations_match_the_table_definitions(database, owner_engine: Engine) -> None:
    upgrade(database.url)  # idempotent: a second run changes nothing
    with owner_engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        diff = compare_metadata(ctx, schema.metadata)
    assert diff == []


def test_service_role_is_not_superuser(app_engine: Engine) -> None:
    with app_engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar_one() == schema.APP_ROLE
        assert conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar_one() is False


def test_refusal_is_a_privilege_error_for_the_service_role(app_engine: Engine) -> None:
    from sqlalchemy.exc import DBAPIError

    with app_engine.connect() as conn, pytest.raises(DBAPIError) as err:
        conn.exec_driver_sql("DELETE FROM events")
    assert isinstance(err.value.orig, psycopg.errors.InsufficientPrivilege)
