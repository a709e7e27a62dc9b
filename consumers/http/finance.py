"""HTTP under ``/finance/...`` (scope ``finance``): the reports of projections.reports as JSON, or
CSV with ``?format=csv`` (or ``Accept: text/csv``). Also the Stripe side of the reconciliation: every
succeeded PaymentIntent and refund of the period from Stripe's list APIs, all pages."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from consumers.http.context import Ctx, HttpContext, bound_router
from consumers.http.errors import ApiError, stripe_failure, wallet_not_found
from consumers.http.models import error_responses
from consumers.http.routing import BillingRoute
from consumers.stripe import reconciliation
from consumers.stripe.gateway import StripeRefused, StripeUnavailable
from projections import anomalies, reports
from projections.queries import UnknownWallet, known_wallet_statement, read_report
from projections.reports import Report

DEFAULT_PERIOD: Final = timedelta(days=30)

# Module level: annotations are strings here (PEP 563) and FastAPI resolves them in this namespace.
Fmt = Annotated[Literal["json", "csv"] | None, Query(alias="format", description="json (default) or csv")]
From = Annotated[datetime | None, Query(alias="from", description="ISO 8601 instant (default: 30 days before to)")]
To = Annotated[datetime | None, Query(alias="to", description="ISO 8601 instant (default: now)")]
At = Annotated[datetime | None, Query(description="ISO 8601 instant (default: now)")]
GroupBy = Annotated[
    str,
    Query(
        alias="groupBy",
        pattern=r"^(day|month|product|gpuType)(,(day|month|product|gpuType))*$",
        description="comma-separated: day or month (YYYY-MM, UTC), product, gpuType",
    ),
]
WalletId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]

routes = APIRouter(
    prefix="/finance",
    route_class=BillingRoute,
    tags=["finance"],
    responses={
        200: {
            "description": "The report: JSON, or CSV with format=csv or Accept: text/csv",
            "content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 403, 422, 502, 503),
    },
)


def build(ctx: HttpContext) -> APIRouter:
    return bound_router(ctx, routes, scope="finance")


def _instant(value: datetime | None, default: datetime) -> datetime:
    if value is None:
        return default
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # an instant without offset is UTC


def _period(start: datetime | None, end: datetime | None, now: datetime) -> tuple[datetime, datetime]:
    e = _instant(end, now)
    # e - 30 days does not exist for an instant in the first days of year 1 (found by the fuzzer).
    earliest = datetime.min.replace(tzinfo=UTC)
    s = _instant(start, e - DEFAULT_PERIOD if e - earliest > DEFAULT_PERIOD else earliest)
    if s > e:
        raise ApiError(422, "invalid_period", "from must not be after to")
    return s, e


def _render(report: Report, request: Request, fmt: str | None, body: dict[str, Any]) -> Response:
    wants_csv = fmt == "csv" or (fmt is None and "text/csv" in request.headers.get("accept", ""))
    if fmt not in (None, "json", "csv"):
        raise ApiError(422, "invalid_format", "format must be json or csv")
    if wants_csv:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(report.columns)
        w.writerows(report.rows)
        return Response(buf.getvalue(), media_type="text/csv")
    return JSONResponse(body)


def _render_rows(report: Report, request: Request, fmt: str | None) -> Response:
    """A report whose JSON is its summary and its rows as ``rows``."""
    return _render(report, request, fmt, {**report.summary, "rows": report.as_dicts()})


def _group_keys(group_by: str) -> list[str]:
    keys = [k for k in group_by.split(",") if k]
    unknown = [k for k in keys if k not in reports.GROUP_KEYS]
    if unknown:
        raise ApiError(422, "invalid_group_by", f"groupBy takes {', '.join(reports.GROUP_KEYS)}; unknown: {unknown}")
    if "day" in keys and "month" in keys:
        raise ApiError(422, "invalid_group_by", "groupBy: day and month together group by day; give one of them")
    return keys


@routes.get("/trial-balance", summary="Every account's balance at an instant; the total is zero")
def trial_balance(ctx: Ctx, request: Request, at: At = None, fmt: Fmt = None) -> Response:
    t = _instant(at, ctx.now())
    rep = read_report(ctx.engine, reports.trial_balance, t)
    body = {
        "at": t.isoformat(),
        "accounts": [{"account": a, "balanceMicros": b} for a, b in rep.rows],
        "totalMicros": rep.summary["totalMicros"],
    }
    return _render(rep, request, fmt, body)


@routes.get(
    "/statements/{walletId}",
    summary="Opening balance, movements and closing balance of a wallet",
    responses=error_responses(404),
)
def statement(
    ctx: Ctx,
    request: Request,
    walletId: WalletId,  # the contract's path parameter name
    start: From = None,
    end: To = None,
    fmt: Fmt = None,
) -> Response:
    s, e = _period(start, end, ctx.now())
    try:
        rep = read_report(ctx.engine, known_wallet_statement, walletId, s, e)
    except UnknownWallet as unknown:
        raise wallet_not_found(unknown.wallet_id) from None
    return _render(rep, request, fmt, {**rep.summary, "movements": rep.as_dicts()})


@routes.get("/revenue", summary="Recognised revenue grouped by day or month, product and GPU type")
def revenue(
    ctx: Ctx,
    request: Request,
    start: From = None,
    end: To = None,
    group_by: GroupBy = "day,product,gpuType",
    fmt: Fmt = None,
) -> Response:
    s, e = _period(start, end, ctx.now())
    keys = _group_keys(group_by)
    return _render_rows(read_report(ctx.engine, reports.revenue, s, e, keys), request, fmt)


@routes.get("/debts", summary="Wallets below zero")
def debts(ctx: Ctx, request: Request, fmt: Fmt = None) -> Response:
    rep = read_report(ctx.engine, reports.debts)
    return _render(rep, request, fmt, {**rep.summary, "wallets": rep.as_dicts()})


@routes.get("/rejected", summary="Rejected inputs by reason")
def rejected(ctx: Ctx, request: Request, start: From = None, end: To = None, fmt: Fmt = None) -> Response:
    s, e = _period(start, end, ctx.now())
    return _render_rows(read_report(ctx.engine, reports.rejected_inputs, s, e), request, fmt)


@routes.get(
    "/anomalies",
    summary="Stripe facts applied as Stripe said but flagged: larger than the payment, or far-off times",
)
def stripe_anomalies(ctx: Ctx, request: Request, start: From = None, end: To = None, fmt: Fmt = None) -> Response:
    """``exceeds_payment``: a refund or dispute larger than what its payment still had in the
    ledger, applied in full (Stripe moved the money). ``event_time``: a webhook whose ``created``
    was more than 300 s from the service clock, booked at its receipt (``bookedAt``) instead of
    Stripe's ``stripeCreatedAt``. Period on the booking instant."""
    s, e = _period(start, end, ctx.now())
    return _render_rows(read_report(ctx.engine, anomalies.anomalies, s, e), request, fmt)


@routes.get("/stripe-reconciliation", summary="Ledger top-ups and refunds against Stripe's own records")
def stripe_reconciliation(ctx: Ctx, request: Request, start: From = None, end: To = None, fmt: Fmt = None) -> Response:
    client = ctx.require_stripe_client()
    s, e = _period(start, end, ctx.now())
    try:
        with ctx.engine.connect() as conn:
            rep = reconciliation.stripe_reconciliation(conn, client, s, e)
    except (StripeRefused, StripeUnavailable) as error:
        raise stripe_failure(error) from None
    return _render_rows(rep, request, fmt)
