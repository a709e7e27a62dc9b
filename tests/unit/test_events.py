"""The CloudEvents models and parser of DESIGN section 3."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

import ledger.events as events_module
from ledger.events import (
    EVENT_ADAPTER,
    EVENT_TYPES,
    LOG_EVENT_ADAPTER,
    MAX_ADJUSTMENT_MICROS,
    MAX_COMPUTE_MS,
    MAX_DETAIL_CHARS,
    MAX_EVENT_BYTES,
    MAX_GPU_COUNT,
    MAX_PRICE_PER_HOUR_MICROS,
    MAX_PRICE_PER_SECOND_MICROS,
    MAX_UPTIME_SECONDS,
    Rejection,
    RejectReason,
    RentalEnded,
    RentalEndedEvent,
    RentalMetered,
    RentalMeteredEvent,
    RentalPausedEvent,
    RentalResumedEvent,
    RentalStarted,
    RentalStartedEvent,
    ServerlessJobCompletedEvent,
    SpotPreemptedEvent,
    WalletAdjustedEvent,
    event_to_json,
    parse_event,
)
from ledger.invariants import InvariantViolation

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 28, 10, 0, 5, tzinfo=UTC)

DESIGN_EXAMPLE = b"""{"specversion": "1.0", "id": "host7-pod42-000118", "source": "compute/host7",
 "type": "gpu.rental.metered", "time": "2026-11-28T10:00:00Z",
 "data": {"walletId": "w_acme", "resourceId": "pod42", "uptimeSecondsTotal": 7080}}"""

VALID_DATA: dict[str, dict[str, Any]] = {
    "gpu.rental.started": {
        "walletId": "w_acme",
        "resourceId": "pod42",
        "resourceKind": "pod",
        "gpuType": "NVIDIA A100 80GB",
        "gpuCount": 2,
        "tier": "on_demand",
        "pricePerHourMicros": 3_580_000,
        "admissionId": "adm-1",
    },
    "gpu.rental.metered": {"walletId": "w_acme", "resourceId": "pod42", "uptimeSecondsTotal": 7080},
    "gpu.rental.paused": {"walletId": "w_acme", "resourceId": "pod42", "uptimeSecondsTotal": 7200},
    "gpu.rental.resumed": {"walletId": "w_acme", "resourceId": "pod42"},
    "gpu.rental.ended": {
        "walletId": "w_acme",
        "resourceId": "pod42",
        "uptimeSecondsTotal": 9000,
        "reason": "destroyed",
    },
    "gpu.spot.preempted": {
        "walletId": "w_acme",
        "resourceId": "spot7",
        "noticedAt": "2026-11-28T09:55:00Z",
        "terminatedAt": "2026-11-28T10:00:00Z",
        "uptimeSecondsTotal": 4000,
    },
    "serverless.job.completed": {
        "walletId": "w_acme",
        "endpointId": "ep-llama",
        "jobId": "job_000123",
        "gpuType": "RTX 4090",
        "computeMs": 1500,
        "pricePerSecondMicros": 333,
        "status": "completed",
    },
    "wallet.adjusted": {
        "walletId": "w_acme",
        "amountMicros": -2_500_000,
        "reason": "duplicate charge on invoice 118",
        "operator": "finance:alice",
    },
}

EXPECTED_CLASS = {
    "gpu.rental.started": RentalStartedEvent,
    "gpu.rental.metered": RentalMeteredEvent,
    "gpu.rental.paused": RentalPausedEvent,
    "gpu.rental.resumed": RentalResumedEvent,
    "gpu.rental.ended": RentalEndedEvent,
    "gpu.spot.preempted": SpotPreemptedEvent,
    "serverless.job.completed": ServerlessJobCompletedEvent,
    "wallet.adjusted": WalletAdjustedEvent,
}


def envelope(event_type: str = "gpu.rental.metered", **overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "compute/host7",
        "type": event_type,
        "time": "2026-11-28T10:00:00Z",
        "data": dict(VALID_DATA.get(event_type, VALID_DATA["gpu.rental.metered"])),
    }
    document.update(overrides)
    return document


def with_data(event_type: str = "gpu.rental.metered", **data_overrides: Any) -> dict[str, Any]:
    document = envelope(event_type)
    document["data"].update(data_overrides)
    return document


def parse(document: Any) -> Any:
    return parse_event(json.dumps(document).encode(), now=NOW)


def rejected(document: Any, reason: RejectReason) -> Rejection:
    result = parse(document) if not isinstance(document, bytes) else parse_event(document, now=NOW)
    assert isinstance(result, Rejection), result
    assert result.reason is reason, result
    assert 0 < len(result.detail) <= MAX_DETAIL_CHARS
    return result


# --- Happy path -----------------------------------------------------------------------------------


def test_design_example_parses() -> None:
    event = parse_event(DESIGN_EXAMPLE, now=NOW)
    assert isinstance(event, RentalMeteredEvent)
    assert event.data == RentalMetered(wallet_id="w_acme", resource_id="pod42", uptime_seconds_total=7080)
    assert event.key == ("compute/host7", "host7-pod42-000118")
    assert event.wallet_id == "w_acme"
    assert event.resource_id == "pod42"
    assert event.time == datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert event.time.utcoffset() == timedelta(0)


@pytest.mark.parametrize("event_type", sorted(VALID_DATA))
def test_every_type_parses_and_round_trips(event_type: str) -> None:
    event = parse(envelope(event_type))
    assert isinstance(event, EXPECTED_CLASS[event_type])
    assert event.type == event_type
    assert event.wallet_id == "w_acme"
    assert parse_event(event_to_json(event), now=NOW) == event
    # camelCase on the wire, exactly the data given (nothing added but what was there).
    assert json.loads(event_to_json(event))["data"] == VALID_DATA[event_type]


def test_event_types_are_the_design_types() -> None:
    assert set(VALID_DATA) == EVENT_TYPES
    assert len(EVENT_TYPES) == 8


@pytest.mark.parametrize(
    ("event_type", "resource_id"),
    [
        ("gpu.rental.started", "pod42"),
        ("gpu.spot.preempted", "spot7"),
        ("serverless.job.completed", "ep-llama"),
        ("wallet.adjusted", None),
    ],
)
def test_resource_id_property(event_type: str, resource_id: str | None) -> None:
    event = parse(envelope(event_type))
    assert not isinstance(event, Rejection)
    assert event.resource_id == resource_id


def test_optional_fields() -> None:
    document = with_data("gpu.rental.started")
    del document["data"]["admissionId"]
    event = parse(document)
    assert isinstance(event, RentalStartedEvent)
    assert event.data.admission_id is None
    assert "admissionId" not in json.loads(event_to_json(event))["data"]
    event = parse(envelope(datacontenttype="application/json", subject="pod42", dataschema="urn:billing:v1"))
    assert isinstance(event, RentalMeteredEvent)
    assert event.subject == "pod42"


def test_times_are_normalised_to_utc() -> None:
    event = parse(envelope(time="2026-11-28T12:00:00+02:00"))
    assert isinstance(event, RentalMeteredEvent)
    assert event.time == datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert event.time.tzinfo is UTC
    spot = parse(with_data("gpu.spot.preempted", noticedAt="2026-11-28T04:55:00-05:00"))
    assert isinstance(spot, SpotPreemptedEvent)
    assert spot.data.noticed_at == datetime(2026, 11, 28, 9, 55, tzinfo=UTC)
    assert spot.data.noticed_at.tzinfo is UTC


def test_time_within_allowed_skew_is_accepted() -> None:
    assert isinstance(parse(envelope(time="2026-11-28T10:05:05Z")), RentalMeteredEvent)


def test_extension_attributes_are_allowed_and_ignored() -> None:
    event = parse(envelope(traceparent="00-abc-def-01", partition=3, replayed=True))
    assert isinstance(event, RentalMeteredEvent)
    assert event == parse(envelope())
    assert "traceparent" not in json.loads(event_to_json(event))


def test_bounds_are_inclusive() -> None:
    top = with_data("gpu.rental.started", gpuCount=MAX_GPU_COUNT, pricePerHourMicros=MAX_PRICE_PER_HOUR_MICROS)
    assert isinstance(parse(top), RentalStartedEvent)
    assert isinstance(parse(with_data(uptimeSecondsTotal=MAX_UPTIME_SECONDS)), RentalMeteredEvent)
    assert isinstance(parse(with_data(uptimeSecondsTotal=0)), RentalMeteredEvent)
    job = with_data(
        "serverless.job.completed", computeMs=MAX_COMPUTE_MS, pricePerSecondMicros=MAX_PRICE_PER_SECOND_MICROS
    )
    assert isinstance(parse(job), ServerlessJobCompletedEvent)
    for amount in (MAX_ADJUSTMENT_MICROS, -MAX_ADJUSTMENT_MICROS, 1, -1):
        assert isinstance(parse(with_data("wallet.adjusted", amountMicros=amount)), WalletAdjustedEvent)


def test_models_are_frozen() -> None:
    event = parse(envelope())
    assert isinstance(event, RentalMeteredEvent)
    with pytest.raises(ValidationError):
        event.id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        event.data.uptime_seconds_total = 1  # type: ignore[misc]


def test_python_construction_by_field_name() -> None:
    data = RentalEnded(wallet_id="w1", resource_id="r1", uptime_seconds_total=60, reason="stopped")
    event = RentalEndedEvent(specversion="1.0", id="e1", source="s", time=datetime(2026, 1, 1, tzinfo=UTC), data=data)
    assert event.type == "gpu.rental.ended"
    assert parse_event(event_to_json(event), now=NOW) == event
    assert EVENT_ADAPTER.validate_python(event) == event


# --- Rejections, one realistic input per reason --------------------------------------------------


def test_too_large() -> None:
    document = envelope(padding="x" * MAX_EVENT_BYTES)
    result = rejected(json.dumps(document).encode(), RejectReason.too_large)
    assert str(MAX_EVENT_BYTES) in result.detail


def test_exactly_max_bytes_is_not_too_large() -> None:
    raw = json.dumps(envelope()).encode()
    raw = raw[:-1] + b" " * (MAX_EVENT_BYTES - len(raw)) + b"}"
    assert len(raw) == MAX_EVENT_BYTES
    assert isinstance(parse_event(raw, now=NOW), RentalMeteredEvent)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"specversion": "1.0", "id": "e1"', "not valid JSON"),
        (b"", "empty"),
        (b"   ", "empty"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{'single': 'quotes'}", "not valid JSON"),
        (b'{"a": 1} trailing', "not valid JSON"),
    ],
)
def test_invalid_json(raw: bytes, needle: str) -> None:
    result = rejected(raw, RejectReason.invalid_json)
    assert needle in result.detail
    assert result.source is None


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ([envelope()], "must be a JSON object"),
        ("gpu.rental.metered", "must be a JSON object"),
        (42, "got a number"),
        (envelope(specversion="0.3"), "specversion"),
        ({k: v for k, v in envelope().items() if k != "id"}, "id: required field is missing"),
        ({k: v for k, v in envelope().items() if k != "type"}, "type: required field is missing"),
        ({k: v for k, v in envelope().items() if k != "time"}, "time: required field is missing"),
        (envelope(id=""), "id: must match"),
        (envelope(id="a" * 257), "id: must match"),
        (envelope(source="compute/host7\n"), "source: must match"),
        (envelope(type=5), "type: must be a valid string"),
        (envelope(time="2026-11-28T10:00:00"), "time: must be an RFC 3339 time with a timezone"),
        (envelope(time="yesterday"), "time: must be an RFC 3339 time"),
        (envelope(time=1764324000), "time: must be an RFC 3339 time"),
        (envelope(time="0001-01-01T00:00:00+05:00"), "between years 1 and 9999"),
        (envelope(datacontenttype="text/plain"), "datacontenttype"),
        (envelope(Trace="x"), 'unknown attribute "Trace"'),
        (envelope(data_base64="eA=="), 'unknown attribute "data_base64"'),
        (envelope(averyveryverylongextension1="x"), "unknown attribute"),
        (envelope(sampled=0.5), 'extension attribute "sampled" must be a string, an integer or a boolean'),
        (envelope(tags=["a"]), "must be a string, an integer or a boolean"),
    ],
)
def test_invalid_envelope(document: Any, needle: str) -> None:
    result = rejected(document, RejectReason.invalid_envelope)
    assert needle in result.detail, result.detail


def test_naive_time_is_refused() -> None:
    result = rejected(envelope(time="2026-11-28T10:00:00"), RejectReason.invalid_envelope)
    assert result.detail.startswith("time: ")


def test_bad_envelope_wins_over_unknown_type_and_bad_data() -> None:
    document = envelope("gpu.rental.exploded", time="2026-11-28T10:00:00")
    rejected(document, RejectReason.invalid_envelope)
    document = with_data(uptimeSecondsTotal=-5)
    document["specversion"] = "2.0"
    rejected(document, RejectReason.invalid_envelope)


def test_unknown_type() -> None:
    result = rejected(envelope("gpu.rental.metred"), RejectReason.unknown_type)
    assert '"gpu.rental.metred"' in result.detail
    assert "gpu.rental.metered" in result.detail  # the detail lists the known types
    assert result.event_type == "gpu.rental.metred"
    assert result.wallet_id == "w_acme"


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        (with_data(uptimeSecondsTotal=-5), "data.uptimeSecondsTotal: must be >= 0, got -5"),
        (
            with_data(uptimeSecondsTotal=MAX_UPTIME_SECONDS + 1),
            f"data.uptimeSecondsTotal: must be <= {MAX_UPTIME_SECONDS}, got {MAX_UPTIME_SECONDS + 1}",
        ),
        (with_data(uptimeSecondsTotal=10**40), "data.uptimeSecondsTotal: must be <= "),
        (with_data("gpu.rental.started", gpuCount=0), "data.gpuCount: must be >= 1, got 0"),
        (with_data("gpu.rental.started", gpuCount=1000), "data.gpuCount: must be <= 256, got 1000"),
        (with_data("gpu.rental.started", pricePerHourMicros=-1), "data.pricePerHourMicros: must be >= 0"),
        (
            with_data("gpu.rental.started", pricePerHourMicros=10**13),
            "data.pricePerHourMicros: must be <= 10000000000",
        ),
        (with_data("serverless.job.completed", computeMs=-1), "data.computeMs: must be >= 0"),
        (
            with_data("serverless.job.completed", pricePerSecondMicros=MAX_PRICE_PER_SECOND_MICROS + 1),
            "data.pricePerSecondMicros: must be <= ",
        ),
        (with_data("wallet.adjusted", amountMicros=0), "data.amountMicros: must not be 0"),
        (
            with_data("wallet.adjusted", amountMicros=-MAX_ADJUSTMENT_MICROS - 1),
            f"data.amountMicros: must be >= {-MAX_ADJUSTMENT_MICROS}",
        ),
        (with_data("gpu.spot.preempted", uptimeSecondsTotal=-30), "data.uptimeSecondsTotal: must be >= 0"),
    ],
)
def test_out_of_range(document: dict[str, Any], detail: str) -> None:
    result = rejected(document, RejectReason.out_of_range)
    assert result.detail.startswith(detail), result.detail
    assert result.wallet_id == "w_acme"
    assert result.source == "compute/host7"
    assert result.event_id == "evt-1"
    assert result.event_type == document["type"]


def _without(document: dict[str, Any], field: str) -> dict[str, Any]:
    del document["data"][field]
    return document


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        (
            with_data(uptimeSecondsTotal="12"),
            'data.uptimeSecondsTotal: must be an integer (a JSON number, not a string, boolean or fraction), got "12"',
        ),
        (with_data(uptimeSecondsTotal=True), "data.uptimeSecondsTotal: must be an integer"),
        (with_data(uptimeSecondsTotal=12.0), "data.uptimeSecondsTotal: must be an integer"),
        (with_data(uptimeSecondsTotal=12.5), "data.uptimeSecondsTotal: must be an integer"),
        (with_data(uptimeSecondsTotal=None), "data.uptimeSecondsTotal: must be an integer"),
        (_without(with_data(), "uptimeSecondsTotal"), "data.uptimeSecondsTotal: required field is missing"),
        (with_data(resourceId="pod 42"), "data.resourceId: must match ^[A-Za-z0-9_-]{1,64}$"),
        (with_data(walletId="w" * 65), "data.walletId: must match"),
        (with_data(walletId="w_acme\n"), "data.walletId: must match"),
        (with_data(uptime_seconds_total=5), "data.uptime_seconds_total: unknown field"),
        (with_data(cost=5), "data.cost: unknown field"),
        (with_data("gpu.rental.started", tier="reserved"), "data.tier: must be 'on_demand' or 'spot'"),
        (with_data("gpu.rental.started", resourceKind="vm"), "data.resourceKind: must be"),
        (with_data("gpu.rental.started", gpuType=""), "data.gpuType: must match"),
        (with_data("gpu.rental.started", gpuType=" A100"), "data.gpuType: must match"),
        (with_data("gpu.rental.started", gpuType="A" * 65), "data.gpuType: must match"),
        (with_data("gpu.rental.started", admissionId=""), "data.admissionId: must match"),
        (with_data("gpu.rental.ended", reason="exploded"), "data.reason: must be"),
        (with_data("serverless.job.completed", status="done"), "data.status: must be"),
        (with_data("wallet.adjusted", reason=""), "data.reason: must match"),
        (with_data("wallet.adjusted", operator="   "), "data.operator: must match"),
        (with_data("wallet.adjusted", reason="x" * 201), "data.reason: "),
        (with_data("gpu.spot.preempted", noticedAt="2026-11-28T09:55:00"), "data.noticedAt: must be an RFC"),
        (
            with_data("gpu.spot.preempted", terminatedAt="2026-11-28T09:00:00Z"),
            "data: terminatedAt 2026-11-28T09:00:00+00:00 is before noticedAt 2026-11-28T09:55:00+00:00",
        ),
        (envelope(data=None), "data: must be an object, got null"),
        (envelope(data=[1, 2]), "data: must be an object, got an array"),
        ({k: v for k, v in envelope().items() if k != "data"}, "data: required field is missing"),
    ],
)
def test_invalid_data(document: dict[str, Any], detail: str) -> None:
    result = rejected(document, RejectReason.invalid_data)
    assert result.detail.startswith(detail), result.detail
    assert result.source == "compute/host7"
    assert result.event_type == document["type"]


def test_strictness_string_for_int_is_refused() -> None:
    rejected(with_data("gpu.rental.started", gpuCount="12"), RejectReason.invalid_data)
    rejected(with_data("gpu.rental.started", pricePerHourMicros="3580000"), RejectReason.invalid_data)


def test_strictness_bool_for_int_is_refused() -> None:
    rejected(with_data("gpu.rental.started", gpuCount=True), RejectReason.invalid_data)
    rejected(with_data("wallet.adjusted", amountMicros=False), RejectReason.invalid_data)


def test_many_errors_are_summarised_within_bounds() -> None:
    data = {f"unknown{i}": "x" * 300 for i in range(50)}
    result = rejected(envelope(data={"walletId": "w_acme", **data}), RejectReason.invalid_data)
    assert "more errors" in result.detail
    assert len(result.detail) <= MAX_DETAIL_CHARS


def test_out_of_range_is_reported_before_other_data_problems() -> None:
    document = with_data(uptimeSecondsTotal=-5, resourceId="bad id")
    result = rejected(document, RejectReason.out_of_range)
    assert "uptimeSecondsTotal" in result.detail


def test_future_time() -> None:
    result = rejected(envelope(time="2026-11-28T10:06:00Z"), RejectReason.future_time)
    assert "355 s after the service clock" in result.detail
    assert "check the producer's clock" in result.detail
    assert result.wallet_id == "w_acme"
    assert result.event_id == "evt-1"


def test_bad_data_wins_over_future_time() -> None:
    document = with_data(uptimeSecondsTotal=-5)
    document["time"] = "2030-01-01T00:00:00Z"
    rejected(document, RejectReason.out_of_range)


def test_rejection_context_is_only_taken_when_sane() -> None:
    document = envelope("gpu.rental.metred", id="x" * 300, source="s\x00")
    document["data"]["walletId"] = "not a wallet id"
    result = rejected(document, RejectReason.invalid_envelope)
    assert result.event_id is None
    assert result.source is None
    assert result.wallet_id is None
    assert result.event_type == "gpu.rental.metred"


# --- The contract of parse_event itself -----------------------------------------------------------


def test_naive_now_is_a_bug() -> None:
    with pytest.raises(InvariantViolation):
        parse_event(DESIGN_EXAMPLE, now=datetime(2026, 11, 28))


def test_non_bytes_input_is_a_bug() -> None:
    with pytest.raises(InvariantViolation):
        parse_event(DESIGN_EXAMPLE.decode(), now=NOW)  # type: ignore[arg-type]


def test_now_in_another_timezone() -> None:
    tokyo = timezone(timedelta(hours=9))
    assert isinstance(parse_event(DESIGN_EXAMPLE, now=NOW.astimezone(tokyo)), RentalMeteredEvent)


def test_huge_numbers_and_deep_nesting_do_not_raise() -> None:
    for raw in (
        b'{"a": ' + b"9" * 5000 + b"}",
        b"[" * 5000 + b"]" * 5000,
        b'{"specversion": "1.0", "data": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
        json.dumps(with_data(uptimeSecondsTotal=1e308)).encode(),
        json.dumps(with_data(uptimeSecondsTotal=float("nan"))).encode(),
    ):
        assert isinstance(parse_event(raw, now=NOW), Rejection)


def test_an_unexpected_error_still_becomes_a_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes, now: datetime) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(events_module, "_parse", broken)
    result = parse_event(DESIGN_EXAMPLE, now=NOW)
    assert isinstance(result, Rejection)
    assert result.detail == "could not be parsed: RuntimeError: boom"


def test_an_invariant_violation_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes, now: datetime) -> None:
        raise InvariantViolation("bug")

    monkeypatch.setattr(events_module, "_parse", broken)
    with pytest.raises(InvariantViolation):
        parse_event(DESIGN_EXAMPLE, now=NOW)


def test_rejection_validates_itself() -> None:
    with pytest.raises(InvariantViolation):
        Rejection(reason=RejectReason.invalid_json, detail="")
    with pytest.raises(InvariantViolation):
        Rejection(reason=RejectReason.invalid_json, detail="x" * (MAX_DETAIL_CHARS + 1))


def test_reject_reasons_are_subject_tokens() -> None:
    assert {reason.value for reason in RejectReason} == {
        "invalid_json",
        "invalid_envelope",
        "unknown_type",
        "invalid_data",
        "out_of_range",
        "future_time",
        "too_large",
        "reserved_source",
        "too_old",
        "subject_mismatch",
        "not_started",
        "reading_after_settlement",
        "already_started",
        "invalid_transition",
        "wallet_mismatch",
        "processing_error",
    }
    for reason in RejectReason:
        assert reason.value == reason.name
        assert f"billing.dlq.{reason}" == f"billing.dlq.{reason.value}"


def test_started_data_model_direct() -> None:
    started = RentalStarted(
        wallet_id="w",
        resource_id="r",
        resource_kind="cluster",
        gpu_type="H100 SXM",
        gpu_count=16,
        tier="spot",
        price_per_hour_micros=20_000_000,
    )
    assert started.model_dump(by_alias=True)["pricePerHourMicros"] == 20_000_000
    with pytest.raises(ValidationError):
        RentalStarted.model_validate({**started.model_dump(), "gpu_count": "16"})


@pytest.mark.parametrize("event_type", sorted(VALID_DATA))
def test_event_to_json_is_the_union_adapters_json(event_type: str) -> None:
    # event_to_json serializes with the event class's own serializer, for speed: the bytes must be
    # those of the LogEvent union's adapter, the log's reference form.
    event = parse(envelope(event_type))
    assert event_to_json(event) == LOG_EVENT_ADAPTER.dump_json(event, by_alias=True, exclude_none=True)


def test_event_to_json_of_a_stripe_fact_is_the_union_adapters_json() -> None:
    fact = LOG_EVENT_ADAPTER.validate_json(
        json.dumps(
            {
                "specversion": "1.0",
                "id": "evt_1",
                "source": "stripe",
                "type": "stripe.payment.succeeded",
                "time": NOW.isoformat(),
                "data": {"walletId": "w_acme", "paymentIntentId": "pi_1", "amountMicros": 5_000_000, "via": "webhook"},
            }
        )
    )
    assert event_to_json(fact) == LOG_EVENT_ADAPTER.dump_json(fact, by_alias=True, exclude_none=True)


def test_event_to_json_refuses_what_is_not_an_event_of_the_log() -> None:
    with pytest.raises(InvariantViolation):
        event_to_json(RentalMetered(wallet_id="w", resource_id="p", uptime_seconds_total=1))  # type: ignore[arg-type]
