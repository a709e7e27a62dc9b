"""Admission replies over real NATS request-reply against the real PostgreSQL (R2, R3, R5), two
responder instances in one queue group, malformed asks answered with what to fix."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import Engine

from consumers.nats.admission import run_admission
from consumers.nats.names import NatsNames
from tests.factories import adjusted, make_event
from tests.integration.outbound import connect, namespace_of, process, stop_task, utc_now, wait_until

pytestmark = pytest.mark.integration

PRICE = 10_000_000  # $10/h


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Any]:
    conn = await connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def names(app_engine: Engine, nc: Any, unique: str) -> AsyncIterator[NatsNames]:
    """This test's namespace with two admission instances answering in one queue group."""
    names = namespace_of(unique)
    stop = asyncio.Event()
    ready = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(run_admission(app_engine, nc, names, stop, ready=r)) for r in ready]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 10)
    await nc.flush()
    yield names
    stop.set()
    for t in tasks:
        await stop_task(stop, t)


async def ask(nc: Any, subject: str, body: Any) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = await nc.request(subject, raw, timeout=10)
    return json.loads(reply.data)


async def rental(nc: Any, names: NatsNames, wallet: str, resource: str, price: int = PRICE, **extra: Any) -> Any:
    return await ask(
        nc, names.admission_rental, {"walletId": wallet, "resourceId": resource, "pricePerHourMicros": price, **extra}
    )


async def serverless(nc: Any, names: NatsNames, wallet: str, endpoint: str = "ep1") -> Any:
    return await ask(nc, names.admission_serverless, {"walletId": wallet, "endpointId": endpoint})


def credit(engine: Engine, wallet: str, micros: int) -> None:
    process(engine, [adjusted(wallet, micros, time=utc_now())])


async def test_rental_admitted_iff_one_hour_is_available_and_the_hold_counts(
    app_engine: Engine, nc: Any, names: NatsNames, unique: str
) -> None:
    w = f"w{unique[-39:]}"
    credit(app_engine, w, 25_000_000)  # $25: two holds of $10, not three

    first = await rental(nc, names, w, "r1")
    assert set(first) == {"admitted", "admissionId", "reason", "availableMicros"}
    assert first["admitted"] is True
    assert first["availableMicros"] == 25_000_000
    assert re.fullmatch(r"[0-9a-f]{32}", first["admissionId"]), "a generated uuid4 hex"

    second = await rental(nc, names, w, "r2")
    assert second["admitted"] is True
    assert second["availableMicros"] == 15_000_000, "the first hold reduces what the next ask sees"

    third = await rental(nc, names, w, "r3")
    assert third["admitted"] is False
    assert third["availableMicros"] == 5_000_000
    assert third["reason"].startswith("insufficient_balance")

    # Exactly one hour available is enough (R2 is "at least").
    exact = f"x{unique[-39:]}"
    credit(app_engine, exact, PRICE)
    assert (await rental(nc, names, exact, "r1"))["admitted"] is True
    short = f"s{unique[-39:]}"
    credit(app_engine, short, PRICE - 1)
    answer = await rental(nc, names, short, "r1")
    assert answer["admitted"] is False
    assert answer["availableMicros"] == PRICE - 1


async def test_hold_is_released_by_the_started_event_with_its_admission_id(
    app_engine: Engine, nc: Any, names: NatsNames, unique: str
) -> None:
    w = f"w{unique[-39:]}"
    credit(app_engine, w, 15_000_000)
    r1 = f"r{unique[-39:]}"
    first = await rental(nc, names, w, r1)
    assert first["admitted"] is True
    assert (await rental(nc, names, w, "other"))["admitted"] is False  # $5 left after the $10 hold

    now = utc_now()
    process(
        app_engine,
        [
            make_event(
                "gpu.rental.started",
                {
                    "walletId": w,
                    "resourceId": r1,
                    "resourceKind": "pod",
                    "gpuType": "A100",
                    "gpuCount": 1,
                    "tier": "on_demand",
                    "pricePerHourMicros": PRICE,
                    "admissionId": first["admissionId"],
                },
                time=now,
            )
        ],
        now=now,
    )
    # The hold is gone; only the few microseconds of accrued usage of r1 count now.
    again = await rental(nc, names, w, "other")
    assert again["admitted"] is True
    assert 15_000_000 - 10_000 < again["availableMicros"] <= 15_000_000


async def test_asking_again_with_the_same_admission_id_is_idempotent(
    app_engine: Engine, nc: Any, names: NatsNames, unique: str
) -> None:
    w = f"w{unique[-39:]}"
    credit(app_engine, w, 15_000_000)
    given = f"adm-{unique[-30:]}"
    a = await rental(nc, names, w, "r1", admissionId=given)
    b = await rental(nc, names, w, "r1", admissionId=given)
    assert a == b == {"admitted": True, "admissionId": given, "reason": "admitted", "availableMicros": 15_000_000}
    refused = await rental(nc, names, w, "r2")
    assert refused["admitted"] is False
    assert refused["availableMicros"] == 5_000_000, "one hold, not two"


async def test_serverless_floor_of_ten_cents(app_engine: Engine, nc: Any, names: NatsNames, unique: str) -> None:
    at_floor, below = f"a{unique[-39:]}", f"b{unique[-39:]}"
    credit(app_engine, at_floor, 100_000)
    credit(app_engine, below, 99_999)
    yes = await serverless(nc, names, at_floor)
    assert yes == {"admitted": True, "reason": "admitted", "availableMicros": 100_000}
    no = await serverless(nc, names, below)
    assert no["admitted"] is False
    assert no["availableMicros"] == 99_999
    assert no["reason"].startswith("insufficient_balance")
    never = await serverless(nc, names, f"n{unique[-39:]}")
    assert never["admitted"] is False
    assert never["availableMicros"] == 0


async def test_serverless_sixty_per_rolling_minute_across_two_instances(
    app_engine: Engine, nc: Any, names: NatsNames, unique: str
) -> None:
    """Two responders share the queue group: each ask is decided once, so exactly 60 are admitted."""
    w = f"w{unique[-39:]}"
    credit(app_engine, w, 10_000_000)
    answers = await asyncio.gather(*(serverless(nc, names, w, f"ep{i % 3}") for i in range(60)))
    assert [a["admitted"] for a in answers] == [True] * 60
    sixty_first = await serverless(nc, names, w)
    assert sixty_first["admitted"] is False
    assert sixty_first["reason"].startswith("rate_limited")
    assert sixty_first["availableMicros"] == 10_000_000
    # Another wallet is not limited by this one.
    other = f"o{unique[-39:]}"
    credit(app_engine, other, 10_000_000)
    assert (await serverless(nc, names, other))["admitted"] is True


@pytest.mark.parametrize(
    ("kind", "body", "mentions"),
    [
        ("rental", b"not json", ["not valid JSON", "pricePerHourMicros"]),
        ("rental", b"[1, 2]", ["JSON object"]),
        ("rental", {"walletId": "w1", "resourceId": "r1"}, ["pricePerHourMicros: required field is missing"]),
        (
            "rental",
            {"walletId": "w1", "resourceId": "r1", "pricePerHourMicros": "100"},
            ["pricePerHourMicros", "integer"],
        ),
        ("rental", {"walletId": "w1", "resourceId": "r1", "pricePerHourMicros": True}, ["integer"]),
        ("rental", {"walletId": "w1", "resourceId": "r1", "pricePerHourMicros": 1.5}, ["integer"]),
        (
            "rental",
            {"walletId": "w1", "resourceId": "r1", "pricePerHourMicros": -1},
            ["pricePerHourMicros: must be >= 0"],
        ),
        ("rental", {"walletId": "w 1", "resourceId": "r1", "pricePerHourMicros": 1}, ["walletId: must match"]),
        ("rental", {"walletId": "w1", "resourceId": "r1", "pricePerHourMicros": 1, "admissionId": ""}, ["admissionId"]),
        ("serverless", {"walletId": "w1"}, ["endpointId: required field is missing"]),
        ("serverless", {"walletId": 7, "endpointId": "e"}, ["walletId: must be a string"]),
    ],
)
async def test_malformed_ask_is_answered_with_what_to_fix(
    nc: Any, names: NatsNames, kind: str, body: Any, mentions: list[str]
) -> None:
    subject = names.admission_rental if kind == "rental" else names.admission_serverless
    answer = await ask(nc, subject, body)
    assert set(answer) == {"admitted", "reason"}
    assert answer["admitted"] is False
    assert answer["reason"].startswith("invalid request: ")
    for m in mentions:
        assert m in answer["reason"], answer["reason"]


async def test_an_ask_whose_reply_subject_is_not_utf8_is_one_warning_and_holds_nothing(
    app_engine: Engine, nc: Any, names: NatsNames, unique: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py cannot publish to a reply subject that is not UTF-8 (UnicodeEncodeError): such an
    ask is ignored before it is decided (an admitted one would hold an hour of the wallet's money
    for an answer nobody can get), in one short warning line, and the next ask is answered."""
    import logging
    import socket
    from urllib.parse import urlsplit

    from consumers.nats import safety as nats_safety

    nats_safety.install()  # as the service does: nats-py reads a subject that is not UTF-8
    credit(app_engine, unique, PRICE)  # one hour, once
    ask_body = json.dumps({"walletId": unique, "resourceId": "r-bad-reply", "pricePerHourMicros": PRICE}).encode()
    parts = urlsplit(nats_url)
    with caplog.at_level(logging.WARNING, logger="billing"):
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=10) as raw:
            raw.recv(4096)  # INFO
            raw.sendall(b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n')
            subject = names.admission_rental.encode()
            raw.sendall(b"PUB %s _INBOX.bad\xff\xfe %d\r\n%s\r\nPING\r\n" % (subject, len(ask_body), ask_body))
            seen = b""
            while b"PONG" not in seen:
                chunk = raw.recv(4096)
                assert chunk, "NATS closed the connection"
                seen += chunk

        async def warned() -> bool:
            return any("_INBOX.bad" in r.getMessage() for r in caplog.records)

        await wait_until(warned, timeout=10, what="the warning about the reply subject")
        answer = await rental(nc, names, unique, "r-good")  # the responders still serve
    assert answer["admitted"] is True, answer  # the ignored ask held nothing: the hour is still there
    lines = [r for r in caplog.records if "_INBOX.bad" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING
    assert lines[0].exc_info is None
    message = lines[0].getMessage()
    assert "\n" not in message, message
    assert len(message) < 300, message
    assert r"_INBOX.bad\xff\xfe" in message, message  # printable: the bytes as escapes
