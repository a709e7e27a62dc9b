"""Reads of ``rejected_inputs`` (the refused inputs, kept with their reason and their bytes) and of
the log beside them, for ``billing dlq`` and the demo's summary. Writes go through the write path
(``projections.write_path.record_rejections``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

import psycopg
from sqlalchemy import Connection, text

from ledger import schema
from projections.queries import like_prefix
from projections.write_path import columns_of

COLUMNS: Final = tuple(columns_of(schema.rejected_inputs))
"""The order of the values of each row :func:`read_rejected` returns (``ledger.schema``'s)."""


def read_rejected(
    conn: Connection, *, reason: str | None = None, ids: Sequence[int] | None = None, limit: int
) -> list[tuple[Any, ...]]:
    """Rows of ``rejected_inputs`` (values in :data:`COLUMNS` order, ``raw`` as bytes), oldest
    first, filtered by reason and/or ids."""
    clauses: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    if reason is not None:
        clauses.append("reason = :reason")
        params["reason"] = reason
    if ids:
        clauses.append("id = ANY(:ids)")
        params["ids"] = list(ids)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        text(f"SELECT {', '.join(COLUMNS)} FROM rejected_inputs {where} ORDER BY id LIMIT :limit"), params
    ).all()
    raw = COLUMNS.index("raw")
    return [tuple(bytes(v) if i == raw else v for i, v in enumerate(r)) for r in rows]


def max_rejected_id(conn: Connection) -> int:
    """The id of the latest refusal recorded (0 if none): refusals after it are newer."""
    return int(conn.execute(text("SELECT coalesce(max(id), 0) FROM rejected_inputs")).scalar_one())


def in_log(conn: Connection, source: str, event_id: str) -> bool:
    """Whether the log holds the event ``(source, event_id)``."""
    found = conn.execute(
        text("SELECT 1 FROM events WHERE source = :s AND event_id = :i"), {"s": source, "i": event_id}
    ).first()
    return found is not None


def latest_refusal(
    conn: Connection, *, after_id: int, source: str | None, event_id: str | None, raw: bytes
) -> tuple[str, str] | None:
    """(reason, detail) of the latest refusal recorded after ``after_id`` of this input: by its
    identity when it has one, else by its bytes."""
    if source is not None and event_id is not None:
        row = conn.execute(
            text(
                "SELECT reason, detail FROM rejected_inputs WHERE id > :before AND source = :s AND event_id = :i"
                " ORDER BY id DESC LIMIT 1"
            ),
            {"before": after_id, "s": source, "i": event_id},
        ).first()
    else:
        row = conn.execute(
            text(
                "SELECT reason, detail FROM rejected_inputs WHERE id > :before AND raw = :raw ORDER BY id DESC LIMIT 1"
            ),
            {"before": after_id, "raw": raw},
        ).first()
    return None if row is None else (str(row[0]), str(row[1]))


def refusals_by_reason(conn: Connection, subject_prefix: str) -> dict[str, int]:
    """How many inputs were refused, by reason, among those that came on subjects starting with
    ``subject_prefix``."""
    rows = conn.execute(
        text("SELECT reason, count(*) FROM rejected_inputs WHERE subject LIKE :s GROUP BY reason ORDER BY reason"),
        {"s": like_prefix(subject_prefix)},
    ).all()
    return {str(r[0]): int(r[1]) for r in rows}


def too_old_refusals(conn: psycopg.Connection[Any], ids: Iterable[int]) -> dict[int, tuple[str, str, bytes]]:
    """The ``too_old`` refusals among ``ids``: id -> (source, event id, the refused bytes), what a
    ``billing dlq replay --accept-old`` claim is checked against (consumers.nats.intake)."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    with conn.cursor() as cur:
        cur.execute(
            "SELECT id, source, event_id, raw FROM rejected_inputs WHERE id = ANY(%s) AND reason = 'too_old'",
            (wanted,),
        )
        return {int(r[0]): (r[1], r[2], bytes(r[3])) for r in cur.fetchall()}
