"""Build valid events for tests through the real models (camelCase data, as producers send)."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from typing import Any

from ledger.events import EVENT_ADAPTER, Event

_seq = itertools.count(1)
T0 = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)


def make_event(
    type_: str,
    data: dict[str, Any],
    *,
    id_: str | None = None,
    source: str = "compute/test",
    time: datetime = T0,
) -> Event:
    # Through JSON, as producers send it (strict models take ISO strings only from JSON).
    return EVENT_ADAPTER.validate_json(
        json.dumps(
            {
                "specversion": "1.0",
                "id": id_ or f"ev-{next(_seq)}",
                "source": source,
                "type": type_,
                "time": time.isoformat(),
                "data": data,
            }
        )
    )


def adjusted(wallet_id: str, amount_micros: int, **kw: Any) -> Event:
    return make_event(
        "wallet.adjusted",
        {"walletId": wallet_id, "amountMicros": amount_micros, "reason": "credit", "operator": "ops"},
        **kw,
    )


def metered(wallet_id: str, resource_id: str, seconds: int, **kw: Any) -> Event:
    return make_event(
        "gpu.rental.metered",
        {"walletId": wallet_id, "resourceId": resource_id, "uptimeSecondsTotal": seconds},
        **kw,
    )
