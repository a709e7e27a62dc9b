"""Bearer tokens and their scopes (DESIGN section 6).

``Authorization: Bearer <token>``; tokens and scopes from ``BILLING_API_TOKENS``
(``token:scope,scope;token:scope``, scopes ``wallet`` and ``finance``). A presented token is compared
with every configured token in constant time (``hmac.compare_digest``), never logged. One check,
:func:`authorization_refusal`, serves the routes' dependency (which also documents the security
scheme in OpenAPI) and the guard that runs before the body is read (``consumers.http.limits``).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from consumers.http.errors import ApiError

SCOPES: Final = frozenset({"wallet", "finance"})
# The path prefixes of the operations that need a token, and the scope (GuardMiddleware checks it
# before the body is read; tests/unit/test_openapi.py checks every scoped route is covered).
ROUTE_SCOPES: Final = {"/wallet/": "wallet", "/wallets/": "wallet", "/rentals/": "wallet", "/finance/": "finance"}


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

    @classmethod
    def from_spec(cls, spec: str) -> TokenAuthenticator:
        """From ``BILLING_API_TOKENS``; ValueError at once if it is malformed."""
        return cls(parse_api_tokens(spec))

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


def scope_dependency(auth: TokenAuthenticator, scope: str) -> Callable[..., Coroutine[Any, Any, None]]:
    """A route dependency: refuse (401/403) a request whose token lacks ``scope``."""

    async def require_scope(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        refusal = authorization_refusal(auth, scope, request.headers.get("authorization"))
        if refusal is not None:
            raise refusal

    return require_scope
