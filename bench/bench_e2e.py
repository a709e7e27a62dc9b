"""End to end: the real `billing up` consuming a burst of realistic CloudEvents from JetStream into
PostgreSQL, beside raw baselines measured in the same run on the same servers (issue #4 item 8).

    python bench/bench_e2e.py [--wallets 10000] [--events 60000] [--runs 3] [--profile]

The defaults take about 2.5 minutes on the 2-core machines here (most of it the service draining the
burst, ~20-30 s a run); --events 100000 takes about 4 minutes.

The workload (bench/e2e_workload.py): a credit per wallet, rentals (pods on demand and spot,
marketplace, a few clusters) with per-minute readings, pauses/resumes, ends and spot preemptions,
many serverless jobs, a few producer retries past the duplicate window and a few bad inputs; a few
wallets arranged to run dry during the run.

Each run measures, in an order that alternates between runs:

* A:  a bare nats-py consumer of the same messages (publish to a bare stream, durable pull
      consumer, ``fetch(1000)``, ack each), and A': the raw ``$JS.API.CONSUMER.MSG.NEXT`` pull loop;
* B:  a bare binary COPY of the rows the service writes for these events (events,
      journal_transactions, journal_entries; ``bench_store.run_copy``), a transaction per 1000 events;
* the service: `billing up` as a subprocess on a fresh migrated database and a unique NATS
  namespace; every message published to ``<ns>.billing.in.<walletId>`` (``publish_async`` in windows
  of 1000); events/s from the first publish until every message is accounted for: accepted ones
  committed in ``events``, bad ones in ``rejected_inputs``, and the intake's consumer fully acked
  (so the duplicates are through too). Also: latency of sampled events, the service's peak RSS, its
  CPU beside PostgreSQL's and nats-server's, a paced latency probe after the burst, and the delay
  from each dry wallet's predicted zero to its stop command arriving on
  ``<ns>.compute.commands.stop``.

Everything is bounded (``--timeout`` for the drain) and cleaned up: the service is stopped by its pid,
the databases dropped, the namespace's streams deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import bisect
import contextlib
import json
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import e2e_workload as workload
from bench.bench_store import run_copy
from bench.common import fresh_database, pg_server, plain
from bench.e2e_nats import baseline_a, connect, delete_streams, nats_server, publish_all
from bench.e2e_profile import PySpy, report
from bench.e2e_workload import Message, Workload
from consumers.names import NatsNames
from ledger.store import AppendItem

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.025
STOP_GRACE_S = 20.0  # after the last predicted zero, how long to wait for its stop command


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


class Service:
    """`billing up` as a subprocess, stopped by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, database_url: str, nats_url: str, namespace: str, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.log_path = workdir / "billing-up.log"
        self.env = {
            **os.environ,
            "BILLING_DATABASE_URL": database_url,
            "BILLING_NATS_URL": nats_url,
            "BILLING_NATS_NAMESPACE": namespace,
            "BILLING_HTTP_PORT": str(self.port),
            "BILLING_HTTP_HOST": "127.0.0.1",
            "BILLING_DATA_DIR": str(workdir / "data"),
            "BILLING_SHUTDOWN_TIMEOUT_S": "10",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("billing", path=str(Path(sys.executable).parent)) or shutil.which("billing")
        if exe is None:
            raise SystemExit("the `billing` console script is not installed (make install)")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, "up"], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
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


# ------------------------------------------------------------------------------------ observers


class CommitPoller(threading.Thread):
    """Polls ``max(events.position)`` every 25 ms on its own connection: the instant a position
    first became visible is the commit instant of its batch (the intake is the only writer of
    ``events`` here and commits its batches one after another), to within one poll."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True, name="commit-poller")
        self.dsn = dsn
        self.times: list[float] = []
        self.positions: list[int] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.done.is_set():
                    t = time.time()
                    row = conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()
                    pos = int(row[0]) if row else 0
                    if not self.positions or pos > self.positions[-1]:
                        self.times.append(t)
                        self.positions.append(pos)
                    self.done.wait(POLL_INTERVAL_S)
        except BaseException as exc:
            self.error = exc

    @property
    def max_position(self) -> int:
        return self.positions[-1] if self.positions else 0

    def visible_at(self, position: int) -> float | None:
        i = bisect.bisect_left(self.positions, position)
        return self.times[i] if i < len(self.times) else None

    def stop(self) -> None:
        self.done.set()
        self.join(5)


class ProcSampler(threading.Thread):
    """Peak RSS of the service process (and any children), sampled every 100 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(psutil.Error):
                rss = self.proc.memory_info().rss
                for child in self.proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss += child.memory_info().rss
                self.peak_rss = max(self.peak_rss, rss)
            self.done.wait(0.1)

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def _cpu(p: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        t = p.cpu_times()
        return float(t.user + t.system)
    return 0.0


class CpuMeter:
    """CPU seconds of the service, of its database's PostgreSQL backends, of nats-server and of this
    bench process over a window (all on this machine; found by pid, database name, listening port)."""

    def __init__(self, service_pid: int, dbname: str, nats_url: str) -> None:
        self.service = psutil.Process(service_pid)
        self.dbname = dbname
        port = int(nats_url.rsplit(":", 1)[1].split("/")[0])
        self.nats: psutil.Process | None = None
        with contextlib.suppress(psutil.Error, OSError):
            for c in psutil.net_connections("tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                    self.nats = psutil.Process(c.pid)
                    break
        self.me = psutil.Process()
        self.start: dict[str, float] = {}
        self.backends0: dict[int, float] = {}

    def _backends(self) -> dict[int, float]:
        out = {}
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith("postgres:") and f" {self.dbname} " in cmd:
                    out[p.pid] = _cpu(p)
        return out

    def snapshot(self) -> dict[str, float]:
        machine = psutil.cpu_times()
        return {
            "service": _cpu(self.service),
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

    def end(self) -> dict[str, float]:
        now = self.snapshot()
        out = {k: now[k] - self.start[k] for k in now}
        backends = self._backends()
        out["postgres (this database's backends)"] = sum(
            v - self.backends0.get(pid, 0.0) for pid, v in backends.items()
        )
        machine = out.pop("whole machine")
        out["everything else on the machine"] = machine - sum(v for v in out.values() if v == v)  # v == v: not NaN
        return out


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


async def _query(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    def run() -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return list(conn.execute(sql, params or None).fetchall())

    return await asyncio.to_thread(run)


async def _wait_accounted(
    dsn: str,
    js: JetStreamContext,
    names: NatsNames,
    accepted: int,
    rejected: int,
    deadline: float,
) -> bool:
    """Until ``events`` holds ``accepted`` rows, ``rejected_inputs`` ``rejected`` rows, and the
    intake's consumer has nothing pending or unacked (the duplicates are through too)."""
    while time.monotonic() < deadline:
        rows = await _query(dsn, "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM rejected_inputs)")
        n_events, n_rejected = int(rows[0][0]), int(rows[0][1])
        if n_events >= accepted and n_rejected >= rejected:
            ci = await js.consumer_info(names.in_stream, "billing-intake")
            if ci.num_pending == 0 and ci.num_ack_pending == 0:
                return True
        await asyncio.sleep(0.2)
    return False


async def run_service(
    server: str,
    nats_url: str,
    wl: Workload,
    items: list[AppendItem],
    args: argparse.Namespace,
    profile_dir: Path | None,
) -> ServiceRun:
    namespace = f"bench{secrets.token_hex(4)}"
    names = NatsNames(namespace)
    with (
        fresh_database(server, "e2e") as db_url,
        tempfile.TemporaryDirectory(prefix="billing-e2e-") as tmp,
    ):
        dsn = plain(db_url)
        dbname = str(make_url(db_url).database)
        svc = Service(db_url, nats_url, namespace, Path(tmp))
        svc.start()
        try:
            ready_s = await svc.wait_ready()
            return await _measure(svc, dsn, dbname, nats_url, names, wl, items, args, ready_s, profile_dir)
        finally:
            svc.stop()
            await delete_streams(nats_url, [names.in_stream, names.dlq_stream, names.commands_stream, names.out_stream])


async def _measure(
    svc: Service,
    dsn: str,
    dbname: str,
    nats_url: str,
    names: NatsNames,
    wl: Workload,
    items: list[AppendItem],
    args: argparse.Namespace,
    ready_s: float,
    profile_dir: Path | None,
) -> ServiceRun:
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

    async with connect(nats_url) as nc, contextlib.AsyncExitStack() as cleanup:
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

        def on_publish(i: int) -> None:
            key = sampled.get(i)
            if key is not None:
                pub_at[key] = time.time()

        poller = CommitPoller(dsn)
        rss = ProcSampler(svc.pid)
        cpu = CpuMeter(svc.pid, dbname, nats_url)
        poller.start()
        cleanup.callback(poller.stop)
        rss.start()
        cleanup.callback(rss.stop)
        spy = None
        if profile_dir is not None:
            spy = PySpy(svc.pid, profile_dir / "billing-up.pyspy")
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

        deadline = time.monotonic() + args.timeout
        cpu.begin()
        t_first = time.time()
        wakeups = asyncio.create_task(read_wakeups())
        subject_of = names.in_subject
        publish_s = await publish_all(js, lambda m: subject_of(m.wallet_id), messages, on_publish=on_publish)
        ok = await _wait_accounted(dsn, js, names, accepted, rejected, deadline)
        final_pos = poller.max_position
        t_end = poller.visible_at(final_pos) if ok else time.time()
        cpu_used = cpu.end()
        if spy is not None:
            spy.stop()
        burst_s = (t_end or time.time()) - t_first
        wakeups.cancel()

        # Latency of the sampled events of the burst.
        keys = list(pub_at)
        rows = await _query(
            dsn,
            "SELECT e.source, e.event_id, e.position, extract(epoch FROM e.received_at)::float8 FROM events e"
            " JOIN unnest(%s::text[], %s::text[]) AS k(s, i) ON e.source = k.s AND e.event_id = k.i",
            ([k[0] for k in keys], [k[1] for k in keys]),
        )
        lat_recv, lat_commit = _latencies(rows, pub_at, poller)

        # The intake's own figures and the journal, at the end of the burst (before the paced probe).
        metrics = svc.metrics()
        dispositions = {
            m[1]: v
            for k, v in metrics.items()
            if (m := re.match(r'billing_intake_messages_total\{disposition="(\w+)"\}', k))
        }
        b_count = metrics.get("billing_intake_batch_seconds_count", 0.0)
        batch_avg = (
            metrics.get("billing_intake_batch_size_sum", 0.0) / b_count if b_count else 0.0,
            metrics.get("billing_intake_batch_seconds_sum", 0.0) / b_count if b_count else 0.0,
        )
        rows = await _query(
            dsn, "SELECT (SELECT count(*) FROM journal_transactions), (SELECT count(*) FROM journal_entries)"
        )
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
            f"outbox rows written by the burst: {rows[0][0]:,} ({rows[0][1]:,} stop commands, {rows[0][2]:,} notices,"
            f" {rows[0][3]:,} settlements); relay delay (row's created_at, the writer's `now`, so the writing"
            " transaction included -> PubAck) avg "
            f"{metrics.get('billing_outbox_relay_delay_seconds_sum', 0.0) / relay_n * 1000 if relay_n else 0:,.0f} ms"
        )

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
                acks.append(
                    await js.publish_async(subject_of(m.wallet_id), m.data, headers={"Nats-Msg-Id": m.msg_id or ""})
                )
            await asyncio.gather(*acks)
            if await _wait_accounted(dsn, js, names, accepted + n_paced, rejected, time.monotonic() + 60):
                rows = await _query(
                    dsn,
                    "SELECT e.source, e.event_id, e.position, extract(epoch FROM e.received_at)::float8 FROM events e"
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
            profile = report(spy, burst_s, cpu_used["service"] / burst_s)
        return ServiceRun(
            rate=len(messages) / burst_s if ok else final_pos / burst_s,
            seconds=burst_s,
            messages=len(messages),
            timed_out=not ok,
            ready_s=ready_s,
            publish_rate=len(messages) / publish_s,
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
            dispositions=dispositions,
            batch_avg=batch_avg,
            journal_check=journal_check,
            outbox=outbox,
            profile=profile,
        )


def _latencies(
    rows: list[tuple[Any, ...]], pub_at: dict[tuple[str, str], float], poller: CommitPoller
) -> tuple[list[float], list[float]]:
    recv, commit = [], []
    for src, eid, pos, received in rows:
        t_pub = pub_at.get((str(src), str(eid)))
        if t_pub is None:
            continue
        recv.append(float(received) - t_pub)
        visible = poller.visible_at(int(pos))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wallets", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=60_000, help="messages in the burst (about)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dry-wallets", type=int, default=12, help="wallets arranged to run dry during the run")
    ap.add_argument("--dry-first", type=float, default=8.0, help="s after the first publish the first runs dry")
    ap.add_argument("--dry-last", type=float, default=30.0, help="s after the first publish the last runs dry")
    ap.add_argument("--sample-every", type=int, default=100, help="latency sample: every Nth accepted event")
    ap.add_argument("--paced-rate", type=float, default=200.0, help="events/s of the paced probe after the burst")
    ap.add_argument("--paced-seconds", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on one run's drain, seconds")
    ap.add_argument("--profile", action="store_true", help="py-spy the service during the first run")
    ap.add_argument("--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "billing-bench-e2e")
    args = ap.parse_args()

    t = time.perf_counter()
    wl = workload.build(args.wallets, args.events, dry=args.dry_wallets)
    dry_proto, _ = workload.dry_wallet_messages(wl.dry, datetime.now(UTC), [60.0] * len(wl.dry))
    all_msgs: list[Message] = dry_proto + wl.messages
    items = workload.append_items(all_msgs)
    accepted, rejected, duplicate = wl.expected(len(dry_proto))
    print(
        f"workload: {len(all_msgs):,} messages for {args.wallets:,} wallets "
        f"({accepted:,} events to accept, {duplicate:,} producer retries, {rejected:,} bad inputs), "
        f"avg {sum(len(m.data) for m in all_msgs) / len(all_msgs):.0f} bytes; "
        f"{sum(len(i.txns) for i in items):,} journal transactions; "
        f"built in {time.perf_counter() - t:.1f} s (not timed)"
    )
    print("  " + ", ".join(f"{k} {v:,}" for k, v in wl.counts.items()) + f", dry wallets {len(wl.dry)} (x2 events)")
    print(f"  machine: {os.cpu_count()} CPUs, load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")

    a_fetch: list[float] = []
    a_raw: list[float] = []
    a_pub: list[float] = []
    b_copy: list[float] = []
    runs: list[ServiceRun] = []
    with pg_server() as server, nats_server() as nats_url:
        print(f"  servers: PostgreSQL {plain(server).split('@')[-1]}, NATS {nats_url}")
        for run in range(args.runs):
            profile_dir = None
            if args.profile and run == 0:
                profile_dir = args.profile_dir
                profile_dir.mkdir(parents=True, exist_ok=True)
            order = ("A", "B", "service") if run % 2 == 0 else ("service", "B", "A")
            for what in order:
                if what == "A":
                    res = asyncio.run(baseline_a(nats_url, f"benchraw{secrets.token_hex(4)}", all_msgs))
                    a_pub.append(res["publish"])
                    a_fetch.append(res["fetch"])
                    a_raw.append(res["raw"])
                elif what == "B":
                    b_copy.append(run_baseline_b(server, items))
                else:
                    runs.append(asyncio.run(run_service(server, nats_url, wl, items, args, profile_dir)))
            r = runs[-1]
            print(
                f"  run {run + 1}{' (py-spy attached)' if profile_dir else ''}: "
                f"A fetch {a_fetch[-1]:,.0f}/s, A' raw {a_raw[-1]:,.0f}/s, B COPY {b_copy[-1]:,.0f}/s, "
                f"service {r.rate:,.0f}/s ({r.messages:,} in {r.seconds:.1f} s{', TIMED OUT' if r.timed_out else ''}); "
                f"load avg {os.getloadavg()[0]:.1f}",
                flush=True,
            )

    service = [r.rate for r in runs]
    print()
    print(f"{'path':<68} {'events/s median (min-max)':>28}")
    print(f"{'A   nats-py durable pull, fetch(1000), ack each (bare stream)':<68} {summary(a_fetch):>28}")
    print(f"{'A`  raw $JS.API.CONSUMER.MSG.NEXT pull loop, ack each':<68} {summary(a_raw):>28}")
    print(f"{'B   binary COPY of the same rows (events + journal), txn per 1000':<68} {summary(b_copy):>28}")
    print(f"{'service end to end (billing up: JetStream -> committed + projected)':<68} {summary(service):>28}")
    producer = summary([r.publish_rate for r in runs])
    print(f"{'    (producer side: publish_async windows of 1000, into the service stream)':<68} {producer:>28}")
    print()

    def ratio_line(name: str, base: list[float]) -> str:
        per_run = [s / b for s, b in zip(service, base, strict=True)]
        return (
            f"  service / {name}: {statistics.median(per_run):.2f} (per run: {', '.join(f'{x:.2f}' for x in per_run)})"
        )

    print("ratios (each run's service figure over the same run's baseline):")
    print(ratio_line("A  (nats-py fetch)", a_fetch))
    print(ratio_line("A` (raw pull)     ", a_raw))
    print(ratio_line("B  (binary COPY)  ", b_copy))
    floor = min(statistics.median(a_fetch), statistics.median(b_copy))
    met = statistics.median(service) >= 0.5 * floor
    print(
        f"goal: end-to-end >= 0.5 x min(baselines A, B) = 0.5 x {floor:,.0f} = {0.5 * floor:,.0f} events/s: "
        f"{'MET' if met else 'NOT MET'} (service median {statistics.median(service):,.0f}, "
        f"{statistics.median(service) / floor:.2f} x min)"
    )
    floor2 = min(statistics.median(a_raw), statistics.median(b_copy))
    print(
        f"      (against the raw-pull ceiling A` instead of A: 0.5 x {floor2:,.0f} = {0.5 * floor2:,.0f}: "
        f"{'met' if statistics.median(service) >= 0.5 * floor2 else 'not met'})"
    )

    print()
    print("service details (median over runs unless said):")
    recv = [x for r in runs for x in r.lat_recv]
    commit = [x for r in runs for x in r.lat_commit]
    print(
        f"  burst latency, {len(commit):,} sampled events (every {args.sample_every}th accepted, all runs), "
        f"publish call -> commit visible (25 ms poll of max(position)): p50 {ms(commit, 50)}, p99 {ms(commit, 99)}, "
        f"max {ms(commit, 100)}"
    )
    print(
        f"      publish call -> events.received_at (the batch's `now`, read when the intake starts the batch,"
        f" before parse and transaction): p50 {ms(recv, 50)}, p99 {ms(recv, 99)}"
    )
    print(
        "      (the whole burst is published at once, faster than it is consumed: these are mostly queueing"
        " in the stream, i.e. backlog / throughput)"
    )
    precv = [x for r in runs for x in r.paced_recv]
    pcommit = [x for r in runs for x in r.paced_commit]
    if pcommit:
        print(
            f"  paced latency after the burst ({args.paced_rate:.0f} events/s for {args.paced_seconds:.0f} s, every"
            f" event, {len(pcommit):,} in all): publish -> commit visible p50 {ms(pcommit, 50)}, p99 {ms(pcommit, 99)};"
            f" publish -> received_at p50 {ms(precv, 50)}, p99 {ms(precv, 99)}"
        )
    print(
        f"  peak RSS of billing up: {statistics.median([r.peak_rss for r in runs]) / 2**20:,.0f} MiB "
        f"(per run: {', '.join(f'{r.peak_rss / 2**20:,.0f}' for r in runs)} MiB); ready in "
        f"{statistics.median([r.ready_s for r in runs]):.1f} s after exec"
    )
    cpu_keys = list(runs[0].cpu)
    print(
        "  CPU during the burst, cores busy on average (of "
        f"{os.cpu_count()}): " + ", ".join(f"{k} {statistics.median([r.cpu[k] for r in runs]):.2f}" for k in cpu_keys)
    )
    print(
        f"  intake batches: avg {statistics.median([r.batch_avg[0] for r in runs]):,.0f} messages, "
        f"{statistics.median([r.batch_avg[1] for r in runs]) * 1000:,.0f} ms each (parse, transaction, commit, acks); "
        "dispositions (last run): " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(runs[-1].dispositions.items()))
    )
    print(f"  {runs[-1].journal_check}")
    print(f"  {runs[-1].outbox} (last run)")
    arr = [x[1] for r in runs for x in r.stops]
    iss = [x[2] for r in runs for x in r.stops]
    relay = [x[1] - x[2] for r in runs for x in r.stops]
    during = sum(1 for r in runs for x in r.stops if x[3])
    missing = sum(r.stops_missing for r in runs)
    if arr:
        print(
            f"  zero -> stop command arriving on <ns>.compute.commands.stop: p50 {ms(arr, 50)}, max {ms(arr, 100)}"
            f" ({len(arr)} dry wallets over all runs, {during} ran dry during the burst"
            + (f"; {missing} stop commands MISSING" if missing else "")
            + ")"
        )
        print(
            f"      predicted zero from rules.projected_zero_at; zero -> issuedAt (the scheduler's tick) p50"
            f" {ms(iss, 50)}, max {ms(iss, 100)}; issuedAt -> arrival (commit, outbox relay, JetStream) p50"
            f" {ms(relay, 50)}, max {ms(relay, 100)}"
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


if __name__ == "__main__":
    main()
