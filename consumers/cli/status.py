"""`billing status`: where the service of a data dir runs and how it is doing.

Reads ``<data_dir>/runtime.json`` of a live ``billing up`` (consumers.runtime.instance), asks its ``/readyz``,
the versions of PostgreSQL and nats-server, and the intake's lag (the messages of ``billing.in``
its durable consumers have not been delivered yet). Every probe is bounded by ``PROBE_TIMEOUT_S``;
a probe that fails says so in its field instead of failing the command.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, Final

import typer

from consumers.runtime.instance import read_runtime_file
from consumers.runtime.settings import Settings, nats_servers

PROBE_TIMEOUT_S: Final = 3.0
EXIT_READY: Final = 0
EXIT_NOT_RUNNING: Final = 1
EXIT_NOT_READY: Final = 3


def collect_status(settings: Settings) -> dict[str, Any] | None:
    """The status of the service on ``settings.data_dir``, None when none runs there."""
    runtime = read_runtime_file(settings)
    if runtime is None:
        return None
    http_url = str(runtime.get("httpUrl", ""))
    database_url = settings.database_url or str(runtime.get("databaseUrl", ""))
    nats_url = settings.nats_url or str(runtime.get("natsUrl", ""))
    namespace = str(runtime.get("natsNamespace", settings.nats_namespace))
    ready, checks = _readiness(http_url)
    nats_version, lag = asyncio.run(_nats_probe(nats_url, namespace))
    return {
        "running": True,
        "pid": runtime.get("pid"),
        "httpUrl": http_url,
        "natsUrl": runtime.get("natsUrl"),
        "databaseUrl": runtime.get("databaseUrl"),
        "dataDir": runtime.get("dataDir"),
        "startedAt": runtime.get("startedAt"),
        "ready": ready,
        "checks": checks,
        "versions": {
            "billing": runtime.get("version"),
            "postgresql": _postgres_version(database_url),
            "natsServer": nats_version,
        },
        "intakeLag": lag,
    }


def _readiness(http_url: str) -> tuple[bool, dict[str, str]]:
    """GET /readyz (the standard library: `make run` installs no HTTP client)."""
    import urllib.error
    import urllib.request

    try:
        try:
            with urllib.request.urlopen(f"{http_url}/readyz", timeout=PROBE_TIMEOUT_S) as response:  # noqa: S310
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:  # 503: not ready, with the checks in the body
            status, raw = exc.code, exc.read()
        body = json.loads(raw)
        return status == 200, {str(k): str(v) for k, v in dict(body.get("checks", {})).items()}
    except (OSError, ValueError, AttributeError) as exc:
        return False, {"http": f"no answer: {type(exc).__name__}"}


def _postgres_version(url: str) -> str:
    import psycopg
    from sqlalchemy.engine import make_url

    try:
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, connect_timeout=int(PROBE_TIMEOUT_S)) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"
    except Exception as exc:  # a status line, never a failure of the command
        return f"unavailable ({type(exc).__name__})"


async def _nats_probe(url: str, namespace: str) -> tuple[str, int | str]:
    """(nats-server version, messages not yet delivered to the intake's consumers)."""
    import nats

    from consumers.nats.names import NatsNames

    try:
        nc = await nats.connect(
            servers=nats_servers(url), allow_reconnect=False, connect_timeout=PROBE_TIMEOUT_S, max_reconnect_attempts=0
        )
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})", "unknown"
    try:
        version = nc.connected_server_version._server_version
        try:
            js = nc.jetstream(timeout=PROBE_TIMEOUT_S)
            consumers = await js.consumers_info(NatsNames(namespace).in_stream)
            lag: int | str = sum(int(c.num_pending or 0) for c in consumers)
        except Exception as exc:
            lag = f"unknown ({type(exc).__name__})"
        return version, lag
    finally:
        await nc.close()


def print_status(output: str, settings: Settings | None = None) -> int:
    from consumers.runtime.preflight import load_settings

    settings = settings or load_settings()
    status = collect_status(settings)
    if status is None:
        if output == "json":
            typer.echo(json.dumps({"running": False, "dataDir": str(settings.data_dir.resolve())}))
        else:
            print(f"billing is not running on data dir {settings.data_dir} (start it: billing up)", file=sys.stderr)
        return EXIT_NOT_RUNNING
    if output == "json":
        typer.echo(json.dumps(status, indent=2))
    else:
        _print_table(status)
    return EXIT_READY if status["ready"] else EXIT_NOT_READY


def _print_table(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title="billing status")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    checks = ", ".join(f"{k} {v}" for k, v in status["checks"].items())
    versions = status["versions"]
    rows = [
        ("running", f"yes, pid {status['pid']} since {status['startedAt']}"),
        ("ready", ("yes" if status["ready"] else "no") + (f" ({checks})" if checks else "")),
        ("HTTP", status["httpUrl"]),
        ("NATS", status["natsUrl"]),
        ("database", status["databaseUrl"]),
        ("data dir", status["dataDir"]),
        (
            "versions",
            f"billing {versions['billing']}, PostgreSQL {versions['postgresql']}, nats-server {versions['natsServer']}",
        ),
        ("intake lag", f"{status['intakeLag']} message(s) not yet delivered"),
    ]
    for what, value in rows:
        table.add_row(what, str(value))
    Console().print(table)
