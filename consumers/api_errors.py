"""The one error shape of the HTTP API: ``{"error": "<code>", "detail": "<what to fix>"}``.

Raised anywhere below a route (auth, validation, the Stripe and ledger paths) as :class:`ApiError`;
the route class of ``consumers.http_api`` turns it into a JSON response with its status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from fastapi.responses import JSONResponse

MAX_DETAIL_CHARS: Final = 1000


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
