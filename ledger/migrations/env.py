"""Alembic environment. Migrations run as the owner of the schema (the login of the migration URL),
never as the service role; see ledger/migrate.py."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from ledger.schema import metadata

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set BILLING_DATABASE_URL or pass one to `billing migrate`")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; run `billing migrate`")
run_migrations_online()
