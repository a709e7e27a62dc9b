"""Helpers of the fault suite (tests/integration/test_faults.py).

* :class:`Workload`: a known stream of events (credits, debits, pod starts, counter readings with
  repeats and stale ones, serverless jobs with a repeated report, ends, and optionally wallets that
  run dry) and the balances the contract says they must produce, computed here with the formulas
  of :mod:`ledger.money` from the published events alone, never from the service;
* :class:`Service`: ``billing up`` as a subprocess (kill -9, SIGTERM, /readyz, /metrics);
* :func:`owned_intake`: an instance's intake in-process as ``billing up`` runs it (owner or standby of
  the durable, ``consumers.nats.partitions``), next to :func:`intake_running`, the bare loop;
* :class:`NatsTap`: a TCP proxy between a service and NATS that can hold everything the service
  sends (its acks above all) while the server's deliveries keep flowing: with it a test kills the
  service *between* its commit and its ack on purpose instead of by luck;
* the checks every scenario ends with (:func:`check_ledger`, :func:`check_stop_commands`) and the
  summary table (:class:`FaultTable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, RawStreamMsg
from sqlalchemy import Engine, text

from consumers.nats import intake
from consumers.nats.intake import IntakeConfig
from consumers.nats.names import NatsNames
from consumers.nats.partitions import OwnedIntake
from consumers.nats.streams import ensure_streams, stream_specs
from consumers.runtime.metrics import Metrics
from ledger.events import Event, event_to_json
from ledger.money import rental_cost_micros, serverless_cost_micros, serverless_exact_millimicros
from ledger.schema import APP_ROLE
from tests.factories import make_event

BILLING = str(Path(sys.executable).with_name("billing"))
DURABLE = "billing-intake"
READY_WITHIN_S = 20.0
EXIT_WITHIN_S = 20.0
POLL_S = 0.05
STOP_SUBJECT = "compute.commands.stop"


# ------------------------------------------------------------------------------------------ waits


async def wait_for(condition: Any, *, within: float, what: str, interval: float = POLL_S) -> Any:
    """Poll ``condition`` (sync or async callable) until it returns something truthy; fail after
    ``within`` seconds with ``what`` and the last value seen."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Outgoing:
    """One message to publish to ``billing.in.<token>`` with ``Nats-Msg-Id`` ``msg_id``."""

    token: str
    raw: bytes
    msg_id: str
    key: tuple[str, str] | None = None
    """(source, id) of a good event that must end in the log exactly once; None for bad input."""


@dataclass
class _Rental:
    wallet: str
    resource: str
    price_per_hour: int
    max_uptime: int = 0


class Workload:
    """Events for a few dozen wallets and the reference the service must reach.

    Every wallet gets a credit, a pod whose counter readings come with repeats and a stale one,
    serverless jobs (one reported twice under two CloudEvent ids) and a debit, and its pod ends at
    its highest reading, so nothing of it depends on the order of delivery (a fault reorders:
    redeliveries come after newer messages). A *dry* wallet gets $0.10 and a $10/h pod read at 60 s:
    it is below zero after that reading and a stop command is due; :meth:`pause_dry` is what the
    compute plane answers once the stop arrived.
    """

    def __init__(
        self,
        tag: str,
        *,
        wallets: int = 30,
        readings: int = 8,
        jobs: int = 6,
        dry: int = 1,
        now: datetime | None = None,
    ) -> None:
        self.tag = tag
        self.source = f"compute/faults-{tag}"
        self.now = (now or datetime.now(UTC)).replace(microsecond=0)
        self.credits: dict[str, int] = defaultdict(int)
        self.rentals: dict[str, _Rental] = {}
        self.jobs: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
        """(wallet, endpoint) -> job id -> exact cost in millimicros (each job once)."""
        self.wallets: list[str] = []
        self.dry_wallets: list[str] = []
        self.dry_rentals: list[str] = []
        self._seq = 0
        self._pauses: list[Event] | None = None
        per_wallet: list[list[Event]] = []
        for i in range(wallets):
            w = f"{tag}-w{i:02d}"
            self.wallets.append(w)
            per_wallet.append(self._regular(w, i, readings, jobs))
        for i in range(dry):
            w = f"{tag}-dry{i}"
            self.wallets.append(w)
            self.dry_wallets.append(w)
            per_wallet.append(self._dry(w))
        # Round robin across wallets: every batch of the intake touches many wallets.
        self.events: list[Event] = []
        for k in range(max((len(s) for s in per_wallet), default=0)):
            self.events.extend(s[k] for s in per_wallet if k < len(s))

    # --- building ------------------------------------------------------------------------------

    def add_wallet(self, w: str) -> str:
        """A wallet whose events the test builds itself (with the methods below)."""
        self.wallets.append(w)
        return w

    def _id(self, what: str) -> str:
        self._seq += 1
        return f"{self.tag}-{what}-{self._seq}"

    def event(self, type_: str, data: dict[str, Any], *, what: str = "ev", at: datetime | None = None) -> Event:
        return make_event(type_, data, id_=self._id(what), source=self.source, time=at or self.now)

    def credit(self, w: str, amount: int, *, at: datetime | None = None, count: bool = True) -> Event:
        ev = self.event(
            "wallet.adjusted",
            {"walletId": w, "amountMicros": amount, "reason": "credit" if amount > 0 else "debit", "operator": "ops"},
            what="adj",
            at=at,
        )
        if count:
            self.credits[w] += amount
        return ev

    def start(self, w: str, r: str, price_per_hour: int, *, at: datetime | None = None, count: bool = True) -> Event:
        if count:
            self.rentals[r] = _Rental(w, r, price_per_hour)
        return self.event(
            "gpu.rental.started",
            {
                "walletId": w,
                "resourceId": r,
                "resourceKind": "pod",
                "gpuType": "A100",
                "gpuCount": 1,
                "tier": "on_demand",
                "pricePerHourMicros": price_per_hour,
            },
            what="start",
            at=at,
        )

    def reading(
        self, w: str, r: str, uptime: int, *, kind: str = "metered", at: datetime | None = None, count: bool = True
    ) -> Event:
        if count:
            rental = self.rentals[r]
            rental.max_uptime = max(rental.max_uptime, uptime)
        data: dict[str, Any] = {"walletId": w, "resourceId": r, "uptimeSecondsTotal": uptime}
        if kind == "ended":
            data["reason"] = "stopped"
        return self.event(f"gpu.rental.{kind}", data, what=kind, at=at)

    def job(
        self, w: str, endpoint: str, job: str, ms: int, pps: int, *, at: datetime | None = None, count: bool = True
    ) -> Event:
        if count:
            self.jobs[(w, endpoint)].setdefault(job, serverless_exact_millimicros(ms, pps))
        return self.event(
            "serverless.job.completed",
            {
                "walletId": w,
                "endpointId": endpoint,
                "jobId": job,
                "gpuType": "L4",
                "computeMs": ms,
                "pricePerSecondMicros": pps,
                "status": "completed",
            },
            what="job",
            at=at,
        )

    def _regular(self, w: str, i: int, readings: int, jobs: int) -> list[Event]:
        r = f"{w}-pod"
        price = 360_000 + 1_337 * i  # ~$0.36/h, odd so every reading rounds
        out = [self.credit(w, 20_000_000 + 1_000 * i), self.start(w, r, price)]
        uptimes = [7 * k + i % 5 for k in range(1, readings + 1)]
        reads = [self.reading(w, r, u) for u in uptimes]
        reads.insert(len(reads) // 2 + 1, self.reading(w, r, uptimes[len(uptimes) // 2]))  # a repeat
        reads.append(self.reading(w, r, uptimes[0]))  # a stale one
        jobs_ = [self.job(w, f"{w}-ep", f"j{j}", 1_500 + 37 * j, 333 + i) for j in range(jobs)]
        jobs_.append(self.job(w, f"{w}-ep", "j0", 1_500, 333 + i))  # the same job reported again
        jobs_.append(self.credit(w, -1_234_567))
        for k in range(max(len(reads), len(jobs_))):
            out += [*reads[k : k + 1], *jobs_[k : k + 1]]
        out.append(self.reading(w, r, uptimes[-1], kind="ended"))
        return out

    def _dry(self, w: str) -> list[Event]:
        r = f"{w}-pod"
        self.dry_rentals.append(r)
        return [self.credit(w, 100_000), self.start(w, r, 36_000_000), self.reading(w, r, 60)]

    def pause_dry(self) -> list[Event]:
        """The compute plane's answer to the stop commands: each dry pod paused at its last reading
        (the same events on every call)."""
        if self._pauses is None:
            self._pauses = [
                self.reading(self.rentals[r].wallet, r, self.rentals[r].max_uptime, kind="paused")
                for r in self.dry_rentals
            ]
        return self._pauses

    # --- the reference -------------------------------------------------------------------------

    def expected_balances(self) -> dict[str, int]:
        """What each wallet must hold: credits, less each pod's ``floor(max uptime * price / 3600)``,
        less each endpoint's ``floor(sum of the jobs' exact costs / 1000)`` (DESIGN section 1)."""
        out = {w: self.credits.get(w, 0) for w in self.wallets}
        for rental in self.rentals.values():
            out[rental.wallet] -= rental_cost_micros(rental.max_uptime, rental.price_per_hour)
        for (w, _endpoint), jobs in self.jobs.items():
            out[w] -= serverless_cost_micros(sum(jobs.values()))
        return out

    def outgoing(self, events: Iterable[Event] | None = None) -> list[Outgoing]:
        return [outgoing(ev) for ev in (self.events if events is None else events)]


def outgoing(ev: Event, *, token: str | None = None, msg_id: str | None = None, good: bool = True) -> Outgoing:
    return Outgoing(
        token or ev.wallet_id,
        event_to_json(ev),
        msg_id or f"{ev.source}/{ev.id}",
        (ev.source, ev.id) if good else None,
    )


# ------------------------------------------------------------------------------------- publishing


async def publish(js: JetStreamContext, names: NatsNames, msgs: Sequence[Outgoing], *, window: int = 500) -> int:
    """publish_async in windows, every PubAck awaited (bounded); returns the last stream sequence."""
    last = 0
    for i in range(0, len(msgs), window):
        futures = [
            await js.publish_async(names.in_subject(m.token), m.raw, headers={"Nats-Msg-Id": m.msg_id})
            for m in msgs[i : i + window]
        ]
        acks = await asyncio.wait_for(asyncio.gather(*futures), timeout=15)
        last = max([last, *(a.seq for a in acks)])
    return last


async def publish_retrying(
    js: JetStreamContext, names: NatsNames, msgs: Sequence[Outgoing], *, within: float = 30.0
) -> tuple[int, int]:
    """Publish one by one, each retried (same Nats-Msg-Id: the stream keeps it once) until the
    stream acknowledges it; for a NATS that restarts under the publisher. Returns (last sequence,
    failed attempts)."""
    deadline = time.monotonic() + within
    last = failures = 0
    for m in msgs:
        while True:
            try:
                ack = await js.publish(names.in_subject(m.token), m.raw, timeout=1.0, headers={"Nats-Msg-Id": m.msg_id})
                last = max(last, ack.seq)
                break
            except Exception:  # no responders, timeout, connection closed or reconnecting
                failures += 1
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    return last, failures


@dataclass
class PacedPublisher:
    """Publishes ``msgs`` in windows of ``window`` with a pause between windows, so that a fault lands
    mid-stream and there is always something new to consume after it; every PubAck awaited."""

    js: JetStreamContext
    names: NatsNames
    msgs: Sequence[Outgoing]
    window: int = 10
    pause_s: float = 0.1
    published: int = 0
    last_seq: int = 0

    async def run(self) -> int:
        for i in range(0, len(self.msgs), self.window):
            self.last_seq = max(self.last_seq, await publish(self.js, self.names, self.msgs[i : i + self.window]))
            self.published = min(i + self.window, len(self.msgs))
            await asyncio.sleep(self.pause_s)
        return self.last_seq


async def connect(url: str) -> Client:
    return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2)


def namespace_of(unique: str) -> str:
    return unique[-40:].lstrip("_") or "t"


@contextlib.asynccontextmanager
async def streams(url: str, namespace: str) -> AsyncIterator[tuple[Client, JetStreamContext, NatsNames]]:
    """A connection that reconnects for ever, and the contract's streams of ``namespace``; the
    streams are deleted afterwards."""
    nc = await connect(url)
    js = nc.jetstream()
    names = NatsNames(namespace)
    await ensure_streams(js, names, replicas=1)
    try:
        yield nc, js, names
    finally:
        for spec in stream_specs(names):
            with contextlib.suppress(Exception):
                await js.delete_stream(spec.name)
        with contextlib.suppress(Exception):
            await nc.close()


@contextlib.asynccontextmanager
async def intake_running(
    nc: Client, engine: Engine, names: NatsNames, config: IntakeConfig, metrics: Metrics | None = None
) -> AsyncIterator[Metrics]:
    """``consumers.nats.intake.run`` as a task of the test, on the real clock; stopped (bounded) on exit."""
    metrics = metrics or Metrics()
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        intake.run(nc, engine, names, config, stop, metrics=metrics, clock=lambda: datetime.now(UTC), ready=ready)
    )
    await wait_for(lambda: ready.is_set() or task.done(), within=10, what="the intake ready")
    if task.done():
        task.result()  # its failure
    try:
        yield metrics
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=20)


@dataclass
class Owner:
    """One instance's :class:`~consumers.nats.partitions.OwnedIntake`, running as a task of the test."""

    name: str
    intake: OwnedIntake
    metrics: Metrics
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def owned(self) -> list[int]:
        return self.intake.owned

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def close(self) -> None:
        """A clean stop (SIGTERM's path): the batch in hand finished, the durable marked released and
        unlocked. Bounded; idempotent."""
        self.stop.set()
        await asyncio.wait_for(self.task, timeout=40)


@contextlib.asynccontextmanager
async def owned_intake(
    nc: Client,
    engine: Engine,
    names: NatsNames,
    config: IntakeConfig,
    *,
    name: str,
    partitions: int = 0,
    rebalance_s: float = 0.2,
) -> AsyncIterator[Owner]:
    """The intake of one instance as ``billing up`` runs it (``consumers.nats.partitions.run_owned``: it
    pulls only while it owns the durable), with the service role on its lock connections, on the real
    clock; yielded once it has joined (owner or standby), stopped cleanly on exit."""
    metrics, stop, ready = Metrics(), asyncio.Event(), asyncio.Event()
    intake_ = OwnedIntake(
        nc,
        engine,
        names,
        config,
        partitions,
        rebalance_s=rebalance_s,
        metrics=metrics,
        clock=lambda: datetime.now(UTC),
        ready=ready,
        role=APP_ROLE,
        instance=name,
    )
    owner = Owner(name, intake_, metrics, stop, asyncio.create_task(intake_.run(stop), name=f"test-owner-{name}"))
    try:
        await wait_for(lambda: ready.is_set() or owner.task.done(), within=10, what=f"{name} to join")
        if owner.task.done():
            owner.task.result()  # its failure
        yield owner
    finally:
        await owner.close()


def lock_waits(engine: Engine) -> int:
    """Backends of this database waiting for a row lock (a batch blocked on a wallet)."""
    return int(
        query(
            engine,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )[0][0]
    )


class Probe:
    """Samples, in the background, the consumer's redelivered-and-pending count and (with an
    engine) the backends waiting for a lock; keeps the peaks. JetStream's ``num_redelivered`` only
    counts redelivered messages still unacked, so its peak during a fault is what shows them."""

    def __init__(self, js: JetStreamContext, names: NatsNames, engine: Engine | None = None) -> None:
        self._js, self._names, self._engine = js, names, engine
        self.redelivered = 0
        self.lock_waits = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # NATS or PostgreSQL restarting
                info = await consumer(self._js, self._names)
                self.redelivered = max(self.redelivered, int(info.num_redelivered or 0))
            if self._engine is not None:
                with contextlib.suppress(Exception):
                    self.lock_waits = max(self.lock_waits, await asyncio.to_thread(lock_waits, self._engine))
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> Probe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# ---------------------------------------------------------------------------------------- service


def service_env(
    *, database_url: str, nats_url: str, namespace: str, data_dir: Path, **settings: str | int | float
) -> dict[str, str]:
    """Environment of a ``billing up``: no inherited BILLING_*, a free HTTP port, fast retries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_DATABASE_URL": database_url,
            "BILLING_NATS_URL": nats_url,
            "BILLING_NATS_NAMESPACE": namespace,
            "BILLING_HTTP_HOST": "127.0.0.1",
            "BILLING_HTTP_PORT": str(free_port()),
            "BILLING_DATA_DIR": str(data_dir),
            "BILLING_SHUTDOWN_TIMEOUT_S": "10",
            "BILLING_INTAKE_MAX_WAIT_S": "0.2",
            "BILLING_INTAKE_NAK_DELAY_S": "0.05",
            "BILLING_INTAKE_NAK_DELAY_MAX_S": "0.5",
            "BILLING_INTAKE_DB_RETRY_MAX_S": "0.5",
        }
    )
    env.update({f"BILLING_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def second_instance(env: dict[str, str]) -> dict[str, str]:
    """The environment of another instance of the same service (same namespace, same durable, same
    database and NATS), with its own HTTP port and data dir (one ``billing up`` per data dir)."""
    port = free_port()
    return {**env, "BILLING_HTTP_PORT": str(port), "BILLING_DATA_DIR": f"{env['BILLING_DATA_DIR']}-{port}"}


class Service:
    """``billing up`` in a subprocess; its output appended to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str = "billing") -> None:
        self.env = env
        self.log_path = log_path
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def port(self) -> int:
        return int(self.env["BILLING_HTTP_PORT"])

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== {self.name} start {self.starts} at {datetime.now(UTC):%H:%M:%S.%f} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen([BILLING, "up"], env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def ready(self, within: float = READY_WITHIN_S) -> None:
        async def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                async with httpx.AsyncClient(timeout=1.0) as client:
                    return (await client.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(answers, within=within, what=f"{self.name} /readyz 200")

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient(timeout=5.0) as client:
            body = (await client.get(f"http://127.0.0.1:{self.port}/metrics")).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)"
        match = re.search(pattern, body)
        return float(match.group(1)) if match else 0.0

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, no batch finished, no ack sent."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=5)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== {self.name} killed at {datetime.now(UTC):%H:%M:%S.%f} =====\n".encode())

    async def committed(self) -> float:
        """Events this process has accepted and settled (0 while its HTTP port does not answer)."""
        try:
            return await self.metric("billing_intake_messages_total", disposition="accepted")
        except httpx.HTTPError:
            return 0.0

    async def terminate(self) -> int:
        """SIGTERM and the exit status; polled, so the test's event loop (a NatsTap in it) keeps
        running while the service finishes its batch and drains its connection."""
        proc = self.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: proc.poll() is not None, within=EXIT_WITHIN_S, what=f"{self.name} to exit")
        return int(proc.returncode)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


# ---------------------------------------------------------------------------------------- NatsTap


# An ack on the wire: nats-py acks with an empty publish to the delivery's $JS.ACK reply subject
# (other acknowledgements carry a payload: -NAK, +WPI, +TERM).
_ACK = re.compile(rb"PUB \$JS\.ACK\.[^ \r\n]+ +0\r\n")


@dataclass(eq=False)
class _Link:
    held: bytearray = field(default_factory=bytearray)
    frozen: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


class NatsTap:
    """A TCP proxy in front of NATS. Once holding, it stops forwarding what the clients send (kept
    in memory instead: acks, pull requests, pings) while the server's deliveries still flow;
    whatever is held when the client dies is never sent, exactly like acks lost with a killed
    process. :meth:`hold_at_next_ack` starts holding with the first ack a client sends (that chunk
    included): the acks of a batch the intake has just committed."""

    def __init__(self, upstream_url: str) -> None:
        host_port = upstream_url.split("://", 1)[1]
        host, port = host_port.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._armed = False
        self.dropped_acks = 0
        """Acks that were held when their connection died: committed, never acked."""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    def hold(self) -> None:
        for link in self._links:
            link.frozen = True

    def hold_at_next_ack(self) -> None:
        self._armed = True

    def held_acks(self) -> int:
        return sum(len(_ACK.findall(link.held)) for link in self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        link = _Link(writers=[writer, up_writer])
        self._links.append(link)
        down = asyncio.create_task(self._pump(up_reader, writer))
        up = asyncio.create_task(self._pump(reader, up_writer, link))
        self._tasks |= {down, up}
        try:
            await asyncio.wait([down, up], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the loop is closing: clean up, nothing to report
            pass
        finally:
            for t in (down, up):
                t.cancel()
            for w in link.writers:
                w.close()
            self.dropped_acks += len(_ACK.findall(link.held))
            self._links.remove(link)
            self._tasks -= {down, up}

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link | None = None
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if link is not None and self._armed and _ACK.search(data):
                    self._armed = False
                    self.hold()
                if link is not None and link.frozen:
                    link.held += data
                    continue
                writer.write(data)
                await writer.drain()

    async def close(self) -> None:
        for link in list(self._links):
            for w in link.writers:
                w.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for t in list(self._tasks):
            t.cancel()


# ----------------------------------------------------------------------------------------- checks


def query(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def logged(engine: Engine, source: str) -> int:
    return int(query(engine, "SELECT count(*) FROM events WHERE source = :s", s=source)[0][0])


async def consumer(js: JetStreamContext, names: NatsNames) -> ConsumerInfo:
    info: ConsumerInfo = await js.consumer_info(names.in_stream, DURABLE)
    return info


def delivered_messages(info: ConsumerInfo) -> int:
    """Messages delivered at least once (the last stream sequence delivered: the stream holds only
    this test's messages and new ones are delivered in order)."""
    return int((info.delivered.stream_seq if info.delivered else 0) or 0)


async def drained(js: JetStreamContext, names: NatsNames, last_seq: int) -> bool:
    """Every message up to ``last_seq`` delivered and acked: none pending, none awaiting a retry."""
    try:
        info = await consumer(js, names)
    except Exception:  # NATS restarting
        return False
    floor = int((info.ack_floor.stream_seq if info.ack_floor else 0) or 0)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0 and floor >= last_seq)


def acked_messages(info: ConsumerInfo) -> int:
    """Messages of a stream holding only this test's messages that the consumer saw acked."""
    return delivered_messages(info) - int(info.num_ack_pending or 0)


async def stream_messages(js: JetStreamContext, stream: str) -> list[RawStreamMsg]:
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(Exception):  # a deleted sequence
            out.append(await js.get_msg(stream, seq))
    return out


@dataclass
class LedgerCheck:
    """What the log and the journal hold for one workload, against its reference."""

    expected_events: int
    logged_events: int
    lost: list[tuple[str, str]]
    unexpected: list[tuple[str, str]]
    duplicated: list[tuple[str, str]]
    balances: dict[str, int | None]
    expected_balances: dict[str, int]
    unbalanced_txns: int
    journal_total: int
    account_mismatches: list[tuple[str, int, int]]

    @property
    def wrong_balances(self) -> dict[str, tuple[int | None, int]]:
        return {
            w: (self.balances.get(w), want)
            for w, want in self.expected_balances.items()
            if self.balances.get(w) != want
        }

    @property
    def overcharged(self) -> list[str]:
        """Wallets charged more than the reference (a double charge shows here)."""
        return [w for w, (got, want) in self.wrong_balances.items() if got is not None and got < want]

    @property
    def doubled(self) -> int:
        return len(self.duplicated) + len(self.overcharged)

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{len(self.lost)} published events not in the log, e.g. {self.lost[:3]}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} events in the log that were not expected, e.g. {self.unexpected[:3]}")
        if self.duplicated:
            out.append(f"{len(self.duplicated)} events in the log more than once, e.g. {self.duplicated[:3]}")
        if self.wrong_balances:
            sample = dict(list(self.wrong_balances.items())[:5])
            out.append(f"{len(self.wrong_balances)} wallets off their reference (got, want): {sample}")
        if self.unbalanced_txns:
            out.append(f"{self.unbalanced_txns} journal transactions of these wallets do not sum to zero")
        if self.journal_total:
            out.append(f"the whole journal sums to {self.journal_total}, not 0")
        if self.account_mismatches:
            out.append(f"account balances differ from the sum of their entries: {self.account_mismatches[:3]}")
        return out


def check_ledger(
    engine: Engine,
    source: str,
    expected_keys: Iterable[tuple[str, str]],
    expected_balances: dict[str, int],
) -> LedgerCheck:
    expected = set(expected_keys)
    wallets = sorted(expected_balances)
    accounts = [f"wallet:{w}" for w in wallets]
    rows = query(engine, "SELECT source, event_id FROM events WHERE source = :s", s=source)
    seen = Counter((r[0], r[1]) for r in rows)
    balances = dict(
        query(engine, "SELECT account, balance_micros FROM account_balances WHERE account = ANY(:a)", a=accounts)
    )
    unbalanced = query(
        engine,
        "SELECT count(*) FROM (SELECT e.event_position, e.txn_no FROM journal_entries e"
        "  JOIN journal_transactions t USING (event_position, txn_no) WHERE t.wallet_id = ANY(:w)"
        "  GROUP BY e.event_position, e.txn_no HAVING sum(e.amount_micros) <> 0) AS bad",
        w=wallets,
    )[0][0]
    total = query(engine, "SELECT coalesce(sum(amount_micros), 0) FROM journal_entries")[0][0]
    mismatches = query(
        engine,
        "SELECT b.account, b.balance_micros, coalesce(s.total, 0) FROM account_balances b"
        "  LEFT JOIN (SELECT account, sum(amount_micros) AS total FROM journal_entries"
        "             WHERE account = ANY(:a) GROUP BY account) s USING (account)"
        " WHERE b.account = ANY(:a) AND b.balance_micros <> coalesce(s.total, 0)",
        a=accounts,
    )
    return LedgerCheck(
        expected_events=len(expected),
        logged_events=sum(seen.values()),
        lost=sorted(expected - set(seen)),
        unexpected=sorted(set(seen) - expected),
        duplicated=sorted(k for k, n in seen.items() if n > 1),
        balances={w: balances.get(f"wallet:{w}") for w in wallets},
        expected_balances=expected_balances,
        unbalanced_txns=int(unbalanced),
        journal_total=int(total),
        account_mismatches=[(str(a), int(b), int(c)) for a, b, c in mismatches],
    )


def stop_rows(engine: Engine, wallets: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(walletId, msg_id, published) of every stop command written for these wallets."""
    rows = query(
        engine,
        "SELECT payload->>'walletId', msg_id, published_at IS NOT NULL FROM outbox"
        " WHERE subject = :s AND payload->>'walletId' = ANY(:w) ORDER BY id",
        s=STOP_SUBJECT,
        w=list(wallets),
    )
    return [(str(a), str(b), bool(c)) for a, b, c in rows]


@dataclass
class StopCheck:
    written: int
    published_rows: int
    in_stream: Counter[str]
    missing_in_stream: list[str]
    for_wallets_not_dry: list[str]
    """Stop commands for wallets that are never dry, whatever the order of their events: unexplained."""
    dry_without_stop: list[str]
    reordered: dict[str, str] = field(default_factory=dict)
    """Wallets funded first in publish order that the service stopped all the same, because it
    applied another of their events before their credit: wallet -> the event type the log has before
    the credit. Not in :meth:`problems`: test_faults' check_and_record fails on it unless the fault
    (a NATS restart) can lose deliveries in flight."""

    def problems(self) -> list[str]:
        out = []
        if self.published_rows != self.written:
            out.append(f"{self.written - self.published_rows} of {self.written} stop commands not marked published")
        if self.missing_in_stream:
            out.append(f"stop commands missing in COMPUTE_COMMANDS: {self.missing_in_stream[:5]}")
        if any(n > 1 for n in self.in_stream.values()):
            out.append(f"stop commands in the stream twice: {[k for k, n in self.in_stream.items() if n > 1][:5]}")
        if self.for_wallets_not_dry:
            out.append(f"stop commands for wallets funded first, in log order too: {self.for_wallets_not_dry[:5]}")
        if self.dry_without_stop:
            out.append(f"dry wallets without a stop command: {self.dry_without_stop}")
        return out


async def check_stop_commands(
    engine: Engine, js: JetStreamContext, names: NatsNames, wallets: Sequence[str], dry: Sequence[str]
) -> StopCheck:
    rows = stop_rows(engine, wallets)
    ours = {msg_id for _, msg_id, _ in rows}
    in_stream: Counter[str] = Counter()
    for m in await stream_messages(js, names.commands_stream):
        msg_id = (m.headers or {}).get("Nats-Msg-Id", "")
        if msg_id in ours:
            in_stream[msg_id] += 1
    stopped = sorted({w for w, _, _ in rows if w not in set(dry)})
    first = {w: first_logged(engine, w) for w in stopped}
    return StopCheck(
        written=len(rows),
        published_rows=sum(1 for *_, p in rows if p),
        in_stream=in_stream,
        missing_in_stream=sorted(ours - set(in_stream)),
        for_wallets_not_dry=[w for w, (kind, amount) in first.items() if kind == "wallet.adjusted" and amount > 0],
        dry_without_stop=sorted(set(dry) - {w for w, _, _ in rows}),
        reordered={w: kind for w, (kind, amount) in first.items() if not (kind == "wallet.adjusted" and amount > 0)},
    )


def first_logged(engine: Engine, wallet: str) -> tuple[str, int]:
    """(type, amountMicros or 0) of a wallet's first event in log order. Every workload wallet's
    first published event is its credit; anything else first means the service reordered it."""
    rows = query(
        engine,
        "SELECT type, coalesce((payload->'data'->>'amountMicros')::bigint, 0) FROM events"
        " WHERE wallet_id = :w ORDER BY position LIMIT 1",
        w=wallet,
    )
    return (str(rows[0][0]), int(rows[0][1])) if rows else ("", 0)


def all_stops_published(engine: Engine, wallets: Sequence[str], dry: Sequence[str]) -> bool:
    rows = stop_rows(engine, wallets)
    return bool(rows) and {w for w, _, _ in rows} >= set(dry) and all(p for *_, p in rows)


def rental_status(engine: Engine, resources: Sequence[str]) -> dict[str, str]:
    return dict(query(engine, "SELECT resource_id, status FROM rentals WHERE resource_id = ANY(:r)", r=list(resources)))


# ------------------------------------------------------------------------------------ the summary


@dataclass
class FaultRow:
    fault: str
    injected: int
    lost: int
    doubled: int
    recover_s: float
    redelivered: int | None = None
    note: str = ""


@dataclass
class FaultTable:
    rows: list[FaultRow] = field(default_factory=list)

    def add(self, row: FaultRow) -> None:
        self.rows.append(row)

    def render(self) -> str:
        head = ("fault", "injected", "events lost", "charges doubled", "redelivered", "recover (s)", "notes")
        cells = [
            (
                r.fault,
                str(r.injected),
                str(r.lost),
                str(r.doubled),
                "-" if r.redelivered is None else str(r.redelivered),
                f"{r.recover_s:.2f}",
                r.note,
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

        def line(values: Sequence[str]) -> str:
            return " | ".join(
                v.ljust(w) if i in (0, 6) else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
            )

        rule = "-+-".join("-" * w for w in widths)
        legend = [
            "events lost: published (acknowledged by the stream) and not in the log; charges doubled: events in",
            "the log twice plus wallets charged beyond the reference; redelivered: peak of JetStream's",
            "num_redelivered during the fault (redelivered, not yet acked; retry naks included); recover: from",
            "the end of the fault (last restart, release, or last publish) to every message acked and logged.",
        ]
        return "\n".join(["fault suite summary", line(head), rule, *(line(c) for c in cells), *legend])
