"""Hostile and broken producers against the real service process (`billing up` in a subprocess):
any bytes in a subject, header or body are recorded in rejected_inputs on their first delivery and
the messages after them are applied; `stripe` is a reserved source; event times have a lower bound,
with `billing dlq replay --accept-old` for a deliberate backfill; the dlq commands (issue 13 items
3, 4, 7, 9 and issue 14 item 6).

Messages are published over a raw TCP connection (the NATS protocol's PUB/HPUB), because nats-py
itself refuses to send a subject that is not UTF-8; the server stores them as any producer's."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import nats
import pytest
from sqlalchemy import Engine

from consumers.nats.names import NatsNames
from ledger.text import unprintable
from tests.fake_stripe import FakeStripe, sign_webhook
from tests.integration.jetstream import balance, namespace_of, query, wait_until

if TYPE_CHECKING:
    from tests.conftest import TestDatabase

pytestmark = pytest.mark.integration

BILLING = str(Path(sys.executable).with_name("billing"))
TOKEN = "hostile-test-token-0123456789"
WEBHOOK_SECRET = "whsec_hostile_test"
MEGABYTE_BODY = 1_000_000  # under the server's default max_payload of 1 MiB, with headers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RawNats:
    """The NATS client protocol by hand over one TCP connection: any subject bytes, any headers."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=10)
        self.sock.recv(4096)  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')

    def pub(self, subject: bytes, body: bytes, headers: bytes | None = None) -> None:
        if headers is None:
            self.sock.sendall(b"PUB %s %d\r\n%s\r\n" % (subject, len(body), body))
        else:
            total = len(headers) + len(body)
            self.sock.sendall(b"HPUB %s %d %d\r\n%s%s\r\n" % (subject, len(headers), total, headers, body))

    def flush(self) -> None:
        """PING, and wait for the PONG: the server has read everything before it (or an -ERR)."""
        self.sock.sendall(b"PING\r\n")
        seen = b""
        while b"PONG\r\n" not in seen:
            chunk = self.sock.recv(65536)
            assert chunk, "NATS closed the connection"
            seen += chunk
            assert b"-ERR" not in seen, seen

    def close(self) -> None:
        self.sock.close()


class Running:
    def __init__(self, env: dict[str, str], names: NatsNames, fake: FakeStripe) -> None:
        self.env, self.names, self.fake = env, names, fake
        self.http = f"http://127.0.0.1:{env['BILLING_HTTP_PORT']}"

    def cli(self, *args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if columns is not None:
            env["COLUMNS"] = str(columns)
        return subprocess.run([BILLING, *args], env=env, capture_output=True, text=True, timeout=60, check=False)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.http}{path}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(f"{self.http}{path}", content=body, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def service(database: TestDatabase, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("hostile")
    names = NatsNames(namespace_of(f"hostile-{os.getpid()}-{tmp.name}"))
    with FakeStripe() as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
        env.update(
            {
                "BILLING_DATABASE_URL": database.url,
                "BILLING_NATS_URL": nats_url,
                "BILLING_NATS_NAMESPACE": names.namespace,
                "BILLING_HTTP_HOST": "127.0.0.1",
                "BILLING_HTTP_PORT": str(_free_port()),
                "BILLING_DATA_DIR": str(tmp / "data"),
                "BILLING_SHUTDOWN_TIMEOUT_S": "10",
                "BILLING_INTAKE_MAX_WAIT_S": "0.2",
                "BILLING_API_TOKENS": f"{TOKEN}:wallet,finance",
                "BILLING_STRIPE_API_KEY": fake.api_key,
                "BILLING_STRIPE_API_BASE": fake.url,
                "BILLING_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            }
        )
        log_path = tmp / "billing-up.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen([BILLING, "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
        running = Running(env, names, fake)
        try:

            async def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"billing up exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    async with httpx.AsyncClient(timeout=1) as client:
                        return (await client.get(f"{running.http}/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            asyncio.run(wait_until(ready, within=30, what="billing up ready"))
            yield running
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _event(wallet: str, id_: str, *, source: str = "compute/hostile", at: datetime | None = None, **data: Any) -> dict:
    return {
        "specversion": "1.0",
        "id": id_,
        "source": source,
        "type": "wallet.adjusted",
        "time": (at or datetime.now(UTC)).isoformat(),
        "data": {"walletId": wallet, "amountMicros": 1_000_000, "reason": "test", "operator": "ops", **data},
    }


def _started(wallet: str, id_: str, at: datetime) -> dict:
    data = {
        "walletId": wallet,
        "resourceId": f"p{id_}",
        "resourceKind": "pod",
        "gpuType": "A100",
        "gpuCount": 1,
        "tier": "on_demand",
        "pricePerHourMicros": 3_600_000,
    }
    doc = {"specversion": "1.0", "id": id_, "source": "compute/hostile", "type": "gpu.rental.started"}
    return {**doc, "time": at.isoformat(), "data": data}


def _js(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def _hostile(i: int, prefix: bytes, tag: str, good: list[str]) -> tuple[bytes, bytes, bytes | None, str]:
    """The i-th hostile message: (subject, body, headers, the reason it must be refused with)."""
    w = f"w{tag}{i}"
    ok = prefix + w.encode()
    if i % 100 == 99:
        return ok, b'{"pad": "' + b" " * (MEGABYTE_BODY - 12) + b'"}', None, "too_large"
    kind = i % 12
    if kind == 0:
        return prefix + b"w\xff\xfe" + str(i).encode(), _js(_event(w, f"k0-{tag}-{i}")), None, "subject_mismatch"
    if kind == 1:
        return prefix + b"w\x00" + str(i).encode(), _js(_event(w, f"k1-{tag}-{i}")), None, "subject_mismatch"
    if kind == 2:
        return prefix + b"w\x01\x1b[31m" + str(i).encode(), _js(_event(w, f"k2-{tag}-{i}")), None, "subject_mismatch"
    if kind == 3:  # NUL in a field name
        body = _js(_event(w, f"k3-{tag}-{i}")).replace(b'"operator"', b'"oper\\u0000ator"')
        return ok, body, None, "invalid_data"
    if kind == 4:  # a raw NUL byte in the JSON
        return ok, b'{"id": "\x00' + str(i).encode() + b'"}', None, "invalid_json"
    if kind == 5:  # NUL in a value
        return ok, _js(_event(w, f"k5-{tag}-{i}", reason=f"a\x00{i}")), None, "invalid_data"
    if kind == 6:
        return ok, b"", None, "invalid_json"
    if kind == 7:
        return ok, b"\xff\xfe\x00" + str(i).encode(), None, "invalid_json"
    if kind == 8:  # control characters (an ANSI escape) raw in a string
        return ok, b'{"id": "\x1b[2J' + str(i).encode() + b'"}', None, "invalid_json"
    if kind == 9:  # a header value that is not UTF-8, and a payment's identity
        headers = b"NATS/1.0\r\nX-Junk: \xff\xfe\x01\r\n\r\n"
        return ok, _js(_event(w, f"pi_k9{tag}{i}", source="stripe")), headers, "reserved_source"
    if kind == 10:  # 26 years old, on a wallet that is credited below: its balance must stay sane
        g = good[i % len(good)]
        old = _started(g, f"k10-{tag}-{i}", datetime(2000, 1, 1, tzinfo=UTC))
        return prefix + g.encode(), _js(old), None, "too_old"
    # A header block nats-py cannot parse (a bare "NATS/1.0"): the message still gets through.
    return ok, b"{broken " + str(i).encode(), b"NATS/1.0", "invalid_json"


async def test_a_burst_of_1000_hostile_messages_is_recorded_and_the_good_ones_after_it_applied(
    service: Running, nats_url: str, app_engine: Engine
) -> None:
    names = service.names
    tag = "burst"
    prefix = names.subject("billing.in.").encode()
    good = [f"g{tag}{n}" for n in range(50)]
    hostile = [_hostile(i, prefix, tag, good) for i in range(1000)]
    raw = RawNats(nats_url)
    try:
        for subject, body, headers, _ in hostile:
            raw.pub(subject, body, headers)
        raw.flush()
    finally:
        raw.close()

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for n, w in enumerate(good):
            for k in range(4):
                await js.publish(
                    names.in_subject(w), _js(_event(w, f"good-{tag}-{n}-{k}", amountMicros=(n + 1) * 1000))
                )
        like = f"{names.namespace}.%"
        await wait_until(
            lambda: (
                query(app_engine, "SELECT count(*) FROM rejected_inputs WHERE subject LIKE :p", p=like)[0][0] >= 1000
                and all(balance(app_engine, w) == 4 * (n + 1) * 1000 for n, w in enumerate(good))
            ),
            within=180,
            what="1,000 refusals recorded and 200 good events applied",
        )
        rows = query(
            app_engine,
            "SELECT reason, subject, delivery_count, length(raw) FROM rejected_inputs"
            " WHERE subject LIKE :p ORDER BY id",
            p=like,
        )
        # The admission request-reply shares the service's NATS connection: it still answers.
        ask = {"walletId": good[1], "resourceId": "p-admission", "pricePerHourMicros": 1_000}
        answer = await nc.request(names.subject("billing.admission.rental"), _js(ask), timeout=5)
        assert json.loads(answer.data)["admitted"] is True, answer.data  # 8,000 available >= 1,000
    finally:
        await nc.close()

    assert len(rows) == 1000, "every hostile message recorded exactly once"
    assert {r[2] for r in rows} == {1}, "every refusal recorded on its first delivery"
    expected: dict[str, int] = {}
    for *_, reason in hostile:
        expected[reason] = expected.get(reason, 0) + 1
    got: dict[str, int] = {}
    for r in rows:
        got[r[0]] = got.get(r[0], 0) + 1
    assert got == expected
    recorded_subjects = {unprintable(r[1]) for r in rows}
    assert {s for s, *_ in hostile} <= recorded_subjects, "subjects stored reversibly"
    assert max(r[3] for r in rows) == max(len(b) for _, b, *_ in hostile) > MEGABYTE_BODY - 10, "1 MB kept whole"
    assert all(balance(app_engine, w) == 4 * (n + 1) * 1000 for n, w in enumerate(good))
    wallet = service.get(f"/wallets/{good[0]}").json()
    assert wallet["availableMicros"] == wallet["balanceMicros"] == 4000, wallet  # the year-2000 start refused
    metrics = service.get("/metrics").text
    assert "billing_intake_unreadable_messages_total" in metrics
    verify = service.cli("verify", *(a for w in good[:10] for a in ("--wallet", w)))
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_a_stripe_sourced_event_on_nats_is_refused_and_the_real_payment_credited_once(
    service: Running, nats_url: str, app_engine: Engine
) -> None:
    names = service.names
    w = "wstripeclaim"
    fake = service.fake
    pi = fake.succeed(fake.create_payment_intent(2500, metadata={"walletId": w})["id"])
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for source in ("stripe", "Stripe", "stripe/webhook"):
            forged = _event(w, pi["id"], source=source, amountMicros=25_000_000)
            await js.publish(names.in_subject(w), _js(forged))
    finally:
        await nc.close()
    await wait_until(
        lambda: (
            query(
                app_engine,
                "SELECT count(*) FROM rejected_inputs WHERE event_id = :i AND reason = 'reserved_source'",
                i=pi["id"],
            )[0][0]
            == 3
        ),
        within=30,
        what="the forged payments refused as reserved_source",
    )
    assert query(app_engine, "SELECT count(*) FROM events WHERE event_id = :i", i=pi["id"])[0][0] == 0
    assert not balance(app_engine, w)  # no account at all, or 0
    body = json.dumps(fake.event("payment_intent.succeeded", pi)).encode()
    headers = {"Stripe-Signature": sign_webhook(body, WEBHOOK_SECRET), "Content-Type": "application/json"}
    for _ in range(2):  # Stripe redelivers: credited once all the same
        r = service.post("/stripe/webhook", body, headers)
        assert r.status_code == 200, r.text
    assert balance(app_engine, w) == 25_000_000
    assert query(app_engine, "SELECT source FROM events WHERE event_id = :i", i=pi["id"]) == [("stripe",)]


async def test_old_events_are_refused_and_replayed_on_purpose_and_dlq_commands(
    service: Running, nats_url: str, app_engine: Engine
) -> None:
    names = service.names
    w = "woldbackfill"
    old = _event(w, "old-1", at=datetime.now(UTC) - timedelta(days=8), amountMicros=3_000_000)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.publish(names.in_subject(w), _js(old))
        unroutable = _event("w\n", "bad-wallet-1")  # a wallet id no subject can hold
        await js.publish(names.in_subject(w), _js(unroutable))
        await js.publish(names.in_subject(w), b"\xff\xfe not utf-8 " + b"\x00\x1b[31m")

        def ids_of(sql: str, **params: Any) -> list[int]:
            return [int(r[0]) for r in query(app_engine, sql, **params)]

        await wait_until(
            lambda: len(ids_of("SELECT id FROM rejected_inputs WHERE subject = :s", s=names.in_subject(w))) == 3,
            within=30,
            what="three refusals",
        )
        (old_id,) = ids_of("SELECT id FROM rejected_inputs WHERE event_id = 'old-1' AND reason = 'too_old'")
        (bad_id,) = ids_of("SELECT id FROM rejected_inputs WHERE event_id = 'bad-wallet-1'")
        (bin_id,) = ids_of(
            "SELECT id FROM rejected_inputs WHERE subject = :s AND event_id IS NULL", s=names.in_subject(w)
        )
        # A producer setting the replay's header itself is not trusted: the row it names is not
        # the too_old refusal of this input.
        forged = _event(w, "old-2", at=datetime.now(UTC) - timedelta(days=9))
        await js.publish(names.in_subject(w), _js(forged), headers={"Billing-Accept-Old": str(bad_id)})
        await wait_until(
            lambda: ids_of("SELECT id FROM rejected_inputs WHERE event_id = 'old-2' AND reason = 'too_old'") != [],
            within=30,
            what="the forged backfill refused",
        )
    finally:
        await nc.close()

    again = service.cli("dlq", "replay", "--id", str(bad_id), "--id", str(old_id))
    assert again.returncode == 0, again.stderr
    assert f"skipped {bad_id} (invalid_data)" in again.stdout
    assert f"{old_id} (too_old): refused again: too_old" in again.stdout
    assert not balance(app_engine, w)  # no account at all, or 0
    backfill = service.cli("dlq", "replay", "--id", str(old_id), "--accept-old")
    assert f"{old_id} (too_old): accepted" in backfill.stdout, backfill.stdout + backfill.stderr
    assert balance(app_engine, w) == 3_000_000
    twice = service.cli("dlq", "replay", "--id", str(old_id), "--accept-old")
    assert f"{old_id} (too_old): duplicate" in twice.stdout, twice.stdout
    assert balance(app_engine, w) == 3_000_000

    shown = service.cli("dlq", "show", str(bin_id))
    assert shown.returncode == 0, shown.stderr
    assert "not UTF-8 text" in shown.stdout
    assert "base64: //4gbm90IHV0Zi04IAAbWzMxbQ==" in shown.stdout
    assert "\x00" not in shown.stdout
    assert "\x1b" not in shown.stdout
    as_json = json.loads(service.cli("dlq", "show", str(old_id), "--format", "json").stdout)
    assert as_json["reason"] == "too_old"
    assert json.loads(as_json["raw"]) == old
    listed = json.loads(
        service.cli("dlq", "list", "--reason", "too_old", "--limit", "100000", "--format", "json").stdout
    )
    assert old_id in {r["id"] for r in listed}
    narrow = service.cli("dlq", "list", "--reason", "too_old", "--limit", "100000", columns=80)
    assert narrow.returncode == 0, narrow.stderr
    assert all(len(line) <= 80 for line in narrow.stdout.splitlines()), narrow.stdout
    assert "BILLING_EVENT_MAX_AGE_S" in narrow.stdout
    assert "..." not in narrow.stdout

    for args, fragment in (
        (("dlq", "show", "999999999"), "no dead letter with id 999999999"),
        (("dlq", "list", "--reason", "nonsense"), "--reason 'nonsense' is not a dead-letter reason"),
        (("dlq", "list", "--format", "yaml"), "--format 'yaml' is not known"),
    ):
        result = service.cli(*args)
        assert result.returncode == 2, result
        assert result.stderr.strip().startswith("error: ")
        assert fragment in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_redelivered_input_without_identity_is_recorded_once(app_engine: Engine, unique: str) -> None:
    """Committed but not acked (a crash, a dead letter not published): the redelivery of an input
    with no (source, id) does not add a second row; two messages' first deliveries are two rows."""
    from ledger.db import unit_of_work
    from ledger.events import Rejection, parse_event
    from projections.processor import RejectedInput, record_rejections

    now = datetime.now(UTC)
    subject = f"billing.in.w\\xff{unique}"
    raw = b"{broken " + unique.encode()
    rejection = parse_event(raw, now=now)
    assert isinstance(rejection, Rejection)
    assert rejection.source is None
    for delivery in (1, 1, 2, 3):
        with unit_of_work(app_engine) as uow:
            record_rejections(uow.pg, [RejectedInput(rejection, raw, subject, delivery)], now=now)
            uow.commit()
    rows = query(app_engine, "SELECT delivery_count FROM rejected_inputs WHERE subject = :s ORDER BY id", s=subject)
    assert [r[0] for r in rows] == [1, 1]
