"""The operational endpoints of ``billing up``: ``GET /healthz`` (liveness), ``GET /readyz``
(PostgreSQL answers, NATS is connected, the components run; 503 otherwise) and ``GET /metrics``
(Prometheus). No token, and none of them is in openapi.json (they are not the API)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from nats.aio.client import Client
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Engine

from consumers.runtime.metrics import CONTENT_TYPE_LATEST
from projections.queries import ping

READY_DB_TIMEOUT_S: Final = 2.0


@dataclass
class Readiness:
    """What /readyz checks besides the database and the NATS connection."""

    components: dict[str, asyncio.Event] = field(default_factory=dict)
    stopping: bool = False


async def check_database(engine: Engine) -> str:
    try:
        await asyncio.wait_for(asyncio.to_thread(ping, engine), timeout=READY_DB_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {READY_DB_TIMEOUT_S} s"
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"
    return "ok"


async def _readiness_checks(
    engine: Engine, connection: Callable[[], Client | None], readiness: Readiness
) -> dict[str, str]:
    checks: dict[str, str] = {}
    checks["database"] = await check_database(engine)
    nc = connection()
    checks["nats"] = "ok" if nc is not None and nc.is_connected else "not connected"
    for name, ready in readiness.components.items():
        checks[name] = "ok" if ready.is_set() else "starting"
    if readiness.stopping:
        checks["service"] = "stopping"
    return checks


def build(
    engine: Engine,
    connection: Callable[[], Client | None],
    registry: CollectorRegistry,
    readiness: Readiness,
) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: PostgreSQL answers, NATS is connected, the consumers run."""
        checks = await _readiness_checks(engine, connection, readiness)
        ok = all(v == "ok" for v in checks.values())
        body = {"status": "ready" if ok else "not ready", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
