"""The route class of every route of the API: JSON bodies parsed with numbers as ``Decimal`` (a
float never carries money), and every error in the API's one shape (``consumers.http.errors``)
whatever app the router is included in. Also the bounded read of a raw body."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from consumers.http.errors import (
    ApiError,
    database_unavailable_response,
    http_error_response,
    validation_error_response,
)
from consumers.runtime.errors import is_transient
from consumers.stripe.facts import load_json

log = logging.getLogger("billing.http")


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
            except Exception as error:
                if not is_transient(error):
                    raise
                log.exception("database unavailable answering %s %s", request.method, request.url.path)
                return database_unavailable_response()

        return route_handler


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the body is more than {limit} bytes")


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it (declared or streamed) is over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
