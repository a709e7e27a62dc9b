"""`billing up`: one process runs the whole service (DESIGN section 7).

* the JetStream intake (``consumers.nats.intake``): ``billing.in.>`` into the ledger, batch by batch, run
  only while this instance owns its durable consumer (``consumers.nats.partitions``: a PostgreSQL advisory
  lock per durable, so a wallet's events are applied in stream order): unpartitioned, one instance
  pulls ``billing-intake`` and the others stand by; with ``BILLING_INTAKE_PARTITIONS=N`` one intake
  per partition this instance owns, a fair share per instance;
* the outbox relay (``consumers.nats.relay``): stop commands, notices and settlements out;
* the auto-stop scheduler (``consumers.service.scheduler``): predicted zero instants into stop commands;
* the admission replies (``consumers.nats.admission``): NATS request-reply;
* HTTP (FastAPI on uvicorn, ``settings.http_port``): the API of ``consumers.http`` (wallet,
  Stripe, reads), and ``GET /healthz`` (liveness), ``GET /readyz`` (PostgreSQL answers ``SELECT 1``,
  NATS is connected, the intake and admission are running; 503 otherwise) and ``GET /metrics``
  (Prometheus).

NATS is FastStream's :class:`~faststream.nats.NatsBroker`: it owns the connection (reconnecting for
ever, logging breaks and reconnects, draining at the end; ``BILLING_NATS_URL`` may list the servers of
a cluster separated by commas); the components run on its nats-py
connection (the intake explains why it pulls by hand). The streams of the contract are declared
(created or updated, never deleted) before anything starts.

SIGTERM or SIGINT sets ``stop``: the intake stops pulling, finishes the batch in hand, commits and
acks; the other loops finish their unit of work; HTTP stops; the broker drains. Whatever still runs
after ``settings.shutdown_timeout_s`` is cancelled (its messages are redelivered). The exit status
is 0 after a requested stop, 1 if a component failed on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import nats.errors
import uvicorn
from faststream.nats import NatsBroker
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from consumers.http.app import create_service_app, install_api
from consumers.http.limits import uvicorn_config
from consumers.http.operations import Readiness
from consumers.nats import intake
from consumers.nats.admission import run_admission
from consumers.nats.names import NatsNames
from consumers.nats.partitions import run_owned
from consumers.nats.relay import run_relay
from consumers.nats.streams import ensure_streams
from consumers.runtime.errors import Backoff
from consumers.runtime.instance import ServiceUrls
from consumers.runtime.metrics import Metrics
from consumers.runtime.settings import Settings, nats_servers
from consumers.runtime.user_errors import UserError
from consumers.service.scheduler import run_scheduler
from consumers.service.writers import WriterPool, effective_writers, writer_env
from ledger.db import make_engine

log = logging.getLogger("billing")

# /readyz: how long the database may take to answer SELECT 1 before the service is "not ready".
# Connections of the service: the intake, the relay, the scheduler, up to 4 admissions, readiness;
# partitioned, one more per partition the instance may own (each runs its own batches).
ENGINE_POOL_SIZE: Final = 8
# Worker threads of the event loop's default executor (asyncio.to_thread): the intake, the relay, the
# scheduler, up to 4 admissions and readiness probes, with room to spare; partitioned, one more per
# partition.
WORKER_THREADS: Final = 16
# A TCP connect to PostgreSQL that hangs longer than this fails (and is retried by the loops).
DB_CONNECT_TIMEOUT_S: Final = 10
# uvicorn: how long open HTTP connections get to finish at shutdown.
HTTP_GRACEFUL_S: Final = 5
# After the components have stopped (or been cancelled), the broker's drain of the connection.
NATS_DRAIN_TIMEOUT_S: Final = 5
# Start-up: how long JetStream may take to answer the stream declarations (a cluster electing leaders).
STREAMS_WITHIN_S: Final = 60.0
# A stream declaration JetStream did not answer is tried again after this, doubling to the max.
STREAMS_RETRY_FIRST_S: Final = 0.5
STREAMS_RETRY_MAX_S: Final = 5.0
# Components still running this long after being cancelled are left behind (logged).
CANCEL_GRACE_S: Final = 5.0
# How often the start-up checks whether uvicorn listens yet (for the ready line).
READY_POLL_S: Final = 0.05

T = TypeVar("T")


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: `billing up` owns SIGTERM/SIGINT (uvicorn would
    re-raise the signal after its shutdown, turning a clean stop into a death by signal)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_http(server: _HttpServer) -> None:
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits the process when it cannot bind: fail this task instead
        raise RuntimeError(f"HTTP server could not start (exit {exc.code}); is the port in use?") from None
    if not server.started:
        raise RuntimeError("HTTP server could not start; is the port in use?")


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set ``stop``; a second one is left to its default (an impatient Ctrl-C kills)."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s received: stopping (finishing the batch in hand)", sig.name)
        stop.set()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


async def run_service(
    settings: Settings,
    urls: ServiceUrls,
    stop: asyncio.Event | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
    on_ready: Callable[[], None] | None = None,
    connect_timeout_s: float | None = None,
    writer: bool = False,
) -> int:
    """Run everything until ``stop`` is set (by SIGTERM/SIGINT when not given); return the exit status.

    ``on_ready`` is called once, when every component runs and HTTP listens. ``connect_timeout_s``
    bounds the broker's first connect (UserError after it); a ``stop`` during the start is honoured
    at once (exit 0). ``writer``: a writer process (consumers/service/writers.py), else the parent of
    BILLING_INTAKE_WRITERS - 1 of them."""
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(stop)
    # Transactions the intake may run at once in this process: one per intake it may own (each
    # owned partition is one writer; unpartitioned, one).
    intake_transactions = max(settings.intake_partitions, 1)
    # Every component runs its database work in worker threads: room for all of them at once.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(WORKER_THREADS + intake_transactions, "billing-db")
    )
    names = NatsNames(settings.nats_namespace)
    engine = make_engine(
        urls.database_url,
        role=settings.database_role or None,
        pool_size=ENGINE_POOL_SIZE + intake_transactions,
        connect_args={"connect_timeout": DB_CONNECT_TIMEOUT_S},
    )
    servers = nats_servers(urls.nats_url)
    broker = NatsBroker(
        servers,
        max_reconnect_attempts=-1,  # a NATS restart must never end the service
        reconnect_time_wait=1,
        drain_timeout=NATS_DRAIN_TIMEOUT_S,
        logger=logging.getLogger("billing.nats"),
    )
    try:
        try:
            await _until_stop(broker.start(), stop, connect_timeout_s, "BILLING_NATS_URL: NATS", servers)
            nc = broker.connection
            js = nc.jetstream()
            streams = await _until_stop(_declare_streams(js, names, settings.nats_replicas, stop), stop)
        except _StoppedDuringStart:
            log.info("stopped while connecting to NATS")
            return 0

        registry = CollectorRegistry()
        readiness = Readiness({c: asyncio.Event() for c in (("intake",) if writer else ("intake", "admission"))})
        http = None if writer else _http_server(engine, nc, settings, registry, readiness, clock)
        intake_config = intake.IntakeConfig.from_settings(settings)
        components = _components(engine, nc, js, names, settings, intake_config, stop, registry, readiness, http, clock)
        if not writer:
            components |= _writer_pool(settings, urls, readiness, stop)
        tasks = {name: asyncio.create_task(coro, name=f"billing-{name}") for name, coro in components.items()}
        _log_started(settings, urls, servers, names, streams, intake_config, writer=writer)
        announcer = asyncio.create_task(_announce_ready(readiness, http, stop, on_ready), name="billing-ready")
        try:
            return await _supervise(tasks, stop, http, readiness, settings.shutdown_timeout_s)
        finally:
            announcer.cancel()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.stop(), timeout=NATS_DRAIN_TIMEOUT_S + 1)
        engine.dispose()
        log.info("billing stopped")


def _writer_pool(
    settings: Settings, urls: ServiceUrls, readiness: Readiness, stop: asyncio.Event
) -> dict[str, Coroutine[Any, Any, None]]:
    """The writer processes beside this one (BILLING_INTAKE_WRITERS - 1) as a component, their
    readiness on /readyz; none with one writer."""
    writers = effective_writers(settings)
    if writers < 2:
        return {}
    ready = readiness.components["writers"] = asyncio.Event()
    env = writer_env(settings, urls)
    return {
        "writers": WriterPool(writers - 1, env, shutdown_timeout_s=settings.shutdown_timeout_s, ready=ready).run(stop)
    }


def _http_server(
    engine: Engine,
    nc: Client,
    settings: Settings,
    registry: CollectorRegistry,
    readiness: Readiness,
    clock: Callable[[], datetime] | None,
) -> _HttpServer:
    api = create_service_app(engine, lambda: nc, registry, readiness)
    # The wallet, Stripe and finance routes (consumers.http) on the same app and port.
    # With the guard (token and body size before the body), the served docs (/, /docs).
    install_api(api, engine, settings, clock=clock, registry=registry)
    return _HttpServer(
        # The bounds on slow and hostile clients (consumers/http/limits.py, the http_* settings).
        uvicorn_config(
            api,
            host=settings.http_host,
            port=settings.http_port,
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            keepalive_timeout_s=settings.http_keepalive_timeout_s,
            max_connections=settings.http_max_connections,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=HTTP_GRACEFUL_S,
        )
    )


def _components(
    engine: Engine,
    nc: Client,
    js: JetStreamContext,
    names: NatsNames,
    settings: Settings,
    intake_config: intake.IntakeConfig,
    stop: asyncio.Event,
    registry: CollectorRegistry,
    readiness: Readiness,
    http: _HttpServer | None,
    clock: Callable[[], datetime] | None,
) -> dict[str, Coroutine[Any, Any, None]]:
    """The service's components, each a coroutine the supervisor runs as a task. Without ``http``
    (a writer process): the ones that commit and publish only, intake, relay and scheduler."""
    relay_kick, scheduler_kick = asyncio.Event(), asyncio.Event()
    # Both modes through the ownership of consumers.nats.partitions: two instances pulling one durable
    # would apply a wallet's events out of stream order.
    intake_run = run_owned(
        nc,
        engine,
        names,
        intake_config,
        settings.intake_partitions,
        stop,
        rebalance_s=settings.intake_rebalance_s,
        metrics=Metrics(registry),
        clock=clock,
        relay_kick=relay_kick,
        scheduler_kick=scheduler_kick,
        ready=readiness.components["intake"],
        role=settings.database_role or None,
    )
    components: dict[str, Coroutine[Any, Any, None]] = {
        "intake": intake_run,
        "relay": run_relay(engine, js, names, stop, kick=relay_kick, registry=registry),
        "scheduler": run_scheduler(
            engine, nc, names, stop, kick=scheduler_kick, relay_kick=relay_kick, registry=registry
        ),
    }
    if http is None:
        return components
    return components | {
        "admission": run_admission(
            engine,
            nc,
            names,
            stop,
            relay_kick=relay_kick,
            scheduler_kick=scheduler_kick,
            ready=readiness.components["admission"],
            registry=registry,
        ),
        "http": _serve_http(http),
    }


class _StoppedDuringStart(Exception):
    pass


async def _until_stop(
    aw: Coroutine[Any, Any, T], stop: asyncio.Event, timeout_s: float | None = None, what: str = "", servers: Any = ()
) -> T:
    """``aw``'s result; _StoppedDuringStart when ``stop`` is set first (``aw`` is cancelled); a
    UserError naming ``what`` when it takes longer than ``timeout_s``."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    if stop.is_set():
        raise _StoppedDuringStart
    shown = ", ".join(_redacted(u) for u in servers)
    raise UserError(f"{what} at {shown} did not answer within {timeout_s:g} s (BILLING_CONNECT_TIMEOUT_S)")


async def _announce_ready(
    readiness: Readiness, http: _HttpServer | None, stop: asyncio.Event, on_ready: Callable[[], None] | None
) -> None:
    """Call ``on_ready`` once every component is ready and HTTP listens (polled: uvicorn has no event)."""
    if on_ready is None:
        return
    for event in readiness.components.values():
        await event.wait()
    while http is not None and not http.started and not stop.is_set():  # noqa: ASYNC110 - uvicorn's `started` is a flag, not an event
        await asyncio.sleep(READY_POLL_S)
    if not stop.is_set():
        log.info("every component is running")
        on_ready()


def _log_started(
    settings: Settings,
    urls: ServiceUrls,
    servers: list[str],
    names: NatsNames,
    streams: list[str],
    config: intake.IntakeConfig,
    *,
    writer: bool = False,
) -> None:
    """What runs where, in a few short lines (one long line is unreadable in a terminal)."""
    partitions = settings.intake_partitions
    log.info(
        "billing up: database %s (role %s)",
        make_url(urls.database_url).render_as_string(hide_password=True),
        settings.database_role or "login's own",
    )
    namespace = f" (namespace {names.namespace})" if names.namespace else ""
    log.info("NATS %s%s; streams %s", ", ".join(_redacted(u) for u in servers), namespace, ", ".join(streams))
    log.info(
        "intake %s/%s, batch %d, one writer per owned consumer, %d wallets in memory each; admission %s",
        names.in_stream,
        f"{config.durable}-<p> ({partitions} partitions)"
        if partitions
        else f"{config.durable} (one instance at a time)",
        config.batch_size,
        config.cache_wallets,
        "in the parent" if writer else "on " + names.admission_rental.rsplit(".", 1)[0] + ".*",
    )
    if writer:
        log.info("writer process: intake, relay and scheduler only (no HTTP, no admission)")
        return
    extra = settings.intake_writers - 1 if partitions >= 2 else 0  # effective_writers() warned otherwise
    writers = f"; {extra} writer process(es) beside this one" if extra else ""
    embedded = f"; embedded: {', '.join(urls.embedded)} in {settings.data_dir}" if urls.embedded else ""
    log.info("HTTP http://%s:%d%s%s", settings.http_host, settings.http_port, embedded, writers)


async def _declare_streams(js: JetStreamContext, names: NatsNames, replicas: int, stop: asyncio.Event) -> list[str]:
    """``ensure_streams``, tried again while JetStream does not answer: on a cluster a stream just
    created by another instance has no leader for a moment, and its info request times out."""
    deadline = asyncio.get_running_loop().time() + STREAMS_WITHIN_S
    backoff = Backoff(STREAMS_RETRY_FIRST_S, STREAMS_RETRY_MAX_S, jitter=0.0)
    while True:
        try:
            return await ensure_streams(js, names, replicas=replicas)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError) as exc:
            delay = backoff.next()
            if stop.is_set() or asyncio.get_running_loop().time() + delay > deadline:
                raise
            log.warning("JetStream did not answer while declaring the streams (%r): again in %.1f s", exc, delay)
            await asyncio.sleep(delay)


def _redacted(url: str) -> str:
    """A server URL for the log: the password (if any) replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def _supervise(
    tasks: dict[str, asyncio.Task[None]],
    stop: asyncio.Event,
    http: _HttpServer | None,
    readiness: Readiness,
    shutdown_timeout_s: float,
) -> int:
    """Wait for ``stop`` or a component that ends on its own (a failure); then stop everything,
    bounded. Returns the exit status."""
    stop_waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([*tasks.values(), stop_waiter], return_when=asyncio.FIRST_COMPLETED)
    # A component that returned because ``stop`` was set (possibly before ``stop_waiter`` got its
    # turn to run) has not failed; one that raised has, whenever.
    failed = [
        name
        for name, task in tasks.items()
        if task.done() and (not stop.is_set() or task.cancelled() or task.exception() is not None)
    ]
    for name in failed:
        task = tasks[name]
        exc = None if task.cancelled() else task.exception()
        log.error("%s ended before the service was stopped: %r; stopping", name, exc, exc_info=exc)
    stop.set()
    stop_waiter.cancel()
    readiness.stopping = True
    log.info("shutting down")
    # HTTP goes last among equals: it keeps answering /readyz (503, stopping) while the others finish.
    others = [t for name, t in tasks.items() if name != "http"]
    _, pending = await asyncio.wait(others, timeout=shutdown_timeout_s) if others else (set(), set())
    if http is not None:
        http.should_exit = True
        done_http, _ = await asyncio.wait([tasks["http"]], timeout=HTTP_GRACEFUL_S + 1)
        pending |= {tasks["http"]} - done_http
    if pending:
        names = sorted(n for n, t in tasks.items() if t in pending)
        log.warning("still running after %.0f s, cancelled: %s", shutdown_timeout_s, ", ".join(names))
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=CANCEL_GRACE_S)
    for name, task in tasks.items():
        if name not in failed and task.done() and not task.cancelled() and task.exception() is not None:
            log.error("%s failed while stopping: %r", name, task.exception(), exc_info=task.exception())
    return 1 if failed else 0
