"""The FastAPI app of the HTTP API, from its routers (DESIGN section 6); nothing else lives here.

Wiring (``billing up``: :func:`create_service_app`, the operational endpoints)::

    app = create_service_app(engine, connection, registry, readiness)
    install_api(app, engine, settings, clock=..., registry=...)

:func:`create_app` does the same on a new app for tests and for the OpenAPI export
(``devtools/export_openapi.py`` writes ``openapi.json``).
"""

from __future__ import annotations

from collections.abc import Callable

import stripe
from fastapi import APIRouter, FastAPI
from nats.aio.client import Client
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from consumers.http import finance, operations, stripe_webhook, topups, wallets
from consumers.http.auth import ROUTE_SCOPES, TokenAuthenticator, authorization_refusal
from consumers.http.context import Clock, HttpContext, create_context
from consumers.http.docs import API_DESCRIPTION, API_TITLE, API_VERSION, install_docs
from consumers.http.errors import install_error_handlers
from consumers.http.limits import GuardMiddleware
from consumers.http.operations import Readiness
from consumers.runtime.settings import Settings
from consumers.stripe.facts import MAX_WEBHOOK_BYTES


def build_api(ctx: HttpContext) -> APIRouter:
    """Every route of the API in one router, which keeps the API's error shape in any app."""
    router = APIRouter()
    for module in (topups, stripe_webhook, wallets, finance):
        router.include_router(module.build(ctx))
    return router


def install_guard(app: FastAPI, auth: TokenAuthenticator, settings: Settings) -> None:
    """Token and body size checked before the body is read (``consumers.http.limits``)."""
    app.add_middleware(
        GuardMiddleware,
        authorize=lambda scope, header: authorization_refusal(auth, scope, header),
        scopes=ROUTE_SCOPES,
        max_body_bytes=settings.http_max_body_bytes,
        limits={stripe_webhook.WEBHOOK_PATH: MAX_WEBHOOK_BYTES},
    )


def install_api(
    app: FastAPI,
    engine: Engine,
    settings: Settings,
    *,
    stripe_client: stripe.StripeClient | None = None,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """The whole HTTP API on ``app``: the routers, the error shape, the guard (token and body size
    before the body is read) and the served docs (``/``, ``/docs``). See
    :func:`consumers.http.context.create_context` for the arguments."""
    ctx = create_context(engine, settings, stripe_client=stripe_client, clock=clock, registry=registry)
    app.include_router(build_api(ctx))
    install_error_handlers(app)
    install_docs(app)
    install_guard(app, ctx.auth, settings)


def _api_app() -> FastAPI:
    return FastAPI(
        title=API_TITLE,
        version=API_VERSION,
        description=API_DESCRIPTION,
        docs_url=None,  # ours, with local assets: install_docs
        redoc_url=None,
    )


def create_service_app(
    engine: Engine,
    connection: Callable[[], Client | None],
    registry: CollectorRegistry,
    readiness: Readiness,
) -> FastAPI:
    """The operational endpoints (``consumers.http.operations``); ``run_service`` adds the API
    with :func:`install_api`. /openapi.json and /docs describe the API routers only: the same
    document as openapi.json; the operational endpoints stay out of it."""
    app = _api_app()
    app.include_router(operations.build(engine, connection, registry, readiness))
    return app


def create_app(
    engine: Engine,
    settings: Settings,
    *,
    stripe_client: stripe.StripeClient | None = None,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """An app with the whole API (tests, the OpenAPI export); ``billing up`` serves the same on its
    operational app (create_service_app)."""
    app = _api_app()
    install_api(app, engine, settings, stripe_client=stripe_client, clock=clock, registry=registry)
    return app
