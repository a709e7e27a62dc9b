"""BILLING_INTAKE_WRITERS (consumers/service/writers.py): one `billing up` with 4 partitions and 2
processes, the instance and one writer process beside it, on the run's PostgreSQL and NATS.

1. Both processes are members of the ownership and own 2 partitions each (their advisory locks in
   ``pg_locks``, told apart by the lock connections' ``application_name``, which names the OS pid).
2. Credits published on every partition's subject are all committed, once each.
3. SIGTERM to the parent stops the writer too: exit 0, no process left, every lock freed.
4. A writer ``kill -9``'d is started again (and the share is 2/2 again); a ``kill -9`` of the parent:
   the writer dies with it (PR_SET_PDEATHSIG) within seconds and its locks
   are freed, so another instance could take every partition over.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
from sqlalchemy import Engine

from consumers.nats.names import NatsNames, partition_of
from consumers.nats.partitions import lock_classes
from ledger.events import event_to_json
from tests.factories import adjusted
from tests.integration.jetstream import jetstream, namespace_of, publish_raw, query, wait_until
from tests.integration.test_billing_up import free_port, service

if TYPE_CHECKING:
    from tests.conftest import TestDatabase
    from tests.integration.test_billing_up import Service

pytestmark = pytest.mark.integration

PARTITIONS = 4
WRITERS = 2
DURABLE = "billing-intake"
# Credits per partition's wallet.
CREDITS = 25
# The writer must be gone this long after the parent's kill -9.
DIES_WITHIN_S = 5.0


@pytest.fixture
def writers_env(database: TestDatabase, nats_url: str, unique: str, tmp_path: Path) -> dict[str, str]:
    """test_billing_up's service environment, partitioned, with one writer process beside the instance."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    return env | {
        "BILLING_DATABASE_URL": database.url,
        "BILLING_NATS_URL": nats_url,
        "BILLING_NATS_NAMESPACE": namespace_of(unique),
        "BILLING_HTTP_HOST": "127.0.0.1",
        "BILLING_HTTP_PORT": str(free_port()),
        "BILLING_DATA_DIR": str(tmp_path / "data"),
        "BILLING_SHUTDOWN_TIMEOUT_S": "10",
        "BILLING_INTAKE_MAX_WAIT_S": "0.2",
        "BILLING_EVENT_MAX_AGE_S": str(100 * 365 * 86_400),  # tests.factories dates events 2026-11-28
        "BILLING_INTAKE_PARTITIONS": str(PARTITIONS),
        "BILLING_INTAKE_WRITERS": str(WRITERS),
        "BILLING_INTAKE_REBALANCE_S": "0.5",
        "BILLING_INTAKE_DURABLE": DURABLE,
    }


def _owners(engine: Engine, names: NatsNames) -> dict[int, list[int]]:
    """OS pid -> the partitions whose advisory lock a connection of that process holds."""
    unit_class, _ = lock_classes(names, DURABLE, partitioned=True)
    rows = query(
        engine,
        "SELECT a.application_name, l.objid::bigint FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = CAST(:c AS bigint)::oid"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        c=unit_class,
    )
    owners: dict[int, list[int]] = {}
    for app, unit in rows:
        match = re.search(r":(\d+)$", app)
        assert match, app
        owners.setdefault(int(match[1]), []).append(int(unit))
    return {pid: sorted(units) for pid, units in owners.items()}


def _members(engine: Engine, names: NatsNames) -> int:
    _, member_class = lock_classes(names, DURABLE, partitioned=True)
    rows = query(
        engine,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2"
        " AND classid = CAST(:c AS bigint)::oid"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        c=member_class,
    )
    return int(rows[0][0])


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _two_writers(svc: Service, owner_engine: Engine, names: NatsNames) -> int:
    """Wait for the 2/2 share of the parent and its writer; the writer's pid."""
    assert svc.proc is not None
    parent = svc.proc.pid
    await wait_until(
        lambda: sorted(len(u) for u in _owners(owner_engine, names).values()) == [2, 2],
        within=20,
        what="two processes owning 2 partitions each",
    )
    owners = _owners(owner_engine, names)
    assert parent in owners, f"the parent {parent} owns nothing: {owners}"
    children = {c.pid for c in psutil.Process(parent).children()}
    (writer,) = set(owners) - {parent}
    assert writer in children, f"{writer} is not a child of the parent {parent} ({children})"
    assert sorted(u for units in owners.values() for u in units) == list(range(PARTITIONS))
    assert _members(owner_engine, names) == WRITERS
    return writer


async def test_two_processes_share_the_partitions_commit_once_and_stop_together(
    writers_env: dict[str, str], nats_url: str, owner_engine: Engine, unique: str, tmp_path: Path
) -> None:
    wallets: dict[int, str] = {}
    i = 0
    while len(wallets) < PARTITIONS:
        w = f"wr{i}{unique[-40:]}"[:64]
        wallets.setdefault(partition_of(w, PARTITIONS), w)
        i += 1
    with service(writers_env, tmp_path / "billing.log") as svc:
        svc.start()
        await svc.ready()
        async with jetstream(nats_url, unique) as (_nc, js, names):
            writer = await _two_writers(svc, owner_engine, names)
            assert "writers" in (await svc.get("/readyz")).text
            for p, w in wallets.items():
                for n in range(CREDITS):
                    ev = adjusted(w, 1_000 + n, id_=f"wr-{p}-{n}-{unique}"[:64])
                    await publish_raw(js, names.in_partition_subject(p, w), event_to_json(ev), msg_id=ev.id)
            ids = list(wallets.values())

            def committed() -> int:
                return int(query(owner_engine, "SELECT count(*) FROM events WHERE wallet_id = ANY(:w)", w=ids)[0][0])

            await wait_until(lambda: committed() >= PARTITIONS * CREDITS, within=20, what="every credit committed")
            per_wallet = query(
                owner_engine,
                "SELECT wallet_id, count(*), count(DISTINCT event_id) FROM events WHERE wallet_id = ANY(:w) GROUP BY 1",
                w=ids,
            )
            assert sorted((c, d) for _w, c, d in per_wallet) == [(CREDITS, CREDITS)] * PARTITIONS

            assert svc.terminate() == 0
            await wait_until(lambda: not _alive(writer), within=5, what="the writer process to be gone")
            assert _owners(owner_engine, names) == {}
            assert _members(owner_engine, names) == 0
        log = svc.log()
        assert f"writer process 1 (pid {writer}) stopped" in log, log[-3000:]


async def test_a_dead_writer_is_restarted_and_kill_9_of_the_parent_kills_it(
    writers_env: dict[str, str], nats_url: str, owner_engine: Engine, unique: str, tmp_path: Path
) -> None:
    with service(writers_env, tmp_path / "billing.log") as svc:
        svc.start()
        await svc.ready()
        async with jetstream(nats_url, unique) as (_nc, _js, names):
            first = await _two_writers(svc, owner_engine, names)
            # A writer that dies on its own is started again, and the share is 2/2 again.
            os.kill(first, signal.SIGKILL)
            await wait_until(lambda: not _alive(first), within=5, what="the first writer to die")
            await wait_until(lambda: first not in _owners(owner_engine, names), within=5, what="its locks freed")
            writer = await _two_writers(svc, owner_engine, names)
            assert writer != first
            assert f"writer process 1 (pid {first}) exited with -9: starting it again" in svc.log()
            assert svc.proc is not None
            os.kill(svc.proc.pid, signal.SIGKILL)
            svc.proc.wait(timeout=5)
            await wait_until(lambda: not _alive(writer), within=DIES_WITHIN_S, what="the writer to die with its parent")
            await wait_until(
                lambda: _owners(owner_engine, names) == {} and _members(owner_engine, names) == 0,
                within=DIES_WITHIN_S,
                what="every advisory lock of the instance freed",
            )
