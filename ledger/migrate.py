"""Run Alembic migrations programmatically (`billing migrate`, and `billing up` at start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, pool

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> None:
    """Upgrade to ``revision`` as the login of the URL (the schema owner)."""
    engine = create_engine(url_or_engine, poolclass=pool.NullPool) if isinstance(url_or_engine, str) else url_or_engine
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
