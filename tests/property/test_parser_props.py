"""Properties of the event parser: any input gives an event or a rejection, never an exception."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.events import (
    EVENT_CLASSES,
    MAX_ADJUSTMENT_MICROS,
    MAX_COMPUTE_MS,
    MAX_DETAIL_CHARS,
    MAX_GPU_COUNT,
    MAX_PRICE_PER_HOUR_MICROS,
    MAX_PRICE_PER_SECOND_MICROS,
    MAX_UPTIME_SECONDS,
    Rejection,
    RentalEnded,
    RentalEndedEvent,
    RentalMetered,
    RentalMeteredEvent,
    RentalPaused,
    RentalPausedEvent,
    RentalResumed,
    RentalResumedEvent,
    RentalStarted,
    RentalStartedEvent,
    ServerlessJobCompleted,
    ServerlessJobCompletedEvent,
    SpotPreempted,
    SpotPreemptedEvent,
    WalletAdjusted,
    WalletAdjustedEvent,
    event_to_json,
    parse_event,
)

pytestmark = pytest.mark.property

# Every generated time is at most this, so no valid event is refused as future_time.
NOW = datetime(2031, 1, 1, tzinfo=UTC)


def assert_event_or_rejection(result: object) -> None:
    if isinstance(result, Rejection):
        assert 0 < len(result.detail) <= MAX_DETAIL_CHARS
    else:
        assert isinstance(result, EVENT_CLASSES), result


# --- Arbitrary input ------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**30), 10**30)
    | st.floats()  # includes NaN and infinities, which json.dumps writes as NaN / Infinity
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=400)
@given(raw=st.binary(max_size=2000))
def test_arbitrary_bytes(raw: bytes) -> None:
    assert_event_or_rejection(parse_event(raw, now=NOW))


@settings(max_examples=300)
@given(value=json_values)
def test_arbitrary_json_values(value: Any) -> None:
    assert_event_or_rejection(parse_event(json.dumps(value).encode(), now=NOW))


# Objects that look like envelopes reach the deeper checks that random JSON rarely does.
envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "specversion": st.just("1.0") | json_values,
        "id": st.just("e1") | json_values,
        "source": st.just("s") | json_values,
        "type": st.sampled_from(["gpu.rental.metered", "wallet.adjusted", "x"]) | json_values,
        "time": st.just("2026-11-28T10:00:00Z") | json_values,
        "data": st.fixed_dictionaries(
            {},
            optional={
                "walletId": st.just("w1") | json_values,
                "resourceId": st.just("r1") | json_values,
                "uptimeSecondsTotal": st.integers() | json_values,
                "amountMicros": st.integers() | json_values,
                "reason": st.just("why") | json_values,
                "operator": st.just("op") | json_values,
            },
        )
        | json_values,
        "traceparent": json_values,
    },
)


@settings(max_examples=300)
@given(document=envelope_like)
def test_envelope_like_objects(document: dict[str, Any]) -> None:
    assert_event_or_rejection(parse_event(json.dumps(document).encode(), now=NOW))


# --- Valid events ---------------------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
gpu_types = st.from_regex(r"[!-~](?:[ -~]{0,62}[!-~])?", fullmatch=True)
# CloudEvents attributes: any text without control characters (category Cc) or lone surrogates.
attributes = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=256)
texts = st.builds(
    lambda first, rest: first + rest,
    st.characters(min_codepoint=ord("!"), max_codepoint=ord("~")),
    st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=199),
)
timezones = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))])
times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2030, 12, 30), timezones=timezones)
uptimes = st.integers(0, MAX_UPTIME_SECONDS)
optional_ids = st.none() | ids


def model(model_class: type[Any], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Build a data model from a strategy per field name (st.builds would guess fields from aliases)."""
    return st.fixed_dictionaries(fields).map(lambda kwargs: model_class(**kwargs))


@st.composite
def spot_preempted(draw: st.DrawFn) -> SpotPreempted:
    noticed_at = draw(times)
    return SpotPreempted(
        wallet_id=draw(ids),
        resource_id=draw(ids),
        noticed_at=noticed_at,
        terminated_at=noticed_at + draw(st.timedeltas(timedelta(0), timedelta(minutes=10))),
        uptime_seconds_total=draw(uptimes),
    )


data_and_class: st.SearchStrategy[tuple[Any, type[Any]]] = st.one_of(
    st.tuples(
        model(
            RentalStarted,
            wallet_id=ids,
            resource_id=ids,
            resource_kind=st.sampled_from(["pod", "marketplace", "cluster"]),
            gpu_type=gpu_types,
            gpu_count=st.integers(1, MAX_GPU_COUNT),
            tier=st.sampled_from(["on_demand", "spot"]),
            price_per_hour_micros=st.integers(0, MAX_PRICE_PER_HOUR_MICROS),
            admission_id=optional_ids,
        ),
        st.just(RentalStartedEvent),
    ),
    st.tuples(
        model(RentalMetered, wallet_id=ids, resource_id=ids, uptime_seconds_total=uptimes),
        st.just(RentalMeteredEvent),
    ),
    st.tuples(
        model(RentalPaused, wallet_id=ids, resource_id=ids, uptime_seconds_total=uptimes),
        st.just(RentalPausedEvent),
    ),
    st.tuples(
        model(RentalResumed, wallet_id=ids, resource_id=ids, admission_id=optional_ids),
        st.just(RentalResumedEvent),
    ),
    st.tuples(
        model(
            RentalEnded,
            wallet_id=ids,
            resource_id=ids,
            uptime_seconds_total=uptimes,
            reason=st.sampled_from(["stopped", "destroyed", "auto_stopped", "failed"]),
        ),
        st.just(RentalEndedEvent),
    ),
    st.tuples(spot_preempted(), st.just(SpotPreemptedEvent)),
    st.tuples(
        model(
            ServerlessJobCompleted,
            wallet_id=ids,
            endpoint_id=ids,
            job_id=ids,
            gpu_type=gpu_types,
            compute_ms=st.integers(0, MAX_COMPUTE_MS),
            price_per_second_micros=st.integers(0, MAX_PRICE_PER_SECOND_MICROS),
            status=st.sampled_from(["completed", "failed", "cancelled"]),
        ),
        st.just(ServerlessJobCompletedEvent),
    ),
    st.tuples(
        model(
            WalletAdjusted,
            wallet_id=ids,
            amount_micros=st.integers(-MAX_ADJUSTMENT_MICROS, MAX_ADJUSTMENT_MICROS).filter(bool),
            reason=texts,
            operator=texts,
        ),
        st.just(WalletAdjustedEvent),
    ),
)


@st.composite
def valid_events(draw: st.DrawFn) -> Any:
    data, event_class = draw(data_and_class)
    return event_class(
        specversion="1.0",
        id=draw(attributes),
        source=draw(attributes),
        time=draw(times),
        datacontenttype=draw(st.none() | st.just("application/json")),
        subject=draw(st.none() | attributes),
        dataschema=draw(st.none() | attributes),
        data=data,
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(event=valid_events())
def test_valid_events_round_trip(event: Any) -> None:
    parsed = parse_event(event_to_json(event), now=NOW)
    assert not isinstance(parsed, Rejection), parsed
    assert parsed == event
    assert parsed.key == event.key
    assert parsed.wallet_id == event.wallet_id
    assert parsed.resource_id == event.resource_id
    assert parsed.time.utcoffset() == timedelta(0)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    event=valid_events(),
    extensions=st.dictionaries(
        st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(
            lambda name: (
                name not in {"specversion", "id", "source", "type", "time", "data", "subject"}
                and name not in {"datacontenttype", "dataschema"}
            )
        ),
        st.text(max_size=20) | st.integers() | st.booleans(),
        max_size=4,
    ),
)
def test_extension_attributes_do_not_change_the_event(event: Any, extensions: dict[str, Any]) -> None:
    document = json.loads(event_to_json(event))
    document.update(extensions)
    assert parse_event(json.dumps(document).encode(), now=NOW) == event


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(event=valid_events(), data=st.data())
def test_one_mutated_field_gives_an_event_or_a_rejection(event: Any, data: st.DataObject) -> None:
    document = json.loads(event_to_json(event))
    target = data.draw(st.sampled_from([document, document["data"]]), label="target")
    key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=12), label="key")
    if data.draw(st.booleans(), label="delete") and key in target:
        del target[key]
    else:
        target[key] = data.draw(json_values, label="value")
    assert_event_or_rejection(parse_event(json.dumps(document).encode(), now=NOW))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(event=valid_events(), cut=st.integers(0, 10_000))
def test_truncated_event_is_rejected(event: Any, cut: int) -> None:
    raw = event_to_json(event)
    truncated = raw[: cut % len(raw)]
    result = parse_event(truncated, now=NOW)
    assert isinstance(result, Rejection)
