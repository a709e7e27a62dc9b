"""Wallet top-ups through Stripe (scope ``wallet``): ``POST /wallet/create-intent`` and
``POST /wallet/confirm``. Handlers that call Stripe are plain functions: FastAPI runs them in its
thread pool, where the blocking Stripe client and SQLAlchemy engine belong."""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated, Final

from fastapi import APIRouter, Header

from consumers.http.context import Ctx, HttpContext, bound_router
from consumers.http.errors import ApiError, stripe_failure, topup_refused
from consumers.http.models import (
    ConfirmRequest,
    ConfirmResponse,
    CreateIntentRequest,
    CreateIntentResponse,
    error_responses,
    presets_text,
)
from consumers.http.routing import BillingRoute
from consumers.stripe.facts import TopUpRefused
from consumers.stripe.gateway import StripeRefused, StripeUnavailable
from ledger.money import MoneyParseError, format_usd, micros_to_cents_exact
from projections import rules

IDEMPOTENCY_KEY_PATTERN: Final = r"^[!-~]{1,200}$"

routes = APIRouter(route_class=BillingRoute, tags=["wallet"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Optional: a retry with the same key returns the same PaymentIntent.",
    ),
]


def build(ctx: HttpContext) -> APIRouter:
    return bound_router(ctx, routes, scope="wallet")


def _topup_cents(micros: int, max_topup_micros: int) -> int:
    """The amount in cents, or a 422 for an amount that is not whole cents or out of R1's range."""
    try:
        cents = micros_to_cents_exact(micros)
    except MoneyParseError as error:
        raise ApiError(422, "invalid_amount", f"{error} (for example 12.50)") from None
    problem = rules.check_topup(micros, max_topup_micros)
    if problem is not None:
        if "$100" not in problem:
            problem += f" Presets: {presets_text()}."
        raise ApiError(
            422,
            "amount_out_of_range",
            problem,
            extra={
                "presetsUsd": list(rules.TOPUP_PRESETS_USD),
                "minimumMicros": rules.MIN_TOPUP_MICROS,
                "maximumMicros": max_topup_micros,
            },
        )
    return cents


def _stripe_idempotency_key(wallet_id: str, idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return f"billing-topup-{uuid.uuid4()}"
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return f"billing-topup-{wallet_id}-{digest}"


@routes.post(
    "/wallet/create-intent",
    summary="Start a top-up: a Stripe PaymentIntent for the wallet",
    responses=error_responses(401, 403, 409, 422, 502, 503),
)
def create_intent(ctx: Ctx, body: CreateIntentRequest, idempotency_key: IdempotencyKey = None) -> CreateIntentResponse:
    """R1: at least $5 and at most the configured maximum, in whole cents. Creates a USD
    PaymentIntent with ``metadata.walletId``; the client confirms it with Stripe.js using
    ``clientSecret``, then the webhook (or ``POST /wallet/confirm``) credits the wallet."""
    micros = body.amount_micros
    cents = _topup_cents(micros, ctx.settings.max_topup_micros)
    stripe_key = _stripe_idempotency_key(body.wallet_id, idempotency_key)
    try:
        intent = ctx.require_gateway().create_payment_intent(
            wallet_id=body.wallet_id, amount_cents=cents, idempotency_key=stripe_key
        )
    except (StripeRefused, StripeUnavailable) as error:
        raise stripe_failure(error) from None
    if not intent.client_secret:
        raise ApiError(502, "stripe_unavailable", "Stripe returned a PaymentIntent without a client secret")
    return CreateIntentResponse(
        wallet_id=body.wallet_id,
        payment_intent_id=intent.id,
        client_secret=intent.client_secret,
        amount_micros=micros,
        amount_usd=format_usd(micros),
    )


@routes.post(
    "/wallet/confirm",
    summary="Credit a succeeded PaymentIntent to its wallet (once)",
    responses=error_responses(401, 403, 404, 409, 422, 502, 503),
)
def confirm(ctx: Ctx, body: ConfirmRequest) -> ConfirmResponse:
    """Retrieves the PaymentIntent from Stripe. If it succeeded, its ``amount_received`` is credited
    to ``metadata.walletId`` exactly once, whether the webhook, this call, or both (concurrently or
    repeatedly) bring it. 409 while it has not succeeded."""
    ctx.require_gateway()
    try:
        result = ctx.facts.confirm(body.payment_intent_id)
    except TopUpRefused as refusal:
        raise topup_refused(refusal) from None
    except (StripeRefused, StripeUnavailable) as error:
        raise stripe_failure(error) from None
    return ConfirmResponse(
        wallet_id=result.wallet_id,
        payment_intent_id=result.payment_intent_id,
        credited=result.credited,
        amount_micros=result.amount_micros,
        balance_micros=result.balance_micros,
        balance_usd=format_usd(result.balance_micros),
    )
