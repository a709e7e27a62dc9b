"""A producer of usage facts, as the compute plane is one (docs/events.md): it tops up a wallet, asks
admission, starts a $2/h pod, sends three readings and watches for stop commands.

    .venv/bin/python examples/producer.py [walletId]      (with `billing up` running)
"""

import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import nats

WALLET = sys.argv[1] if len(sys.argv) > 1 else "w_quickstart"
POD = f"pod-{uuid.uuid4().hex[:8]}"  # a resource id starts once: a new one per run
PRICE = 2_000_000  # micro-USD per hour: $2/h


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
        event = {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "examples/producer", "type": kind,
                 "time": datetime.now(UTC).isoformat(), "data": {"walletId": WALLET, **data}}  # fmt: skip
        ack = await js.publish(f"billing.in.{WALLET}", json.dumps(event).encode(), headers={"Nats-Msg-Id": event["id"]})
        print(f"sent {kind} {json.dumps(data)} (stream seq {ack.seq})")

    stops: list[bytes] = []

    async def on_stop(msg: nats.aio.msg.Msg) -> None:
        stops.append(msg.data)
        print(f"stop command: {msg.data.decode()}")

    await nc.subscribe("compute.commands.stop", cb=on_stop)
    print(f"NATS {url}, wallet {WALLET}")
    await send("wallet.adjusted", amountMicros=20_000_000, reason="quickstart top-up", operator="examples")
    ask = {"walletId": WALLET, "resourceId": POD, "pricePerHourMicros": PRICE, "admissionId": f"adm-{POD}"}
    for _ in range(40):  # until the intake has applied the top-up (R2: one hour's price must be available)
        answer = json.loads((await nc.request("billing.admission.rental", json.dumps(ask).encode(), 5)).data)
        if answer["admitted"]:
            break
        await asyncio.sleep(0.25)
    print(f"admission: {answer}")
    await send("gpu.rental.started", resourceId=POD, resourceKind="pod", gpuType="RTX 4090", gpuCount=1,
               tier="on_demand", pricePerHourMicros=PRICE, admissionId=ask["admissionId"])  # fmt: skip
    for seconds in (60, 120, 180):  # cumulative billable seconds: 180 s at $2/h cost $0.10
        await send("gpu.rental.metered", resourceId=POD, uptimeSecondsTotal=seconds)
    await asyncio.sleep(1)  # a moment to show a stop command if one came (none: $20 lasts 10 hours)
    if not stops:
        print(f"no stop command for {POD}: the wallet has money (examples/run_dry.py runs one dry)")
    await nc.close()


asyncio.run(main())
