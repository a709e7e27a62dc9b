"""The wallet and rental reads (scope ``wallet``): ``GET /wallets/{walletId}`` and
``GET /rentals/{resourceId}``. A read takes no write lock: a read-only repeatable-read snapshot
(``projections.read_models``), with the live figures (available, burn, projected zero, state)
computed at the request's instant by the rules' query functions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path

from consumers.http.context import Ctx, HttpContext, bound_router
from consumers.http.errors import ApiError, wallet_not_found
from consumers.http.models import RentalResponse, WalletResponse, error_responses
from consumers.http.routing import BillingRoute
from ledger.events import ID_PATTERN
from ledger.money import format_usd
from projections import rules
from projections.read_models import read_rental, read_snapshot, read_wallet

routes = APIRouter(route_class=BillingRoute, tags=["wallet"])
_READ_ERRORS = error_responses(401, 403, 404, 422, 503)


def build(ctx: HttpContext) -> APIRouter:
    return bound_router(ctx, routes, scope="wallet")


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


@routes.get(
    "/wallets/{walletId}",
    summary="A wallet's balance, available funds, burn and projected zero, live",
    responses=_READ_ERRORS,
)
def get_wallet(
    ctx: Ctx,
    walletId: Annotated[str, Path(pattern=ID_PATTERN, description="The wallet's id.")],
) -> WalletResponse:
    at = ctx.now()
    with read_snapshot(ctx.engine) as conn:
        state = read_wallet(conn, walletId)
    if state is None:
        raise wallet_not_found(walletId)
    available = rules.available_micros(state, at)
    return WalletResponse(
        wallet_id=state.wallet_id,
        balance_micros=state.balance_micros,
        balance_usd=format_usd(state.balance_micros),
        available_micros=available,
        available_usd=format_usd(available),
        holds_micros=rules.holds_micros(state, at),
        accrued_micros=rules.accrued_unmetered_micros(state, at),
        burn_micros_per_hour=rules.burn_micros_per_hour(state),
        projected_zero_at=_utc(rules.projected_zero_at(state, at)),
        state=rules.wallet_status(state, at),
        running_rentals=len(rules.running_rentals(state)),
        at=at.astimezone(UTC),
    )


@routes.get(
    "/rentals/{resourceId}",
    summary="A rental's state, billable seconds and cost so far",
    responses=_READ_ERRORS,
)
def get_rental(
    ctx: Ctx,
    resourceId: Annotated[str, Path(pattern=ID_PATTERN, description="The rental's resource id.")],
) -> RentalResponse:
    with read_snapshot(ctx.engine) as conn:
        rental = read_rental(conn, resourceId)
    if rental is None:
        raise ApiError(404, "rental_not_found", f"no rental {resourceId} is known: no gpu.rental.started seen")
    return RentalResponse(
        resource_id=rental.resource_id,
        wallet_id=rental.wallet_id,
        resource_kind=rental.resource_kind,
        tier=rental.tier,
        gpu_type=rental.gpu_type,
        state=rental.status,
        billable_seconds=rental.billable_seconds,
        cost_micros=rental.charged_micros,
        cost_usd=format_usd(rental.charged_micros),
        price_per_hour_micros=rental.price_per_hour_micros,
        started_at=rental.started_at.astimezone(UTC),
        ended_at=_utc(rental.ended_at),
        end_reason=rental.end_reason,
    )
