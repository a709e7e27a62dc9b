"""The charging vectors (tests/data/charging.json, the worked examples of docs/rules.md), renamed per test so that cases
never collide in the run's database, with helpers to read the results back."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from ledger.events import Event
from tests.factories import T0, make_event

VECTORS_PATH = Path(__file__).resolve().parents[1] / "data" / "charging.json"


def load_cases() -> list[dict[str, Any]]:
    return list(json.loads(VECTORS_PATH.read_text())["cases"])


def renamed(case: dict[str, Any]) -> tuple[list[Event], dict[str, str], list[dict[str, Any]]]:
    """The case's events with fresh ids (walletId, resourceId, endpointId get a random prefix),
    each its own CloudEvent id, one second apart; plus the rename map and the raw data dicts."""
    prefix = secrets.token_hex(4)
    names: dict[str, str] = {}

    def rename(value: str) -> str:
        return names.setdefault(value, f"{prefix}-{value}")

    events: list[Event] = []
    datas: list[dict[str, Any]] = []
    for i, e in enumerate(case["events"]):
        data = dict(e["data"])
        for k in ("walletId", "resourceId", "endpointId"):
            if k in data:
                data[k] = rename(data[k])
        datas.append({"type": e["type"], "data": data})
        events.append(
            make_event(e["type"], data, id_=f"{prefix}-{i}", source="compute/vectors", time=T0 + timedelta(seconds=i))
        )
    return events, names, datas
