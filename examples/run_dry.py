"""A wallet runs dry (docs/rules.md, R4 and R7): $5 and a $7,200/h pod ($2 a second). Billing predicts
the instant of zero and sends a stop command then; this script answers it as the compute plane does
(the pod pauses, later it is stopped) and prints the notices and the settlement that come out.

    .venv/bin/python examples/run_dry.py [walletId]      (with `billing up` running)
"""

import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import nats

WALLET = sys.argv[1] if len(sys.argv) > 1 else "w_dry"
POD = f"pod-{uuid.uuid4().hex[:8]}"
PRICE = 7_200_000_000  # micro-USD per hour: $7,200/h, $2/s


def nats_url() -> str:
    """BILLING_NATS_URL, else where the running `billing up` of BILLING_DATA_DIR says, else the default."""
    if os.environ.get("BILLING_NATS_URL"):
        return os.environ["BILLING_NATS_URL"].split(",")[0]
    runtime = Path(os.environ.get("BILLING_DATA_DIR", ".billing")) / "runtime.json"
    return json.loads(runtime.read_text())["natsUrl"] if runtime.exists() else "nats://127.0.0.1:14222"


async def main() -> None:
    url = nats_url()
    try:
        nc = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0)
    except Exception as error:
        sys.exit(f"cannot reach NATS at {url} ({error}): is `billing up` running?")
    js = nc.jetstream()

    async def send(kind: str, **data: object) -> None:
        event = {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "examples/run_dry", "type": kind,
                 "time": datetime.now(UTC).isoformat(), "data": {"walletId": WALLET, **data}}  # fmt: skip
        await js.publish(f"billing.in.{WALLET}", json.dumps(event).encode(), headers={"Nats-Msg-Id": event["id"]})
        print(f"sent {kind} {json.dumps(data)}")

    stop: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
    settled: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

    async def on_stop(msg: nats.aio.msg.Msg) -> None:
        command = json.loads(msg.data)
        if command["resourceId"] == POD and not stop.done():
            stop.set_result(command)

    async def on_out(msg: nats.aio.msg.Msg) -> None:
        body = json.loads(msg.data)
        print(f"{msg.subject}: {json.dumps(body)}")
        if msg.subject.startswith("billing.out.settlements.") and body["resourceId"] == POD:
            settled.set_result(body)

    await nc.subscribe("compute.commands.stop", cb=on_stop)
    await nc.subscribe(f"billing.out.*.{WALLET}", cb=on_out)
    print(f"NATS {url}, wallet {WALLET}")
    await send("wallet.adjusted", amountMicros=5_000_000, reason="run-dry example", operator="examples")
    # No admission asked: it would refuse (R2: one hour of this pod is $7,200).
    started = time.monotonic()
    await send("gpu.rental.started", resourceId=POD, resourceKind="pod", gpuType="H100", gpuCount=8,
               tier="on_demand", pricePerHourMicros=PRICE)  # fmt: skip
    command = await asyncio.wait_for(stop, timeout=30)
    elapsed = time.monotonic() - started
    print(f"stop command after {elapsed:.1f} s: {json.dumps(command)}")
    uptime = int(elapsed) + 1  # the pod ran until it paused: the last seconds are a debt (R7)
    await send("gpu.rental.paused", resourceId=POD, uptimeSecondsTotal=uptime)
    await send("gpu.rental.ended", resourceId=POD, uptimeSecondsTotal=uptime, reason="stopped")
    settlement = await asyncio.wait_for(settled, timeout=30)
    cost = int(str(settlement["costMicros"]))  # integer micro-USD: never a float, even to print
    print(f"settled: {settlement['billableSeconds']} s, ${cost // 1_000_000:,}.{cost % 1_000_000:06d}")
    await nc.close()


asyncio.run(main())
