"""HTTP under ``/finance/...`` (finance scope): the reports of projections.reports as JSON, or CSV
with ``?format=csv`` (or ``Accept: text/csv``). Also the Stripe side of the reconciliation: every
succeeded PaymentIntent and refund of the period from Stripe's list APIs, all pages."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

import stripe
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Connection, Engine, text

from consumers import reconciliation
from consumers.api_errors import ApiError
from consumers.http_api import TokenAuthenticator, _errors, _scope_dependency, _stripe_failure, parse_api_tokens
from consumers.settings import Settings
from consumers.stripe_gateway import StripeRefused, StripeUnavailable, client_from_settings
from projections import anomalies, reports
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


def _statement(conn: Connection, wallet_id: str, start: datetime, end: datetime) -> Report:
    """The statement of a wallet the ledger knows; an unknown one is 404 as on the wallet API (and
    an error on the CLI), not an all-zero statement that looks like a wallet with no money."""
    if not reports.wallet_known(conn, wallet_id):
        raise ApiError(
            404,
            "wallet_not_found",
            f"no wallet {wallet_id} is known: it has had no top-up, usage or admission yet",
        )
    return reports.statement(conn, wallet_id, start, end)


def build_finance_api(
    engine: Engine,
    settings: Settings,
    *,
    stripe_client: stripe.StripeClient | None = None,
    clock: Callable[[], datetime] | None = None,
) -> APIRouter:
    now = clock or (lambda: datetime.now(UTC))
    auth = TokenAuthenticator(parse_api_tokens(settings.api_tokens.get_secret_value()))
    client = stripe_client if stripe_client is not None else client_from_settings(settings)
    router = APIRouter(
        prefix="/finance",
        tags=["finance"],
        dependencies=[Depends(_scope_dependency(auth, "finance"))],
        responses={
            200: {
                "description": "The report: JSON, or CSV with format=csv or Accept: text/csv",
                "content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}},
            },
            **_errors(401, 403, 422, 502, 503),
        },
    )

    def read(fn: Callable[..., Report], *args: Any) -> Report:
        with engine.connect() as conn:
            conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
            return fn(conn, *args)

    @router.get("/trial-balance", summary="Every account's balance at an instant; the total is zero")
    def trial_balance(request: Request, at: At = None, fmt: Fmt = None) -> Response:
        t = _instant(at, now())
        rep = read(reports.trial_balance, t)
        body = {
            "at": t.isoformat(),
            "accounts": [{"account": a, "balanceMicros": b} for a, b in rep.rows],
            "totalMicros": rep.summary["totalMicros"],
        }
        return _render(rep, request, fmt, body)

    @router.get(
        "/statements/{walletId}",
        summary="Opening balance, movements and closing balance of a wallet",
        responses=_errors(404),
    )
    def statement(
        request: Request,
        walletId: WalletId,  # the contract's path parameter name
        start: From = None,
        end: To = None,
        fmt: Fmt = None,
    ) -> Response:
        s, e = _period(start, end, now())
        rep = read(_statement, walletId, s, e)
        return _render(rep, request, fmt, {**rep.summary, "movements": rep.as_dicts()})

    @router.get("/revenue", summary="Recognised revenue grouped by day or month, product and GPU type")
    def revenue(
        request: Request,
        start: From = None,
        end: To = None,
        group_by: GroupBy = "day,product,gpuType",
        fmt: Fmt = None,
    ) -> Response:
        s, e = _period(start, end, now())
        keys = [k for k in group_by.split(",") if k]
        unknown = [k for k in keys if k not in reports.GROUP_KEYS]
        if unknown:
            raise ApiError(
                422, "invalid_group_by", f"groupBy takes {', '.join(reports.GROUP_KEYS)}; unknown: {unknown}"
            )
        if "day" in keys and "month" in keys:
            raise ApiError(422, "invalid_group_by", "groupBy: day and month together group by day; give one of them")
        rep = read(reports.revenue, s, e, keys)
        return _render(rep, request, fmt, {**rep.summary, "rows": rep.as_dicts()})

    @router.get("/debts", summary="Wallets below zero")
    def debts(request: Request, fmt: Fmt = None) -> Response:
        rep = read(reports.debts)
        return _render(rep, request, fmt, {**rep.summary, "wallets": rep.as_dicts()})

    @router.get("/rejected", summary="Rejected inputs by reason")
    def rejected(
        request: Request,
        start: From = None,
        end: To = None,
        fmt: Fmt = None,
    ) -> Response:
        s, e = _period(start, end, now())
        rep = read(reports.rejected_inputs, s, e)
        return _render(rep, request, fmt, {**rep.summary, "rows": rep.as_dicts()})

    @router.get(
        "/anomalies",
        summary="Stripe facts applied as Stripe said but flagged: larger than the payment, or far-off times",
    )
    def stripe_anomalies(
        request: Request,
        start: From = None,
        end: To = None,
        fmt: Fmt = None,
    ) -> Response:
        """``exceeds_payment``: a refund or dispute larger than what its payment still had in the
        ledger, applied in full (Stripe moved the money). ``event_time``: a webhook whose ``created``
        was more than 300 s from the service clock, booked at its receipt (``bookedAt``) instead of
        Stripe's ``stripeCreatedAt``. Period on the booking instant."""
        s, e = _period(start, end, now())
        rep = read(anomalies.anomalies, s, e)
        return _render(rep, request, fmt, {**rep.summary, "rows": rep.as_dicts()})

    @router.get("/stripe-reconciliation", summary="Ledger top-ups and refunds against Stripe's own records")
    def stripe_reconciliation(
        request: Request,
        start: From = None,
        end: To = None,
        fmt: Fmt = None,
    ) -> Response:
        if client is None:
            raise ApiError(503, "stripe_not_configured", "Stripe is not configured: set BILLING_STRIPE_API_KEY")
        s, e = _period(start, end, now())
        try:
            with engine.connect() as conn:
                rep = reconciliation.stripe_reconciliation(conn, client, s, e)
        except (StripeRefused, StripeUnavailable) as error:
            raise _stripe_failure(error) from None
        return _render(rep, request, fmt, {**rep.summary, "rows": rep.as_dicts()})

    return router
