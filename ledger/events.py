"""The events in (DESIGN section 3): CloudEvents 1.0 in structured JSON mode, and their parser.

Every message of ``billing.in.>`` goes through :func:`parse_event`, which turns *any* bytes into
either a typed event or a typed :class:`Rejection` (whose reason names the dead-letter subject
``billing.dlq.<reason>``). It never raises on bad input: bad input must never block the stream.

The models are strict (``"12"`` is not an int, ``true`` is not an int, a float is never an int),
frozen (an event is a fact) and bounded (every number has a documented range, every string a
maximum length), so the deciders downstream never see a value they were not written for.

Speed matters (the intake parses tens of thousands of events per second): the happy path is one
``EVENT_ADAPTER.validate_json`` call in pydantic-core plus a clock comparison. Only a failure pays
for the slower work of classifying it and writing a message a person can act on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails, PydanticCustomError

from ledger.invariants import InvariantViolation, fail, require
from ledger.text import printable

# --- Bounds -------------------------------------------------------------------------------------
# Each bound is far above anything real, and far below anything that would overflow a BIGINT once
# multiplied out (uptime x price, compute time x price): a value past it is a producer's bug, and is
# dead-lettered as ``out_of_range`` instead of being charged.

MAX_EVENT_BYTES: Final = 65_536
"""Largest message accepted; real events are a few hundred bytes."""

MAX_FUTURE_SKEW: Final = timedelta(minutes=5)
"""How far ``time`` may be ahead of the service clock before the event is refused (clock skew)."""


RESERVED_SOURCES: Final = frozenset({"stripe"})
"""Sources of the facts the service itself writes into the log from HTTP (Stripe's webhooks and
``POST /wallet/confirm``: ``consumers.stripe.facts``). Refused on ``billing.in`` as
``reserved_source``: a producer must never take the identity (source, id) of a payment, or the real
payment arriving later would be a duplicate and never credited (issue 13)."""

MAX_GPU_COUNT: Final = 256
"""GPUs of one rental: 1..256 (a large cluster; a pod has at most 8 or 10)."""

MAX_PRICE_PER_HOUR_MICROS: Final = 10_000_000_000
"""Price of one rental per hour: 0..$10,000/h (a 256-GPU cluster of the dearest GPU is ~$2,000/h)."""

MAX_UPTIME_SECONDS: Final = 315_360_000
"""Cumulative billable seconds of one rental: 0..10 years."""

MAX_COMPUTE_MS: Final = 86_400_000
"""Compute time of one serverless job: 0..24 hours."""

MAX_PRICE_PER_SECOND_MICROS: Final = 10_000_000
"""Serverless price per second: 0..$10/s."""

MAX_ADJUSTMENT_MICROS: Final = 1_000_000_000_000
"""Largest finance adjustment either way: $1,000,000. Zero is refused (it would be no entry)."""

MAX_TEXT_CHARS: Final = 200
"""``reason`` and ``operator`` of a wallet adjustment."""

MAX_ATTRIBUTE_CHARS: Final = 256
"""CloudEvents ``id``, ``source``, ``subject``, ``dataschema``."""

MAX_DETAIL_CHARS: Final = 1000
"""A rejection's detail; it is stored and shown to people, so it is bounded too."""

_ONE_SECOND: Final = timedelta(seconds=1)  # timedelta // timedelta is an int: no float in details

# How many validation errors a detail lists; more only hide the first, which is usually the cause.
MAX_DETAIL_ERRORS: Final = 5
# How much of an offending value a detail quotes.
MAX_QUOTED_CHARS: Final = 80

ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"

# Control characters (C0, DEL, C1) would corrupt logs, NATS headers and CSV reports.
_NO_CONTROL: Final = r"[^\x00-\x1f\x7f-\x9f]"
_ATTRIBUTE_PATTERN: Final = rf"^{_NO_CONTROL}{{1,{MAX_ATTRIBUTE_CHARS}}}$"
# Free text must say something: at least one character that is not whitespace.
_TEXT_PATTERN: Final = rf"^{_NO_CONTROL}*[^\s\x00-\x1f\x7f-\x9f]{_NO_CONTROL}*$"
# GPU types group revenue reports, so " A100" and "A100" must not both exist: printable ASCII,
# no leading or trailing space.
_GPU_TYPE_PATTERN: Final = r"^[!-~](?:[ -~]{0,62}[!-~])?$"

# Python copies of the patterns, for the best-effort extraction of ids from input that failed.
_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ATTRIBUTE_RE: Final = re.compile(rf"{_NO_CONTROL}{{1,{MAX_ATTRIBUTE_CHARS}}}")
# CloudEvents extension attribute names are lowercase ASCII letters and digits; the spec suggests at
# most 20 characters. Anything else (data_base64, a camelCase typo) is refused, not guessed at.
_EXTENSION_NAME_RE: Final = re.compile(r"[a-z0-9]{1,20}")


def _to_utc(value: datetime) -> datetime:
    """Normalise every instant to UTC, so equal instants are equal values everywhere downstream."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # "0001-01-01T00:00:00+05:00" is before year 1 in UTC.
        raise PydanticCustomError(
            "datetime_out_of_range", "must be a time between years 1 and 9999 once converted to UTC"
        ) from None


def _nonzero(value: int) -> int:
    if value == 0:
        # "out_of_range" error type: a zero adjustment is a number outside its range (|amount| >= 1).
        raise PydanticCustomError("out_of_range", "must not be 0 (an adjustment of nothing is no entry)")
    return value


Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
GpuType = Annotated[str, StringConstraints(pattern=_GPU_TYPE_PATTERN)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS, pattern=_TEXT_PATTERN)]
AttributeText = Annotated[str, StringConstraints(pattern=_ATTRIBUTE_PATTERN)]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]

GpuCount = Annotated[int, Field(ge=1, le=MAX_GPU_COUNT)]
PricePerHourMicros = Annotated[int, Field(ge=0, le=MAX_PRICE_PER_HOUR_MICROS)]
UptimeSeconds = Annotated[int, Field(ge=0, le=MAX_UPTIME_SECONDS)]
ComputeMs = Annotated[int, Field(ge=0, le=MAX_COMPUTE_MS)]
PricePerSecondMicros = Annotated[int, Field(ge=0, le=MAX_PRICE_PER_SECOND_MICROS)]
AdjustmentMicros = Annotated[int, Field(ge=-MAX_ADJUSTMENT_MICROS, le=MAX_ADJUSTMENT_MICROS), AfterValidator(_nonzero)]

ResourceKind = Literal["pod", "marketplace", "cluster"]
Tier = Literal["on_demand", "spot"]
EndReason = Literal["stopped", "destroyed", "auto_stopped", "failed"]
JobStatus = Literal["completed", "failed", "cancelled"]


# --- Data -----------------------------------------------------------------------------------------


class _EventData(BaseModel):
    """Fields are snake_case in Python and camelCase on the wire (``wallet_id`` <-> ``walletId``)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,  # Python code may build data by field name; the parser reads aliases only.
        extra="forbid",  # an unknown field is a producer's typo, not something to drop silently
        frozen=True,
        strict=True,
    )

    wallet_id: Id

    def _resource_ref(self) -> str | None:
        """The resource this event bills, if any (overridden per type)."""
        return None


class _RentalData(_EventData):
    resource_id: Id

    def _resource_ref(self) -> str | None:
        return self.resource_id


class RentalStarted(_RentalData):
    resource_kind: ResourceKind
    gpu_type: GpuType
    gpu_count: GpuCount
    tier: Tier
    price_per_hour_micros: PricePerHourMicros
    admission_id: Id | None = None


class RentalMetered(_RentalData):
    uptime_seconds_total: UptimeSeconds


class RentalPaused(_RentalData):
    uptime_seconds_total: UptimeSeconds


class RentalResumed(_RentalData):
    admission_id: Id | None = None


class RentalEnded(_RentalData):
    uptime_seconds_total: UptimeSeconds
    reason: EndReason


class SpotPreempted(_RentalData):
    noticed_at: UtcDatetime
    terminated_at: UtcDatetime
    uptime_seconds_total: UptimeSeconds

    @model_validator(mode="after")
    def _terminated_after_notice(self) -> Self:
        if self.terminated_at < self.noticed_at:
            raise PydanticCustomError(
                "terminated_before_noticed",
                "terminatedAt {terminated_at} is before noticedAt {noticed_at}",
                {"terminated_at": self.terminated_at.isoformat(), "noticed_at": self.noticed_at.isoformat()},
            )
        return self


class ServerlessJobCompleted(_EventData):
    endpoint_id: Id
    job_id: Id
    gpu_type: GpuType
    compute_ms: ComputeMs
    price_per_second_micros: PricePerSecondMicros
    status: JobStatus

    def _resource_ref(self) -> str | None:
        return self.endpoint_id


class WalletAdjusted(_EventData):
    amount_micros: AdjustmentMicros
    reason: Text
    operator: Text


# --- Envelopes ------------------------------------------------------------------------------------


class _Envelope(BaseModel):
    """The CloudEvents 1.0 context attributes that every event carries."""

    # extra="allow" only to validate extension attributes (then dropped): see _check_extensions.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    specversion: Literal["1.0"]
    id: AttributeText
    source: AttributeText
    type: AttributeText
    time: UtcDatetime
    datacontenttype: Literal["application/json"] | None = None
    subject: AttributeText | None = None
    dataschema: AttributeText | None = None

    @model_validator(mode="after")
    def _check_extensions(self) -> Self:
        """Extension attributes (e.g. ``traceparent``) are allowed if well-formed, then ignored.

        They are dropped rather than kept so that two deliveries of one event that differ only in
        tracing metadata are equal values; the raw message is stored as received anyway.
        """
        extensions = self.__pydantic_extra__
        if not extensions:
            return self
        for name, value in extensions.items():
            if _EXTENSION_NAME_RE.fullmatch(name) is None:
                raise PydanticCustomError(
                    "extension_name",
                    "unknown attribute {name}: extension attribute names are 1 to 20 lowercase ASCII letters or digits",
                    {"name": _quote(name)},
                )
            # type() not isinstance(): a float is not allowed, and neither is an int subclass.
            if type(value) not in (str, int, bool):
                raise PydanticCustomError(
                    "extension_value",
                    "extension attribute {name} must be a string, an integer or a boolean, got {value}",
                    {"name": _quote(name), "value": _quote(value)},
                )
        extensions.clear()
        return self


class _AnyEnvelope(_Envelope):
    """Any event's envelope, whatever its type: used only to classify a failed parse."""

    data: object = None


class _TypedEnvelope(_Envelope):
    data: _EventData  # narrowed by each event class

    @property
    def key(self) -> tuple[str, str]:
        """The event's identity: the same (source, id) twice is one event (DESIGN section 3)."""
        return (self.source, self.id)

    @property
    def wallet_id(self) -> str:
        return self.data.wallet_id

    @property
    def resource_id(self) -> str | None:
        """The rental's resourceId, a serverless job's endpointId, or None (wallet adjustments)."""
        return self.data._resource_ref()


# ``type`` has a default so Python code can build events without repeating it; on the wire it is
# required all the same, because the discriminated union needs it to pick the class.
class RentalStartedEvent(_TypedEnvelope):
    type: Literal["gpu.rental.started"] = "gpu.rental.started"
    data: RentalStarted


class RentalMeteredEvent(_TypedEnvelope):
    type: Literal["gpu.rental.metered"] = "gpu.rental.metered"
    data: RentalMetered


class RentalPausedEvent(_TypedEnvelope):
    type: Literal["gpu.rental.paused"] = "gpu.rental.paused"
    data: RentalPaused


class RentalResumedEvent(_TypedEnvelope):
    type: Literal["gpu.rental.resumed"] = "gpu.rental.resumed"
    data: RentalResumed


class RentalEndedEvent(_TypedEnvelope):
    type: Literal["gpu.rental.ended"] = "gpu.rental.ended"
    data: RentalEnded


class SpotPreemptedEvent(_TypedEnvelope):
    type: Literal["gpu.spot.preempted"] = "gpu.spot.preempted"
    data: SpotPreempted


class ServerlessJobCompletedEvent(_TypedEnvelope):
    type: Literal["serverless.job.completed"] = "serverless.job.completed"
    data: ServerlessJobCompleted


class WalletAdjustedEvent(_TypedEnvelope):
    type: Literal["wallet.adjusted"] = "wallet.adjusted"
    data: WalletAdjusted


# --- Stripe facts -------------------------------------------------------------------------------
# Money Stripe moved arrives by HTTP (webhook or confirm), never on billing.in: these types are in
# the log (so a rebuild sees them) but parse_event refuses them on the NATS subject (unknown_type).
# Their identity is Stripe's own: source "stripe" and the PaymentIntent, refund or dispute id, so
# the same PaymentIntent credits once whether it comes by webhook, by confirm, or both.

STRIPE_SOURCE: Final = "stripe"
STRIPE_ID_PATTERN: Final = r"^[A-Za-z0-9_]{1,255}$"
MAX_STRIPE_AMOUNT_MICROS: Final = 1_000_000_000_000
"""$1,000,000: far above the largest top-up; Stripe's own cap on one charge is below it."""

StripeId = Annotated[str, StringConstraints(pattern=STRIPE_ID_PATTERN)]
StripeMicros = Annotated[int, Field(ge=1, le=MAX_STRIPE_AMOUNT_MICROS)]


MAX_STRIPE_CREATED: Final = 2**63 - 1


class _StripeData(_EventData):
    stripe_created: Annotated[int, Field(ge=-MAX_STRIPE_CREATED, le=MAX_STRIPE_CREATED)] | None = None
    """Set only when Stripe's ``created`` (unix seconds, as Stripe sent it) was more than the webhook
    tolerance away from the service clock: the fact is then booked at its receipt (``time``), not
    when Stripe says, and finance sees it flagged (projections.anomalies). Absent otherwise, so the
    facts written before this field serialize byte for byte as they did."""


class StripePaymentSucceeded(_StripeData):
    payment_intent_id: StripeId
    amount_micros: StripeMicros
    via: Literal["webhook", "confirm"]


class StripeRefundSucceeded(_StripeData):
    payment_intent_id: StripeId
    refund_id: StripeId
    amount_micros: StripeMicros


class StripeDisputeOpened(_StripeData):
    payment_intent_id: StripeId
    dispute_id: StripeId
    amount_micros: StripeMicros


class StripeDisputeClosed(_StripeData):
    payment_intent_id: StripeId
    dispute_id: StripeId
    amount_micros: StripeMicros
    won: bool


class StripePaymentSucceededEvent(_TypedEnvelope):
    type: Literal["stripe.payment.succeeded"] = "stripe.payment.succeeded"
    data: StripePaymentSucceeded


class StripeRefundSucceededEvent(_TypedEnvelope):
    type: Literal["stripe.refund.succeeded"] = "stripe.refund.succeeded"
    data: StripeRefundSucceeded


class StripeDisputeOpenedEvent(_TypedEnvelope):
    type: Literal["stripe.dispute.opened"] = "stripe.dispute.opened"
    data: StripeDisputeOpened


class StripeDisputeClosedEvent(_TypedEnvelope):
    type: Literal["stripe.dispute.closed"] = "stripe.dispute.closed"
    data: StripeDisputeClosed


StripeFact = (
    StripePaymentSucceededEvent | StripeRefundSucceededEvent | StripeDisputeOpenedEvent | StripeDisputeClosedEvent
)


Event = Annotated[
    RentalStartedEvent
    | RentalMeteredEvent
    | RentalPausedEvent
    | RentalResumedEvent
    | RentalEndedEvent
    | SpotPreemptedEvent
    | ServerlessJobCompletedEvent
    | WalletAdjustedEvent,
    Field(discriminator="type"),
]

EVENT_ADAPTER: Final[TypeAdapter[Event]] = TypeAdapter(Event)

# Everything the log holds: the events of billing.in and the Stripe facts of the HTTP intake.
LogEvent = Annotated[
    RentalStartedEvent
    | RentalMeteredEvent
    | RentalPausedEvent
    | RentalResumedEvent
    | RentalEndedEvent
    | SpotPreemptedEvent
    | ServerlessJobCompletedEvent
    | WalletAdjustedEvent
    | StripePaymentSucceededEvent
    | StripeRefundSucceededEvent
    | StripeDisputeOpenedEvent
    | StripeDisputeClosedEvent,
    Field(discriminator="type"),
]
LOG_EVENT_ADAPTER: Final[TypeAdapter[LogEvent]] = TypeAdapter(LogEvent)
_ANY_ENVELOPE_ADAPTER: Final = TypeAdapter(_AnyEnvelope)

EVENT_CLASSES: Final[tuple[type[_TypedEnvelope], ...]] = (
    RentalStartedEvent,
    RentalMeteredEvent,
    RentalPausedEvent,
    RentalResumedEvent,
    RentalEndedEvent,
    SpotPreemptedEvent,
    ServerlessJobCompletedEvent,
    WalletAdjustedEvent,
)
EVENT_TYPES: Final[frozenset[str]] = frozenset(
    str(get_args(cls.model_fields["type"].annotation)[0]) for cls in EVENT_CLASSES
)
require(len(EVENT_TYPES) == len(EVENT_CLASSES), "two event classes share a type")


# --- Rejections -----------------------------------------------------------------------------------


class RejectReason(StrEnum):
    """Why an input was refused. Values are NATS subject tokens: ``billing.dlq.<reason>``."""

    # Decided by parse_event:
    invalid_json = "invalid_json"
    invalid_envelope = "invalid_envelope"
    unknown_type = "unknown_type"
    invalid_data = "invalid_data"
    out_of_range = "out_of_range"
    future_time = "future_time"
    too_large = "too_large"
    reserved_source = "reserved_source"
    too_old = "too_old"
    # Decided by the intake and the deciders, which know the subject and the state:
    subject_mismatch = "subject_mismatch"
    not_started = "not_started"
    reading_after_settlement = "reading_after_settlement"
    already_started = "already_started"
    invalid_transition = "invalid_transition"
    wallet_mismatch = "wallet_mismatch"
    # Decided by the intake, not a refusal: the processor failed on every delivery of the message (a
    # bug). Dead-lettered (DLQ stream only); rejected_inputs does not keep it, since nothing refused it.
    processing_error = "processing_error"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A refused input: why, in words a person can act on, and what could be read of its identity.

    ``source``, ``event_id``, ``event_type`` and ``wallet_id`` are extracted best-effort from the
    raw input, and only when they are sane (well-formed, bounded); otherwise they are None.
    """

    reason: RejectReason
    detail: str
    source: str | None = None
    event_id: str | None = None
    event_type: str | None = None
    wallet_id: str | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.reason, RejectReason), f"bad reject reason {self.reason!r}")
        require(0 < len(self.detail) <= MAX_DETAIL_CHARS, f"detail of {len(self.detail)} chars")


# --- Parser ---------------------------------------------------------------------------------------

# pydantic error types that mean "a number outside its documented range".
_OUT_OF_RANGE_ERRORS: Final = frozenset(
    {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "out_of_range"}
)
# error type -> (symbol, key of the bound in the error's ctx)
_BOUNDS: Final = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}
_JSON_KINDS: Final[dict[type, str]] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    type(None): "null",
}


def parse_event(raw: bytes, *, now: datetime, max_age: timedelta | None = None) -> Event | Rejection:
    """Parse one message of ``billing.in.>`` into a typed event, or say why not.

    Never raises on any input. Checks, in order: size (``too_large``), JSON (``invalid_json``),
    the CloudEvents envelope (``invalid_envelope``), the type (``unknown_type``), the data
    (``out_of_range`` for numbers outside their bounds, else ``invalid_data``), the source
    (``reserved_source``: :data:`RESERVED_SOURCES`), and finally that ``time`` is at most
    :data:`MAX_FUTURE_SKEW` after ``now`` (``future_time``) and, when ``max_age`` is given (the
    intake gives ``BILLING_EVENT_MAX_AGE_S``), at most ``max_age`` before it (``too_old``).
    """
    # A naive `now` or non-bytes input is the caller's bug, not bad input: raise.
    require(isinstance(raw, bytes | bytearray), f"raw must be bytes, got {type(raw).__name__}")
    require(now.utcoffset() is not None, "now must be timezone-aware")
    try:
        event = _parse(bytes(raw), now)
        if max_age is None or isinstance(event, Rejection):
            return event
        return _too_old(event, now, max_age) or event
    except InvariantViolation:
        raise
    except Exception as error:
        # Defence in depth: whatever escaped the classification (a pydantic bug, MemoryError...)
        # still becomes a dead letter instead of a stuck stream.
        try:
            message = str(error)
        except Exception:  # str() itself may fail, e.g. on an int of more than 4300 digits
            message = "(no message)"
        detail = f"could not be parsed: {type(error).__name__}: {message}"
        return _reject(RejectReason.invalid_envelope, detail)


def is_reserved_source(source: str) -> bool:
    """Whether ``source`` is, or looks like (any case, a path under it), a source the service
    reserves for itself (:data:`RESERVED_SOURCES`): ``stripe``, ``Stripe``, ``stripe/webhook``."""
    head = source.strip().casefold()
    for separator in "/:.#":
        head = head.split(separator, 1)[0]
    return head.strip() in RESERVED_SOURCES


def _too_old(event: Event, now: datetime, max_age: timedelta) -> Rejection | None:
    behind = now - event.time
    if behind <= max_age:
        return None
    return _reject(
        RejectReason.too_old,
        f"time {event.time.isoformat()} is {behind // _ONE_SECOND} s before the service clock "
        f"({now.astimezone(UTC).isoformat()}); at most {max_age // _ONE_SECOND} s "
        "(BILLING_EVENT_MAX_AGE_S) is allowed: check the producer's clock, or backfill on purpose "
        "with `billing dlq replay --accept-old`",
        source=event.source,
        event_id=event.id,
        event_type=event.type,
        wallet_id=event.wallet_id,
    )


def _parse(raw: bytes, now: datetime) -> Event | Rejection:
    if len(raw) > MAX_EVENT_BYTES:
        return _reject(
            RejectReason.too_large,
            f"event is {len(raw)} bytes, more than the limit of {MAX_EVENT_BYTES} bytes",
        )
    try:
        # by_name=False: the wire format is camelCase only; snake_case keys are unknown fields.
        event = EVENT_ADAPTER.validate_json(raw, by_name=False)
    except ValidationError as error:
        return _classify_failure(raw, error)
    identity = {"source": event.source, "event_id": event.id, "event_type": event.type, "wallet_id": event.wallet_id}
    if is_reserved_source(event.source):
        return _reject(
            RejectReason.reserved_source,
            f"source {_quote(event.source)} is reserved: the service writes the facts of that source "
            "itself (Stripe payments, refunds and disputes arrive by HTTP); a producer's events need a "
            "source of its own, such as compute/<host>",
            **identity,
        )
    ahead = event.time - now
    if ahead > MAX_FUTURE_SKEW:
        return _reject(
            RejectReason.future_time,
            f"time {event.time.isoformat()} is {ahead // _ONE_SECOND} s after the service clock "
            f"({now.astimezone(UTC).isoformat()}); at most {MAX_FUTURE_SKEW // _ONE_SECOND} s "
            "is allowed: check the producer's clock",
            **identity,
        )
    return event


def _classify_failure(raw: bytes, error: ValidationError) -> Rejection:
    """The slow path: find which check failed first, and describe it for a person."""
    errors = error.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return _reject(RejectReason.invalid_json, _describe_json_failure(raw, errors))

    document = _load_best_effort(raw)
    context = _context_of(document)
    try:
        envelope = _ANY_ENVELOPE_ADAPTER.validate_json(raw, by_name=False)
    except ValidationError as envelope_error:
        envelope_errors = envelope_error.errors(include_url=False)
        not_an_object = envelope_errors[0]["loc"] == () and envelope_errors[0]["type"] == "model_type"
        if not_an_object:
            detail = f"event must be a JSON object (a CloudEvent), got {_json_kind(document)}"
        else:
            detail = _describe_errors(envelope_errors, skip=0)
        return _reject(RejectReason.invalid_envelope, detail, **context)

    if envelope.type not in EVENT_TYPES:
        known = ", ".join(sorted(EVENT_TYPES))
        detail = f"unknown event type {_quote(envelope.type)}; known types: {known}"
        return _reject(RejectReason.unknown_type, detail, **context)

    # The envelope is fine and the type is known, so the errors are about data. Locations start
    # with the union tag (the type), which the detail leaves out.
    typed_errors = [e for e in errors if len(e["loc"]) >= 2 and e["loc"][0] == envelope.type]
    if not typed_errors or any(e["loc"][1] != "data" for e in typed_errors):
        # Not expected (the envelope passed on its own), but if it happens it is the envelope's fault.
        return _reject(RejectReason.invalid_envelope, _describe_errors(errors, skip=0), **context)
    reason = (
        RejectReason.out_of_range
        if any(e["type"] in _OUT_OF_RANGE_ERRORS for e in typed_errors)
        else RejectReason.invalid_data
    )
    return _reject(reason, _describe_errors(typed_errors, skip=1), **context)


def _describe_json_failure(raw: bytes, errors: list[ErrorDetails]) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as decode_error:
        return f"event is not UTF-8 text: {decode_error.reason} at byte {decode_error.start}"
    if not raw.strip():
        return "event is empty; expected a CloudEvent as a JSON object"
    message = next(e["msg"] for e in errors if e["type"] == "json_invalid")
    return f"event is not valid JSON: {message.removeprefix('Invalid JSON: ')}"


def _describe_errors(errors: list[ErrorDetails], *, skip: int) -> str:
    """``data.uptimeSecondsTotal: must be >= 0, got -5; ...`` — the first few errors, bounded."""
    parts = []
    for e in errors[:MAX_DETAIL_ERRORS]:
        where = ".".join(str(part) for part in e["loc"][skip:]) or "event"
        parts.append(f"{where}: {_describe_error(e)}")
    if len(errors) > MAX_DETAIL_ERRORS:
        parts.append(f"and {len(errors) - MAX_DETAIL_ERRORS} more errors")
    return "; ".join(parts)


def _describe_error(e: ErrorDetails) -> str:
    error_type = e["type"]
    ctx: dict[str, Any] = dict(e.get("ctx") or {})
    if error_type == "missing":
        return "required field is missing"
    if error_type == "extra_forbidden":
        return "unknown field (field names are camelCase, as in docs/events.md)"
    if error_type in _BOUNDS:
        symbol, key = _BOUNDS[error_type]
        return f"must be {symbol} {ctx.get(key)}, got {_quote(e['input'])}"
    if error_type == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}, got {_quote(e['input'])}"
    if error_type in ("timezone_aware", "datetime_type", "datetime_parsing", "datetime_from_date_parsing"):
        return f"must be an RFC 3339 time with a timezone, such as 2026-11-28T10:00:00Z, got {_quote(e['input'])}"
    if error_type in ("int_type", "int_parsing"):
        return f"must be an integer (a JSON number, not a string, boolean or fraction), got {_quote(e['input'])}"
    message = e["msg"]
    if message.startswith("Input should "):
        message = "must " + message.removeprefix("Input should ")
    if error_type in ("model_type", "dict_type", "model_attributes_type"):
        return f"{message}, got {_json_kind(e['input'])}"
    if error_type.startswith(("extension_", "terminated_", "out_of_range", "datetime_out")):
        return message  # our own messages say everything already
    return f"{message}, got {_quote(e['input'])}"


def _quote(value: object) -> str:
    """A short, printable rendering of an offending value (JSON-like, so ``"12"`` shows its quotes)."""
    try:
        text = json.dumps(value, ensure_ascii=True, default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    if len(text) > MAX_QUOTED_CHARS:
        text = text[: MAX_QUOTED_CHARS - 3] + "..."
    return text


def _json_kind(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _load_best_effort(raw: bytes) -> object:
    """The JSON document, for extracting ids into a rejection; None if it cannot be read."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _context_of(document: object) -> dict[str, str | None]:
    """Best-effort identity of a refused event: each value only if present and well-formed."""
    if not isinstance(document, dict):
        return {}
    data = document.get("data")
    wallet_id = data.get("walletId") if isinstance(data, dict) else None
    return {
        "source": _sane(document.get("source"), _ATTRIBUTE_RE),
        "event_id": _sane(document.get("id"), _ATTRIBUTE_RE),
        "event_type": _sane(document.get("type"), _ATTRIBUTE_RE),
        "wallet_id": _sane(wallet_id, _ID_RE),
    }


def _sane(value: object, pattern: re.Pattern[str]) -> str | None:
    if isinstance(value, str) and pattern.fullmatch(value) is not None:
        return value
    return None


def _reject(
    reason: RejectReason,
    detail: str,
    *,
    source: str | None = None,
    event_id: str | None = None,
    event_type: str | None = None,
    wallet_id: str | None = None,
) -> Rejection:
    # Printable: a field name may hold NUL or control characters, and the detail is stored as text,
    # sent in a NATS header and shown on terminals (ledger.text).
    detail = printable(detail, reversible=False)
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
    return Rejection(
        reason=reason,
        detail=detail or reason.value,
        source=source,
        event_id=event_id,
        event_type=event_type,
        wallet_id=wallet_id,
    )


# The classes of LogEvent (the members of its union), for event_to_json.
_LOG_EVENT_CLASSES: Final[frozenset[type]] = frozenset(get_args(get_args(LogEvent)[0]))


def event_to_json(event: LogEvent) -> bytes:
    """The event as CloudEvents structured JSON (camelCase data); ``parse_event`` reads it back equal
    (``parse_log_event`` for the Stripe facts, which billing.in does not accept).

    By the event class's own serializer: the same bytes as the union's adapter (checked in
    tests/unit/test_events.py), in half the time (once per accepted event; see bench/README.md)."""
    cls = type(event)
    if cls not in _LOG_EVENT_CLASSES:
        fail(f"not an event of the log: {cls.__name__}")
    return cls.__pydantic_serializer__.to_json(event, by_alias=True, exclude_none=True)


def parse_log_event(raw: bytes | str) -> LogEvent:
    """An event as the log stored it (any type, Stripe facts included). Raises on bad input: what
    is in the log was validated on the way in, so a failure here is a bug or a tampered log."""
    return LOG_EVENT_ADAPTER.validate_json(raw, by_name=False)
