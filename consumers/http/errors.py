"""The one error shape of the HTTP API: ``{"error": "<code>", "detail": "<what to fix>"}``, and the
mapping to it of everything a route can meet: :class:`ApiError` (raised anywhere below a route),
request validation, Starlette's own HTTP errors, Stripe's failures, the domain errors of the
projections, and a database that is unavailable (``consumers.runtime.errors.is_transient``: 503 with
``Retry-After``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from consumers.stripe.facts import TopUpRefused
from consumers.stripe.gateway import StripeRefused, StripeUnavailable

log = logging.getLogger("billing.http")

MAX_DETAIL_CHARS: Final = 1000
RETRY_AFTER_SECONDS: Final = "5"
MAX_VALIDATION_PARTS: Final = 5
"""Validation errors named in one answer; the rest are counted."""


class ApiError(Exception):
    """An answer other than success, with a status, a stable code and a message a person can act on."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> JSONResponse:
        return error_response(self.status, self.error, self.detail, headers=self.headers, extra=self.extra)


def error_response(
    status: int,
    error: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
    body: dict[str, Any] = {"error": error, "detail": detail, **(extra or {})}
    return JSONResponse(status_code=status, content=body, headers=dict(headers or {}))


# ------------------------------------------------------------------------ transient errors


def database_unavailable_response() -> Response:
    return error_response(
        503,
        "database_unavailable",
        "the database is unavailable or overloaded; retry in a few seconds",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


# ---------------------------------------------------------------------------- domain errors


def stripe_failure(error: StripeRefused | StripeUnavailable) -> ApiError:
    if isinstance(error, StripeRefused):
        return ApiError(error.status, error.error, error.detail)
    return ApiError(502, "stripe_unavailable", error.detail, headers={"Retry-After": RETRY_AFTER_SECONDS})


# The HTTP status of each refusal of a confirm (consumers.stripe.facts.TopUpRefused).
TOPUP_REFUSAL_STATUS: Final = {"payment_intent_not_found": 404, "payment_not_succeeded": 409, "not_a_wallet_topup": 422}


def topup_refused(refusal: TopUpRefused) -> ApiError:
    return ApiError(TOPUP_REFUSAL_STATUS[refusal.error], refusal.error, refusal.detail, extra=refusal.extra)


def stripe_not_configured() -> ApiError:
    return ApiError(503, "stripe_not_configured", "Stripe is not configured: set BILLING_STRIPE_API_KEY")


def wallet_not_found(wallet_id: str) -> ApiError:
    return ApiError(
        404,
        "wallet_not_found",
        f"no wallet {wallet_id} is known: it has had no top-up, usage or admission yet",
    )


# ----------------------------------------------------------------- validation and Starlette


def _validation_message(e: Mapping[str, Any]) -> tuple[str, str | None]:
    """(where, message) of one validation error; message None when the error's text says it all."""
    loc = [str(p) for p in e.get("loc", ())]
    if loc and loc[0] in ("body", "path", "query", "header"):
        loc = loc[1:]
    where = ".".join(loc) or "body"
    kind = e.get("type", "")
    if kind == "missing":
        return where, "required field is missing"
    if kind == "extra_forbidden":
        return where, "unknown field (field names are camelCase)"
    if kind == "json_invalid":
        reason = e.get("ctx", {}).get("error")
        return "body", "is not valid JSON" + (f" ({reason})" if reason else "")
    if kind == "usd_amount":
        return where, None  # the message names the amount itself
    if kind == "string_pattern_mismatch":
        return where, f"must match {e.get('ctx', {}).get('pattern')}"
    if kind in ("model_attributes_type", "dict_type", "model_type"):
        return where, "must be a JSON object (send Content-Type: application/json)"
    return where, str(e.get("msg", "is invalid"))


def validation_error_response(error: RequestValidationError) -> Response:
    parts = []
    errors = list(error.errors())
    for e in errors[:MAX_VALIDATION_PARTS]:
        where, message = _validation_message(e)
        if message is None:
            parts.append(str(e.get("msg", "amount is invalid")))
        else:
            parts.append(f"{where}: {message}")
    if len(errors) > MAX_VALIDATION_PARTS:
        parts.append(f"and {len(errors) - MAX_VALIDATION_PARTS} more")
    return error_response(422, "invalid_request", "; ".join(parts) or "the request is invalid")


_HTTP_CODES: Final = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def http_error_response(error: StarletteHTTPException) -> Response:
    code = _HTTP_CODES.get(error.status_code, "http_error")
    detail = error.detail if isinstance(error.detail, str) else code
    if error.status_code == 404 and detail == "Not Found":
        detail = "no such path; see openapi.json for the API's paths"
    return error_response(error.status_code, code, detail, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """The API's error shape for what no route of the router answers: unknown paths (404), wrong
    methods (405), and the 500 of a bug (details in the log, not in the answer)."""

    async def on_api_error(_request: Request, exc: Exception) -> Response:
        if isinstance(exc, ApiError):
            return exc.response()
        raise exc

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        if isinstance(exc, StarletteHTTPException):
            return http_error_response(exc)
        raise exc

    async def on_validation_error(_request: Request, exc: Exception) -> Response:
        if isinstance(exc, RequestValidationError):
            return validation_error_response(exc)
        raise exc

    async def on_bug(request: Request, exc: Exception) -> Response:
        log.error("unhandled error answering %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_bug)
