"""The kit's error classifier and backoff (consumers.runtime.errors): what counts as an outage, the
delays a Backoff gives, and the warning :meth:`Backoff.next_logged` writes."""

from __future__ import annotations

import logging

import psycopg
import pytest
import sqlalchemy.exc

from consumers.runtime.errors import Backoff, is_transient

pytestmark = pytest.mark.unit


def _wrapped(inner: BaseException) -> RuntimeError:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("while writing the batch") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("server closed the connection"),
        psycopg.InterfaceError("connection already closed"),
        sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("down")),
        sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("closed")),
        sqlalchemy.exc.TimeoutError("QueuePool limit reached"),
        sqlalchemy.exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True),
        ConnectionResetError("reset by peer"),
        TimeoutError(),
        _wrapped(psycopg.OperationalError("terminating connection")),
    ],
)
def test_outages_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a bug"),
        psycopg.errors.UniqueViolation("duplicate key"),
        sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate")),
        sqlalchemy.exc.DBAPIError("SELECT 1", {}, Exception("bad"), connection_invalidated=False),
        _wrapped(KeyError("wallet")),
    ],
)
def test_faults_of_the_work_are_not(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_also_and_a_cycle_of_causes() -> None:
    class WorkerGone(Exception):
        pass

    assert is_transient(_wrapped(WorkerGone()), also=(WorkerGone,))
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert not is_transient(a)


def test_backoff_doubles_to_its_bound_and_resets() -> None:
    backoff = Backoff(0.5, 4.0, jitter=0.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.failures == 6
    backoff.reset()
    assert backoff.next() == 0.5


def test_backoff_jitter_only_shortens() -> None:
    backoff = Backoff(1.0, 8.0, jitter=0.2)
    for bound in (1.0, 2.0, 4.0, 8.0, 8.0):
        assert 0.8 * bound <= backoff.next() <= bound


def test_next_logged_says_what_failed_with_the_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("billing.test_backoff")
    backoff = Backoff(0.25, 1.0, jitter=0.0)
    with caplog.at_level(logging.WARNING, logger=log.name):
        first = backoff.next_logged(log, "outbox relay pass failed", ValueError("boom"))
        second = backoff.next_logged(log, "outbox relay pass failed", ValueError("boom"))
    assert (first, second) == (0.25, 0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "outbox relay pass failed (1 in a row), retrying in 0.25 s: ValueError: boom",
        "outbox relay pass failed (2 in a row), retrying in 0.50 s: ValueError: boom",
    ]
    assert [bool(r.exc_info) for r in caplog.records] == [True, False]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [(psycopg.OperationalError("down"), ()), (KeyError("x"), (KeyError,))],
)
def test_next_logged_without_traceback_for_outages_and_expected(
    caplog: pytest.LogCaptureFixture, exc: BaseException, expected: tuple[type[BaseException], ...]
) -> None:
    log = logging.getLogger("billing.test_backoff")
    with caplog.at_level(logging.WARNING, logger=log.name):
        Backoff().next_logged(log, "scheduler: database work failed", exc, expected=expected)
    assert [bool(r.exc_info) for r in caplog.records] == [False]
