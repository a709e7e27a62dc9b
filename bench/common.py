"""Shared bench plumbing: a PostgreSQL server (env URL, local default port, else embedded) and
fresh throw-away databases on it, so every measurement starts from the same empty schema."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from ledger.migrate import upgrade


def _local_port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def pg_server() -> Iterator[str]:
    url = os.environ.get("BILLING_BENCH_DATABASE_URL") or os.environ.get("BILLING_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _local_port_open(5432):
        yield "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        return
    from consumers.runtime.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="billing-bench-") as d, EmbeddedPostgres(Path(d)) as pg:
        yield pg.url


def plain(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_database(server_url: str, tag: str) -> Iterator[str]:
    name = f"billing_bench_{tag}_{secrets.token_hex(4)}"
    with psycopg.connect(plain(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(plain(server_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):>10,.0f}  ({min(values):,.0f}-{max(values):,.0f})"
