"""Small pieces the long-running loops share: waiting on several events, and a unit of work whose
blocking calls run in a worker thread (errors and backoff: consumers.runtime.errors).

The ledger's unit of work is synchronous (psycopg). The relay, the scheduler and the admission
replies live on the service's event loop, so every database call goes through
:func:`asyncio.to_thread`: a slow or unreachable PostgreSQL delays that loop only, never the loop
that serves NATS and HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine

from ledger.db import UnitOfWork, unit_of_work
from ledger.invariants import require

T = TypeVar("T")


def utc_now() -> datetime:
    return datetime.now(UTC)


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
