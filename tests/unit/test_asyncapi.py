"""asyncapi.json in the repository is the NATS interface as declared in devtools/asyncapi.py, and it
documents every subject of the contract (docs/events.md) with the real models and examples."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from consumers.nats.admission import InvalidAnswer, RentalAnswer, RentalAsk, ServerlessAnswer, ServerlessAsk
from devtools.asyncapi import (
    DEFAULT_PATH,
    EXAMPLES,
    NoticeBody,
    SettlementBody,
    StopCommandBody,
    asyncapi_document,
    main,
    render,
)
from ledger.events import EVENT_TYPES, Rejection, RejectReason, parse_event
from projections.messages import notice_message, settlement_message, stop_message
from projections.rules import Notice, Settlement, StopCommand

pytestmark = pytest.mark.unit

# docs/events.md: in, out and questions, as AsyncAPI addresses.
CONTRACT_SUBJECTS = {
    "billing.in.{walletId}",
    "compute.commands.stop",
    "billing.out.notices.{walletId}",
    "billing.out.settlements.{walletId}",
    "billing.admission.rental",
    "billing.admission.serverless",
    "billing.dlq.{reason}",
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return json.loads(DEFAULT_PATH.read_text())


def _schema(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    """The object a local $ref points at (following references)."""
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("%7B", "{").replace("%7D", "}")]
    return _schema(doc, node["$ref"]) if "$ref" in node else node


def _payload(doc: dict[str, Any], channel: str) -> dict[str, Any]:
    (message_ref,) = doc["channels"][channel]["messages"].values()
    return _schema(doc, _schema(doc, message_ref["$ref"])["payload"]["$ref"])


def _properties(doc: dict[str, Any], schema_name: str) -> set[str]:
    return set(doc["components"]["schemas"][schema_name]["properties"])


def test_asyncapi_json_is_up_to_date() -> None:
    assert DEFAULT_PATH.exists(), "asyncapi.json is missing: run python -m devtools.asyncapi"
    assert DEFAULT_PATH.read_text() == render(asyncapi_document()), (
        "asyncapi.json is stale: run python -m devtools.asyncapi and commit the result"
    )


def test_every_contract_subject_is_documented(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values() if c["address"] is not None}
    assert addresses == CONTRACT_SUBJECTS
    actions = {
        doc["channels"][o["channel"]["$ref"].rsplit("/", 1)[1]]["address"]: o["action"]
        for o in doc["operations"].values()
    }
    assert actions == {
        "billing.in.{walletId}": "receive",
        "billing.admission.rental": "receive",
        "billing.admission.serverless": "receive",
        "compute.commands.stop": "send",
        "billing.out.notices.{walletId}": "send",
        "billing.out.settlements.{walletId}": "send",
        "billing.dlq.{reason}": "send",
    }
    assert set(doc["channels"]["deadLetters"]["parameters"]["reason"]["enum"]) >= {r.value for r in RejectReason}


def test_events_in_are_the_cloudevents_union(doc: dict[str, Any]) -> None:
    union = _payload(doc, "usageEvents")
    assert union["discriminator"] == "type"
    types = set()
    for option in union["oneOf"]:
        envelope = _schema(doc, option["$ref"])
        assert {"specversion", "id", "source", "type", "time", "data"} <= set(envelope["required"])
        types.add(envelope["properties"]["type"]["const"])
    assert types == EVENT_TYPES
    assert _properties(doc, "RentalStarted") == {
        "walletId",
        "resourceId",
        "resourceKind",
        "gpuType",
        "gpuCount",
        "tier",
        "pricePerHourMicros",
        "admissionId",
    }
    assert _properties(doc, "RentalMetered") == {"walletId", "resourceId", "uptimeSecondsTotal"}


def test_admission_asks_and_answers(doc: dict[str, Any]) -> None:
    assert _properties(doc, "RentalAsk") == {"walletId", "resourceId", "pricePerHourMicros", "admissionId"}
    assert _properties(doc, "RentalAnswer") == {"admitted", "admissionId", "reason", "availableMicros"}
    assert _properties(doc, "ServerlessAsk") == {"walletId", "endpointId"}
    assert _properties(doc, "ServerlessAnswer") == {"admitted", "reason", "availableMicros"}
    for ask, answer in (("admissionRental", "RentalAnswer"), ("admissionServerless", "ServerlessAnswer")):
        reply = doc["operations"][ask]["reply"]
        reply_channel = _schema(doc, reply["channel"]["$ref"])
        assert reply_channel["address"] is None  # the asker's inbox
        payload = _schema(doc, _schema(doc, reply["messages"][0]["$ref"])["payload"]["$ref"])
        assert {o["$ref"].rsplit("/", 1)[1] for o in payload["anyOf"]} == {answer, "InvalidAnswer"}


def test_outbound_bodies(doc: dict[str, Any]) -> None:
    assert _properties(doc, "StopCommandBody") == {
        "commandId",
        "walletId",
        "resourceId",
        "resourceKind",
        "action",
        "reason",
        "issuedAt",
    }
    assert _properties(doc, "NoticeBody") == {"walletId", "kind", "balanceMicros", "projectedZeroAt"}
    assert _properties(doc, "SettlementBody") == {
        "walletId",
        "resourceId",
        "billableSeconds",
        "costMicros",
        "endedAt",
        "reason",
    }
    stop = doc["components"]["messages"]["stopCommands:Message"]
    assert stop["headers"]["required"] == ["Nats-Msg-Id"]


def test_body_models_match_what_the_relay_publishes() -> None:
    """The models describe exactly the payloads projections.messages builds (no key more or less)."""
    now = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    payloads = [
        (StopCommandBody, stop_message(StopCommand("stop-w-p-1", "w", "p", "pod", now)).payload),
        (NoticeBody, notice_message(Notice("w", "exhausted", -5, None), now=now).payload),
        (NoticeBody, notice_message(Notice("w", "low_balance", 5, now), now=now).payload),
        (SettlementBody, settlement_message(Settlement("w", "p", 60, 10, now, "preempted")).payload),
    ]
    for model, payload in payloads:
        body = model.model_validate(payload)
        assert json.loads(body.model_dump_json(by_alias=True)).keys() == payload.keys()


def test_check_mode_reports_stale_files(tmp_path, capsys) -> None:
    stale = tmp_path / "asyncapi.json"
    stale.write_text("{}\n")
    assert main(["--check", str(stale)]) == 1
    assert main([str(stale)]) == 0
    assert main(["--check", str(stale)]) == 0


def _messages_of(doc: dict[str, Any], channel_ref: str) -> list[dict[str, Any]]:
    channel = _schema(doc, channel_ref)
    return [_schema(doc, ref["$ref"]) for ref in channel["messages"].values()]


def test_every_operation_has_example_messages(doc: dict[str, Any]) -> None:
    for name, operation in doc["operations"].items():
        refs = [operation["channel"]["$ref"]] + (
            [operation["reply"]["channel"]["$ref"]] if "reply" in operation else []
        )
        for ref in refs:
            for message in _messages_of(doc, ref):
                assert message.get("examples"), f"operation {name}: {message['title']} has no example"


_VALIDATORS: dict[str, tuple[type[BaseModel], ...]] = {
    "admissionRental": (RentalAsk,),
    "admissionRentalReply": (RentalAnswer, InvalidAnswer),
    "admissionServerless": (ServerlessAsk,),
    "admissionServerlessReply": (ServerlessAnswer, InvalidAnswer),
    "stopCommands": (StopCommandBody,),
    "notices": (NoticeBody,),
    "settlements": (SettlementBody,),
}


def _valid_as_one_of(payload: dict[str, Any], models: tuple[type[BaseModel], ...]) -> bool:
    for model in models:
        try:
            model.model_validate(payload)
        except ValidationError:
            continue
        return True
    return False


def test_examples_are_what_the_service_reads_and_writes(doc: dict[str, Any]) -> None:
    """Each example validates against the real models: events through the real parser, asks and answers
    through the admission models, outbound bodies through theirs, a dead letter refused for its reason."""
    now = datetime(2026, 11, 28, 10, 1, tzinfo=UTC)
    for example in EXAMPLES["usageEvents"]:
        event = parse_event(json.dumps(example["payload"]).encode(), now=now)
        assert not isinstance(event, Rejection), (example["name"], event)
        assert example["headers"]["Nats-Msg-Id"] == event.id
    assert {e["payload"]["type"] for e in EXAMPLES["usageEvents"]} == EVENT_TYPES
    for channel, models in _VALIDATORS.items():
        for example in EXAMPLES[channel]:
            assert _valid_as_one_of(example["payload"], models), (channel, example["name"])
    for example in EXAMPLES["deadLetters"]:
        refused = parse_event(example["payload"].encode(), now=now)
        assert isinstance(refused, Rejection)
        assert example["headers"]["Billing-Reason"] == refused.reason.value
        assert example["headers"]["Billing-Detail"] == refused.detail
    assert doc["components"]["messages"]["stopCommands:Message"]["examples"] == EXAMPLES["stopCommands"]


def test_servers_name_the_embedded_default_and_a_cluster(doc: dict[str, Any]) -> None:
    servers = doc["servers"]
    assert "localhost:4222" not in json.dumps(servers)
    assert servers["embedded"]["host"] == "127.0.0.1:{port}"
    # The default of BILLING_EMBEDDED_NATS_PORT (consumers/runtime/settings.py, docs/operations.md).
    assert servers["embedded"]["variables"]["port"]["default"] == "14222"
    assert "BILLING_NATS_URL" in servers["production"]["description"]
