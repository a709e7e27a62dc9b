"""The intake's lanes in worker processes: parse, rules and SQL of a batch on every core.

A batch of the intake is split into lanes by wallet (``consumers.intake.lane_of``), each lane one
transaction. In threads (the default) the lanes overlap their waits on PostgreSQL, but their Python
(parsing, the rules, the statements' parameters: about two thirds of a batch) runs one at a time
under the GIL, on one core. With ``BILLING_INTAKE_WORKERS=N`` each lane runs in one of N worker
processes instead: the service process keeps NATS (pulls, acks, dead letters) and sends each lane
its raw deliveries; the worker parses them, runs ``projections.processor.process_batch`` in its own
transaction, commits, and sends back what to do with each message. Nothing else changes: the
service process acks only after every lane of the batch has committed, a failing lane is split and
retried alone, an unavailable database holds the batch.

Why processes and not something lighter: the intake's Python is the ceiling of the service
(``bench/bench_e2e.py``, see bench/README.md), not NATS or PostgreSQL, and only processes run Python on two
cores at once. What a lane costs to hand over is small: a list of (subject, bytes, delivery count,
stream sequence) tuples out, one small result per message back.

Failure: a worker that dies (OOM, a signal) breaks the pool: its lane's transaction was rolled back
by PostgreSQL when the connection closed, or had committed (then the retry finds the events in the
log: duplicates, acked); :class:`LaneWorkers` starts a new pool and the intake treats the failure like
an unavailable database (holds the batch, retries with back-off). An exception in a worker comes back
as :class:`WorkerTransientError` (the database was unavailable: retry) or :class:`WorkerError` (the
batch itself failed: the intake splits it to isolate the message), both picklable whatever the
original was. Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group): the
service process decides when to stop, and finishes the batch in hand first. If the service process
is killed, each worker notices within a second that its parent is gone and exits
(:func:`_exit_with_parent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from typing import TYPE_CHECKING, Final

from sqlalchemy import Engine

from consumers.gc_tuning import tune_gc
from ledger.db import make_engine

if TYPE_CHECKING:
    from consumers.intake import Delivery, LaneResult

log = logging.getLogger("billing.lane_workers")

MAX_PROCESSES: Final = 16
# A worker's connect to PostgreSQL that hangs longer than this fails (the lane is retried).
CONNECT_TIMEOUT_S: Final = 10
# At start, how long the workers get to spawn and import the service's modules.
WARM_UP_TIMEOUT_S: Final = 60.0
# How often a worker checks that the service process is still its parent.
PARENT_CHECK_S: Final = 1.0


class WorkerTransientError(Exception):
    """The database was unavailable in a lane worker: hold the batch and try again."""


class WorkerError(Exception):
    """A lane's transaction failed in a worker for another reason: ``<type>: <message>``."""


# ------------------------------------------------------------------------------ in the worker process

_engine: Engine | None = None


def _exit_with_parent(parent_pid: int) -> None:
    """A worker outlives a ``kill -9`` of the service otherwise: its siblings hold the task queue's
    pipe open, so it never reads end-of-file. Checked every PARENT_CHECK_S, in a daemon thread; a
    transaction in flight finishes first only if it ends within that time (if it commits, its events
    are duplicates when redelivered; if not, PostgreSQL rolls it back when the connection closes)."""
    while True:  # ends with the process
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def _init_worker(database_url: str, role: str | None, parent_pid: int) -> None:
    # The service process stops the lanes (after finishing the batch in hand), not Ctrl-C, which a
    # terminal sends to the whole process group. SIGTERM is left alone: concurrent.futures ends the
    # workers of a broken pool with it, and a supervisor that sends it to every process of the
    # service means it (a lane cut short is rolled back and retried).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The same for SIGHUP (a closed terminal): the service process stops, then lets the workers go.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    global _engine
    _engine = make_engine(database_url, role=role, pool_size=1, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    tune_gc()


def _warm_up() -> int:
    """Imports what a lane needs, so the first batch does not pay for it. (No database connection
    here: an unavailable database is the lanes' business, retried like any outage.)"""
    import consumers.intake  # noqa: F401
    import projections.processor  # noqa: F401

    return os.getpid()


def transact_deliveries(
    deliveries: list[Delivery],
    now: datetime,
    namespace: str,
    max_deliver: int,
    partitions: int,
    max_age_s: float | None,
) -> LaneResult:
    """In a worker: parse one lane's deliveries, run its transaction, commit, return the outcomes."""
    from consumers.intake import is_transient, prepare_deliveries, transact
    from consumers.names import NatsNames

    if _engine is None:
        raise RuntimeError("lane worker not initialised")
    try:
        items = prepare_deliveries(
            deliveries,
            now=now,
            names=NatsNames(namespace),
            max_deliver=max_deliver,
            partitions=partitions,
            max_age_s=max_age_s,
        )
        return transact(_engine, items, now, max_age_s=max_age_s)
    except Exception as exc:
        # Re-raised as one of ours: the original may not pickle, and the service process must still
        # tell "database unavailable" from "this batch fails".
        if is_transient(exc):
            raise WorkerTransientError(f"{type(exc).__name__}: {exc}") from None
        log.exception("lane of %d messages failed in worker %d", len(deliveries), os.getpid())
        raise WorkerError(f"{type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------- in the service process


class LaneWorkers:
    """A pool of ``processes`` lane workers (spawned, not forked: the service process has threads)."""

    def __init__(self, database_url: str, role: str | None, processes: int) -> None:
        if not 1 <= processes <= MAX_PROCESSES:
            raise ValueError(f"lane worker processes {processes} outside 1..{MAX_PROCESSES}")
        self.processes = processes
        self._database_url = database_url
        self._role = role
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0
        """Pools started again after a worker died."""
        self.pids: list[int] = []
        """The workers' process ids, as of :meth:`start`."""
        self._started = asyncio.Event()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self._database_url, self._role, os.getpid()),
        )

    async def start(self) -> None:
        """Start the workers and wait until each has imported the service's modules. The service
        runs it as a task beside everything else (spawning and importing take seconds on a busy
        machine); a lane waits for it (:meth:`transact`)."""
        self._pool = self._new_pool()
        loop = asyncio.get_running_loop()
        try:
            # One warm-up per process: ProcessPoolExecutor starts all of them for the first submissions.
            pids = await asyncio.wait_for(
                asyncio.gather(*(loop.run_in_executor(self._pool, _warm_up) for _ in range(self.processes))),
                timeout=WARM_UP_TIMEOUT_S,
            )
            # A fast process may run more than one warm-up, so the warm-ups' pids can be fewer than
            # the processes; the pool knows them all.
            self.pids = sorted(set(pids) | set(getattr(self._pool, "_processes", None) or ()))
            log.info("lane workers ready: %d process(es), pids %s", len(self.pids), self.pids)
        except Exception:
            # Not fatal: a broken pool is started again by the first lane (transact); a slow one
            # is simply used once it is up.
            log.exception("lane worker processes did not start cleanly")
        finally:
            self._started.set()  # a lane that waited goes ahead (and meets a broken pool if it failed)

    async def transact(
        self,
        deliveries: list[Delivery],
        now: datetime,
        *,
        namespace: str,
        max_deliver: int,
        partitions: int,
        max_age_s: float | None,
    ) -> LaneResult:
        await asyncio.wait_for(self._started.wait(), timeout=WARM_UP_TIMEOUT_S)
        pool = self._pool
        if pool is None:
            raise RuntimeError("lane workers not started")
        loop = asyncio.get_running_loop()
        try:
            result: LaneResult = await loop.run_in_executor(
                pool, transact_deliveries, deliveries, now, namespace, max_deliver, partitions, max_age_s
            )
        except BrokenProcessPool:
            # A worker died; every lane in the pool fails with this. One new pool for all of them.
            if self._pool is pool:
                self.restarts += 1
                log.error("a lane worker process died; starting a new pool (restart %d)", self.restarts)
                self._pool = self._new_pool()
                with contextlib.suppress(Exception):
                    pool.shutdown(wait=False, cancel_futures=True)
            raise
        return result

    def shutdown(self) -> None:
        """After the intake has stopped (no lane in flight): let the workers exit."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
