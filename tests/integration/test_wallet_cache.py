"""The intake owner's wallets in memory (projections.wallet_store.WalletCache) against the real
PostgreSQL: used only while the row's version is the one it wrote, reloaded after any other writer
(whose lock bumps the version), never ahead of the database after a failed batch, bounded."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from consumers.nats import intake as intake_module
from ledger.db import unit_of_work
from ledger.events import Event
from projections.processor import process_batch, tick_wallets
from projections.wallet_store import WalletCache
from tests.factories import adjusted, make_event, metered
from tests.integration.test_processor import NOW, q, run

pytestmark = pytest.mark.integration


def started(wallet_id: str, resource_id: str) -> Event:
    return make_event(
        "gpu.rental.started",
        {
            "walletId": wallet_id,
            "resourceId": resource_id,
            "resourceKind": "pod",
            "gpuType": "A100",
            "gpuCount": 1,
            "tier": "on_demand",
            "pricePerHourMicros": 3_600_000,  # 1,000 micros a second
        },
    )


def ids(unique: str) -> tuple[str, str]:
    return f"w{unique[-39:]}", f"p{unique[-39:]}"


def balance(engine: Engine, w: str) -> int:
    ((b,),) = q(engine, "SELECT balance_micros FROM account_balances WHERE account = :a", a=f"wallet:{w}")
    return int(b)


def version(engine: Engine, w: str) -> int:
    ((v,),) = q(engine, "SELECT version FROM wallets WHERE wallet_id = :w", w=w)
    return int(v)


def test_a_cached_wallet_is_used_while_its_version_is_the_owners(app_engine: Engine, unique: str) -> None:
    w, p = ids(unique)
    cache = WalletCache(100)
    run(app_engine, [adjusted(w, 10_000_000), started(w, p), metered(w, p, 60)], cache=cache)
    entry = cache.get(w)
    assert entry is not None
    assert entry[0] == version(app_engine, w)
    assert entry[1].balance_micros == balance(app_engine, w) == 10_000_000 - 60_000
    hits = cache.hits
    run(app_engine, [metered(w, p, 120)], cache=cache, now=NOW + timedelta(seconds=1))
    assert cache.hits == hits + 1
    assert balance(app_engine, w) == 10_000_000 - 120_000
    entry = cache.get(w)
    assert entry is not None
    assert entry[1].rentals[p].billable_seconds == 120


@pytest.mark.parametrize("writer", ["process_batch", "tick_wallets"])
def test_another_writer_makes_the_owner_reload_the_wallet(app_engine: Engine, unique: str, writer: str) -> None:
    """Had the owner used its state from before the other writer's commit, the reading at 180 s
    would be charged from 60 s again (a charge twice) or the credit not seen by the rules."""
    w, p = ids(unique)
    cache = WalletCache(100)
    run(app_engine, [adjusted(w, 10_000_000), started(w, p), metered(w, p, 60)], cache=cache)
    before = version(app_engine, w)
    if writer == "process_batch":  # a rebuild, Stripe facts: process_batch without a cache
        run(app_engine, [metered(w, p, 120), adjusted(w, 5_000_000)], now=NOW + timedelta(seconds=1))
    else:
        with unit_of_work(app_engine) as uow:
            tick_wallets(uow.pg, [w], now=NOW + timedelta(seconds=1))
            uow.commit()
    assert version(app_engine, w) == before + 1, "the other writer's lock bumps the version"
    misses = cache.misses
    run(app_engine, [metered(w, p, 180)], cache=cache, now=NOW + timedelta(seconds=2))
    assert cache.misses == misses + 1, "reloaded, not taken from memory"
    credit = 5_000_000 if writer == "process_batch" else 0
    assert balance(app_engine, w) == 10_000_000 + credit - 180_000
    entry = cache.get(w)
    assert entry is not None
    assert entry[1].balance_micros == balance(app_engine, w)
    assert entry[0] == version(app_engine, w)


def test_a_failed_batch_evicts_its_wallets(app_engine: Engine, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transaction fails after the processor ran (as a commit that fails would): the cache does
    not keep the states the database does not have."""
    w, p = ids(unique)
    cache = WalletCache(100)
    run(app_engine, [adjusted(w, 10_000_000), started(w, p)], cache=cache)
    assert cache.get(w) is not None

    def fails_after(conn: Any, incoming: Any, **kwargs: Any) -> Any:
        process_batch(conn, incoming, **kwargs)
        raise RuntimeError("the commit did not happen")

    monkeypatch.setattr(intake_module, "process_batch", fails_after)
    with pytest.raises(RuntimeError):
        run(app_engine, [metered(w, p, 60)], cache=cache)
    assert cache.get(w) is None
    monkeypatch.undo()
    run(app_engine, [metered(w, p, 60)], cache=cache)
    assert balance(app_engine, w) == 10_000_000 - 60_000


def test_the_cache_is_bounded_least_recently_used_first(app_engine: Engine, unique: str) -> None:
    wallets = [f"c{i}{unique[-36:]}" for i in range(3)]
    cache = WalletCache(2)
    for w in wallets:
        run(app_engine, [adjusted(w, 1_000)], cache=cache)
    assert len(cache) == 2
    assert cache.get(wallets[0]) is None
    run(app_engine, [adjusted(wallets[0], 1_000)], cache=cache)  # loaded again on a miss
    assert balance(app_engine, wallets[0]) == 2_000
    assert cache.get(wallets[1]) is None
    assert len(cache) == 2
