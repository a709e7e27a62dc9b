"""Bounds on what one HTTP client can hold: time, connections, bytes, and work before its token.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and answers 503 past
``limit_concurrency``, but it has no deadline for *receiving* a request: its keep-alive timer is
cancelled by every byte that arrives, so a client that sends one header byte every few seconds
(slowloris) holds its socket, and a slot of the server, for ever. An ASGI middleware cannot help
there: it runs only once the request head is parsed. So the deadlines live in the protocol:

- :func:`deadline_protocol` is uvicorn's h11 protocol with two absolute timers per request: the head
  (request line and headers) must be complete within ``http_header_timeout_s`` of its first byte (or
  of the connection, for a client that connects and says nothing), and the body within
  ``http_body_timeout_s`` of the head. Absolute, not idle: a trickle of bytes does not extend them.
  On expiry the connection is closed (a 408 first when no response has begun).
- :class:`GuardMiddleware` answers before the app reads a byte of the body: the bearer token and its
  scope are checked first (401/403 in the API's error shape, ``consumers.http.errors``), then the
  body's size: a ``Content-Length`` over the limit is a 413 at once, and a chunked body is counted
  as it streams, so at most the limit is ever held in memory. The routes' own token dependency
  still runs (it documents the security scheme in OpenAPI); this only moves the refusal earlier.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from consumers.http.errors import ApiError

log = logging.getLogger("billing.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_TIMEOUT_BODY: Final = b'{"error":"request_timeout","detail":"the request was not received in time"}'
_REQUEST_TIMEOUT: Final = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + b"content-length: %d\r\n\r\n" % len(_TIMEOUT_BODY)
    + _TIMEOUT_BODY
)


class _DeadlineH11Protocol(H11Protocol):
    """H11Protocol with absolute deadlines for a request's head and body (see the module doc)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._enter("head")  # a client that connects and sends nothing is bounded too

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_state(new_bytes=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_state(new_bytes=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(None)
        super().connection_lost(exc)

    def _follow_state(self, *, new_bytes: bool) -> None:
        """The phase the client is in: sending a head (IDLE, once a byte of it arrived), a body
        (SEND_BODY), or neither (the app has the request, or the connection idles in keep-alive)."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._enter("body")
        elif state is h11.IDLE and (new_bytes or self._phase == "head"):
            self._enter("head")
        else:
            self._enter(None)

    def _enter(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # the running deadline stands: more bytes do not extend it
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None and self.transport is not None and not self.transport.is_closing():
            limit = self.header_timeout_s if phase == "head" else self.body_timeout_s
            self._deadline = self.loop.call_later(limit, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        log.debug("closing an HTTP connection from %s: request %s not received in time", self.client, phase)
        if self.conn.our_state is h11.IDLE:  # no response begun: say why before closing
            self.transport.write(_REQUEST_TIMEOUT)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()


def deadline_protocol(header_timeout_s: float, body_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with these deadlines (a class per configuration: uvicorn builds one
    protocol per connection from the class and its Config)."""
    return type(
        "DeadlineH11Protocol",
        (_DeadlineH11Protocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )


# -------------------------------------------------------------------------------- the middleware

Authorize = Callable[[str, str | None], ApiError | None]
"""(required scope, Authorization header or None) -> the refusal, or None when the token may."""


class GuardMiddleware:
    """Token and scope before the body, then a size limit on every body (see the module doc).

    ``scopes`` maps a path prefix to the scope its routes need (longest prefix first is not needed:
    the prefixes do not overlap); ``limits`` maps a path to its own body limit (the webhook's)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        authorize: Authorize,
        scopes: Mapping[str, str],
        max_body_bytes: int,
        limits: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self._authorize = authorize
        self._scopes = tuple(scopes.items())
        self._max_body_bytes = max_body_bytes
        self._limits = dict(limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        needed = next((s for prefix, s in self._scopes if path.startswith(prefix)), None)
        headers = _headers(scope)
        if needed is not None:
            refusal = self._authorize(needed, headers.get("authorization"))
            if refusal is not None:
                await _answer(refusal, scope, receive, send)
                return
        limit = self._limits.get(path, self._max_body_bytes)
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _answer(_too_large(limit), scope, receive, send)
            return
        body = await _read_body(receive, limit)
        if body is None:
            await _answer(_too_large(limit), scope, receive, send)
            return
        if body and body[-1]["type"] != "http.request":
            return  # the client went away (or its body deadline passed) before the body was complete
        await self.app(scope, _replay(body, receive), send)


def _headers(scope: Scope) -> dict[str, str]:
    """The request headers by lower-case name (the first of each); latin-1, as HTTP defines them."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the body is more than {limit} bytes (BILLING_HTTP_MAX_BODY_BYTES)")


async def _read_body(receive: Receive, limit: int) -> list[Message] | None:
    """The request's body messages, or None as soon as their bytes exceed ``limit``."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # a disconnect: nobody to answer
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _answer(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer ``error`` without reading the body (uvicorn discards what the client still sends,
    bounded by the body deadline)."""
    response = error.response()
    await response(scope, receive, send)


def uvicorn_config(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    header_timeout_s: float,
    body_timeout_s: float,
    keepalive_timeout_s: float,
    max_connections: int,
    **kwargs: Any,
) -> uvicorn.Config:
    """A uvicorn Config with every bound of this module: head and body deadlines, keep-alive,
    and at most ``max_connections`` connections or requests at once (503 past it)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=deadline_protocol(header_timeout_s, body_timeout_s),
        timeout_keep_alive=max(1, round(keepalive_timeout_s)),
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=16_384,  # request line and headers: 16 KiB (h11's default)
        **kwargs,
    )
