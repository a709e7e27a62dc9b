"""Small pieces the long-running loops share: bounded backoff, waiting on several events, and a
unit of work whose blocking calls run in a worker thread.

The ledger's unit of work is synchronous (psycopg). The relay, the scheduler and the admission
replies live on the service's event loop, so every database call goes through
:func:`asyncio.to_thread`: a slow or unreachable PostgreSQL delays that loop only, never the loop
that serves NATS and HTTP.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import psycopg
import sqlalchemy.exc
from sqlalchemy import Engine

from ledger.db import UnitOfWork, unit_of_work
from ledger.invariants import require

T = TypeVar("T")

DEFAULT_BACKOFF_INITIAL_S: Final = 0.1
DEFAULT_BACKOFF_MAX_S: Final = 10.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class Backoff:
    """Bounded exponential backoff with jitter: initial, x2 per failure, capped at ``maximum``."""

    def __init__(
        self,
        initial: float = DEFAULT_BACKOFF_INITIAL_S,
        maximum: float = DEFAULT_BACKOFF_MAX_S,
        *,
        factor: float = 2.0,
        jitter: float = 0.2,
    ) -> None:
        require(0 < initial <= maximum, f"backoff {initial}..{maximum}")
        require(factor >= 1 and 0 <= jitter < 1, "backoff factor/jitter")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.failures = 0

    def next(self) -> float:
        """The delay before the next attempt (and count one more failure)."""
        base = min(self.maximum, self.initial * self.factor ** min(self.failures, 64))
        self.failures += 1
        return base * (1 - self.jitter * random.random())

    def reset(self) -> None:
        self.failures = 0


async def wait_any(*events: asyncio.Event | None, seconds: float | None) -> bool:
    """Wait until one of ``events`` is set or ``seconds`` pass; True if one is set."""
    present = [e for e in events if e is not None]
    if any(e.is_set() for e in present):
        return True
    if seconds is not None and seconds <= 0:
        return False
    if not present:
        await asyncio.sleep(seconds if seconds is not None else 0)
        return False
    waiters = [asyncio.ensure_future(e.wait()) for e in present]
    try:
        done, _ = await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return bool(done)


def is_connectivity_error(exc: BaseException) -> bool:
    """A database that is down, restarting or unreachable (as opposed to a bug or a bad row)."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        psycopg.OperationalError
        | psycopg.InterfaceError
        | sqlalchemy.exc.OperationalError
        | sqlalchemy.exc.InterfaceError
        | sqlalchemy.exc.TimeoutError
        | ConnectionError
        | TimeoutError,
    )


class ThreadedUnitOfWork:
    """``ledger.db.unit_of_work`` driven from asyncio: each blocking step runs in a worker thread.

    One step at a time (the connection is never used by two threads at once). Rolls back on exit
    unless :meth:`commit` was awaited; the rollback is shielded from cancellation, so a cancelled
    task still returns its connection to the pool with nothing kept.
    """

    def __init__(self, engine: Engine) -> None:
        self._cm: AbstractContextManager[UnitOfWork] = unit_of_work(engine)
        self._uow: UnitOfWork | None = None

    async def __aenter__(self) -> ThreadedUnitOfWork:
        self._uow = await asyncio.to_thread(self._cm.__enter__)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._uow is None:
            return
        self._uow = None
        await asyncio.shield(asyncio.to_thread(self._cm.__exit__, None, None, None))

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(pg, *args, **kwargs)`` in a worker thread, ``pg`` being this transaction's connection."""
        uow = self._uow
        require(uow is not None, "unit of work not entered")
        assert uow is not None
        return await asyncio.to_thread(lambda: fn(uow.pg, *args, **kwargs))

    async def commit(self) -> None:
        uow = self._uow
        require(uow is not None, "unit of work not entered")
        assert uow is not None
        await asyncio.to_thread(uow.commit)
