"""The AsyncAPI 3.0 document of the service's NATS interface (docs/events.md), generated
by FastStream from code and kept in the repository as ``asyncapi.json``.

    python -m devtools.asyncapi [--check] [PATH]
    faststream docs gen devtools.asyncapi:app -o asyncapi.json   (the same document, formatting aside)

``--check`` writes nothing and exits 1 if the file is stale; tests/unit/test_asyncapi.py fails the
same way.

**The handlers below are documentation only.** Nothing here connects to NATS or runs: the broker
is never started. The real runtime is :mod:`consumers.service.run` (``billing up``): the intake pulls
``billing.in.>`` by hand (:mod:`consumers.nats.intake`), the admission replies run on nats-py
(:mod:`consumers.nats.admission`), and the outbox relay (:mod:`consumers.nats.relay`) publishes stop
commands, notices and settlements. This module declares the same subjects with the real pydantic
models, so the document follows the code: the event union and its envelopes come from
:mod:`ledger.events`, the admission asks and answers from :mod:`consumers.nats.admission`. The outbound
bodies are built as plain dicts in :mod:`projections.messages`; the models :class:`StopCommandBody`,
:class:`NoticeBody` and :class:`SettlementBody` below describe them (a unit test checks they have
exactly the keys those builders write).

What FastStream cannot say by itself is added to its output by :class:`BillingAsyncAPI` (so that
``faststream docs gen`` gives the same document):

* request-reply: the admission operations get an AsyncAPI 3.0 ``reply`` whose channel has a null
  address (the asker's NATS inbox) and whose message is the answer model;
* channel parameters (``{walletId}``, ``{reason}`` with the dead-letter reasons);
* message headers (``Nats-Msg-Id`` of the outbound messages, the ``Billing-*`` headers of dead
  letters);
* ``type`` as a required field of every event envelope (it has a Python default, but on the wire
  it is the discriminator of the union and must be present).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args

from faststream import FastStream
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.specification import AsyncAPI
from faststream.specification.base import Specification
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from consumers.nats.admission import InvalidAnswer, RentalAnswer, RentalAsk, ServerlessAnswer, ServerlessAsk
from consumers.nats.streams import DUPLICATE_WINDOW_S
from devtools import generated_docs
from ledger.events import ID_PATTERN, Event, RejectReason
from projections.rules import EndReason, NoticeKind

DEFAULT_PATH: Final = Path(__file__).resolve().parent.parent / "asyncapi.json"

TITLE: Final = "GPU cloud billing: NATS interface"
VERSION: Final = "0.1.0"
# The embedded nats-server's default address (BILLING_EMBEDDED_NATS_PORT); the document names it
# with a port variable, and a production server whose host is a variable (BILLING_NATS_URL).
SERVER_URL: Final = "nats://127.0.0.1:14222"

DOC_ONLY: Final = "documentation only: the service's runtime is consumers.service.run (billing up)"

Id = Annotated[str, Field(pattern=ID_PATTERN)]

# --------------------------------------------------------------------------------- outbound bodies


class _Body(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid")


class StopCommandBody(_Body):
    """compute.commands.stop: pause a running rental whose wallet's available balance reached zero
    (R4). Re-issued with a new commandId (5, 10, 20, 40 s, then every 60 s) until the rental reports
    gpu.rental.paused or gpu.rental.ended. Header Nats-Msg-Id = commandId."""

    command_id: str = Field(description="Unique per issue: stop-<walletId>-<resourceId>-<n>.")
    wallet_id: Id
    resource_id: Id
    resource_kind: Literal["pod", "marketplace", "cluster"]
    action: Literal["pause"] = Field(description="Pods are paused: billing pauses, the volume is kept.")
    reason: Literal["balance_exhausted"]
    issued_at: datetime = Field(description="When billing issued this command (RFC 3339, UTC).")


class NoticeBody(_Body):
    """billing.out.notices.<walletId>: a change of the wallet's status, one notice per change."""

    wallet_id: Id
    kind: NoticeKind = Field(
        description="low_balance: less than one hour of running burn is left; exhausted: available "
        "reached zero; replenished: back up from exhausted (or from low to active)."
    )
    balance_micros: int = Field(description="Ledger balance in micro-USD (may be negative: a debt).")
    projected_zero_at: datetime | None = Field(
        description="When the available balance reaches zero at the current burn; null if nothing runs."
    )


class SettlementBody(_Body):
    """billing.out.settlements.<walletId>: a rental that ended is settled (R8), once per rental."""

    wallet_id: Id
    resource_id: Id
    billable_seconds: int = Field(ge=0, description="Total billable seconds (paused time excluded).")
    cost_micros: int = Field(ge=0, description="floor(billableSeconds * pricePerHourMicros / 3600).")
    ended_at: datetime = Field(description="The final reading's time (a preemption's terminatedAt).")
    reason: EndReason


# ------------------------------------------------------------------------------------ the broker

broker = NatsBroker(
    SERVER_URL,
    description=(
        "NATS with JetStream: BILLING_NATS_URL, or the embedded nats-server that `billing up` starts "
        "when it is unset. A non-empty BILLING_NATS_NAMESPACE prefixes every subject (<ns>.billing.in.>) "
        "and stream (<NS>_BILLING_IN); production uses the names exactly as written here."
    ),
)

_IN_STREAM: Final = JStream("BILLING_IN", subjects=["billing.in.>"], declare=False)


@broker.subscriber(
    "billing.in.{walletId}",
    stream=_IN_STREAM,
    durable="billing-intake",
    pull_sub=PullSub(batch_size=4000),
    title="usageEvents",
    description=(
        "Usage facts in (docs/events.md): CloudEvents 1.0 in structured JSON mode, published by the "
        "compute plane to JetStream stream BILLING_IN (subjects billing.in.>), one subject per wallet. "
        "data.walletId must be the subject's walletId. (source, id) identifies an event: the same pair "
        "twice is one event. Set Nats-Msg-Id for the stream's "
        f"{DUPLICATE_WINDOW_S:.0f} s duplicate window. Bad input is acknowledged, recorded and "
        "published to billing.dlq.<reason>; a reading for a rental not started yet is retried with a "
        "delay first."
    ),
)
async def usage_events(event: Event) -> None:
    """Documentation only (see the module docstring): consumers.nats.intake consumes this subject."""
    raise NotImplementedError(DOC_ONLY)


@broker.subscriber(
    "billing.admission.rental",
    queue="billing-admission",
    title="admissionRental",
    description=(
        "Request-reply (R2, R3): may this rental start or resume? Admitted iff the wallet's available "
        "balance is at least one hour of pricePerHourMicros; an admitted answer holds one hour's price "
        "until the matching gpu.rental.started/resumed (with admissionId) arrives, or 120 s. A "
        "malformed ask is answered {admitted: false, reason: 'invalid request: ...'}; an answer whose "
        "reason starts with 'unavailable:' means retry shortly (nothing was held)."
    ),
)
async def admission_rental(ask: RentalAsk) -> RentalAnswer | InvalidAnswer:
    """Documentation only (see the module docstring): consumers.nats.admission answers this subject."""
    raise NotImplementedError(DOC_ONLY)


@broker.subscriber(
    "billing.admission.serverless",
    queue="billing-admission",
    title="admissionServerless",
    description=(
        "Request-reply (R5): may a serverless job of this wallet run? Admitted iff available is at "
        "least $0.10 (100000 micros) and fewer than 60 jobs of the wallet were admitted in the rolling "
        "minute."
    ),
)
async def admission_serverless(ask: ServerlessAsk) -> ServerlessAnswer | InvalidAnswer:
    """Documentation only (see the module docstring): consumers.nats.admission answers this subject."""
    raise NotImplementedError(DOC_ONLY)


# The answers go to the asker's reply subject (a NATS inbox); declared as publishers only so that
# FastStream puts their schemas in the document. BillingAsyncAPI turns them into the replies of the
# admission operations.
_REPLIES: Final = {"admissionRental": "admissionRentalReply", "admissionServerless": "admissionServerlessReply"}
broker.publisher(
    "billing.admission.rental.reply",
    title="admissionRentalReply",
    schema=RentalAnswer | InvalidAnswer,
    description="The answer to billing.admission.rental, sent to the ask's reply subject (its inbox).",
)
broker.publisher(
    "billing.admission.serverless.reply",
    title="admissionServerlessReply",
    schema=ServerlessAnswer | InvalidAnswer,
    description="The answer to billing.admission.serverless, sent to the ask's reply subject (its inbox).",
)

broker.publisher(
    "compute.commands.stop",
    stream=JStream("COMPUTE_COMMANDS", subjects=["compute.commands.stop"], declare=False),
    title="stopCommands",
    schema=StopCommandBody,
    description=(
        "Stop commands to the compute plane (R4), JetStream stream COMPUTE_COMMANDS, header Nats-Msg-Id "
        "= commandId. Decided in the same database transaction as the fact that caused them and "
        "published by the outbox relay: at least once, dedup downstream by commandId. Answer by "
        "publishing gpu.rental.paused (or gpu.rental.ended) to billing.in.<walletId>."
    ),
)
broker.publisher(
    "billing.out.notices.{walletId}",
    stream=JStream("BILLING_OUT", subjects=["billing.out.>"], declare=False),
    title="notices",
    schema=NoticeBody,
    description="Wallet status notices, JetStream stream BILLING_OUT, with a Nats-Msg-Id header.",
)
broker.publisher(
    "billing.out.settlements.{walletId}",
    stream=JStream("BILLING_OUT", subjects=["billing.out.>"], declare=False),
    title="settlements",
    schema=SettlementBody,
    description=(
        "Settlements of ended rentals (R8), JetStream stream BILLING_OUT, header Nats-Msg-Id = "
        "settlement-<walletId>-<resourceId> (a rental settles once)."
    ),
)
broker.publisher(
    "billing.dlq.{reason}",
    stream=JStream("BILLING_DLQ", subjects=["billing.dlq.>"], declare=False),
    title="deadLetters",
    schema=bytes,
    description=(
        "Dead letters, JetStream stream BILLING_DLQ: every refused input of billing.in.>, its body the "
        "input's bytes exactly as received, with the reason and a detail a person can act on in "
        "Billing-* headers. Also recorded in the ledger database (rejected_inputs); `billing dlq "
        "replay` sends them back once the cause is fixed."
    ),
)

DEAD_LETTER_REASONS: Final[tuple[str, ...]] = tuple(r.value for r in RejectReason)

# ------------------------------------------------------------------------- what FastStream leaves out

_MSG_ID_HEADER: Final = {
    "type": "object",
    "properties": {"Nats-Msg-Id": {"type": "string", "description": "Deduplication id (JetStream)."}},
    "required": ["Nats-Msg-Id"],
}
_DLQ_HEADERS: Final = {
    "type": "object",
    "properties": {
        "Nats-Msg-Id": {"type": "string", "description": "dlq-<reason>-<digest of source and id>, or of the input."},
        "Billing-Reason": {"type": "string", "enum": list(DEAD_LETTER_REASONS)},
        "Billing-Detail": {"type": "string", "description": "Why, in words a person can act on."},
        "Billing-Subject": {"type": "string", "description": "The subject the input arrived on."},
        "Billing-Delivery-Count": {"type": "string", "description": "Deliveries of the input, decimal."},
        "Billing-Stream": {"type": "string"},
        "Billing-Stream-Sequence": {"type": "string"},
        "Billing-Source": {"type": "string", "description": "CloudEvents source, when readable."},
        "Billing-Event-Id": {"type": "string", "description": "CloudEvents id, when readable."},
        "Billing-Event-Type": {"type": "string", "description": "CloudEvents type, when readable."},
        "Billing-Wallet-Id": {"type": "string", "description": "data.walletId, when readable."},
    },
    "required": ["Nats-Msg-Id", "Billing-Reason", "Billing-Detail", "Billing-Subject"],
}
_WALLET_PARAMETER: Final = {"description": "The wallet's id: 1 to 64 letters, digits, _ or -."}
_PARAMETERS: Final[dict[str, dict[str, Any]]] = {
    "usageEvents": {"walletId": _WALLET_PARAMETER},
    "notices": {"walletId": _WALLET_PARAMETER},
    "settlements": {"walletId": _WALLET_PARAMETER},
    "deadLetters": {"reason": {"enum": list(DEAD_LETTER_REASONS), "description": "Why the input was refused."}},
}
_ORDER: Final = (
    "usageEvents",
    "stopCommands",
    "notices",
    "settlements",
    "admissionRental",
    "admissionRentalReply",
    "admissionServerless",
    "admissionServerlessReply",
    "deadLetters",
)
_HEADERS: Final[dict[str, dict[str, Any]]] = {
    "stopCommands": _MSG_ID_HEADER,
    "notices": _MSG_ID_HEADER,
    "settlements": _MSG_ID_HEADER,
    "deadLetters": _DLQ_HEADERS,
}

# ------------------------------------------------------------------------------------- examples
# One example message or more for every operation, as the service reads or writes them (the bodies
# of docs/events.md). tests/unit/test_asyncapi.py validates each against the real models.

_T: Final = "2026-11-28T10:00:00Z"


def _cloudevent(event_id: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"specversion": "1.0", "id": event_id, "source": "compute/host7", "type": kind, "time": _T, "data": data}


_W: Final = {"walletId": "w_acme"}
_POD: Final = {**_W, "resourceId": "pod42"}
USAGE_EXAMPLES: Final[tuple[dict[str, Any], ...]] = (
    _cloudevent(
        "host7-pod42-000001",
        "gpu.rental.started",
        {
            **_POD,
            "resourceKind": "pod",
            "gpuType": "RTX 4090",
            "gpuCount": 1,
            "tier": "on_demand",
            "pricePerHourMicros": 2_000_000,
            "admissionId": "adm-pod42",
        },
    ),
    _cloudevent("host7-pod42-000118", "gpu.rental.metered", {**_POD, "uptimeSecondsTotal": 7080}),
    _cloudevent("host7-pod42-000119", "gpu.rental.paused", {**_POD, "uptimeSecondsTotal": 7100}),
    _cloudevent("host7-pod42-000120", "gpu.rental.resumed", {**_POD, "admissionId": "adm-pod42-2"}),
    _cloudevent("host7-pod42-000180", "gpu.rental.ended", {**_POD, "uptimeSecondsTotal": 10800, "reason": "stopped"}),
    _cloudevent(
        "host7-spot9-000015",
        "gpu.spot.preempted",
        {
            **_W,
            "resourceId": "spot9",
            "noticedAt": "2026-11-28T09:55:00Z",
            "terminatedAt": _T,
            "uptimeSecondsTotal": 900,
        },
    ),
    _cloudevent(
        "ep1-job-77",
        "serverless.job.completed",
        {
            **_W,
            "endpointId": "ep1",
            "jobId": "job-77",
            "gpuType": "AMPERE_24",
            "computeMs": 1500,
            "pricePerSecondMicros": 333,
            "status": "completed",
        },
    ),
    _cloudevent(
        "ops-2026-11-28-001",
        "wallet.adjusted",
        {**_W, "amountMicros": 20_000_000, "reason": "goodwill credit", "operator": "ops@example.com"},
    ),
)
_RENTAL_ASK: Final = {**_POD, "pricePerHourMicros": 2_000_000, "admissionId": "adm-pod42"}
_REFUSED_INPUT: Final = _cloudevent("host7-pod42-000121", "gpu.rental.metered", {**_POD, "uptimeSecondsTotal": -5})


def _example(name: str, summary: str, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
    example: dict[str, Any] = {"name": name, "summary": summary}
    if headers is not None:
        example["headers"] = headers
    example["payload"] = payload
    return example


EXAMPLES: Final[dict[str, list[dict[str, Any]]]] = {
    "usageEvents": [
        _example(e["type"].replace(".", "_"), f"A {e['type']} event", e, {"Nats-Msg-Id": e["id"]})
        for e in USAGE_EXAMPLES
    ],
    "admissionRental": [_example("ask", "May pod42 start at $2/h?", _RENTAL_ASK)],
    "admissionRentalReply": [
        _example(
            "admitted",
            "Admitted: one hour of the price ($2) is held for at most 120 s",
            {"admitted": True, "admissionId": "adm-pod42", "reason": "admitted", "availableMicros": 20_000_000},
        ),
        _example(
            "refused",
            "Refused: less than one hour of the price is available",
            {
                "admitted": False,
                "admissionId": "adm-pod42",
                "reason": "insufficient_balance: starting needs one hour of its price (2000000 micros) available, "
                "the wallet has 1500000",
                "availableMicros": 1_500_000,
            },
        ),
        _example(
            "invalid",
            "A malformed ask",
            {"admitted": False, "reason": "invalid request: pricePerHourMicros: required field is missing"},
        ),
    ],
    "admissionServerless": [_example("ask", "May a job of endpoint ep1 run?", {**_W, "endpointId": "ep1"})],
    "admissionServerlessReply": [
        _example("admitted", "Admitted", {"admitted": True, "reason": "admitted", "availableMicros": 19_899_343}),
        _example(
            "rateLimited",
            "Refused: 60 jobs were admitted in the last minute",
            {
                "admitted": False,
                "reason": "rate_limited: at most 60 jobs per minute (endpoint ep1)",
                "availableMicros": 19_899_343,
            },
        ),
    ],
    "stopCommands": [
        _example(
            "balanceExhausted",
            "Pause pod42: its wallet's available balance reached zero",
            {
                "commandId": "stop-w_acme-pod42-1",
                "walletId": "w_acme",
                "resourceId": "pod42",
                "resourceKind": "pod",
                "action": "pause",
                "reason": "balance_exhausted",
                "issuedAt": "2026-11-28T10:00:00.250000Z",
            },
            {"Nats-Msg-Id": "stop-w_acme-pod42-1"},
        ),
    ],
    "notices": [
        _example(
            "lowBalance",
            "Less than one hour of running burn is left",
            {
                "walletId": "w_acme",
                "kind": "low_balance",
                "balanceMicros": 1_500_000,
                "projectedZeroAt": "2026-11-28T10:45:00Z",
            },
            {"Nats-Msg-Id": "notice-w_acme-low_balance-2026-11-28T10:00:00Z"},
        ),
        _example(
            "exhausted",
            "The available balance reached zero",
            {"walletId": "w_acme", "kind": "exhausted", "balanceMicros": 0, "projectedZeroAt": _T},
            {"Nats-Msg-Id": "notice-w_acme-exhausted-2026-11-28T10:00:00Z"},
        ),
    ],
    "settlements": [
        _example(
            "stopped",
            "pod42 ended after 3 hours at $2/h",
            {
                "walletId": "w_acme",
                "resourceId": "pod42",
                "billableSeconds": 10800,
                "costMicros": 6_000_000,
                "endedAt": _T,
                "reason": "stopped",
            },
            {"Nats-Msg-Id": "settlement-w_acme-pod42"},
        ),
    ],
    "deadLetters": [
        _example(
            "outOfRange",
            "A reading with a negative counter, refused as received",
            json.dumps(_REFUSED_INPUT),
            {
                "Nats-Msg-Id": "dlq-out_of_range-3f2a9c",
                "Billing-Reason": "out_of_range",
                "Billing-Detail": "data.uptimeSecondsTotal: must be >= 0, got -5",
                "Billing-Subject": "billing.in.w_acme",
                "Billing-Delivery-Count": "1",
                "Billing-Stream": "BILLING_IN",
                "Billing-Stream-Sequence": "1042",
                "Billing-Source": "compute/host7",
                "Billing-Event-Id": "host7-pod42-000121",
                "Billing-Event-Type": "gpu.rental.metered",
                "Billing-Wallet-Id": "w_acme",
            },
        ),
    ],
}
_SERVERS: Final[dict[str, dict[str, Any]]] = {
    "embedded": {
        "host": "127.0.0.1:{port}",
        "pathname": "",
        "protocol": "nats",
        "title": "The embedded nats-server of `billing up`",
        "description": (
            "Started by `billing up` when BILLING_NATS_URL is unset (`make run`), with JetStream, on "
            "127.0.0.1. Its port is BILLING_EMBEDDED_NATS_PORT (default 14222); if that is taken a free "
            "port is used, logged, and written to <data dir>/runtime.json (natsUrl) and `billing status`."
        ),
        "variables": {
            "port": {"default": "14222", "description": "BILLING_EMBEDDED_NATS_PORT, or runtime.json's natsUrl"}
        },
    },
    "production": {
        "host": "{host}",
        "pathname": "",
        "protocol": "nats",
        "title": "A NATS JetStream cluster",
        "description": (
            "BILLING_NATS_URL: the cluster's servers, with the users and permissions of "
            "deploy/nats/accounts.conf. A non-empty BILLING_NATS_NAMESPACE prefixes every subject "
            "(<ns>.billing.in.>) and stream (<NS>_BILLING_IN); production uses the names exactly as "
            "written here."
        ),
        "variables": {"host": {"default": "nats-1:4222", "description": "host:port of a server of the cluster"}},
    },
}


class _Document:
    """A finished document (FastStream's ``Specification`` protocol), for ``faststream docs gen``."""

    def __init__(self, document: dict[str, Any]) -> None:
        self._document = document

    @property
    def title(self) -> str:
        return str(self._document["info"]["title"])

    def to_jsonable(self) -> Any:
        return json.loads(json.dumps(self._document))

    def to_json(self) -> str:
        return json.dumps(self._document)

    def to_yaml(self) -> str:
        import yaml  # type: ignore[import-untyped,unused-ignore]

        return str(yaml.dump(self.to_jsonable(), sort_keys=False))


class BillingAsyncAPI(AsyncAPI):
    """FastStream's AsyncAPI 3.0 factory, plus the replies, parameters, headers and required ``type``
    that it cannot express (see the module docstring)."""

    def to_specification(self) -> Specification:
        return _Document(complete(super().to_specification().to_jsonable()))


def _message(doc: dict[str, Any], channel: str) -> dict[str, Any]:
    """The component message of a channel with one message."""
    (reference,) = doc["channels"][channel]["messages"].values()
    name = reference["$ref"].rsplit("/", 1)[1].replace("%7B", "{").replace("%7D", "}")
    message: dict[str, Any] = doc["components"]["messages"][name]
    return message


def complete(doc: dict[str, Any]) -> dict[str, Any]:
    """Add to FastStream's document what it cannot express (in place; returned for chaining)."""
    channels: dict[str, Any] = doc["channels"]
    operations: dict[str, Any] = doc["operations"]
    for ask, reply in _REPLIES.items():
        channel = channels[reply]
        channel["address"] = None  # AsyncAPI 3.0: a dynamic address, here the asker's NATS inbox
        channel.pop("bindings", None)
        del operations[reply]  # not an operation of its own: the reply of the ask's operation
        operations[ask]["reply"] = {
            "channel": {"$ref": f"#/channels/{reply}"},
            "messages": [{"$ref": f"#/channels/{reply}/messages/{name}"} for name in channel["messages"]],
        }
        operations[ask]["description"] = "NATS request-reply: the answer goes to the ask's reply subject (its inbox)."
    for channel_name, parameters in _PARAMETERS.items():
        channels[channel_name]["parameters"] = parameters
    for channel_name, headers in _HEADERS.items():
        _message(doc, channel_name)["headers"] = headers
    for channel_name, examples in EXAMPLES.items():
        _message(doc, channel_name)["examples"] = examples
    doc["servers"] = _SERVERS
    for channel in channels.values():
        if "servers" in channel:  # FastStream names its one server; every channel is on both
            channel["servers"] = [{"$ref": f"#/servers/{name}"} for name in _SERVERS]
    for message in doc["components"]["messages"].values():
        # FastStream's own correlation header: billing neither sets nor reads it.
        message.pop("correlationId", None)
    schemas: dict[str, Any] = doc["components"]["schemas"]
    for cls in get_args(get_args(Event)[0]):
        schema = schemas[cls.__name__]
        if "type" not in schema["required"]:
            schema["required"].insert(schema["required"].index("time"), "type")
    components: dict[str, Any] = doc["components"]
    for section in ("messages", "schemas"):
        components[section] = dict(sorted(components[section].items()))
    # The contract's order (docs/events.md), each reply after its ask.
    doc["channels"] = {name: channels[name] for name in _ORDER if name in channels} | channels
    doc["operations"] = {name: operations[name] for name in _ORDER if name in operations} | operations
    return doc


app = FastStream(
    broker,
    specification=BillingAsyncAPI(
        title=TITLE,
        version=VERSION,
        description=(
            "NATS subjects of the GPU cloud's billing service: usage facts in, admission questions "
            "(request-reply), stop commands, notices, settlements and dead letters out. Money is "
            "always an integer of micro-USD (fields named ...Micros). Generated from devtools/asyncapi.py "
            "(python -m devtools.asyncapi); the contract is docs/events.md."
        ),
    ),
)


def asyncapi_document() -> dict[str, Any]:
    result: dict[str, Any] = app.schema.to_specification().to_jsonable()
    return result


def render(document: dict[str, Any]) -> str:
    return generated_docs.render(document, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    return generated_docs.write_or_check(
        argv, DEFAULT_PATH, lambda: render(asyncapi_document()), "python -m devtools.asyncapi"
    )


if __name__ == "__main__":
    raise SystemExit(main())
