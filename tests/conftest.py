"""Fixtures: a real PostgreSQL and a real NATS with JetStream for the whole run (see
tests/services.py for where they come from), a fresh database per run, unique names per test."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, pool
from sqlalchemy.engine import make_url

from ledger.db import make_engine
from ledger.migrate import upgrade
from ledger.schema import APP_ROLE
from tests.services import nats_server, postgres_server

# One id per test run: the database and every stream and subject of the run carry it.
RUN_ID = f"{os.getpid()}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class TestDatabase:
    url: str
    """Owner's URL of this run's database (migrations, test set-up)."""
    name: str
    origin: str


def _plain(url: str) -> str:
    """A libpq URL for psycopg.connect (no +psycopg driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with postgres_server(tmp_path_factory.mktemp("pgserver")) as server:
        yield server


@contextlib.contextmanager
def migrated_database(admin_url: str, tag: str) -> Iterator[str]:
    """A fresh database on the run's server, migrated; dropped afterwards. Yields its owner URL."""
    name = f"billing_{tag}_{RUN_ID}_{secrets.token_hex(3)}"
    with psycopg.connect(_plain(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(_plain(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database(pg_server: tuple[str, str]) -> Iterator[TestDatabase]:
    admin_url, origin = pg_server
    with migrated_database(admin_url, "test") as url:
        yield TestDatabase(url=url, name=make_url(url).database or "", origin=origin)


@pytest.fixture(scope="session")
def owner_engine(database: TestDatabase) -> Iterator[Engine]:
    engine = create_engine(database.url, poolclass=pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def app_engine(database: TestDatabase) -> Iterator[Engine]:
    """Connections as the service role, exactly as the service runs."""
    engine = make_engine(database.url, role=APP_ROLE)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nats_server(tmp_path_factory.mktemp("nats")) as (url, _origin):
        yield url


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A name no other test of any run uses: for wallet ids, subjects and stream names."""
    base = re.sub(r"[^A-Za-z0-9]", "_", request.node.name)[-30:]
    return f"t{RUN_ID}_{base}_{secrets.token_hex(3)}"


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"billing test run {RUN_ID}: database from "
        + ("BILLING_TEST_DATABASE_URL" if os.environ.get("BILLING_TEST_DATABASE_URL") else "testcontainers/embedded")
        + ", NATS from "
        + ("BILLING_TEST_NATS_URL" if os.environ.get("BILLING_TEST_NATS_URL") else "testcontainers/embedded")
    ]
