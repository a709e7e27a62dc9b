"""The JetStream intake in-process against the run's NATS and PostgreSQL: events published to
billing.in.<walletId> are charged exactly once; bad input is dead-lettered and never blocks the
stream; a reading before its start is retried, then charged or dead-lettered as not_started; a
database outage holds the batch; a message that breaks the processor is isolated."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

import consumers.nats.intake as intake_module
from consumers.nats.intake import PROCESSING_ERROR, IntakeConfig
from consumers.runtime.metrics import Metrics
from projections.processor import process_batch
from tests.factories import adjusted, make_event, metered
from tests.integration.jetstream import (
    balance,
    dead_letters,
    drained,
    jetstream,
    publish_events,
    publish_raw,
    query,
    running_intake,
    sample,
    wait_until,
)
from tests.integration.test_processor import check_case
from tests.integration.vectors import load_cases, renamed

pytestmark = pytest.mark.integration

CASES = load_cases()
# Short delays so retries happen within the test; max_deliver small so "never started" ends fast.
FAST = IntakeConfig(durable="intake", batch_size=500, max_wait_s=0.2, nak_delay_s=0.05, nak_delay_max_s=0.2)


def pod_started(wallet_id: str, resource_id: str, price_per_hour_micros: int = 3_600_000, **kw: Any):
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


def ids(unique: str) -> tuple[str, str]:
    return f"w{unique[-39:]}", f"p{unique[-39:]}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"][:60] for c in CASES])
async def test_charging_vectors_through_jetstream(
    nats_url: str, app_engine: Engine, unique: str, case: dict[str, Any]
) -> None:
    events, names_map, _ = renamed(case)
    async with jetstream(nats_url, unique) as (nc, js, names), running_intake(nc, app_engine, names, FAST):
        last = await publish_events(js, names, events)
        await wait_until(lambda: drained(js, names, FAST.durable, last), what="the case to be consumed")
    check_case(app_engine, case, names_map)


async def test_same_event_published_twice_is_charged_once(nats_url: str, app_engine: Engine, unique: str) -> None:
    w, _ = ids(unique)
    credit = adjusted(w, 7_000_000, id_=f"credit-{unique}")
    metrics = Metrics()
    async with (
        jetstream(nats_url, unique) as (nc, js, names),
        running_intake(nc, app_engine, names, FAST, metrics=metrics),
    ):
        # Two publishes with different Nats-Msg-Id (JetStream keeps both), one CloudEvent identity.
        await publish_events(js, names, [credit], tag="a/")
        last = await publish_events(js, names, [credit], tag="b/")
        await wait_until(lambda: drained(js, names, FAST.durable, last), what="both copies consumed")
    assert balance(app_engine, w) == 7_000_000
    assert query(app_engine, "SELECT count(*) FROM events WHERE wallet_id = :w", w=w) == [(1,)]
    assert sample(metrics, "billing_intake_messages_total", disposition="accepted") == 1
    assert sample(metrics, "billing_intake_messages_total", disposition="duplicate") == 1


async def test_bad_input_is_dead_lettered_and_later_events_still_pass(
    nats_url: str, app_engine: Engine, unique: str
) -> None:
    w, p = ids(unique)
    other = f"o{unique[-39:]}"
    # Built valid through the models, then broken on the wire.
    negative = json.loads(metered(w, p, 5, id_=f"neg-{unique}").model_dump_json(by_alias=True))
    negative["data"]["uptimeSecondsTotal"] = -5
    wrong_type = json.loads(adjusted(w, 1, id_=f"str-{unique}").model_dump_json(by_alias=True))
    wrong_type["data"]["amountMicros"] = "1000"
    misrouted = adjusted(w, 2_000_000, id_=f"misrouted-{unique}")
    metrics = Metrics()
    async with (
        jetstream(nats_url, unique) as (nc, js, names),
        running_intake(nc, app_engine, names, FAST, metrics=metrics),
    ):
        subject = names.in_subject(w)
        await publish_raw(js, subject, b'{"specversion": "1.0", "id": ', msg_id="bad-json")
        await publish_raw(js, subject, json.dumps(negative).encode(), msg_id="negative-1")
        await publish_raw(js, subject, json.dumps(wrong_type).encode(), msg_id="wrong-type")
        # The event of wallet w on another wallet's subject.
        await publish_raw(js, names.in_subject(other), misrouted.model_dump_json(by_alias=True).encode())
        # The same refused event again (a producer's retry): recorded and dead-lettered once.
        await publish_raw(js, subject, json.dumps(negative).encode(), msg_id="negative-2")
        last = await publish_events(js, names, [adjusted(w, 5_000_000, id_=f"good-{unique}")])
        await wait_until(lambda: drained(js, names, FAST.durable, last), what="all consumed")
        letters = await dead_letters(js, names)

    assert balance(app_engine, w) == 5_000_000  # the good event after the bad ones went through
    rows = query(
        app_engine,
        "SELECT reason, wallet_id, source, event_id, delivery_count, raw FROM rejected_inputs"
        " WHERE subject LIKE :prefix ORDER BY id",
        prefix=f"{names.namespace}.%",
    )
    assert [r[0] for r in rows] == ["invalid_json", "out_of_range", "invalid_data", "subject_mismatch"]
    assert bytes(rows[0][5]) == b'{"specversion": "1.0", "id": '  # kept exactly as received
    assert rows[1][1:5] == (w, negative["source"], negative["id"], 1)
    assert rows[3][1] == w

    assert [m.subject for m in letters] == [
        names.dlq_subject("invalid_json"),
        names.dlq_subject("out_of_range"),
        names.dlq_subject("invalid_data"),
        names.dlq_subject("subject_mismatch"),
    ]
    mismatch = letters[3]
    assert mismatch.headers is not None
    assert mismatch.headers["Billing-Reason"] == "subject_mismatch"
    assert mismatch.headers["Billing-Subject"] == names.in_subject(other)
    assert mismatch.headers["Billing-Source"] == misrouted.source
    assert mismatch.headers["Billing-Event-Id"] == misrouted.id
    assert "does not match the subject" in mismatch.headers["Billing-Detail"]
    assert mismatch.data == misrouted.model_dump_json(by_alias=True).encode()
    assert letters[0].headers is not None
    assert letters[0].headers["Billing-Detail"].startswith("event is not valid")
    assert sample(metrics, "billing_dead_letters_total", reason="out_of_range") == 2  # published twice, kept once


async def test_reading_before_its_start_is_retried_then_charged(nats_url: str, app_engine: Engine, unique: str) -> None:
    w, p = ids(unique)
    metrics = Metrics()
    async with (
        jetstream(nats_url, unique) as (nc, js, names),
        running_intake(nc, app_engine, names, FAST, metrics=metrics),
    ):
        await publish_events(js, names, [adjusted(w, 10_000_000), metered(w, p, 1000)])
        await wait_until(
            lambda: sample(metrics, "billing_intake_messages_total", disposition="retry") >= 2,
            what="the early reading to be retried twice",
        )
        last = await publish_events(js, names, [pod_started(w, p)])
        await wait_until(lambda: drained(js, names, FAST.durable, last), what="all consumed")
    # 1000 s at $3.60/h = $1.00
    assert balance(app_engine, w) == 9_000_000
    assert query(app_engine, "SELECT billable_seconds, charged_micros FROM rentals WHERE resource_id = :p", p=p) == [
        (1000, 1_000_000)
    ]
    assert query(app_engine, "SELECT count(*) FROM rejected_inputs WHERE wallet_id = :w", w=w) == [(0,)]


async def test_reading_that_never_starts_is_dead_lettered_as_not_started(
    nats_url: str, app_engine: Engine, unique: str
) -> None:
    w, p = ids(unique)
    config = replace(FAST, max_deliver=3)
    metrics = Metrics()
    reading = metered(w, p, 60, id_=f"orphan-{unique}")
    async with (
        jetstream(nats_url, unique) as (nc, js, names),
        running_intake(nc, app_engine, names, config, metrics=metrics),
    ):
        last = await publish_events(js, names, [reading])
        await wait_until(lambda: drained(js, names, config.durable, last), what="the reading to be settled")
        letters = await dead_letters(js, names)
    rows = query(app_engine, "SELECT reason, event_id, delivery_count FROM rejected_inputs WHERE wallet_id = :w", w=w)
    assert rows == [("not_started", reading.id, 3)]
    assert [m.subject for m in letters] == [names.dlq_subject("not_started")]
    assert sample(metrics, "billing_intake_messages_total", disposition="retry") == 2
    assert query(app_engine, "SELECT count(*) FROM events WHERE wallet_id = :w", w=w) == [(0,)]


async def test_database_outage_holds_the_batch_without_spending_deliveries(
    nats_url: str, app_engine: Engine, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, _ = ids(unique)
    real = process_batch
    failures = {"left": 3}

    def flaky(*args: Any, **kwargs: Any):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real(*args, **kwargs)

    monkeypatch.setattr(intake_module, "process_batch", flaky)
    metrics = Metrics()
    async with (
        jetstream(nats_url, unique) as (nc, js, names),
        running_intake(nc, app_engine, names, FAST, metrics=metrics),
    ):
        last = await publish_events(js, names, [adjusted(w, 3_000_000), adjusted(w, 4_000_000)])
        await wait_until(lambda: drained(js, names, FAST.durable, last), what="the held batch to commit")
        info = await js.consumer_info(names.in_stream, FAST.durable)
    assert balance(app_engine, w) == 7_000_000
    assert sample(metrics, "billing_intake_batch_failures_total", kind="database") == 3
    assert info.num_redelivered == 0  # held in hand, not nak-ed: no delivery attempt spent


def _breaks_on(poison: str) -> Any:
    """process_batch, failing (a bug) on every batch that holds the event ``poison``."""
    real = process_batch

    def breaks_on_poison(conn: Any, incoming: Any, **kwargs: Any):
        if any(i.event.id == poison for i in incoming):
            raise ValueError("a bug this event triggers")
        return real(conn, incoming, **kwargs)

    return breaks_on_poison


async def test_a_message_that_breaks_the_processor_is_isolated(
    nats_url: str, app_engine: Engine, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, _ = ids(unique)
    poison = f"poison-{unique}"
    monkeypatch.setattr(intake_module, "process_batch", _breaks_on(poison))
    config = replace(FAST, max_deliver=3)
    events = [adjusted(w, 1_000_000), adjusted(w, 9_999_999, id_=poison), adjusted(w, 2_000_000)]
    async with jetstream(nats_url, unique) as (nc, js, names):
        last = await publish_events(js, names, events)  # before the intake starts: one batch
        async with running_intake(nc, app_engine, names, config):
            await wait_until(lambda: drained(js, names, config.durable, last), what="all settled")
            letters = await dead_letters(js, names)
    assert balance(app_engine, w) == 3_000_000
    assert [m.subject for m in letters] == [names.dlq_subject(PROCESSING_ERROR)]
    assert letters[0].headers is not None
    assert letters[0].headers["Billing-Event-Id"] == poison
    assert letters[0].headers["Billing-Delivery-Count"] == "3"
    assert "ValueError" in letters[0].headers["Billing-Detail"]


async def test_a_batch_is_one_transaction_in_stream_order_and_a_poison_is_isolated(
    nats_url: str, app_engine: Engine, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One writer: a batch is one transaction, every wallet's events are in the log in publication
    order, every charge exact; a poison message makes the batch fail, which is split down to it and
    the rest committed; the poison is dead-lettered on its last delivery. The writer's wallets in
    memory are right after the failure too (the failed halves evicted theirs)."""
    poison = f"poison-{unique}"
    monkeypatch.setattr(intake_module, "process_batch", _breaks_on(poison))
    config = replace(FAST, max_deliver=2)
    wallets = [f"l{i:02d}{unique[-36:]}" for i in range(24)]
    events = []
    for i, w in enumerate(wallets):
        pod = f"pod-{w}"
        events += [
            adjusted(w, 10_000_000, id_=f"credit-{w}"),
            pod_started(w, pod, id_=f"start-{w}"),
            metered(w, pod, 60, id_=f"m60-{w}"),
            metered(w, pod, 120, id_=f"m120-{w}"),
        ]
        if i == 20:
            events.append(adjusted(w, 1, id_=poison))
    clean = events[: len(events) // 2]
    async with jetstream(nats_url, unique) as (nc, js, names):
        last = await publish_events(js, names, clean)  # before the intake starts: one batch
        async with running_intake(nc, app_engine, names, config):
            await wait_until(lambda: drained(js, names, config.durable, last), what="the clean batch settled")
            last = await publish_events(js, names, events[len(clean) :])
            await wait_until(lambda: drained(js, names, config.durable, last), what="all settled")
            more = [metered(w, f"pod-{w}", 180, id_=f"m180-{w}") for w in wallets]
            last = await publish_events(js, names, more)
            await wait_until(lambda: drained(js, names, config.durable, last), what="the readings after it")
            letters = await dead_letters(js, names)
    for w in wallets:
        # $10 - 180 s at $3.60/h = 180,000 micros
        assert balance(app_engine, w) == 10_000_000 - 180_000, w
        order = query(app_engine, "SELECT event_id FROM events WHERE wallet_id = :w ORDER BY position", w=w)
        assert [r[0] for r in order] == [f"credit-{w}", f"start-{w}", f"m60-{w}", f"m120-{w}", f"m180-{w}"]
    clean_wallets = sorted({e.wallet_id for e in clean})
    [(transactions,)] = query(
        app_engine,
        "SELECT count(DISTINCT xmin::text) FROM events WHERE wallet_id = ANY(:ws) AND event_id LIKE 'credit-%'",
        ws=clean_wallets,
    )
    assert transactions == 1, "the clean batch is one transaction"
    assert [m.headers["Billing-Event-Id"] for m in letters if m.headers] == [poison]
