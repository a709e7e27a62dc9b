"""No bytes on the wire stop this process's NATS connections: nats-py patched to read any message.

**Why a patch.** nats-py 2.x (2.16 here) decodes every delivered message's subject and reply with
strict UTF-8 (``Client._build_message``: ``subject.decode()``). NATS itself does not require subjects
to be UTF-8: a producer's ``PUB billing.in.w\\xff 2`` is accepted and stored by JetStream, and its
delivery makes ``decode()`` raise inside the client's read loop, which catches the exception, logs
"nats: encountered error" and *ends the loop*. The connection stays open and looks healthy (no
reconnect, ``is_connected`` is True), but nothing is read from it again: the intake applies no
more events and admission requests on the same connection time out. Found by issue 13's probes,
reproduced with a raw TCP ``PUB`` against the real service.

nats-py has no hook for this (``msg_class`` is built *after* the decode), so :func:`install`
replaces two of ``nats.aio.client.Client``'s private methods, process-wide, for every connection
(FastStream's broker connection included):

* ``_build_message`` decodes subject and reply with ``surrogateescape``: valid UTF-8 reads exactly
  as before, and an invalid byte ``0xNN`` becomes the lone surrogate ``U+DCNN``, so the original
  bytes are still there (:func:`subject_bytes`). Code that stores or forwards such a subject must
  make it printable first (:func:`printable`): it does not encode as UTF-8.
* ``_process_headers`` is wrapped: a header block it cannot parse (a bare ``NATS/1.0`` raises
  IndexError in nats-py) is counted and logged, and the message is delivered without headers;
* ``_process_msg`` is wrapped: whatever else makes the client fail on one message (a header block
  it cannot parse...) drops that message alone, logs it and counts it
  (``billing_intake_unreadable_messages_total``) instead of ending the read loop. A JetStream
  delivery dropped this way is not acked, so JetStream redelivers it up to ``max_deliver`` times.

:func:`check_compatible` (run by :func:`install` and by a unit test) fails loudly if a nats-py
upgrade changes what is patched, rather than silently running unpatched.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Final

from nats.aio.client import Client

from consumers.runtime.metrics import UNREADABLE_MESSAGES
from ledger.text import printable

log = logging.getLogger("billing.nats")

_BUILD_PARAMS: Final = ("self", "sid", "subject", "reply", "data", "headers")
_PROCESS_PARAMS: Final = ("self", "sid", "subject", "reply", "data", "headers")

_lock = threading.Lock()
_installed = False


def subject_bytes(subject: str) -> bytes:
    """A subject as it was on the wire (the inverse of the patched decode)."""
    return subject.encode("utf-8", "surrogateescape")


def check_compatible() -> None:
    """Raise if nats-py's methods are not the ones this module was written against."""
    for name, params in (
        ("_build_message", _BUILD_PARAMS),
        ("_process_msg", _PROCESS_PARAMS),
        ("_process_headers", ("self", "headers")),
    ):
        method = getattr(Client, name, None)
        if method is None:
            raise RuntimeError(f"nats-py has no Client.{name}: consumers/nats/safety.py must be updated")
        original = getattr(method, "__wrapped_by_billing__", method)
        found = tuple(inspect.signature(original).parameters)
        if found != params:
            raise RuntimeError(f"nats-py Client.{name}{found} changed: consumers/nats/safety.py must be updated")


def _build_message(self: Client, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> Any:
    return self.msg_class(
        subject=subject.decode("utf-8", "surrogateescape"),
        reply=reply.decode("utf-8", "surrogateescape"),
        data=data,
        headers=headers,
        _client=self,
        _sid=sid,
    )


def _guarded(original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    async def _process_msg(self: Client, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> None:
        try:
            await original(self, sid, subject, reply, data, headers)
        except Exception as exc:
            UNREADABLE_MESSAGES.add()
            log.error(
                "NATS message dropped: the client could not read it (%s: %s); subject %s, reply %s, "
                "%d header bytes, %d body bytes (a JetStream delivery is redelivered until max_deliver)",
                type(exc).__name__,
                exc,
                printable(subject.decode("utf-8", "surrogateescape"))[:300],
                printable(reply.decode("utf-8", "surrogateescape"))[:300],
                len(headers or b""),
                len(data),
            )

    _process_msg.__wrapped_by_billing__ = original  # type: ignore[attr-defined]
    return _process_msg


def _guarded_headers(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def _process_headers(self: Client, headers: Any) -> Any:
        try:
            return await original(self, headers)
        except Exception as exc:
            # e.g. a header block of just "NATS/1.0" (IndexError in nats-py): the message is still
            # delivered, without headers, so that the intake records it like any other bad input.
            UNREADABLE_MESSAGES.add()
            log.error(
                "NATS message headers unreadable (%s: %s), the message is delivered without them: %s",
                type(exc).__name__,
                exc,
                printable(bytes(headers[:300]).decode("utf-8", "surrogateescape")),
            )
            return None

    _process_headers.__wrapped_by_billing__ = original  # type: ignore[attr-defined]
    return _process_headers


def install() -> None:
    """Patch nats-py once per process (idempotent); see the module docstring for why."""
    global _installed
    with _lock:
        if _installed:
            return
        check_compatible()
        Client._build_message = _build_message  # type: ignore[method-assign]
        Client._process_msg = _guarded(Client._process_msg)  # type: ignore[method-assign,assignment]
        Client._process_headers = _guarded_headers(Client._process_headers)  # type: ignore[method-assign,assignment]
        _installed = True
