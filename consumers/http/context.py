"""What the routes of one API share, built once per app: the engine, the settings, the service
clock, the token authenticator, and the Stripe client with the facts it feeds.

The routes are module-level functions on module-level routers; :func:`bound_router` wraps such a
router for one context, which its routes receive as a ``ctx: Ctx`` parameter. So a router keeps its
routes small and flat and still works in any app (the runtime's, a test's), several per process.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import stripe
from fastapi import APIRouter, Depends, Request
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Engine

from consumers.http.auth import TokenAuthenticator, scope_dependency
from consumers.http.errors import stripe_not_configured
from consumers.runtime.settings import Settings
from consumers.stripe.facts import StripeFacts
from consumers.stripe.gateway import StripeGateway, client_from_settings
from ledger.invariants import fail

Clock = Callable[[], datetime]
_STATE_KEY: Final = "billing_http_context"
ANOMALY_KINDS: Final = ("exceeds_payment", "event_time")


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class HttpContext:
    engine: Engine
    settings: Settings
    now: Clock
    """Aware UTC datetimes: the service clock."""
    auth: TokenAuthenticator
    stripe_client: stripe.StripeClient | None
    gateway: StripeGateway | None
    facts: StripeFacts

    def require_gateway(self) -> StripeGateway:
        if self.gateway is None:
            raise stripe_not_configured()
        return self.gateway

    def require_stripe_client(self) -> stripe.StripeClient:
        if self.stripe_client is None:
            raise stripe_not_configured()
        return self.stripe_client


def _anomaly_counter(registry: CollectorRegistry | None) -> Callable[[str, int], None] | None:
    if registry is None:
        return None
    counter = Counter(
        "billing_stripe_anomalies",
        "Stripe facts applied as Stripe said but flagged for finance (GET /finance/anomalies), by kind",
        ["kind"],
        registry=registry,
    )
    for kind in ANOMALY_KINDS:
        counter.labels(kind)  # present at 0 from the start, so a rate() has a baseline

    def count(kind: str, n: int) -> None:
        counter.labels(kind).inc(n)

    return count


def create_context(
    engine: Engine,
    settings: Settings,
    *,
    stripe_client: stripe.StripeClient | None = None,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
) -> HttpContext:
    """``stripe_client`` defaults to one built from the settings (key and ``BILLING_STRIPE_API_BASE``);
    ``clock`` (aware UTC datetimes) defaults to the system clock; ``registry`` gets
    ``billing_stripe_anomalies_total{kind}``. Raises ValueError at once if ``BILLING_API_TOKENS`` is
    malformed."""
    now = clock or _utc_now
    auth = TokenAuthenticator.from_spec(settings.api_tokens.get_secret_value())
    client = stripe_client if stripe_client is not None else client_from_settings(settings)
    gateway = StripeGateway(client) if client is not None else None
    facts = StripeFacts(engine, gateway, now, on_anomaly=_anomaly_counter(registry))
    return HttpContext(engine, settings, now, auth, client, gateway, facts)


def _binder(ctx: HttpContext) -> Callable[[Request], Coroutine[Any, Any, None]]:
    async def bind_context(request: Request) -> None:
        setattr(request.state, _STATE_KEY, ctx)

    return bind_context


async def current_context(request: Request) -> HttpContext:
    ctx = getattr(request.state, _STATE_KEY, None)
    if not isinstance(ctx, HttpContext):
        fail("a route of consumers.http runs outside bound_router: no context")
    return ctx


Ctx = Annotated[HttpContext, Depends(current_context)]


def bound_router(ctx: HttpContext, routes: APIRouter, *, scope: str | None = None) -> APIRouter:
    """``routes`` for ``ctx``: its routes get ``ctx``, and with ``scope`` refuse (401/403) a token
    without it. The binding runs first of the route's dependencies."""
    dependencies = [Depends(_binder(ctx))]
    if scope is not None:
        dependencies.append(Depends(scope_dependency(ctx.auth, scope)))
    router = APIRouter(dependencies=dependencies)
    router.include_router(routes)
    return router
