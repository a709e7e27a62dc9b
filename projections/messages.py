"""Outbound messages of DESIGN section 5 built from decisions (pure; the relay publishes them).

Subjects and bodies are contract. Each message has a deterministic dedup id (``Nats-Msg-Id``),
fixed when the row is written, so a republished row is recognised downstream.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from projections.outbox import OutboxMessage
from projections.rules import Notice, Settlement, StopCommand

STOP_SUBJECT: Final = "compute.commands.stop"


def notices_subject(wallet_id: str) -> str:
    return f"billing.out.notices.{wallet_id}"


def settlements_subject(wallet_id: str) -> str:
    return f"billing.out.settlements.{wallet_id}"


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat().replace("+00:00", "Z")


def stop_message(c: StopCommand) -> OutboxMessage:
    return OutboxMessage(
        subject=STOP_SUBJECT,
        msg_id=c.command_id,
        payload={
            "commandId": c.command_id,
            "walletId": c.wallet_id,
            "resourceId": c.resource_id,
            "resourceKind": c.resource_kind,
            "action": c.action,
            "reason": c.reason,
            "issuedAt": _iso(c.issued_at),
        },
    )


def notice_message(n: Notice, *, now: datetime) -> OutboxMessage:
    return OutboxMessage(
        subject=notices_subject(n.wallet_id),
        msg_id=f"notice-{n.wallet_id}-{n.kind}-{_iso(now)}",
        payload={
            "walletId": n.wallet_id,
            "kind": n.kind,
            "balanceMicros": n.balance_micros,
            "projectedZeroAt": _iso(n.projected_zero_at),
        },
    )


def settlement_message(s: Settlement) -> OutboxMessage:
    return OutboxMessage(
        subject=settlements_subject(s.wallet_id),
        # A rental settles once: its resource id is the identity of the settlement.
        msg_id=f"settlement-{s.wallet_id}-{s.resource_id}",
        payload={
            "walletId": s.wallet_id,
            "resourceId": s.resource_id,
            "billableSeconds": s.billable_seconds,
            "costMicros": s.cost_micros,
            "endedAt": _iso(s.ended_at),
            "reason": s.reason,
        },
    )
