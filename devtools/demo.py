"""`billing demo`: a simulated hour of platform traffic through the running service (DESIGN section 7).

The demo is a stand-in for the compute plane and the platform's users. It talks to the service only
the way they do, over NATS:

* wallets are funded with ``wallet.adjusted`` credits (the demo's stand-in for Stripe top-ups);
* every rental start and resume is asked on ``billing.admission.rental`` first, every serverless job
  on ``billing.admission.serverless``; refused ones do not run;
* on-demand and spot pods, marketplace rentals and a 4-node cluster report cumulative
  ``gpu.rental.metered`` readings every simulated minute; some are paused and resumed by their
  users, some end early, some spot pods are preempted (``gpu.spot.preempted`` after 5 minutes of
  grace); thousands of ``serverless.job.completed`` events;
* one wallet asks for more than it can afford (an 8x H200 pod, refused) and starts a smaller one;
* one wallet runs dry: a $5 wallet runs a pod and a burst of heavy serverless jobs (its pod runs on
  past the hour until it is stopped). The demo listens on ``compute.commands.stop`` and answers every
  stop command like the compute plane would, with a ``gpu.rental.paused`` reading;
* a few malformed messages, which the service dead-letters with their reason.

**Simulated time.** The hour is compressed (by default into 45 s, ``--pace`` real seconds per
simulated minute). Event ``time`` fields are real wall-clock time (the service refuses times more
than 5 minutes ahead of its clock); the simulated uptime is what the readings' counters carry, so a
pod that ran 37 simulated minutes reports ``uptimeSecondsTotal`` 2220 and is charged for it.

**Which service.** ``BILLING_NATS_URL`` / ``BILLING_DATABASE_URL`` (and ``BILLING_NATS_NAMESPACE``)
when set, else the embedded servers of the ``billing up`` running on the data dir
(``<data dir>/runtime.json``, as ``billing dlq`` does). A service is running when its admission
subject answers. If none is, the demo starts ``billing up`` as a subprocess with the same
environment (embedded PostgreSQL and nats-server in the data dir when no URL is set), and stops it
with SIGTERM at the end; the ledger stays in the data dir.

At the end it waits (bounded) until the ledger holds every good event it published and every
malformed one is dead-lettered, then prints a summary read from the database: events published and
in the ledger, the charged total (and the demo's own arithmetic of what it should be), stops issued
and answered, dead letters by reason, admissions, and the trial balance total (zero). The exit
status is 1 if any of those checks fails.

Each run has its own run id: wallet, resource and endpoint ids start with ``demo-<run>-``, so runs
never collide and the summary counts this run only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import nats
import typer
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text
from sqlalchemy import Engine

from consumers.nats.names import NatsNames
from consumers.runtime.instance import ServiceUrls, running_service_urls
from consumers.runtime.preflight import RUNTIME_FILE
from consumers.runtime.settings import Settings
from ledger.money import display_usd, rental_cost_micros, serverless_cost_micros, serverless_exact_millimicros
from projections.queries import charged_to_wallets_micros, events_of_wallets
from projections.read_models import read_rental, read_snapshot, read_wallet
from projections.rejected import refusals_by_reason

# --- simulated time ---------------------------------------------------------------------------------

TICK_S: Final = 15
"""Simulated seconds per step of the simulation."""
TICKS_PER_MINUTE: Final = 60 // TICK_S
READING_EVERY_TICKS: Final = TICKS_PER_MINUTE
"""Each running rental reports a cumulative reading every simulated minute."""
PREEMPTION_GRACE_TICKS: Final = 5 * TICKS_PER_MINUTE
"""R6: 5 minutes of grace between a preemption notice and the termination reading."""
DEFAULT_PACE_S: Final = 0.75
"""Real seconds per simulated minute: the default hour takes 45 s."""

# --- service ----------------------------------------------------------------------------------------

ASK_TIMEOUT_S: Final = 5.0
PUBLISH_WINDOW: Final = 500
PUBLISH_ACK_TIMEOUT_S: Final = 15.0
MAX_ASKS_IN_FLIGHT: Final = 32
SERVICE_START_TIMEOUT_S: Final = 90.0
SERVICE_STOP_TIMEOUT_S: Final = 30.0
POLL_S: Final = 0.2

# --- money (micro-USD, integers only) ---------------------------------------------------------------

USD: Final = 1_000_000
TOPUP_PRESETS_USD: Final = (25, 50, 100, 250, 500)
DRY_TOPUP: Final = 5 * USD
"""The wallet that runs dry: the minimum top-up."""
DRY_POD_PRICE: Final = 4_490_000
"""Its pod: one hour of the price is available at the start (R2), barely."""
DRY_JOB_COMPUTE_MS: Final = 200_000
DRY_JOB_PRICE_PER_SECOND: Final = 10_000
"""Its heavy serverless jobs: 200 s on an 8-GPU endpoint at $0.01/s, $2.00 each."""
DRY_JOB_MAX_REFUSALS: Final = 3

# (GPU type, on-demand price per GPU-hour in micros)
GPUS: Final = (
    ("H100 SXM", 2_990_000),
    ("H200", 3_590_000),
    ("A100 80GB", 1_640_000),
    ("L40S", 860_000),
    ("RTX 4090", 690_000),
    ("RTX A6000", 490_000),
    ("A40", 390_000),
)
MARKETPLACE_GPUS: Final = (("RTX 4090", 440_000), ("RTX 3090", 220_000), ("A100 80GB", 1_190_000))
CLUSTER_NODES: Final = 4
CLUSTER_GPU: Final = ("H100 SXM", 2_690_000)
CLUSTER_GPUS_PER_NODE: Final = 8

RUN_ID_RE: Final = re.compile(r"^[A-Za-z0-9]{1,16}$")


def _usd(micros: int, *, exact: bool = False) -> str:
    """``$1,234.57`` (or every micro with ``exact``) from integer micros: ledger.money's one formatter."""
    return display_usd(micros, exact=exact)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class Rental:
    resource_id: str
    wallet_id: str
    kind: str  # pod, marketplace, cluster
    tier: str  # on_demand, spot
    gpu_type: str
    gpu_count: int
    price: int  # micros per hour, the whole resource
    host: str
    start_tick: int
    end_tick: int | None = None  # None: still running when the hour ends
    end_reason: str = "stopped"
    preempt_tick: int | None = None
    pause_tick: int | None = None
    resume_tick: int | None = None
    dry: bool = False
    # what happened
    status: str = "planned"  # planned, refused, running, paused, auto_paused, ended
    uptime: int = 0
    readings_since: int = 0
    noticed_at: datetime | None = None
    terminate_tick: int | None = None
    answer: tuple[str, bytes, str] | None = None  # the event that answers a stop command (republished)

    @property
    def source(self) -> str:
        return f"compute/{self.host}"


@dataclass
class Endpoint:
    endpoint_id: str
    wallet_id: str
    gpu_type: str
    price_per_second: int
    jobs_per_tick: float
    exact_millimicros: int = 0


@dataclass
class Wallet:
    wallet_id: str
    role: str
    topup: int
    extra_topup_tick: int | None = None
    extra_topup: int = 0


@dataclass
class Plan:
    run_id: str
    ticks: int
    wallets: list[Wallet]
    rentals: list[Rental]
    endpoints: list[Endpoint]
    dry_wallet: str
    dry_endpoint: Endpoint


def _poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw (Knuth; ``lam`` is small here)."""
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def make_plan(run_id: str, wallets: int, minutes: int, seed: int) -> Plan:
    """Who does what in the simulated hour (deterministic for a seed)."""
    planner = _Planner(random.Random(f"{seed}-{wallets}-{minutes}"), minutes * TICKS_PER_MINUTE, f"demo-{run_id}")
    dry_wallet, dry_endpoint = planner.special_wallets()
    for i in range(3, wallets):
        planner.customer(f"{planner.prefix}-w{i:04d}")
    # About 12 jobs per wallet per simulated hour, spread over the serverless endpoints.
    planner.spread_jobs(12 * wallets * minutes / 60, dry_endpoint)
    return Plan(run_id, planner.ticks, planner.wallets, planner.rentals, planner.endpoints, dry_wallet, dry_endpoint)


@dataclass
class _Planner:
    """What :func:`make_plan` builds, and its one random generator: drawn from in a fixed order, so
    that a seed gives one plan."""

    rng: random.Random
    ticks: int
    prefix: str
    wallets: list[Wallet] = field(default_factory=list)
    rentals: list[Rental] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    counter: Counter[str] = field(default_factory=Counter)

    def rid(self, kind: str) -> str:
        self.counter[kind] += 1
        return f"{self.prefix}-{kind}{self.counter[kind]:04d}"

    def host(self) -> str:
        return f"host{self.rng.randrange(1, 97):02d}"

    @property
    def late_start(self) -> int:
        return max(1, int(self.ticks * 0.6))

    def lifetime(self, rental: Rental) -> None:
        """Some rentals end before the hour is over; the rest are stopped at its end."""
        if self.rng.random() < 0.35:
            rental.end_tick = self.rng.randrange(rental.start_tick + 1, self.ticks + 1)
            rental.end_reason = self.rng.choices(["stopped", "destroyed", "failed"], [70, 28, 2])[0]

    def special_wallets(self) -> tuple[str, Endpoint]:
        """Wallet 0 runs dry; wallet 1 runs the cluster; wallet 2 asks for more than it can afford:
        an 8x H200 pod is refused (R2), one H200 is admitted. Returns the dry wallet and endpoint."""
        prefix, ticks = self.prefix, self.ticks
        dry_wallet = f"{prefix}-w0000"
        self.wallets.append(Wallet(dry_wallet, "runs dry", DRY_TOPUP))
        self.rentals.append(
            Rental(self.rid("pod"), dry_wallet, "pod", "on_demand", "L40S", 1, DRY_POD_PRICE, self.host(), 0, dry=True)
        )
        dry_endpoint = Endpoint(f"{prefix}-ep-heavy", dry_wallet, "H100 SXM", DRY_JOB_PRICE_PER_SECOND, 0.0)
        self.endpoints.append(dry_endpoint)

        cluster_wallet = f"{prefix}-w0001"
        self.wallets.append(Wallet(cluster_wallet, "cluster", 1_000 * USD))
        gpu_type, per_gpu = CLUSTER_GPU
        cluster_start = int(ticks * 0.1)
        cluster_end = max(cluster_start + 1, int(ticks * 0.85))
        for n in range(CLUSTER_NODES):
            self.rentals.append(
                Rental(
                    f"{prefix}-cluster1-node{n}",
                    cluster_wallet,
                    "cluster",
                    "on_demand",
                    gpu_type,
                    CLUSTER_GPUS_PER_NODE,
                    per_gpu * CLUSTER_GPUS_PER_NODE,
                    f"rack7-node{n}",
                    start_tick=cluster_start,
                    end_tick=cluster_end,
                    end_reason="destroyed",
                )
            )

        modest = f"{prefix}-w0002"
        self.wallets.append(Wallet(modest, "refused, then smaller", 25 * USD))
        h200 = dict(GPUS)["H200"]
        self.rentals.append(Rental(self.rid("pod"), modest, "pod", "on_demand", "H200", 8, 8 * h200, self.host(), 0))
        self.rentals.append(Rental(self.rid("pod"), modest, "pod", "on_demand", "H200", 1, h200, self.host(), 0))
        return dry_wallet, dry_endpoint

    def customer(self, wallet_id: str) -> None:
        """One of the other wallets: pods, spot pods, marketplace rentals or serverless endpoints."""
        rng = self.rng
        role = rng.choices(["pods", "spot", "marketplace", "serverless"], [45, 10, 15, 30])[0]
        burn = 0
        if role in ("pods", "spot"):
            burn += self._pods(wallet_id, role)
        elif role == "marketplace":
            burn += self._marketplace(wallet_id)
        if role == "serverless" or (role == "pods" and rng.random() < 0.2):
            for _ in range(rng.choice([1, 1, 2])):
                gpu_type, per_gpu = rng.choice(GPUS[:5])
                self.endpoints.append(Endpoint(self.rid("ep"), wallet_id, gpu_type, max(1, per_gpu // 3600), 0.0))
            burn += 5 * USD
        # At least three hours of the wallet's burn, so that only the dry wallet runs dry.
        topup = next((p * USD for p in TOPUP_PRESETS_USD if p * USD >= 3 * burn), burn * 3 + 100 * USD)
        wallet = Wallet(wallet_id, role, topup)
        if rng.random() < 0.1 and self.ticks > 2:
            wallet.extra_topup_tick = rng.randrange(1, self.ticks)
            wallet.extra_topup = rng.choice(TOPUP_PRESETS_USD[:3]) * USD
        self.wallets.append(wallet)

    def _pods(self, wallet_id: str, role: str) -> int:
        """A wallet's pods (spot ones may be preempted, on-demand ones paused and resumed); their burn."""
        rng, burn = self.rng, 0
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3] if role == "spot" else [1, 1, 1, 2])):
            gpu_type, per_gpu = rng.choice(GPUS)
            count = rng.choice([1, 1, 1, 2, 4, 8])
            spot = role == "spot" or rng.random() < 0.1
            price = per_gpu * count // (2 if spot else 1)
            rental = Rental(
                self.rid("pod"),
                wallet_id,
                "pod",
                "spot" if spot else "on_demand",
                gpu_type,
                count,
                price,
                self.host(),
                start_tick=rng.randrange(0, self.late_start),
            )
            self.lifetime(rental)
            last = rental.end_tick if rental.end_tick is not None else self.ticks
            if spot and rng.random() < 0.35 and last - rental.start_tick > 2:
                rental.preempt_tick = rng.randrange(rental.start_tick + 1, last)
                rental.end_tick = None
            elif not spot and rng.random() < 0.12 and last - rental.start_tick > 8:
                rental.pause_tick = rng.randrange(rental.start_tick + 2, last - 4)
                rental.resume_tick = min(rental.pause_tick + rng.randrange(4, 40), last - 1)
            self.rentals.append(rental)
            burn += price
        return burn

    def _marketplace(self, wallet_id: str) -> int:
        """A wallet's marketplace rentals (community hosts); their burn."""
        rng, burn = self.rng, 0
        for _ in range(rng.choice([1, 1, 2])):
            gpu_type, per_gpu = rng.choice(MARKETPLACE_GPUS)
            count = rng.choice([1, 2, 4])
            spot = rng.random() < 0.3
            price = per_gpu * count // (2 if spot else 1)
            rental = Rental(
                self.rid("mkt"),
                wallet_id,
                "marketplace",
                "spot" if spot else "on_demand",
                gpu_type,
                count,
                price,
                f"community-{rng.randrange(1000, 9999)}",
                start_tick=rng.randrange(0, self.late_start),
            )
            self.lifetime(rental)
            self.rentals.append(rental)
            burn += price
        return burn

    def spread_jobs(self, jobs: float, dry_endpoint: Endpoint) -> None:
        """``jobs`` in the hour, spread over the endpoints but the dry wallet's (its own rate)."""
        regular = [e for e in self.endpoints if e is not dry_endpoint]
        if regular:
            rate = jobs / (len(regular) * self.ticks)
            for e in regular:
                e.jobs_per_tick = rate * self.rng.uniform(0.5, 1.5)


# ------------------------------------------------------------------------------------------ the summary


@dataclass
class Summary:
    run_id: str
    wallets: int
    simulated_minutes: int
    real_seconds: float = 0.0
    topped_up_micros: int = 0
    events_published: int = 0
    events_in_ledger: int = 0
    malformed_published: int = 0
    dead_letters_expected: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    rentals_started: dict[str, int] = field(default_factory=dict)
    rental_admissions: dict[str, int] = field(default_factory=dict)
    serverless_admissions: dict[str, int] = field(default_factory=dict)
    unanswered_asks: int = 0
    jobs_completed: int = 0
    spot_preemptions: int = 0
    user_pauses: int = 0
    stops_issued: int = 0
    stops_answered: int = 0
    dry_wallet: str = ""
    dry_rental: str = ""
    dry_rental_status: str = ""
    dry_wallet_balance_micros: int = 0
    notices: dict[str, int] = field(default_factory=dict)
    settlements_received: int = 0
    settlements_expected: int = 0
    charged_micros: int = 0
    expected_charges_micros: int = 0
    trial_balance_accounts: int = 0
    trial_balance_total_micros: int | None = None
    trial_balance_error: str = ""
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def to_json(self) -> str:
        body = {_camel(k): v for k, v in asdict(self).items()}
        body["ok"] = self.ok
        return json.dumps(body, indent=2)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


# ---------------------------------------------------------------------------------------- the traffic


class Traffic:
    """The simulation against a running service: NATS out (events, asks), NATS in (stop commands,
    notices, settlements), and reads of the ledger for the progress and the summary."""

    def __init__(
        self, plan: Plan, nc: Client, names: NatsNames, engine: Engine, *, pace_s: float, drain_timeout_s: float
    ) -> None:
        self.plan = plan
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=PUBLISH_ACK_TIMEOUT_S)
        self.names = names
        self.engine = engine
        self.tick_s = pace_s / TICKS_PER_MINUTE
        self.drain_timeout_s = drain_timeout_s
        self.prefix = f"demo-{plan.run_id}-"
        self.wallets = {w.wallet_id for w in plan.wallets}
        self.rentals = {r.resource_id: r for r in plan.rentals}
        self.summary = Summary(plan.run_id, len(plan.wallets), plan.ticks // TICKS_PER_MINUTE)
        self.summary.dry_wallet = plan.dry_wallet
        self.summary.dry_rental = next(r.resource_id for r in plan.rentals if r.dry)
        self.seq = 0
        self.outbox: list[tuple[str, bytes, str]] = []
        self.good: set[str] = set()
        self.bad: Counter[str] = Counter()
        self.stop_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.commands_seen: set[str] = set()
        self.notices: Counter[str] = Counter()
        self.settlements: set[str] = set()
        self.pending_jobs: list[tuple[Endpoint, int]] = []
        self.rental_asks: Counter[str] = Counter()
        self.serverless_asks: Counter[str] = Counter()
        self.asks = asyncio.Semaphore(MAX_ASKS_IN_FLIGHT)
        self.dry_refusals = 0
        self.topped_up = 0

    # --- building and publishing events --------------------------------------------------------------

    def _event(
        self, wallet_id: str, type_: str, source: str, data: dict[str, Any], *, at: datetime | None = None
    ) -> str:
        """Queue one good event for ``billing.in.<walletId>``; returns its id."""
        self.seq += 1
        event_id = f"{self.plan.run_id}-{self.seq:07d}"
        body = {
            "specversion": "1.0",
            "id": event_id,
            "source": source,
            "type": type_,
            "time": _iso(at or _now()),
            "datacontenttype": "application/json",
            "data": {"walletId": wallet_id, **data},
        }
        entry = (self.names.in_subject(wallet_id), json.dumps(body).encode(), f"{source}/{event_id}")
        self.outbox.append(entry)
        self.good.add(f"{source}/{event_id}")
        if type_ in ("gpu.rental.paused", "gpu.rental.ended", "gpu.spot.preempted"):
            rental = self.rentals.get(str(data.get("resourceId")))
            if rental is not None:
                rental.answer = entry  # what a re-issued stop command is answered with
        return event_id

    def _malformed(self, wallet_id: str, reason: str, raw: bytes) -> None:
        self.seq += 1
        self.outbox.append((self.names.in_subject(wallet_id), raw, f"demo-bad/{self.plan.run_id}-{self.seq}"))
        self.bad[reason] += 1

    async def flush(self) -> None:
        """Publish the queued messages in order, each with its Nats-Msg-Id; wait for every PubAck."""
        queued, self.outbox = self.outbox, []
        for i in range(0, len(queued), PUBLISH_WINDOW):
            futures = [
                await self.js.publish_async(subject, raw, headers={"Nats-Msg-Id": msg_id})
                for subject, raw, msg_id in queued[i : i + PUBLISH_WINDOW]
            ]
            await asyncio.wait_for(asyncio.gather(*futures), timeout=PUBLISH_ACK_TIMEOUT_S)

    # --- asking -----------------------------------------------------------------------------------

    async def _ask(self, subject: str, body: dict[str, Any]) -> dict[str, Any] | None:
        raw = json.dumps(body).encode()
        async with self.asks:
            for _ in range(2):
                try:
                    reply = await self.nc.request(subject, raw, timeout=ASK_TIMEOUT_S)
                except (NatsTimeoutError, NoRespondersError, TimeoutError):
                    continue
                answer: dict[str, Any] = json.loads(reply.data)
                return answer
        self.summary.unanswered_asks += 1
        return None

    async def ask_rental(self, rental: Rental) -> str | None:
        """The admission id if the rental may start or resume, else None."""
        answer = await self._ask(
            self.names.admission_rental,
            {"walletId": rental.wallet_id, "resourceId": rental.resource_id, "pricePerHourMicros": rental.price},
        )
        admitted = bool(answer and answer.get("admitted"))
        self.rental_asks["admitted" if admitted else "refused"] += 1
        return str(answer["admissionId"]) if answer and admitted else None

    async def ask_job(self, endpoint: Endpoint) -> bool:
        answer = await self._ask(
            self.names.admission_serverless, {"walletId": endpoint.wallet_id, "endpointId": endpoint.endpoint_id}
        )
        admitted = bool(answer and answer.get("admitted"))
        if admitted:
            self.serverless_asks["admitted"] += 1
        elif answer and str(answer.get("reason", "")).startswith("rate_limited"):
            self.serverless_asks["refused (rate limit)"] += 1
        else:
            self.serverless_asks["refused (balance)"] += 1
        return admitted

    # --- listening --------------------------------------------------------------------------------

    def _ours(self, msg: Msg) -> dict[str, Any] | None:
        try:
            body = json.loads(msg.data)
        except ValueError:
            return None
        if isinstance(body, dict) and str(body.get("walletId", "")).startswith(self.prefix):
            return body
        return None

    async def on_stop(self, msg: Msg) -> None:
        body = self._ours(msg)
        if body is not None:
            self.stop_queue.put_nowait(body)

    async def on_notice(self, msg: Msg) -> None:
        body = self._ours(msg)
        if body is not None:
            self.notices[str(body.get("kind"))] += 1

    async def on_settlement(self, msg: Msg) -> None:
        body = self._ours(msg)
        if body is not None:
            self.settlements.add(str(body.get("resourceId")))

    def answer_stops(self) -> None:
        """Answer every stop command received like the compute plane: pause the pod, report it."""
        while not self.stop_queue.empty():
            command = self.stop_queue.get_nowait()
            command_id = str(command.get("commandId"))
            if command_id in self.commands_seen:
                continue  # a redelivery of a command already answered
            self.commands_seen.add(command_id)
            rental = self.rentals.get(str(command.get("resourceId")))
            if rental is None:
                continue
            if rental.status == "running":
                rental.status = "auto_paused"
                self._event(
                    rental.wallet_id,
                    "gpu.rental.paused",
                    rental.source,
                    {"resourceId": rental.resource_id, "uptimeSecondsTotal": rental.uptime},
                )
            elif rental.answer is not None:
                self.outbox.append(rental.answer)  # re-issued: the same answer again (a duplicate)
            self.summary.stops_answered += 1

    # --- the simulation ---------------------------------------------------------------------------

    def fund(self) -> None:
        for wallet in self.plan.wallets:
            self._topup(wallet.wallet_id, wallet.topup)

    def _topup(self, wallet_id: str, amount: int) -> None:
        self.topped_up += amount
        self._event(
            wallet_id,
            "wallet.adjusted",
            "finance/demo-topups",
            {"amountMicros": amount, "reason": "top-up (Stripe stand-in)", "operator": "billing-demo"},
        )

    async def step(self, tick: int) -> None:
        """One simulated step of TICK_S seconds."""
        self.answer_stops()
        last = tick == self.plan.ticks - 1
        for r in self.plan.rentals:
            if r.status == "running" and tick > r.start_tick:
                r.uptime += TICK_S
        starts: list[Rental] = []
        resumes: list[Rental] = []
        for r in self.plan.rentals:
            if r.status == "planned" and r.start_tick == tick:
                starts.append(r)
            elif r.status == "running":
                self._rental_step(r, tick)
            elif r.status == "paused" and r.resume_tick == tick:
                resumes.append(r)
        for w in self.plan.wallets:
            if w.extra_topup_tick == tick:
                self._topup(w.wallet_id, w.extra_topup)
        self._malformed_step(tick)
        # Jobs admitted in the previous step complete now; new ones are asked for.
        for endpoint, compute_ms in self.pending_jobs:
            self._job_completed(endpoint, compute_ms)
        self.pending_jobs = []
        await asyncio.gather(
            *(self._start(r) for r in starts),
            *(self._resume(r) for r in resumes),
            *(self._jobs(e, tick) for e in self.plan.endpoints),
        )
        if last:
            self._end_of_hour()
        await self.flush()

    def _rental_step(self, r: Rental, tick: int) -> None:
        if r.terminate_tick == tick:
            self._preempted(r)
        elif r.end_tick == tick:
            self._event(
                r.wallet_id,
                "gpu.rental.ended",
                r.source,
                {"resourceId": r.resource_id, "uptimeSecondsTotal": r.uptime, "reason": r.end_reason},
            )
            r.status = "ended"
        elif r.pause_tick == tick:
            self._event(
                r.wallet_id,
                "gpu.rental.paused",
                r.source,
                {"resourceId": r.resource_id, "uptimeSecondsTotal": r.uptime},
            )
            r.status = "paused"
            self.summary.user_pauses += 1
        else:
            if r.preempt_tick == tick:
                r.noticed_at = _now()
                r.terminate_tick = tick + PREEMPTION_GRACE_TICKS
            if (tick - r.readings_since) % READING_EVERY_TICKS == 0:
                self._event(
                    r.wallet_id,
                    "gpu.rental.metered",
                    r.source,
                    {"resourceId": r.resource_id, "uptimeSecondsTotal": r.uptime},
                )

    def _preempted(self, r: Rental) -> None:
        now = _now()
        self._event(
            r.wallet_id,
            "gpu.spot.preempted",
            r.source,
            {
                "resourceId": r.resource_id,
                "noticedAt": _iso(r.noticed_at or now),
                "terminatedAt": _iso(now),
                "uptimeSecondsTotal": r.uptime,
            },
        )
        r.status = "ended"
        self.summary.spot_preemptions += 1

    async def _start(self, r: Rental) -> None:
        admission_id = await self.ask_rental(r)
        if admission_id is None:
            r.status = "refused"
            return
        self._event(
            r.wallet_id,
            "gpu.rental.started",
            r.source,
            {
                "resourceId": r.resource_id,
                "resourceKind": r.kind,
                "gpuType": r.gpu_type,
                "gpuCount": r.gpu_count,
                "tier": r.tier,
                "pricePerHourMicros": r.price,
                "admissionId": admission_id,
            },
        )
        r.status = "running"
        r.readings_since = r.start_tick
        kind = "spot pods" if r.kind == "pod" and r.tier == "spot" else f"{r.kind}s"
        if r.kind == "cluster":
            kind = "cluster nodes"
        self.summary.rentals_started[kind] = self.summary.rentals_started.get(kind, 0) + 1

    async def _resume(self, r: Rental) -> None:
        admission_id = await self.ask_rental(r)
        if admission_id is None:
            return  # stays paused
        self._event(
            r.wallet_id, "gpu.rental.resumed", r.source, {"resourceId": r.resource_id, "admissionId": admission_id}
        )
        r.status = "running"

    async def _jobs(self, e: Endpoint, tick: int) -> None:
        if e is self.plan.dry_endpoint:
            # The dry wallet bursts heavy jobs from a quarter of the hour on, one per step, until the
            # service refuses it a few times.
            if tick < max(1, self.plan.ticks // 4) or self.dry_refusals >= DRY_JOB_MAX_REFUSALS:
                return
            if await self.ask_job(e):
                self.pending_jobs.append((e, DRY_JOB_COMPUTE_MS))
            else:
                self.dry_refusals += 1
            return
        rng = random.Random(f"{e.endpoint_id}-{tick}")
        for _ in range(_poisson(rng, e.jobs_per_tick)):
            compute_ms = min(max(int(rng.lognormvariate(8.6, 0.9)), 40), 900_000)
            if await self.ask_job(e):
                self.pending_jobs.append((e, compute_ms))

    def _job_completed(self, e: Endpoint, compute_ms: int) -> None:
        rng = random.Random(f"{e.endpoint_id}-{self.seq}")
        status = rng.choices(["completed", "failed", "cancelled"], [94, 4, 2])[0]
        self._event(
            e.wallet_id,
            "serverless.job.completed",
            f"serverless/{e.gpu_type.replace(' ', '-').lower()}",
            {
                "endpointId": e.endpoint_id,
                "jobId": f"job-{self.seq + 1:07d}",
                "gpuType": e.gpu_type,
                "computeMs": compute_ms,
                "pricePerSecondMicros": e.price_per_second,
                "status": status,
            },
        )
        e.exact_millimicros += serverless_exact_millimicros(compute_ms, e.price_per_second)
        self.summary.jobs_completed += 1

    def _end_of_hour(self) -> None:
        """The hour is over: pending jobs complete, running rentals stop (spot ones under a
        preemption notice are terminated), paused ones stay paused; one reading arrives late."""
        for endpoint, compute_ms in self.pending_jobs:
            self._job_completed(endpoint, compute_ms)
        self.pending_jobs = []
        for r in self.plan.rentals:
            if r.status != "running" or r.dry:
                continue
            if r.noticed_at is not None:
                self._preempted(r)
            else:
                self._event(
                    r.wallet_id,
                    "gpu.rental.ended",
                    r.source,
                    {"resourceId": r.resource_id, "uptimeSecondsTotal": r.uptime, "reason": "stopped"},
                )
                r.status = "ended"
        ended = next((r for r in self.plan.rentals if r.status == "ended"), None)
        if ended is not None:
            # A reading past the settlement of an ended rental: refused by the rules, dead-lettered.
            late = self._envelope_bytes(
                ended.wallet_id,
                "gpu.rental.metered",
                ended.source,
                {"resourceId": ended.resource_id, "uptimeSecondsTotal": ended.uptime + 60},
            )
            self._malformed(ended.wallet_id, "reading_after_settlement", late)

    def _envelope_bytes(
        self, wallet_id: str, type_: str, source: str, data: dict[str, Any], *, at: datetime | None = None
    ) -> bytes:
        body = {
            "specversion": "1.0",
            "id": f"{self.plan.run_id}-bad-{self.seq + 1:07d}",
            "source": source,
            "type": type_,
            "time": _iso(at or _now()),
            "data": {"walletId": wallet_id, **data},
        }
        return json.dumps(body).encode()

    def _malformed_step(self, tick: int) -> None:
        """A few malformed messages, a third and two thirds into the hour."""
        if tick not in (self.plan.ticks // 3, (2 * self.plan.ticks) // 3):
            return
        first = tick == self.plan.ticks // 3
        wallets = [w.wallet_id for w in self.plan.wallets]
        w = wallets[(tick * 7) % len(wallets)]
        other = wallets[(tick * 7 + 1) % len(wallets)]
        running = next((r for r in self.plan.rentals if r.status == "running"), None)
        resource = running.resource_id if running else f"{self.prefix}pod9999"
        if first:
            self._malformed(
                w, "invalid_json", b'{"specversion": "1.0", "id": "' + self.plan.run_id.encode() + b'-broken",'
            )
            self._malformed(
                w,
                "invalid_envelope",
                json.dumps({"id": f"{self.plan.run_id}-noenv", "data": {"walletId": w}}).encode(),
            )
            self._malformed(
                w,
                "unknown_type",
                self._envelope_bytes(w, "gpu.rental.rebooted", "compute/host13", {"resourceId": resource}),
            )
            self._malformed(
                w,
                "out_of_range",
                self._envelope_bytes(
                    w, "gpu.rental.metered", "compute/host13", {"resourceId": resource, "uptimeSecondsTotal": -60}
                ),
            )
        else:
            self._malformed(
                w,
                "future_time",
                self._envelope_bytes(
                    w,
                    "gpu.rental.metered",
                    "compute/host13",
                    {"resourceId": resource, "uptimeSecondsTotal": 60},
                    at=_now() + timedelta(hours=1),
                ),
            )
            self._malformed(
                other,  # wallet w's top-up on another wallet's subject
                "subject_mismatch",
                self._envelope_bytes(
                    w,
                    "wallet.adjusted",
                    "finance/demo-topups",
                    {"amountMicros": 1_000_000, "reason": "misrouted", "operator": "billing-demo"},
                ),
            )
            self._malformed(
                w,
                "invalid_data",
                self._envelope_bytes(
                    w,
                    "gpu.rental.started",
                    "compute/host13",
                    {
                        "resourceId": f"{self.prefix}pod9998",
                        "resourceKind": "pod",
                        "gpuType": "A40",
                        "gpuCount": 1,
                        "tier": "on_demand",
                        "pricePerHourMicros": "390000",
                    },
                ),
            )

    def expected_charges(self) -> int:
        """What the contract's arithmetic says the ledger must have charged (section 1)."""
        rentals = sum(
            rental_cost_micros(r.uptime, r.price) for r in self.plan.rentals if r.status not in ("planned", "refused")
        )
        jobs = sum(serverless_cost_micros(e.exact_millimicros) for e in self.plan.endpoints)
        return rentals + jobs

    # --- reading the ledger ------------------------------------------------------------------------

    def events_in_ledger(self) -> int:
        with self.engine.connect() as conn:
            return events_of_wallets(conn, self.prefix)

    def dead_letters(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return refusals_by_reason(conn, self.names.in_subject(self.prefix))

    def read_summary(self) -> None:
        """The ledger's side of the summary."""
        from projections.reports import trial_balance

        s = self.summary
        s.events_in_ledger = self.events_in_ledger()
        s.dead_letters = self.dead_letters()
        with read_snapshot(self.engine) as pg:
            rental, wallet = read_rental(pg, s.dry_rental), read_wallet(pg, s.dry_wallet)
        s.dry_rental_status = str(rental.status) if rental else "unknown"
        s.dry_wallet_balance_micros = wallet.balance_micros if wallet else 0
        with self.engine.connect() as conn:
            s.charged_micros = charged_to_wallets_micros(conn, self.prefix)
            try:
                report = trial_balance(conn, _now())
                s.trial_balance_total_micros = int(report.summary["totalMicros"])
                s.trial_balance_accounts = len(report.rows)
            except Exception as exc:  # InvariantViolation: the total is not zero
                s.trial_balance_error = f"{type(exc).__name__}: {exc}"

    # --- the whole run ----------------------------------------------------------------------------

    async def run(self, progress: Progress) -> Summary:
        subs = [
            await self.nc.subscribe(self.names.stop_subject, cb=self.on_stop),
            await self.nc.subscribe(self.names.subject("billing.out.notices.*"), cb=self.on_notice),
            await self.nc.subscribe(self.names.subject("billing.out.settlements.*"), cb=self.on_settlement),
        ]
        started = time.monotonic()
        try:
            # Funding: every wallet's first top-up is in the ledger before anyone asks to start.
            funding = progress.add_task("funding wallets", total=len(self.plan.wallets), info="")
            self.fund()
            await self.flush()
            await self._wait(progress, funding, target=len(self.plan.wallets), what="the top-ups to be booked")
            await self._simulate(progress)
            await self._drain(progress)
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self.summary.real_seconds = round(time.monotonic() - started, 1)
        self._finish()
        await asyncio.to_thread(self.read_summary)
        self._checks()
        return self.summary

    async def _simulate(self, progress: Progress) -> None:
        """The simulated hour, one tick every ``tick_s`` real seconds."""
        s = self.summary
        hour = progress.add_task("simulated time", total=self.plan.ticks, info="")
        t0 = time.monotonic()
        for tick in range(self.plan.ticks):
            await self.step(tick)
            sim = (tick + 1) * TICK_S
            running = sum(1 for r in self.plan.rentals if r.status == "running")
            progress.update(
                hour,
                completed=tick + 1,
                description=f"simulated time {sim // 3600:02d}:{sim // 60 % 60:02d}:{sim % 60:02d}",
                info=(
                    f"events {len(self.good):,} · running {running} · jobs {s.jobs_completed:,} · "
                    f"stops {len(self.commands_seen)}"
                ),
            )
            delay = t0 + (tick + 1) * self.tick_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _drain(self, progress: Progress) -> None:
        """The ledger catches up, the dry wallet's pod is stopped and answered (or the drain times out)."""
        catching_up = progress.add_task("ledger catching up", total=len(self.good), info="")
        deadline = time.monotonic() + self.drain_timeout_s
        dry = self.rentals[self.summary.dry_rental]
        while True:
            self.answer_stops()
            if dry.status == "running":
                # Not stopped yet: the pod runs on past the hour (and is charged) until it is.
                dry.uptime += TICK_S
                self._event(
                    dry.wallet_id,
                    "gpu.rental.metered",
                    dry.source,
                    {"resourceId": dry.resource_id, "uptimeSecondsTotal": dry.uptime},
                )
            await self.flush()
            in_ledger = await asyncio.to_thread(self.events_in_ledger)
            letters = sum((await asyncio.to_thread(self.dead_letters)).values())
            ended = sum(1 for r in self.plan.rentals if r.status == "ended")
            progress.update(
                catching_up,
                total=len(self.good),
                completed=in_ledger,
                info=f"dead letters {letters} of {self.bad.total()} · settlements {len(self.settlements)} of {ended}",
            )
            settled = (
                in_ledger == len(self.good)
                and letters == self.bad.total()
                and dry.status != "running"
                and len(self.settlements) >= ended
                and self.stop_queue.empty()
            )
            if settled or time.monotonic() > deadline:
                return
            await asyncio.sleep(POLL_S)

    async def _wait(self, progress: Progress, task: TaskID, *, target: int, what: str) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while True:
            n = await asyncio.to_thread(self.events_in_ledger)
            progress.update(task, completed=min(n, target))
            if n >= target:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {self.drain_timeout_s:.0f} s waiting for {what} ({n} of {target})")
            await asyncio.sleep(POLL_S)

    def _finish(self) -> None:
        s = self.summary
        s.topped_up_micros = self.topped_up
        s.events_published = len(self.good)
        s.malformed_published = self.bad.total()
        s.dead_letters_expected = dict(sorted(self.bad.items()))
        s.rental_admissions = dict(self.rental_asks)
        s.serverless_admissions = dict(self.serverless_asks)
        s.stops_issued = len(self.commands_seen)
        s.notices = dict(sorted(self.notices.items()))
        s.settlements_received = len(self.settlements)
        s.settlements_expected = sum(1 for r in self.plan.rentals if r.status == "ended")
        s.expected_charges_micros = self.expected_charges()

    def _checks(self) -> None:
        s = self.summary
        s.checks = {
            "every good event is in the ledger": s.events_in_ledger == s.events_published,
            "every malformed message is dead-lettered": s.dead_letters == s.dead_letters_expected,
            "charged exactly what the readings and jobs cost": s.charged_micros == s.expected_charges_micros,
            "the dry wallet's rental was stopped and paused": s.stops_issued >= 1 and s.dry_rental_status == "paused",
            "every stop command was answered": s.stops_answered == s.stops_issued,
            "every ended rental was settled": s.settlements_received == s.settlements_expected,
            "trial balance total is 0": s.trial_balance_total_micros == 0,
        }


class DemoError(RuntimeError):
    """The demo could not run (no service, a timeout)."""


# ------------------------------------------------------------------------------------------ the service


async def _answers(nats_url: str, names: NatsNames) -> bool:
    """Whether a billing service answers on this NATS (its admission subject has a responder)."""
    try:
        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    except Exception:
        return False
    try:
        # An empty ask is answered "invalid request" and changes nothing.
        await nc.request(names.admission_serverless, b"{}", timeout=2)
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_service(settings: Settings, console: Console) -> Iterator[ServiceUrls]:
    """The URLs of a running billing service: the configured or running one, else one started here
    (``billing up`` in a subprocess, stopped on exit)."""
    names = NatsNames(settings.nats_namespace)
    running = running_service_urls(settings)
    nats_url = settings.nats_url or (running.nats_url if running else None)
    database_url = settings.database_url or (running.database_url if running else None)
    if nats_url and database_url and asyncio.run(_answers(nats_url, names)):
        console.print(f"[dim]billing service found on {nats_url}[/dim]", soft_wrap=True)
        yield ServiceUrls(database_url, nats_url, ())
        return

    env = dict(os.environ)
    if not _port_free(settings.http_port):
        env["BILLING_HTTP_PORT"] = str(_free_port())
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.data_dir / "demo-service.log"
    console.print(f"[dim]no billing service answers: starting `billing up` (log in {log_path})[/dim]", soft_wrap=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "consumers.cli.main", "up"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops the service in order
        )
    try:
        urls = _wait_for_service(proc, settings, names, log_path)
        yield urls
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=SERVICE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        console.print(
            f"[dim]stopped the billing service started for the demo; its data stays in {settings.data_dir}[/dim]",
            soft_wrap=True,
        )


def _wait_for_service(
    proc: subprocess.Popen[bytes], settings: Settings, names: NatsNames, log_path: Path
) -> ServiceUrls:
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    runtime = settings.data_dir / RUNTIME_FILE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise DemoError(f"billing up exited with status {proc.returncode}:\n{tail}")
        urls = running_service_urls(settings)
        if urls is not None and runtime.exists() and json.loads(runtime.read_text()).get("pid") == proc.pid:
            nats_url = settings.nats_url or urls.nats_url
            if asyncio.run(_answers(nats_url, names)):
                return ServiceUrls(settings.database_url or urls.database_url, nats_url, ())
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGTERM)
    raise DemoError(f"billing up did not answer within {SERVICE_START_TIMEOUT_S:.0f} s (log: {log_path})")


# ---------------------------------------------------------------------------------------------- output


def summary_title(s: Summary) -> Text:
    """The summary's title on its own line (a table's title is only as wide as the table)."""
    return Text(f"billing demo {s.run_id}: {s.simulated_minutes} simulated minutes in {s.real_seconds} s", style="bold")


def summary_table(s: Summary) -> Table:
    """What happened, one line per figure; readable from 80 columns (labels short, values fold)."""

    def mark(check: str) -> Text:
        return Text("✓", style="green") if s.checks.get(check) else Text("✗", style="red")

    rows: list[tuple[str, str, Text | str]] = [
        ("wallets funded (wallet.adjusted)", f"{s.wallets:,} ({_usd(s.topped_up_micros)})", ""),
        ("events published (good)", f"{s.events_published:,}", ""),
        ("events in the ledger", f"{s.events_in_ledger:,}", mark("every good event is in the ledger")),
    ]
    started = ", ".join(f"{n} {k}" for k, n in sorted(s.rentals_started.items()))
    rows.append(("rentals started", f"{sum(s.rentals_started.values()):,} ({started})", ""))
    rows.append(("spot preemptions / user pauses", f"{s.spot_preemptions} / {s.user_pauses}", ""))
    rows.append(("serverless jobs completed", f"{s.jobs_completed:,}", ""))
    rental = s.rental_admissions
    rows.append(
        ("rental admissions: ok / refused", f"{rental.get('admitted', 0):,} / {rental.get('refused', 0):,}", "")
    )
    sl = s.serverless_admissions
    refused = {k: n for k, n in sl.items() if k != "admitted"}
    why = f" ({', '.join(f'{n} {k[9:-1]}' for k, n in sorted(refused.items()))})" if refused else ""
    rows.append(
        ("serverless admissions: ok / refused", f"{sl.get('admitted', 0):,} / {sum(refused.values()):,}{why}", "")
    )
    if s.unanswered_asks:
        rows.append(("admission asks unanswered", f"{s.unanswered_asks:,}", ""))
    charged = f"{_usd(s.charged_micros, exact=True)} / {_usd(s.expected_charges_micros, exact=True)}"
    rows.append(("charged (ledger / expected)", charged, mark("charged exactly what the readings and jobs cost")))
    rows.append(
        ("stops issued / answered", f"{s.stops_issued} / {s.stops_answered}", mark("every stop command was answered"))
    )
    dry = f"{s.dry_wallet}: rental {s.dry_rental_status}, balance {_usd(s.dry_wallet_balance_micros)}"
    rows.append(("the wallet that ran dry", dry, mark("the dry wallet's rental was stopped and paused")))
    rows.append(("notices", ", ".join(f"{n} {k}" for k, n in s.notices.items()) or "none", ""))
    settled = f"{s.settlements_received} / {s.settlements_expected}"
    rows.append(("settlements / rentals ended", settled, mark("every ended rental was settled")))
    letters = f"{s.malformed_published} / {sum(s.dead_letters.values())}"
    rows.append(("malformed sent / dead letters", letters, mark("every malformed message is dead-lettered")))
    for reason in sorted(set(s.dead_letters) | set(s.dead_letters_expected)):
        rows.append((f"  dead letters: {reason}", str(s.dead_letters.get(reason, 0)), ""))
    total = "not computed" if s.trial_balance_total_micros is None else _usd(s.trial_balance_total_micros, exact=True)
    error = f" ({s.trial_balance_error})" if s.trial_balance_error else ""
    tb = f"{total} over {s.trial_balance_accounts:,} accounts{error}"
    rows.append(("trial balance total (whole ledger)", tb, mark("trial balance total is 0")))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("what", overflow="fold", max_width=36)
    table.add_column("value", overflow="fold")
    table.add_column("", justify="center", no_wrap=True, width=1)
    for what, value, check in rows:
        table.add_row(Text(what), Text(value), check)
    return table


class DemoProgress(Progress):
    """Progress with each task's figures on a line of their own under its bar: at 80 columns a bar,
    its count and a sentence of figures do not fit on one line."""

    def get_renderables(self) -> Iterator[RenderableType]:
        for task in self.tasks:
            yield self.make_tasks_table([task])
            info = str(task.fields.get("info") or "")
            if info:
                yield Text(f"    {info}", style="dim", overflow="fold")


def demo_progress(console: Console, get_time: Callable[[], float] | None = None) -> DemoProgress:
    """Fixed columns so the separate tasks line up; the bar takes what the terminal has left.
    ``get_time``: a fixed clock for tests (the spinner's frame and the elapsed time read it)."""
    return DemoProgress(
        SpinnerColumn(table_column=Column(width=1, no_wrap=True)),
        TextColumn("[bold]{task.description}", table_column=Column(width=23, no_wrap=True)),
        BarColumn(bar_width=None, table_column=Column(ratio=1)),
        MofNCompleteColumn(table_column=Column(width=13, justify="right", no_wrap=True)),
        TimeElapsedColumn(table_column=Column(width=7, no_wrap=True)),
        console=console,
        expand=True,
        get_time=get_time,
    )


async def run_demo(
    urls: ServiceUrls,
    settings: Settings,
    console: Console,
    *,
    wallets: int,
    minutes: int,
    pace_s: float,
    seed: int,
    run_id: str,
    drain_timeout_s: float,
) -> Summary:
    from ledger.db import make_engine

    plan = make_plan(run_id, wallets, minutes, seed)
    names = NatsNames(settings.nats_namespace)
    engine = make_engine(urls.database_url, role=settings.database_role or None, pool_size=2)
    nc = await nats.connect(urls.nats_url, connect_timeout=5, max_reconnect_attempts=5)
    progress = demo_progress(console)
    try:
        traffic = Traffic(plan, nc, names, engine, pace_s=pace_s, drain_timeout_s=drain_timeout_s)
        with progress:
            return await traffic.run(progress)
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
        engine.dispose()


def demo(
    wallets: int = typer.Option(300, "--wallets", min=3, max=10_000, help="How many wallets."),
    minutes: int = typer.Option(60, "--minutes", min=1, max=24 * 60, help="Simulated minutes of platform time."),
    pace: float = typer.Option(
        DEFAULT_PACE_S, "--pace", min=0.05, max=60.0, help="Real seconds per simulated minute (0.75: an hour in 45 s)."
    ),
    seed: int = typer.Option(7, "--seed", help="Seed of the simulated traffic."),
    run_id: str = typer.Option(
        None, "--run-id", help="Id of this run (ids start with demo-<run>-); random by default."
    ),
    timeout: float = typer.Option(
        60.0, "--timeout", min=1.0, help="Seconds to wait for the service to catch up before giving up."
    ),
    json_path: Path = typer.Option(None, "--json", help="Also write the summary as JSON to this file."),  # noqa: B008
) -> None:
    """Drive a simulated hour of platform traffic through the running service and print what happened.

    Uses BILLING_NATS_URL / BILLING_DATABASE_URL, else the `billing up` of the data dir; starts one if none answers.
    """
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = run_id or secrets.token_hex(3)
    if not RUN_ID_RE.match(run):
        raise typer.BadParameter("1 to 16 letters or digits", param_hint="--run-id")
    console = Console()  # the terminal's width; off a terminal COLUMNS, else 80
    settings = Settings()
    try:
        with running_service(settings, console) as urls:
            summary = asyncio.run(
                run_demo(
                    urls,
                    settings,
                    console,
                    wallets=wallets,
                    minutes=minutes,
                    pace_s=pace,
                    seed=seed,
                    run_id=run,
                    drain_timeout_s=timeout,
                )
            )
            console.print(Group(summary_title(summary), summary_table(summary)))
            if json_path is not None:
                json_path.write_text(summary.to_json() + "\n")
    except DemoError as exc:
        console.print(f"[red]billing demo failed:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    failed = [name for name, ok in summary.checks.items() if not ok]
    if failed:
        console.print(f"[red]failed checks:[/red] {'; '.join(failed)}", soft_wrap=True)
        raise typer.Exit(1)
