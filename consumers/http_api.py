"""The HTTP API of the billing service (DESIGN section 6): wallet top-ups through Stripe, Stripe
webhooks, and the wallet and rental reads.

Wiring (the runtime owns the app, ``/healthz``, ``/readyz`` and ``/metrics``)::

    app.include_router(build_api(engine, settings))
    install_error_handlers(app)   # the error shape for what no route answers (404, 405, 500)

:func:`create_app` does both for tests and for the OpenAPI export (``consumers/export_openapi.py``
writes ``openapi.json``).

Conventions
-----------
- JSON in camelCase; money as integer ``...Micros`` with an exact decimal ``...Usd`` string beside it
  for people. Request bodies are parsed with JSON numbers as ``Decimal``: a float never carries money.
- Every error is ``{"error": "<code>", "detail": "<what to fix>"}`` with its status: 400 (unreadable
  body, bad webhook signature), 401 (no or unknown token, with ``WWW-Authenticate: Bearer``), 403
  (token without the scope), 404, 409, 413, 422 (invalid input), 502/503 (Stripe or the database
  unavailable: retry). Bad input never yields a 500. The route class turns errors into this shape
  itself, so the router keeps it inside any app.
- Auth: ``Authorization: Bearer <token>``; tokens and scopes from ``BILLING_API_TOKENS``
  (``token:scope,scope;token:scope``, scopes ``wallet`` and ``finance``). A presented token is
  compared with every configured token in constant time (``hmac.compare_digest``), never logged.
- Handlers that do I/O are plain functions: FastAPI runs them in its thread pool, where the
  SQLAlchemy engine and the Stripe client (both blocking) belong.
- Reads take no write lock: a read-only repeatable-read snapshot (``projections.read_models``), with
  the live figures (available, burn, projected zero, state) computed at the request's instant by the
  rules' query functions.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import psycopg
import sqlalchemy.exc
import stripe
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from consumers.api_errors import ApiError, error_response
from consumers.settings import Settings
from consumers.stripe_facts import MAX_WEBHOOK_BYTES, InvalidWebhook, StripeFacts, load_json
from consumers.stripe_gateway import (
    StripeGateway,
    StripeRefused,
    StripeUnavailable,
    WebhookSignatureError,
    client_from_settings,
)
from ledger.events import ID_PATTERN
from ledger.money import MAX_AMOUNT_CHARS, MoneyParseError, format_usd, micros_to_cents_exact, parse_usd_micros
from projections import rules
from projections.read_models import read_rental, read_snapshot, read_wallet

log = logging.getLogger("billing.http")

SCOPES: Final = frozenset({"wallet", "finance"})
PAYMENT_INTENT_PATTERN: Final = r"^pi_[A-Za-z0-9_]{1,252}$"
IDEMPOTENCY_KEY_PATTERN: Final = r"^[!-~]{1,200}$"
RETRY_AFTER_SECONDS: Final = "5"
# The amount strings ledger.money.parse_usd_micros reads (without the spaces it would strip).
AMOUNT_STRING_PATTERN: Final = r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------- auth


@dataclass(frozen=True, slots=True)
class _Token:
    secret: bytes
    scopes: frozenset[str]


def parse_api_tokens(spec: str) -> tuple[_Token, ...]:
    """``token:scope,scope;token:scope`` -> tokens. Raises ValueError naming the entry by position
    (never the token itself) for an empty token, a missing scope list or an unknown scope."""
    merged: dict[bytes, set[str]] = {}
    for position, entry in enumerate(spec.split(";"), start=1):
        entry = entry.strip()
        if not entry:
            continue
        token, sep, scopes_text = entry.rpartition(":")
        token = token.strip()
        if not sep or not token or any(c.isspace() for c in token):
            raise ValueError(f"BILLING_API_TOKENS entry {position}: expected token:scope[,scope]")
        scopes = {s.strip() for s in scopes_text.split(",") if s.strip()}
        unknown = scopes - SCOPES
        if not scopes or unknown:
            raise ValueError(
                f"BILLING_API_TOKENS entry {position}: scopes must be among {sorted(SCOPES)}, "
                f"got {sorted(scopes) or 'none'}"
            )
        merged.setdefault(token.encode(), set()).update(scopes)
    return tuple(_Token(secret, frozenset(scopes)) for secret, scopes in merged.items())


class TokenAuthenticator:
    def __init__(self, tokens: tuple[_Token, ...]) -> None:
        self._tokens = tokens

    def scopes_of(self, presented: str) -> frozenset[str] | None:
        """The scopes of a presented token, or None. Compares with *every* configured token, each in
        constant time, so the time taken says nothing about which token came close."""
        given = presented.encode("utf-8", "surrogateescape")
        found: frozenset[str] | None = None
        for token in self._tokens:
            if hmac.compare_digest(given, token.secret):
                found = token.scopes
        return found


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearerToken",
    description="A token of BILLING_API_TOKENS with the scope the operation names.",
)


def _bearer_token(header: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (the scheme in any case), as HTTPBearer reads it."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def authorization_refusal(auth: TokenAuthenticator, scope: str, header: str | None) -> ApiError | None:
    """Why a request with this ``Authorization`` header may not use an operation of ``scope``, or
    None. One check for the route dependency and for the guard that runs before the body is read."""
    token = _bearer_token(header)
    if token is None:
        return ApiError(
            401,
            "unauthenticated",
            "send an API token: Authorization: Bearer <token>",
            headers={"WWW-Authenticate": 'Bearer realm="billing"'},
        )
    scopes = auth.scopes_of(token)
    if scopes is None:
        return ApiError(
            401,
            "invalid_token",
            "the bearer token is not one this service knows; check the token (BILLING_API_TOKENS)",
            headers={"WWW-Authenticate": 'Bearer realm="billing", error="invalid_token"'},
        )
    if scope not in scopes:
        return ApiError(
            403,
            "insufficient_scope",
            f"this token lacks the {scope!r} scope this operation needs (it has: {', '.join(sorted(scopes))})",
            headers={"WWW-Authenticate": f'Bearer realm="billing", error="insufficient_scope", scope="{scope}"'},
        )
    return None


def _scope_dependency(auth: TokenAuthenticator, scope: str) -> Callable[..., Coroutine[Any, Any, None]]:
    async def require_scope(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        refusal = authorization_refusal(auth, scope, request.headers.get("authorization"))
        if refusal is not None:
            raise refusal

    return require_scope


# -------------------------------------------------------------------------------------- models


class _In(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", frozen=True, validate_by_name=False)


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, frozen=True, validate_by_name=True, serialize_by_alias=True)


def _usd_to_micros(value: object) -> int:
    if isinstance(value, str) and value != value.strip():
        raise PydanticCustomError("usd_amount", "amount must not have spaces around it: {value}", {"value": value[:40]})
    try:
        return parse_usd_micros(value)
    except MoneyParseError as error:
        raise PydanticCustomError("usd_amount", "{message}", {"message": str(error)}) from None
    except ArithmeticError:
        # decimal.InvalidOperation from Decimal() itself, e.g. "0E1000000000000000000" (an exponent past
        # Decimal's limits): parse_usd_micros lets it through; it is bad input all the same.
        raise PydanticCustomError(
            "usd_amount", "amount is not a number of USD this service can read: {value}", {"value": str(value)[:40]}
        ) from None


WalletId = Annotated[
    str,
    StringConstraints(pattern=ID_PATTERN),
    Field(description="The wallet's id: 1 to 64 letters, digits, '_' or '-'.", examples=["w_acme"]),
]
UsdAmount = Annotated[
    int,
    BeforeValidator(_usd_to_micros),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 5},
                {"type": "string", "pattern": AMOUNT_STRING_PATTERN, "maxLength": MAX_AMOUNT_CHARS},
            ],
            "description": 'USD, as a JSON number or a decimal string, in whole cents: 10, 12.5, "12.50". '
            f"At least $5 (presets: {', '.join(f'${p}' for p in rules.TOPUP_PRESETS_USD)}).",
            "examples": [10, 12.5, "12.50"],
        }
    ),
]


class CreateIntentRequest(_In):
    wallet_id: WalletId
    amount_micros: UsdAmount = Field(alias="amount")


class CreateIntentResponse(_Out):
    wallet_id: str
    payment_intent_id: str
    client_secret: str = Field(description="For Stripe.js on the client: confirm the payment with it.")
    amount_micros: int
    amount_usd: str
    currency: Literal["usd"] = "usd"


class ConfirmRequest(_In):
    payment_intent_id: Annotated[
        str, StringConstraints(pattern=PAYMENT_INTENT_PATTERN), Field(examples=["pi_3Nabc123"])
    ]


class ConfirmResponse(_Out):
    wallet_id: str
    payment_intent_id: str
    credited: bool = Field(description="True if this call credited the payment; false if it was credited before.")
    amount_micros: int
    balance_micros: int
    balance_usd: str


class WalletResponse(_Out):
    wallet_id: str
    balance_micros: int = Field(description="Ledger balance: the sum of the wallet's journal entries.")
    balance_usd: str
    available_micros: int = Field(description="Balance minus usage accrued since the last readings minus holds.")
    available_usd: str
    holds_micros: int = Field(description="Open admission holds.")
    accrued_micros: int = Field(description="Usage of the running rentals accrued but not metered yet.")
    burn_micros_per_hour: int = Field(description="Sum of the hourly prices of the running rentals.")
    projected_zero_at: datetime | None = Field(description="When available reaches zero at the current burn.")
    state: Literal["active", "low", "exhausted"]
    running_rentals: int
    at: datetime = Field(description="The instant these figures were computed for.")


class RentalResponse(_Out):
    resource_id: str
    wallet_id: str
    resource_kind: str
    tier: str
    gpu_type: str
    state: Literal["running", "paused", "ended"]
    billable_seconds: int
    cost_micros: int = Field(description="floor(billableSeconds * pricePerHourMicros / 3600), charged so far.")
    cost_usd: str
    price_per_hour_micros: int
    started_at: datetime
    ended_at: datetime | None
    end_reason: str | None


class WebhookResponse(_Out):
    received: Literal[True] = True
    event_id: str
    type: str
    handled: bool = Field(description="The type is acted on and its facts are in the ledger.")
    duplicate: bool = Field(description="This Stripe event was received before; nothing was done again.")
    facts: int
    applied: int = Field(description="Facts new to the ledger (a payment already credited by confirm is not).")
    note: str = Field(description="What was done, or why the event was only recorded.")


class ErrorResponse(BaseModel):
    error: str = Field(description="A stable code, e.g. invalid_token, wallet_not_found.")
    detail: str = Field(description="What went wrong and what to do about it.")


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


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "Unreadable body, or a webhook whose signature does not verify",
        401: "No token, or a token this service does not know",
        403: "The token lacks the scope",
        404: "Not found",
        409: "Conflict with the current state",
        413: "Body too large",
        422: "Invalid input",
        502: "Stripe failed or could not be reached; retry",
        503: "Not configured, or the database is unavailable; retry",
    }
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": described[status]}
        if status == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
        responses[status] = entry
    return responses


# ---------------------------------------------------------------------------- the route class


class _DecimalJSONRequest(Request):
    """A request whose JSON body parses numbers with a fraction as ``Decimal``, never float."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = load_json(body)
            except json.JSONDecodeError:
                raise
            except (ValueError, RecursionError, ArithmeticError) as error:  # not UTF-8, NaN, 1e9999999999...
                raise json.JSONDecodeError(str(error) or "invalid JSON", body.decode("utf-8", "replace"), 0) from None
        return self._json


class BillingRoute(APIRoute):
    """Every route of the API: Decimal JSON bodies, and every error in the API's one shape, whatever
    app the router is included in."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handle(_DecimalJSONRequest(request.scope, request.receive))
            except ApiError as error:
                return error.response()
            except RequestValidationError as error:
                return validation_error_response(error)
            except StarletteHTTPException as error:
                return http_error_response(error)
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError, psycopg.OperationalError):
                log.exception("database unavailable answering %s %s", request.method, request.url.path)
                return error_response(
                    503,
                    "database_unavailable",
                    "the database is unavailable or overloaded; retry in a few seconds",
                    headers={"Retry-After": RETRY_AFTER_SECONDS},
                )

        return route_handler


def validation_error_response(error: RequestValidationError) -> Response:
    parts = []
    errors = list(error.errors())
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc", ())]
        if loc and loc[0] in ("body", "path", "query", "header"):
            loc = loc[1:]
        where = ".".join(loc) or "body"
        kind = e.get("type", "")
        if kind == "missing":
            message = "required field is missing"
        elif kind == "extra_forbidden":
            message = "unknown field (field names are camelCase)"
        elif kind == "json_invalid":
            reason = e.get("ctx", {}).get("error")
            where, message = "body", "is not valid JSON" + (f" ({reason})" if reason else "")
        elif kind == "usd_amount":
            parts.append(str(e.get("msg", "amount is invalid")))  # the message names the amount itself
            continue
        elif kind == "string_pattern_mismatch":
            message = f"must match {e.get('ctx', {}).get('pattern')}"
        elif kind in ("model_attributes_type", "dict_type", "model_type"):
            message = "must be a JSON object (send Content-Type: application/json)"
        else:
            message = str(e.get("msg", "is invalid"))
        parts.append(f"{where}: {message}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
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


# ------------------------------------------------------------------------------------ the API


def _presets_text() -> str:
    return ", ".join(f"${p}" for p in rules.TOPUP_PRESETS_USD)


def _stripe_failure(error: StripeRefused | StripeUnavailable) -> ApiError:
    if isinstance(error, StripeRefused):
        return ApiError(error.status, error.error, error.detail)
    return ApiError(502, "stripe_unavailable", error.detail, headers={"Retry-After": RETRY_AFTER_SECONDS})


def _anomaly_counter(registry: CollectorRegistry | None) -> Callable[[str, int], None] | None:
    if registry is None:
        return None
    counter = Counter(
        "billing_stripe_anomalies",
        "Stripe facts applied as Stripe said but flagged for finance (GET /finance/anomalies), by kind",
        ["kind"],
        registry=registry,
    )
    for kind in ("exceeds_payment", "event_time"):
        counter.labels(kind)  # present at 0 from the start, so a rate() has a baseline

    def count(kind: str, n: int) -> None:
        counter.labels(kind).inc(n)

    return count


def build_api(
    engine: Engine,
    settings: Settings,
    *,
    stripe_client: stripe.StripeClient | None = None,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
) -> APIRouter:
    """The API's routes. ``stripe_client`` defaults to one built from the settings (key and
    ``BILLING_STRIPE_API_BASE``); ``clock`` (aware UTC datetimes) defaults to the system clock;
    ``registry`` gets ``billing_stripe_anomalies_total{kind}``. Raises ValueError at once if
    ``BILLING_API_TOKENS`` is malformed."""
    now = clock or _utc_now
    auth = TokenAuthenticator(parse_api_tokens(settings.api_tokens.get_secret_value()))
    client = stripe_client if stripe_client is not None else client_from_settings(settings)
    gateway = StripeGateway(client) if client is not None else None
    facts = StripeFacts(engine, gateway, now, on_anomaly=_anomaly_counter(registry))
    wallet_scope = [Depends(_scope_dependency(auth, "wallet"))]
    router = APIRouter(route_class=BillingRoute)

    def require_gateway() -> StripeGateway:
        if gateway is None:
            raise ApiError(503, "stripe_not_configured", "Stripe is not configured: set BILLING_STRIPE_API_KEY")
        return gateway

    @router.post(
        "/wallet/create-intent",
        tags=["wallet"],
        summary="Start a top-up: a Stripe PaymentIntent for the wallet",
        dependencies=wallet_scope,
        responses=_errors(401, 403, 409, 422, 502, 503),
    )
    def create_intent(
        body: CreateIntentRequest,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                pattern=IDEMPOTENCY_KEY_PATTERN,
                description="Optional: a retry with the same key returns the same PaymentIntent.",
            ),
        ] = None,
    ) -> CreateIntentResponse:
        """R1: at least $5 and at most the configured maximum, in whole cents. Creates a USD
        PaymentIntent with ``metadata.walletId``; the client confirms it with Stripe.js using
        ``clientSecret``, then the webhook (or ``POST /wallet/confirm``) credits the wallet."""
        micros = body.amount_micros
        try:
            cents = micros_to_cents_exact(micros)
        except MoneyParseError as error:
            raise ApiError(422, "invalid_amount", f"{error} (for example 12.50)") from None
        problem = rules.check_topup(micros, settings.max_topup_micros)
        if problem is not None:
            if "$100" not in problem:
                problem += f" Presets: {_presets_text()}."
            raise ApiError(
                422,
                "amount_out_of_range",
                problem,
                extra={
                    "presetsUsd": list(rules.TOPUP_PRESETS_USD),
                    "minimumMicros": rules.MIN_TOPUP_MICROS,
                    "maximumMicros": settings.max_topup_micros,
                },
            )
        if idempotency_key is not None:
            digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
            stripe_key = f"billing-topup-{body.wallet_id}-{digest}"
        else:
            stripe_key = f"billing-topup-{uuid.uuid4()}"
        try:
            intent = require_gateway().create_payment_intent(
                wallet_id=body.wallet_id, amount_cents=cents, idempotency_key=stripe_key
            )
        except (StripeRefused, StripeUnavailable) as error:
            raise _stripe_failure(error) from None
        if not intent.client_secret:
            raise ApiError(502, "stripe_unavailable", "Stripe returned a PaymentIntent without a client secret")
        return CreateIntentResponse(
            wallet_id=body.wallet_id,
            payment_intent_id=intent.id,
            client_secret=intent.client_secret,
            amount_micros=micros,
            amount_usd=format_usd(micros),
        )

    @router.post(
        "/wallet/confirm",
        tags=["wallet"],
        summary="Credit a succeeded PaymentIntent to its wallet (once)",
        dependencies=wallet_scope,
        responses=_errors(401, 403, 404, 409, 422, 502, 503),
    )
    def confirm(body: ConfirmRequest) -> ConfirmResponse:
        """Retrieves the PaymentIntent from Stripe. If it succeeded, its ``amount_received`` is credited
        to ``metadata.walletId`` exactly once, whether the webhook, this call, or both (concurrently or
        repeatedly) bring it. 409 while it has not succeeded."""
        require_gateway()
        try:
            result = facts.confirm(body.payment_intent_id)
        except (StripeRefused, StripeUnavailable) as error:
            raise _stripe_failure(error) from None
        return ConfirmResponse(
            wallet_id=result.wallet_id,
            payment_intent_id=result.payment_intent_id,
            credited=result.credited,
            amount_micros=result.amount_micros,
            balance_micros=result.balance_micros,
            balance_usd=format_usd(result.balance_micros),
        )

    @router.post(
        "/stripe/webhook",
        tags=["stripe"],
        summary="Stripe webhook endpoint (signed by Stripe)",
        responses=_errors(400, 413, 422, 502, 503),
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": _STRIPE_EVENT_SCHEMA}}}
        },
    )
    async def stripe_webhook(
        request: Request,
        stripe_signature: Annotated[
            str | None,
            Header(
                alias="Stripe-Signature",
                description="t=<unix time>,v1=<hex HMAC-SHA256 of f'{t}.{body}' with the webhook secret>",
            ),
        ] = None,
    ) -> WebhookResponse:
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
        secret = settings.stripe_webhook_secret.get_secret_value()
        if not secret:
            raise ApiError(
                503, "webhook_not_configured", "no webhook secret is configured (BILLING_STRIPE_WEBHOOK_SECRET)"
            )
        body = await _read_limited(request, MAX_WEBHOOK_BYTES)
        try:
            result = await run_in_threadpool(facts.webhook, body, stripe_signature, secret)
        except WebhookSignatureError as error:
            raise ApiError(400, "invalid_signature", str(error)) from None
        except InvalidWebhook as error:
            raise ApiError(400, "invalid_event", str(error)) from None
        except (StripeRefused, StripeUnavailable) as error:  # 5xx whatever Stripe said: Stripe retries
            detail = error.detail
            raise ApiError(502, "stripe_unavailable", detail, headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
        return WebhookResponse(
            event_id=result.event_id,
            type=result.type,
            handled=result.handled,
            duplicate=result.duplicate,
            facts=result.facts,
            applied=result.applied,
            note=result.note,
        )

    @router.get(
        "/wallets/{walletId}",
        tags=["wallet"],
        summary="A wallet's balance, available funds, burn and projected zero, live",
        dependencies=wallet_scope,
        responses=_errors(401, 403, 404, 422, 503),
    )
    def get_wallet(
        walletId: Annotated[str, Path(pattern=ID_PATTERN, description="The wallet's id.")],
    ) -> WalletResponse:
        at = now()
        with read_snapshot(engine) as conn:
            state = read_wallet(conn, walletId)
        if state is None:
            raise ApiError(
                404,
                "wallet_not_found",
                f"no wallet {walletId} is known: it has had no top-up, usage or admission yet",
            )
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

    @router.get(
        "/rentals/{resourceId}",
        tags=["wallet"],
        summary="A rental's state, billable seconds and cost so far",
        dependencies=wallet_scope,
        responses=_errors(401, 403, 404, 422, 503),
    )
    def get_rental(
        resourceId: Annotated[str, Path(pattern=ID_PATTERN, description="The rental's resource id.")],
    ) -> RentalResponse:
        with read_snapshot(engine) as conn:
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

    return router


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the body is more than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body is more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


API_TITLE: Final = "GPU cloud billing API"
API_VERSION: Final = "1.0.0"
API_DESCRIPTION: Final = (
    "Billing and metering service of the GPU cloud: wallet top-ups through Stripe, "
    "Stripe webhooks, wallet and rental reads. Money is integer micro-USD (`...Micros`)."
)
# The path prefixes of the operations that need a token, and the scope (GuardMiddleware checks it
# before the body is read; tests/unit/test_openapi.py checks every scoped route is covered).
ROUTE_SCOPES: Final = {"/wallet/": "wallet", "/wallets/": "wallet", "/rentals/": "wallet", "/finance/": "finance"}
DOCS_ASSETS_PATH: Final = "/docs/assets"


def install_api(
    app: FastAPI,
    engine: Engine,
    settings: Settings,
    *,
    stripe_client: stripe.StripeClient | None = None,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """The whole HTTP API on ``app``: the wallet/Stripe and finance routers, the error shape, the
    guard (token and body size before the body is read) and the served docs (``/``, ``/docs``)."""
    app.include_router(build_api(engine, settings, stripe_client=stripe_client, clock=clock, registry=registry))
    from consumers.finance_api import build_finance_api  # it imports this module's auth

    app.include_router(build_finance_api(engine, settings, stripe_client=stripe_client, clock=clock))
    install_error_handlers(app)
    install_docs(app)
    install_guard(app, settings)


def install_guard(app: FastAPI, settings: Settings) -> None:
    from consumers.http_limits import GuardMiddleware

    auth = TokenAuthenticator(parse_api_tokens(settings.api_tokens.get_secret_value()))
    app.add_middleware(
        GuardMiddleware,
        authorize=lambda scope, header: authorization_refusal(auth, scope, header),
        scopes=ROUTE_SCOPES,
        max_body_bytes=settings.http_max_body_bytes,
        limits={"/stripe/webhook": MAX_WEBHOOK_BYTES},
    )


def install_docs(app: FastAPI) -> None:
    """``/docs``: FastAPI's Swagger UI page, its JavaScript and CSS served from the installed
    swagger-ui-bundle-v2 package (no CDN: the page works without internet); ``/``: where things are.
    ``app.openapi_url`` must be set (``/openapi.json``). None of them needs a token."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from starlette.staticfiles import StaticFiles

    openapi_url = app.openapi_url or "/openapi.json"
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=str(swagger_ui_bundle.swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{API_TITLE} - docs",
            swagger_js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS_PATH}/favicon-32x32.png",
        )

    @app.get("/", include_in_schema=False)
    async def root() -> dict[str, Any]:
        return {
            "service": API_TITLE,
            "version": API_VERSION,
            "docs": "/docs",
            "openapi": openapi_url,
            "health": "/healthz",
            "ready": "/readyz",
            "metrics": "/metrics",
            "auth": "Authorization: Bearer <token> (BILLING_API_TOKENS; scopes wallet, finance)",
        }


def create_app(
    engine: Engine,
    settings: Settings,
    *,
    stripe_client: stripe.StripeClient | None = None,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """An app with the whole API (tests, the OpenAPI export); ``billing up`` serves the same on its
    operational app (consumers.app.build_http)."""
    app = FastAPI(
        title=API_TITLE,
        version=API_VERSION,
        description=API_DESCRIPTION,
        docs_url=None,  # ours, with local assets: install_docs
        redoc_url=None,
    )
    install_api(app, engine, settings, stripe_client=stripe_client, clock=clock, registry=registry)
    return app
