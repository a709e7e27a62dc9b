"""Writer processes of one `billing up` (``BILLING_INTAKE_WRITERS=W``, issue 15).

One interpreter runs its Python under one GIL: every partition an instance owns is an asyncio loop of
that one process, so an instance uses about one core however many partitions it owns. With ``W > 1``
(partitioned only: ``BILLING_INTAKE_PARTITIONS >= 2``) `billing up` starts ``W - 1`` *writer
processes* beside itself (``python -m consumers.service.writer_process``), each a member of the
intake's ownership exactly like an instance (``consumers.nats.partitions``: its own shared membership
lock, its own unit locks), so the fair share spreads the partitions over every process of every
instance (1 instance, W=2, 8 partitions: 4 each). A writer process runs the components that commit
and publish: the intake of the units it owns, its own outbox relay and auto-stop scheduler (several
of each are supported, and in the same process the intake's in-process kicks reach them: no latency
lost). It serves no HTTP, answers no admission requests and never starts an embedded server.

* **Spawn.** By :class:`WriterPool`, a component of the parent's ``run_service``: after the
  migrations and the service's login (`billing up` does those first), when the parent has connected
  to NATS and declared the streams. The child's environment is the parent's with every setting as the
  parent resolved it (:func:`writer_env`): ``BILLING_DATABASE_URL`` is the *service's* URL (in embedded
  mode the ``billing_svc`` login on the embedded server's socket), ``BILLING_NATS_URL`` the NATS the
  parent uses (embedded or given), ``BILLING_DATABASE_ROLE`` the same role. Each child is a session
  leader of its own (``start_new_session``): a Ctrl-C in the terminal reaches only the parent, which
  forwards one SIGTERM (two signals would make the child's second one a hard kill).
* **Readiness.** A child prints :data:`READY_LINE` on its stdout once it has joined the ownership
  (and its relay and scheduler run); the parent reads the children's stdout (forwarding anything else)
  and counts ``writers`` as ready on ``/readyz`` and before the ``billing ready`` line only once every
  child has said so. A child not ready within :data:`READY_WITHIN_S` of the start fails the parent
  (exit 1), at once if it exits with 2 (its settings refused) before it was ever ready: a child that
  cannot start is a deployment error, not a standby.
* **Supervision.** After that, a child that exits on its own is logged and started again after a
  bounded back-off (:class:`~consumers.runtime.errors.Backoff`, 0.5 s doubling to 10 s; afresh after
  :data:`STABLE_S` of life). Meanwhile the other processes take its units at their next rebalance
  (the live count dropped), and give some back when it has joined again. ``/readyz`` stays ready.
* **Stop.** When the parent stops (SIGTERM, SIGINT, SIGHUP, or a component's failure) it sends SIGTERM
  to every child (each finishes its batch in hand, commits, acks and releases its units, as an
  instance does) and waits for them, bounded by ``shutdown_timeout_s`` (a little less, so that it ends
  before the parent's own bound); whatever still runs is SIGKILLed.
* **Death of the parent.** A child sets ``PR_SET_PDEATHSIG`` to SIGKILL first thing (Linux), then
  checks that its parent is still the one that started it (it may have died before the prctl): so a
  ``kill -9`` of the parent kills its writers at once, PostgreSQL frees every lock of theirs with their
  sockets, and the other instances take the units over as after any crash. Elsewhere a thread polls
  the parent's pid instead.

Metrics: the parent's ``/metrics`` covers the parent's process only (its own units, relay and
scheduler); a writer's figures are not exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import SecretStr

from consumers.runtime.errors import Backoff
from consumers.runtime.instance import ServiceUrls
from consumers.runtime.settings import Settings

log = logging.getLogger("billing.writers")

WRITER_MODULE: Final = "consumers.service.writer_process"
READY_LINE: Final = "billing writer ready"
# A writer process must be ready (imported, connected, streams declared, joined) within this of its
# start, or the parent fails.
READY_WITHIN_S: Final = 60.0
# Restart back-off of a writer that exited on its own; a writer that lived STABLE_S starts it afresh.
RESTART_FIRST_S: Final = 0.5
RESTART_MAX_S: Final = 10.0
STABLE_S: Final = 30.0
# A writer's exit status for a mistake of its settings (a UserError): not retried before it was ever ready.
USAGE_EXIT: Final = 2
# After SIGKILL, how long to wait for the exit (it is immediate; the bound is for the log).
KILL_WAIT_S: Final = 5.0


def effective_writers(settings: Settings) -> int:
    """The processes that own partitions: BILLING_INTAKE_WRITERS, or 1 (with one warning) when the
    intake has fewer than 2 units."""
    wanted = settings.intake_writers
    if wanted > 1 and settings.intake_partitions < 2:
        log.warning(
            "BILLING_INTAKE_WRITERS=%d needs BILLING_INTAKE_PARTITIONS >= 2 (it is %d: one unit, one owner): "
            "running 1 process",
            wanted,
            settings.intake_partitions,
        )
        return 1
    return wanted


def writer_env(settings: Settings, urls: ServiceUrls, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a writer process: ``base`` (the parent's) with every setting as the parent
    resolved it, the service's database and NATS URLs, and one writer (a writer spawns none)."""
    env = dict(os.environ if base is None else base)
    for name, value in settings:
        key = f"BILLING_{name.upper()}"
        if value is None:
            env.pop(key, None)
            continue
        env[key] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    env["BILLING_DATABASE_URL"] = urls.database_url
    env["BILLING_NATS_URL"] = urls.nats_url
    env["BILLING_INTAKE_WRITERS"] = "1"
    return env


@dataclass
class _Writer:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the first process of this slot said it is ready."""
    backoff: Backoff = field(default_factory=lambda: Backoff(RESTART_FIRST_S, RESTART_MAX_S))
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class WriterPool:
    """``count`` writer processes: started, awaited ready, restarted, stopped (the module's doc)."""

    def __init__(
        self, count: int, env: dict[str, str], *, shutdown_timeout_s: float, ready: asyncio.Event | None = None
    ) -> None:
        self._writers = [_Writer(i) for i in range(1, count + 1)]
        self._env = env
        # The children's stop ends a little before the parent's own bound on its components.
        self._stop_budget_s = max(shutdown_timeout_s - 1.0, shutdown_timeout_s * 0.8)
        self._ready = ready

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._writers if w.proc is not None and w.proc.returncode is None]

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: keep every writer running; then stop them all (bounded)."""
        keepers = [asyncio.create_task(self._keep(w, stop), name=f"billing-writer-{w.index}") for w in self._writers]
        try:
            await self._await_ready(stop, keepers)
            await asyncio.gather(*keepers)
        finally:
            for k in keepers:
                k.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            self._kill_all()

    async def _await_ready(self, stop: asyncio.Event, keepers: list[asyncio.Task[None]]) -> None:
        waiters = [asyncio.ensure_future(w.ready.wait()) for w in self._writers]
        stopper = asyncio.ensure_future(stop.wait())
        watched: list[asyncio.Future[Any]] = [asyncio.gather(*waiters), stopper, *keepers]
        try:
            await asyncio.wait(
                watched,
                timeout=READY_WITHIN_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopper.cancel()
            for waiter in waiters:
                waiter.cancel()
        if stop.is_set():
            return
        for k in keepers:
            if k.done():
                k.result()  # a keeper that failed fails the pool
        late = [w.index for w in self._writers if not w.ready.is_set()]
        if late:
            raise RuntimeError(f"writer process(es) {late} not ready within {READY_WITHIN_S:g} s")
        log.info("%d writer process(es) ready: pids %s", len(self._writers), self.pids)
        if self._ready is not None:
            self._ready.set()

    async def _keep(self, w: _Writer, stop: asyncio.Event) -> None:
        """Run slot ``w`` until ``stop``: start, restart after an exit of its own, stop at the end."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            proc = await self._spawn(w)
            started = loop.time()
            exited = asyncio.ensure_future(proc.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([exited, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not exited.done():
                exited.cancel()
                await self._stop_one(w, proc)
                return
            if proc.returncode == USAGE_EXIT and not w.ready.is_set():
                raise RuntimeError(f"writer process {w.index} refused its environment (exit {USAGE_EXIT}); see its log")
            if loop.time() - started >= STABLE_S:
                w.backoff.reset()
            delay = w.backoff.next()
            log.error(
                "writer process %d (pid %d) exited with %s: starting it again in %.1f s",
                w.index,
                proc.pid,
                proc.returncode,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _spawn(self, w: _Writer) -> asyncio.subprocess.Process:
        # Started from the event loop's thread, the parent's main thread: PR_SET_PDEATHSIG fires when
        # the thread that forked the child ends, which for this one is the parent's end.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            WRITER_MODULE,
            "--parent-pid",
            str(os.getpid()),
            "--index",
            str(w.index),
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        w.proc = proc
        log.info("writer process %d started: pid %d", w.index, proc.pid)
        reader = asyncio.create_task(self._read(w, proc), name=f"billing-writer-{w.index}-stdout")
        w.tasks = [t for t in w.tasks if not t.done()] + [reader]
        return proc

    @staticmethod
    async def _read(w: _Writer, proc: asyncio.subprocess.Process) -> None:
        """The child's stdout: the ready line sets ``w.ready``, anything else is forwarded."""
        assert proc.stdout is not None
        with contextlib.suppress(ValueError):  # a line beyond the reader's limit: stop reading it
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if line == READY_LINE:
                    w.ready.set()
                else:
                    print(line, flush=True)

    async def _stop_one(self, w: _Writer, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=self._stop_budget_s)
        except TimeoutError:
            log.warning(
                "writer process %d (pid %d) still running after %.0f s: killed", w.index, proc.pid, self._stop_budget_s
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=KILL_WAIT_S)
        if proc.returncode:
            log.warning("writer process %d (pid %d) exited with %s", w.index, proc.pid, proc.returncode)
        else:
            log.info("writer process %d (pid %d) stopped", w.index, proc.pid)

    def _kill_all(self) -> None:
        """Whatever still runs (the pool was cancelled): SIGKILL, without waiting."""
        for w in self._writers:
            for t in w.tasks:
                t.cancel()
            if w.proc is not None and w.proc.returncode is None:
                log.warning("writer process %d (pid %d) still running: killed", w.index, w.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
