"""One error and backoff kit for every loop of the service.

:func:`is_transient` says whether a failure is the outside world being unavailable (PostgreSQL down,
restarting or unreachable; a connection reset; a timeout), worth holding the work and trying again,
rather than something the work itself causes (a bug, a row the rules refuse), which must be narrowed
down or refused instead. :class:`Backoff` spaces the retries: bounded doubling with jitter
(``jitter=0.0``: plain doubling), and :meth:`Backoff.next_logged` says so in the log.
"""

from __future__ import annotations

import logging
import random
from typing import Final

import psycopg
import sqlalchemy.exc

from ledger.invariants import require

DEFAULT_BACKOFF_INITIAL_S: Final = 0.1
DEFAULT_BACKOFF_MAX_S: Final = 10.0
MAX_CAUSE_DEPTH: Final = 32
"""Causes followed from a failure to its origin (chains are a few links; cycles are cut)."""

TRANSIENT_TYPES: Final[tuple[type[BaseException], ...]] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # the pool had no connection to give in time
    ConnectionError,
    TimeoutError,
)


def is_transient(exc: BaseException, *, also: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``exc``, or one of its causes, is an outage rather than a fault of the work.

    ``also``: further types the caller knows to be transient (a dead worker process, say). The
    causes (``__cause__``, else ``__context__``) are followed, at most :data:`MAX_CAUSE_DEPTH`: a
    driver error wrapped by SQLAlchemy or by our own code is still an outage."""
    kinds = TRANSIENT_TYPES + also
    current: BaseException | None = exc
    for _ in range(MAX_CAUSE_DEPTH):
        if current is None:
            return False
        if isinstance(current, kinds):
            return True
        if isinstance(current, sqlalchemy.exc.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


class Backoff:
    """Bounded exponential backoff with jitter: ``initial``, x2 per failure, capped at ``maximum``;
    each delay is shortened by up to ``jitter`` of itself (so that many waiters do not retry in step)."""

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

    def next_logged(
        self,
        log: logging.Logger,
        what: str,
        exc: BaseException,
        *,
        expected: tuple[type[BaseException], ...] = (),
    ) -> float:
        """:meth:`next`, logged as a warning ``<what> (<n> in a row), retrying in <delay> s: <type>: <exc>``;
        with the traceback on the first failure in a row, unless ``exc`` is an outage
        (:func:`is_transient`) or one of ``expected`` (failures the caller reports well enough)."""
        delay = self.next()
        log.warning(
            "%s (%d in a row), retrying in %.2f s: %s: %s",
            what,
            self.failures,
            delay,
            type(exc).__name__,
            exc,
            exc_info=self.failures == 1 and not (isinstance(exc, expected) or is_transient(exc)),
        )
        return delay

    def reset(self) -> None:
        self.failures = 0
