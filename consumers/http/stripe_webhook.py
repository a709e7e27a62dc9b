"""``POST /stripe/webhook``: the events Stripe signs and sends (no token: the signature is the
authentication). The body is read here, bounded (``MAX_WEBHOOK_BYTES``), because the signature is
over its exact bytes."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Header, Request
from starlette.concurrency import run_in_threadpool

from consumers.http.context import Ctx, HttpContext, bound_router
from consumers.http.errors import RETRY_AFTER_SECONDS, ApiError
from consumers.http.models import WebhookResponse, error_responses
from consumers.http.routing import BillingRoute, read_limited
from consumers.stripe.facts import MAX_WEBHOOK_BYTES, InvalidWebhook
from consumers.stripe.gateway import StripeRefused, StripeUnavailable, WebhookSignatureError

WEBHOOK_PATH: Final = "/stripe/webhook"

_STRIPE_EVENT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "description": "A Stripe event (object: event), exactly as Stripe signed it.",
    "required": ["id", "type", "data"],
    "properties": {
        "id": {"type": "string", "examples": ["evt_1NG8Du2eZvKYlo2CUI79vXWy"]},
        "object": {"type": "string", "enum": ["event"]},
        "type": {"type": "string", "examples": ["payment_intent.succeeded"]},
        "created": {"type": "integer"},
        "data": {
            "type": "object",
            "required": ["object"],
            "properties": {"object": {"type": "object"}},
        },
    },
}

routes = APIRouter(route_class=BillingRoute, tags=["stripe"])

StripeSignature = Annotated[
    str | None,
    Header(
        alias="Stripe-Signature",
        description="t=<unix time>,v1=<hex HMAC-SHA256 of f'{t}.{body}' with the webhook secret>",
    ),
]


def build(ctx: HttpContext) -> APIRouter:
    return bound_router(ctx, routes)


@routes.post(
    WEBHOOK_PATH,
    summary="Stripe webhook endpoint (signed by Stripe)",
    responses=error_responses(400, 413, 422, 502, 503),
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": _STRIPE_EVENT_SCHEMA}}}
    },
)
async def stripe_webhook(ctx: Ctx, request: Request, stripe_signature: StripeSignature = None) -> WebhookResponse:
    """Verified with ``BILLING_STRIPE_WEBHOOK_SECRET``: a bad signature, or a signed time more than
    300 s in the past **or in the future**, is a 400 and changes nothing (stripe's own
    ``construct_event`` accepts future times; this endpoint does not, so a signature cannot stay
    fresh for longer than 5 minutes whatever its date).

    Handled: ``payment_intent.succeeded`` (credit), ``charge.refunded`` (one debit per succeeded
    refund), ``charge.dispute.created`` (hold) and ``charge.dispute.closed`` (release if won, else
    lost). Money Stripe moved is applied as Stripe says even when it is implausible, and flagged for
    finance (``GET /finance/anomalies``): a refund or dispute larger than what its payment still
    has in the ledger is applied in full; an event whose ``created`` is more than 300 s from the
    service clock is booked at its receipt, not in another period. Every event is recorded once
    by its Stripe id with its effect, in one transaction,
    committed before the 2xx; other types are answered 200 and recorded as not handled. A 5xx
    (502 when Stripe must be asked and fails, 503 when the database is unavailable) makes Stripe
    retry."""
    secret = ctx.settings.stripe_webhook_secret.get_secret_value()
    if not secret:
        raise ApiError(503, "webhook_not_configured", "no webhook secret is configured (BILLING_STRIPE_WEBHOOK_SECRET)")
    body = await read_limited(request, MAX_WEBHOOK_BYTES)
    try:
        result = await run_in_threadpool(ctx.facts.webhook, body, stripe_signature, secret)
    except WebhookSignatureError as error:
        raise ApiError(400, "invalid_signature", str(error)) from None
    except InvalidWebhook as error:
        raise ApiError(400, "invalid_event", str(error)) from None
    except (StripeRefused, StripeUnavailable) as error:  # 5xx whatever Stripe said: Stripe retries
        raise ApiError(502, "stripe_unavailable", error.detail, headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
    return WebhookResponse(
        event_id=result.event_id,
        type=result.type,
        handled=result.handled,
        duplicate=result.duplicate,
        facts=result.facts,
        applied=result.applied,
        note=result.note,
    )
