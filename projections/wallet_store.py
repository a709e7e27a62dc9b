"""Load and save the wallet aggregates (WalletState of projections.rules) as table rows.

Every writer of a wallet (the intake, the scheduler, admission replies) first locks the wallet's
row with ``SELECT ... FOR UPDATE``, wallets in id order, so two writers of one wallet take turns
and two batches never deadlock on each other's wallets.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

import psycopg

from ledger.invariants import fail, require
from projections.rules import EndpointState, Hold, PaymentState, PendingStripeFact, RentalState, WalletState

# The aggregate of one wallet is small; a batch touches at most this many wallets.
MAX_WALLETS_PER_LOAD: Final = 10_000

_RENTAL_COLS: Final = (
    "resource_id, wallet_id, resource_kind, tier, gpu_type, price_per_hour_micros, product, status,"
    " started_at, last_reading_at, billable_seconds, charged_micros, ended_at, end_reason,"
    " stop_seq, stop_attempts, stop_issued_at"
)
_RENTAL_COLS_R: Final = ", ".join(f"r.{c.strip()}" for c in _RENTAL_COLS.split(","))
# RentalState's fields in _RENTAL_COLS order, and those a saved rental may change (the key first).
_RENTAL_FIELDS: Final = tuple(c.strip() for c in _RENTAL_COLS.split(","))
_RENTAL_MUTABLE_FIELDS: Final = (
    "resource_id",
    "wallet_id",
    "status",
    "last_reading_at",
    "billable_seconds",
    "charged_micros",
    "ended_at",
    "end_reason",
    "stop_seq",
    "stop_attempts",
    "stop_issued_at",
)


def _arrays(rows: Sequence[Any], fields: Sequence[str]) -> list[list[Any]]:
    """One array parameter per field, in order (the columns of an ``unnest`` statement)."""
    return [[getattr(r, f) for r in rows] for f in fields]


# The lookups of a batch. Each key list is joined as a relation (``JOIN unnest(...)``), never
# filtered with ``= ANY(array)``: psycopg prepares a statement run five times, PostgreSQL then
# settles on a generic plan, and in a generic plan ``col = ANY($1)`` in a sequential scan's filter
# is searched element by element for every row (only a literal array is hashed): the rentals
# lookup would grow with every rental ever started (figures in bench/README.md).
# tests/integration/test_processor.py checks the generic plans of these statements.
LOAD_WALLETS_SQL: Final = (
    # jsonb as text: most wallets hold '[]', and parsing it in Python per row is not free.
    "SELECT w.wallet_id, coalesce(b.balance_micros, 0), w.status, w.last_notice, w.holds::text,"
    "       w.serverless_admissions::text, w.next_wakeup_at"
    "  FROM unnest(%b::text[]) AS k(w)"
    "  JOIN wallets w ON w.wallet_id = k.w"
    "  LEFT JOIN account_balances b ON b.account = 'wallet:' || k.w"
)
LOAD_RENTALS_SQL: Final = (
    # The open rentals of the wallets (partial index ix_rentals_wallet_id_open), then the named ones
    # (primary key); a rental in both comes twice and is simply kept once.
    f"SELECT {_RENTAL_COLS_R} FROM unnest(%b::text[]) AS k(w)"
    "  JOIN rentals r ON r.wallet_id = k.w AND r.status <> 'ended'"
    f" UNION ALL SELECT {_RENTAL_COLS_R} FROM unnest(%b::text[]) AS k(r)"
    "  JOIN rentals r ON r.resource_id = k.r"
)
LOAD_PAYMENTS_SQL: Final = (
    # Of another wallet's PaymentIntent only the owner is used (the caller keeps the batch's own).
    "SELECT p.wallet_id, p.payment_intent_id, p.seen, p.credited_micros, p.refunded_micros, p.disputes,"
    "       p.pending"
    "  FROM unnest(%b::text[]) AS k(pi) JOIN stripe_payments p ON p.payment_intent_id = k.pi"
)
LOAD_ENDPOINTS_SQL: Final = (
    "SELECT e.wallet_id, e.endpoint_id, e.exact_millimicros_total, e.charged_micros"
    "  FROM serverless_endpoints e"
    "  JOIN unnest(%b::text[], %b::text[]) AS k(w, e) ON e.wallet_id = k.w AND e.endpoint_id = k.e"
)
LOAD_JOBS_SQL: Final = (
    "SELECT j.wallet_id, j.endpoint_id, j.job_id FROM serverless_jobs j"
    "  JOIN unnest(%b::text[], %b::text[], %b::text[]) AS k(w, e, j)"
    "    ON j.wallet_id = k.w AND j.endpoint_id = k.e AND j.job_id = k.j"
)
LOCK_AND_READ_WALLETS_SQL: Final = LOAD_WALLETS_SQL + " ORDER BY w.wallet_id FOR UPDATE OF w"
"""The wallet rows locked in id order, read in the same statement (the columns of LOAD_WALLETS_SQL)."""
LOCK_VERSIONS_SQL: Final = (
    "SELECT w.wallet_id, w.version FROM unnest(%b::text[]) AS k(w) JOIN wallets w ON w.wallet_id = k.w"
    " ORDER BY w.wallet_id FOR UPDATE OF w"
)
"""The intake owner's lock: the wallet rows in id order, only their versions read (WalletCache)."""
BUMP_VERSIONS_SQL: Final = (
    "UPDATE wallets w SET version = w.version + 1 FROM unnest(%b::text[]) AS k(w) WHERE w.wallet_id = k.w"
)
BATCH_LOOKUPS_SQL: Final = (
    LOCK_AND_READ_WALLETS_SQL,
    LOCK_VERSIONS_SQL,
    LOAD_WALLETS_SQL,
    LOAD_RENTALS_SQL,
    LOAD_PAYMENTS_SQL,
    LOAD_ENDPOINTS_SQL,
    LOAD_JOBS_SQL,
)


def _holds_from_json(raw: list[dict[str, Any]]) -> tuple[Hold, ...]:
    return tuple(
        Hold(
            admission_id=h["admissionId"],
            resource_id=h["resourceId"],
            amount_micros=int(h["amountMicros"]),
            expires_at=datetime.fromisoformat(h["expiresAt"]),
        )
        for h in raw
    )


def _holds_to_json(holds: Iterable[Hold]) -> str:
    return json.dumps(
        [
            {
                "admissionId": h.admission_id,
                "resourceId": h.resource_id,
                "amountMicros": h.amount_micros,
                "expiresAt": h.expires_at.isoformat(),
            }
            for h in holds
        ]
    )


def _rental_from_row(row: Sequence[Any]) -> RentalState:
    return RentalState(
        resource_id=row[0],
        wallet_id=row[1],
        resource_kind=row[2],
        tier=row[3],
        gpu_type=row[4],
        price_per_hour_micros=row[5],
        product=row[6],
        status=row[7],
        started_at=row[8],
        last_reading_at=row[9],
        billable_seconds=row[10],
        charged_micros=row[11],
        ended_at=row[12],
        end_reason=row[13],
        stop_seq=row[14],
        stop_attempts=row[15],
        stop_issued_at=row[16],
    )


def _admissions_to_json(admissions: tuple[datetime, ...]) -> str:
    return json.dumps([t.isoformat() for t in admissions]) if admissions else "[]"


WalletRow = tuple[Any, ...]
"""A row of LOAD_WALLETS_SQL: wallet id, balance, status, last notice, holds and admissions as text,
stored next wake-up."""


def lock_wallets(conn: psycopg.Connection[Any], wallet_ids: Iterable[str]) -> list[str]:
    """Create missing wallet rows and lock all of them (bumping their versions). Returns the sorted ids."""
    return lock_and_read_wallets(conn, wallet_ids)[0]


def lock_and_read_wallets(
    conn: psycopg.Connection[Any], wallet_ids: Iterable[str]
) -> tuple[list[str], list[WalletRow]]:
    """Lock the wallets' rows, creating the missing ones, and read them (for ``load_wallets``).
    Returns the sorted ids and the rows.

    Every writer but the intake's partition owner locks here, and the lock bumps each row's
    ``version``: the owner, which keeps its wallets in memory (:class:`WalletCache`), then sees that
    someone else may have written the wallet and reloads it. (Bumped whether or not the writer then
    changes anything: a reload too many costs a look-up, a missed one a wrong charge.)

    Lock order: the existing rows in id order (one statement: the intake's batches nearly always
    find every wallet), then the missing ones, inserted and locked in id order. No writer waits for
    a row it then holds while another waits for its first ones, except in one case: a wallet created
    by another transaction between the two steps, which a scheduler tick of that and an earlier
    wallet has locked meanwhile; PostgreSQL then detects the deadlock, and the batch (a transient
    failure) is tried again."""
    ids, rows = _lock(conn, wallet_ids, LOCK_AND_READ_WALLETS_SQL)
    if ids:
        with conn.cursor(binary=True) as cur:
            cur.execute(BUMP_VERSIONS_SQL, (ids,))
    return ids, rows


def lock_wallet_versions(conn: psycopg.Connection[Any], wallet_ids: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """The intake owner's lock (same order and creation of missing rows as
    :func:`lock_and_read_wallets`): the sorted ids and each row's version, not bumped here (the
    owner's save bumps it, :func:`save_wallets` with ``versions``)."""
    ids, rows = _lock(conn, wallet_ids, LOCK_VERSIONS_SQL)
    return ids, {str(r[0]): int(r[1]) for r in rows}


def _lock(conn: psycopg.Connection[Any], wallet_ids: Iterable[str], sql: str) -> tuple[list[str], list[WalletRow]]:
    ids = sorted(set(wallet_ids))
    if not (len(ids) <= MAX_WALLETS_PER_LOAD):
        fail(f"{len(ids)} wallets in one load")
    if not ids:
        return ids, []
    with conn.cursor(binary=True) as cur:
        cur.execute(sql, (ids,))
        rows = cur.fetchall()
        if len(rows) < len(ids):
            have = {r[0] for r in rows}
            missing = [w for w in ids if w not in have]
            cur.execute(
                "INSERT INTO wallets (wallet_id) SELECT w FROM unnest(%b::text[]) AS x(w) ORDER BY w"
                " ON CONFLICT (wallet_id) DO NOTHING",
                (missing,),
            )
            cur.execute(sql, (missing,))
            rows = sorted([*rows, *cur.fetchall()], key=_first)
    require([r[0] for r in rows] == ids, "wallet rows missing after insert")
    return ids, rows


def _first(row: WalletRow) -> str:
    return str(row[0])


@dataclass(slots=True)
class _Parts:
    """What a batch loads into its wallets' states, by wallet (then made into WalletState)."""

    ids: list[str]
    known: Mapping[str, WalletState]
    rentals: dict[str, dict[str, RentalState]]
    endpoints: dict[str, dict[str, EndpointState]]
    seen: dict[str, set[tuple[str, str]]]
    payments: dict[str, dict[str, PaymentState]]
    foreign: dict[str, RentalState] = field(default_factory=dict)

    @classmethod
    def of(cls, ids: list[str], known: Mapping[str, WalletState]) -> _Parts:
        def start(w: str, attr: str) -> dict[str, Any]:
            return dict(getattr(known[w], attr)) if w in known else {}

        return cls(
            ids,
            known,
            {w: start(w, "rentals") for w in ids},
            {w: start(w, "endpoints") for w in ids},
            {w: set() for w in ids},
            {w: start(w, "payments") for w in ids},
        )


def load_wallets(
    conn: psycopg.Connection[Any],
    wallet_ids: Sequence[str],
    *,
    resource_ids: Iterable[str] = (),
    endpoint_keys: Iterable[tuple[str, str]] = (),
    job_keys: Iterable[tuple[str, str, str]] = (),
    payment_ids: Iterable[str] = (),
    wallet_rows: Sequence[WalletRow] | None = None,
    stored_wakeups: dict[str, datetime | None] | None = None,
    known: Mapping[str, WalletState] | None = None,
) -> tuple[dict[str, WalletState], dict[str, RentalState]]:
    """The aggregates of locked wallets: balance, holds, status, every open rental, the named
    rentals (ended ones too), the named serverless endpoints and which named jobs were seen.
    ``wallet_rows``: the rows of the wallets not ``known`` as :func:`lock_and_read_wallets` read
    them (else read here). ``stored_wakeups``: filled with each read wallet's stored next wake-up
    (for :func:`save_wallets`). ``known``: states the caller holds and knows to be current (the
    intake owner's :class:`WalletCache`): not read again, only completed with the named rentals,
    endpoints and payments they lack, and the named jobs.

    Also returns the named rentals that belong to *other* wallets (so the caller can refuse an
    event that names another wallet's resource instead of starting it twice).
    """
    ids = list(wallet_ids)
    known = {w: known[w] for w in ids if w in known} if known else {}
    fresh = [w for w in ids if w not in known]
    parts = _Parts.of(ids, known)
    have = {rid for st in known.values() for rid in st.rentals}
    resources = sorted(r for r in set(resource_ids) if r not in have)
    endpoints = sorted(k for k in set(endpoint_keys) if k[0] not in known or k[1] not in known[k[0]].endpoints)
    jobs = sorted(set(job_keys))
    paid = {pi for st in known.values() for pi in st.payments}
    pis = sorted(pi for pi in set(payment_ids) if pi not in paid)
    # Results in binary: psycopg converts binary timestamps and integers for less than their text
    # (rentals carry several timestamps each; this is the intake's hot path).
    with conn.cursor(binary=True) as cur:
        if pis:
            cur.execute(LOAD_PAYMENTS_SQL, (pis,))
            for w, pi, was_seen, credited, refunded, disputes, pending in cur.fetchall():
                if w in parts.payments:  # another wallet's: the save refuses to take it over
                    parts.payments[w][pi] = _payment_from_row(pi, was_seen, credited, refunded, disputes, pending)
        rows: list[WalletRow] = []
        if fresh and wallet_rows is None:
            cur.execute(LOAD_WALLETS_SQL, (fresh,))
            rows = cur.fetchall()
        elif fresh and wallet_rows is not None:
            rows = list(wallet_rows)
        if fresh or resources:
            cur.execute(LOAD_RENTALS_SQL, (fresh, resources))
            for r in cur.fetchall():
                _add_rental(parts, _rental_from_row(r))
        _load_endpoints_and_jobs(cur, parts, endpoints, jobs)
    return _states(parts, rows, stored_wakeups), parts.foreign


def _add_rental(parts: _Parts, rental: RentalState) -> None:
    if rental.wallet_id in parts.rentals:
        parts.rentals[rental.wallet_id][rental.resource_id] = rental
    else:
        parts.foreign[rental.resource_id] = rental


def _load_endpoints_and_jobs(
    cur: psycopg.Cursor[Any], parts: _Parts, endpoints: list[tuple[str, str]], jobs: list[tuple[str, str, str]]
) -> None:
    if endpoints:
        cur.execute(LOAD_ENDPOINTS_SQL, ([k[0] for k in endpoints], [k[1] for k in endpoints]))
        for w, e, exact, charged in cur.fetchall():
            parts.endpoints[w][e] = EndpointState(e, exact_millimicros_total=exact, charged_micros=charged)
    if jobs:
        cur.execute(LOAD_JOBS_SQL, ([k[0] for k in jobs], [k[1] for k in jobs], [k[2] for k in jobs]))
        for w, e, j in cur.fetchall():
            parts.seen[w].add((e, j))


def _states(
    parts: _Parts, rows: Sequence[WalletRow], stored_wakeups: dict[str, datetime | None] | None
) -> dict[str, WalletState]:
    states: dict[str, WalletState] = {}
    for wallet_id, balance, status, last_notice, holds, admissions, wakeup in rows:
        if stored_wakeups is not None:
            stored_wakeups[wallet_id] = wakeup
        states[wallet_id] = WalletState(
            wallet_id=wallet_id,
            balance_micros=int(balance),
            holds=() if holds == "[]" else _holds_from_json(json.loads(holds)),
            rentals=parts.rentals[wallet_id],
            endpoints=parts.endpoints[wallet_id],
            jobs_seen=frozenset(parts.seen[wallet_id]),
            serverless_admissions=()
            if admissions == "[]"
            else tuple(datetime.fromisoformat(t) for t in json.loads(admissions)),
            status=status,
            last_notice=last_notice,
            payments=parts.payments[wallet_id],
        )
    for wallet_id, st in parts.known.items():
        states[wallet_id] = replace(
            st,
            rentals=parts.rentals[wallet_id],
            endpoints=parts.endpoints[wallet_id],
            jobs_seen=frozenset(parts.seen[wallet_id]),
            payments=parts.payments[wallet_id],
        )
    require(set(states) == set(parts.ids), "a locked wallet has no row")
    return states


@dataclass(slots=True)
class _Changes:
    wallets: list[WalletState] = field(default_factory=list)
    new_rentals: list[RentalState] = field(default_factory=list)
    """Rentals new to the table (started in this batch): inserted whole."""
    changed_rentals: list[RentalState] = field(default_factory=list)
    """Rentals loaded and changed: only what can change is written."""
    endpoints: list[tuple[str, EndpointState]] = field(default_factory=list)
    payments: list[tuple[str, PaymentState]] = field(default_factory=list)


def save_wallets(
    conn: psycopg.Connection[Any],
    before: dict[str, WalletState],
    after: dict[str, WalletState],
    *,
    next_wakeups: dict[str, datetime | None],
    now: datetime,
    stored_wakeups: Mapping[str, datetime | None] | None = None,
    versions: Mapping[str, int] | None = None,
) -> None:
    """Write what changed between ``before`` and ``after`` (same wallet ids): wallet rows, rentals,
    endpoints, payments. Balances are not written here: they follow the journal (ledger.store).

    ``versions`` (the intake owner, :func:`lock_wallet_versions`): every wallet row is written, with
    its version set to the one given (the locked version + 1), so that any other holder of a cached
    state of it sees the change."""
    require(set(before) == set(after), "save of a different wallet set")
    changes = _changes(before, after, next_wakeups, stored_wakeups, owner=versions is not None)
    with conn.cursor() as cur:
        if changes.wallets:
            _update_wallet_rows(cur, changes.wallets, next_wakeups, now, versions)
        if changes.new_rentals:
            _insert_rentals(cur, changes.new_rentals)
        if changes.changed_rentals:
            _update_rentals(cur, changes.changed_rentals)
        if changes.endpoints:
            _upsert_endpoints(cur, changes.endpoints)
        if changes.payments:
            _upsert_payments(cur, changes.payments)


def _changes(
    before: dict[str, WalletState],
    after: dict[str, WalletState],
    next_wakeups: Mapping[str, datetime | None],
    stored_wakeups: Mapping[str, datetime | None] | None,
    *,
    owner: bool,
) -> _Changes:
    out = _Changes()
    for wid, new in after.items():
        old = before[wid]
        # A row that would not change is not sent (most wallets of a batch are only charged, and
        # the balance lives in account_balances); without the stored wake-ups, the UPDATE's own
        # IS DISTINCT FROM leaves such rows alone. The owner writes every row (its version).
        if owner or not (
            stored_wakeups is not None
            and wid in stored_wakeups
            and stored_wakeups[wid] == next_wakeups.get(wid)
            and (new.status, new.last_notice, new.holds, new.serverless_admissions)
            == (old.status, old.last_notice, old.holds, old.serverless_admissions)
        ):
            out.wallets.append(new)
        if new.rentals is not old.rentals:
            for rid, r in new.rentals.items():
                if old.rentals.get(rid) != r:
                    if r.wallet_id != wid:
                        fail(f"rental {rid} of {r.wallet_id} saved under {wid}")
                    (out.changed_rentals if rid in old.rentals else out.new_rentals).append(r)
        for eid, e in new.endpoints.items():
            if old.endpoints.get(eid) != e:
                out.endpoints.append((wid, e))
        for pi, pay in new.payments.items():
            if old.payments.get(pi) != pay:
                out.payments.append((wid, pay))
    return out


def _update_wallet_rows(
    cur: psycopg.Cursor[Any],
    rows: list[WalletState],
    next_wakeups: Mapping[str, datetime | None],
    now: datetime,
    versions: Mapping[str, int] | None,
) -> None:
    params = {
        "now": now,
        "w": [s.wallet_id for s in rows],
        "s": [s.status for s in rows],
        "n": [s.last_notice for s in rows],
        # Most wallets hold nothing: '[]' without a json.dumps each (the intake's hot path).
        "h": [_holds_to_json(s.holds) if s.holds else "[]" for s in rows],
        "a": [_admissions_to_json(s.serverless_admissions) for s in rows],
        "nw": [next_wakeups.get(s.wallet_id) for s in rows],
    }
    if versions is not None:
        params["v"] = [versions[s.wallet_id] for s in rows]
        cur.execute(
            "UPDATE wallets w SET status = x.s, last_notice = x.n, holds = x.h::jsonb,"
            "       serverless_admissions = x.a::jsonb, next_wakeup_at = x.nw, updated_at = %(now)s,"
            "       version = x.v"
            "  FROM unnest(%(w)b::text[], %(s)b::text[], %(n)b::text[], %(h)b::text[], %(a)b::text[],"
            "              %(nw)b::timestamptz[], %(v)b::int8[]) AS x(w, s, n, h, a, nw, v)"
            " WHERE w.wallet_id = x.w",
            params,
        )
        require(cur.rowcount == len(rows), "a locked wallet row is gone")
        return
    cur.execute(
        "UPDATE wallets w SET status = x.s, last_notice = x.n, holds = x.h::jsonb,"
        "       serverless_admissions = x.a::jsonb, next_wakeup_at = x.nw, updated_at = %(now)s"
        "  FROM unnest(%(w)b::text[], %(s)b::text[], %(n)b::text[], %(h)b::text[], %(a)b::text[],"
        "              %(nw)b::timestamptz[]) AS x(w, s, n, h, a, nw)"
        " WHERE w.wallet_id = x.w"
        # A wallet whose row would not change is not rewritten: most batches charge a wallet
        # (its balance lives in account_balances) and change nothing else of it.
        "   AND (w.status, w.last_notice, w.holds, w.serverless_admissions, w.next_wakeup_at)"
        "       IS DISTINCT FROM (x.s, x.n, x.h::jsonb, x.a::jsonb, x.nw)",
        params,
    )


def _insert_rentals(cur: psycopg.Cursor[Any], rental_rows: list[RentalState]) -> None:
    cur.execute(
        f"INSERT INTO rentals ({_RENTAL_COLS})"
        " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::int8[],"
        "   %b::text[], %b::text[], %b::timestamptz[], %b::timestamptz[], %b::int8[], %b::int8[],"
        "   %b::timestamptz[], %b::text[], %b::int4[], %b::int4[], %b::timestamptz[])"
        " ON CONFLICT (resource_id) DO UPDATE SET"
        "   status = EXCLUDED.status, last_reading_at = EXCLUDED.last_reading_at,"
        "   billable_seconds = EXCLUDED.billable_seconds, charged_micros = EXCLUDED.charged_micros,"
        "   ended_at = EXCLUDED.ended_at, end_reason = EXCLUDED.end_reason,"
        "   stop_seq = EXCLUDED.stop_seq, stop_attempts = EXCLUDED.stop_attempts,"
        "   stop_issued_at = EXCLUDED.stop_issued_at"
        " WHERE rentals.wallet_id = EXCLUDED.wallet_id",
        _arrays(rental_rows, _RENTAL_FIELDS),
    )
    require(cur.rowcount == len(rental_rows), "a rental row belongs to another wallet")


def _update_rentals(cur: psycopg.Cursor[Any], changed_rentals: list[RentalState]) -> None:
    # An UPDATE of the mutable columns: a reading changes a few of them, and each column is
    # an array parameter psycopg dumps element by element (the intake's hot path).
    cur.execute(
        "UPDATE rentals r SET status = x.s, last_reading_at = x.lr, billable_seconds = x.bs,"
        "       charged_micros = x.cm, ended_at = x.ea, end_reason = x.er, stop_seq = x.sq,"
        "       stop_attempts = x.sa, stop_issued_at = x.si"
        "  FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::int8[], %b::int8[],"
        "              %b::timestamptz[], %b::text[], %b::int4[], %b::int4[], %b::timestamptz[])"
        "       AS x(r, w, s, lr, bs, cm, ea, er, sq, sa, si)"
        " WHERE r.resource_id = x.r AND r.wallet_id = x.w",
        _arrays(changed_rentals, _RENTAL_MUTABLE_FIELDS),
    )
    require(cur.rowcount == len(changed_rentals), "a loaded rental row is gone or of another wallet")


def _upsert_endpoints(cur: psycopg.Cursor[Any], endpoint_rows: list[tuple[str, EndpointState]]) -> None:
    cur.execute(
        "INSERT INTO serverless_endpoints (wallet_id, endpoint_id, exact_millimicros_total, charged_micros)"
        " SELECT * FROM unnest(%b::text[], %b::text[], %b::int8[], %b::int8[])"
        " ON CONFLICT (wallet_id, endpoint_id) DO UPDATE SET"
        "   exact_millimicros_total = EXCLUDED.exact_millimicros_total,"
        "   charged_micros = EXCLUDED.charged_micros",
        [
            [w for w, _ in endpoint_rows],
            [e.endpoint_id for _, e in endpoint_rows],
            [e.exact_millimicros_total for _, e in endpoint_rows],
            [e.charged_micros for _, e in endpoint_rows],
        ],
    )


def _upsert_payments(cur: psycopg.Cursor[Any], payment_rows: list[tuple[str, PaymentState]]) -> None:
    cur.execute(
        "INSERT INTO stripe_payments (payment_intent_id, wallet_id, seen, credited_micros, refunded_micros,"
        "                             disputes, pending)"
        " SELECT p, w, s, c, r, d::jsonb, pe::jsonb"
        "   FROM unnest(%b::text[], %b::text[], %b::bool[], %b::int8[], %b::int8[], %b::text[], %b::text[])"
        "        AS x(p, w, s, c, r, d, pe)"
        " ON CONFLICT (payment_intent_id) DO UPDATE SET"
        "   seen = EXCLUDED.seen, credited_micros = EXCLUDED.credited_micros,"
        "   refunded_micros = EXCLUDED.refunded_micros, disputes = EXCLUDED.disputes,"
        "   pending = EXCLUDED.pending"
        " WHERE stripe_payments.wallet_id = EXCLUDED.wallet_id",
        [
            [p.payment_intent_id for _, p in payment_rows],
            [w for w, _ in payment_rows],
            [p.seen for _, p in payment_rows],
            [p.credited_micros for _, p in payment_rows],
            [p.refunded_micros for _, p in payment_rows],
            [json.dumps({k: list(v) for k, v in sorted(p.disputes.items())}) for _, p in payment_rows],
            [json.dumps([_pending_to_json(f) for f in p.pending]) for _, p in payment_rows],
        ],
    )
    require(cur.rowcount == len(payment_rows), "a PaymentIntent belongs to another wallet")


def _pending_to_json(f: PendingStripeFact) -> dict[str, Any]:
    return {
        "kind": f.kind,
        "factId": f.fact_id,
        "amountMicros": f.amount_micros,
        "disputeId": f.dispute_id,
        "won": f.won,
    }


def _payment_from_row(
    pi: str, seen: bool, credited: int, refunded: int, disputes: dict[str, list[Any]], pending: list[dict[str, Any]]
) -> PaymentState:
    return PaymentState(
        payment_intent_id=pi,
        seen=seen,
        credited_micros=int(credited),
        refunded_micros=int(refunded),
        disputes={k: (str(v[0]), int(v[1])) for k, v in disputes.items()},
        pending=tuple(
            PendingStripeFact(
                kind=f["kind"],
                fact_id=f["factId"],
                amount_micros=int(f["amountMicros"]),
                dispute_id=f["disputeId"],
                won=f["won"],
            )
            for f in pending
        ),
    )


class WalletCache:
    """The intake owner's wallets in memory: the state each had at the owner's last commit, with the
    row version that commit wrote (least recently used dropped beyond ``limit``).

    The rule that keeps it right while other writers (scheduler ticks, admission holds, Stripe facts,
    adjustments, another owner after a takeover) write the same wallets: every one of them bumps the
    row's version under its lock (:func:`lock_and_read_wallets`), and the owner's own commit writes
    ``locked version + 1`` (:func:`save_wallets` with ``versions``). The owner locks its batch's
    rows, reads only their versions, and uses a cached state only when its version is the row's
    (:meth:`current`); anything else is read again. Entries are put only after the commit
    (:meth:`keep`); a batch that fails, commit included, evicts its wallets (:meth:`evict`), so the
    cache is never ahead of the database. One owner, one cache, used by one thread at a time; the
    owner drops it with its ownership."""

    def __init__(self, limit: int) -> None:
        require(limit >= 1, f"wallet cache limit {limit}")
        self.limit = limit
        self._entries: OrderedDict[str, tuple[int, WalletState]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, wallet_id: str) -> tuple[int, WalletState] | None:
        return self._entries.get(wallet_id)

    def current(self, versions: Mapping[str, int]) -> dict[str, WalletState]:
        """The cached states whose version is the locked row's; stale entries are dropped."""
        out: dict[str, WalletState] = {}
        entries = self._entries
        for wid, version in versions.items():
            entry = entries.get(wid)
            if entry is not None and entry[0] == version:
                entries.move_to_end(wid)
                out[wid] = entry[1]
            elif entry is not None:
                del entries[wid]
        self.hits += len(out)
        self.misses += len(versions) - len(out)
        return out

    def keep(self, written: Mapping[str, tuple[int, WalletState]]) -> None:
        """After a commit: each written wallet's state and the version the commit wrote. Kept as a
        load would give it: open rentals only, no jobs seen (those are looked up when named)."""
        entries = self._entries
        for wid, (version, state) in written.items():
            rentals = state.rentals
            if any(r.status == "ended" for r in rentals.values()):
                rentals = {rid: r for rid, r in rentals.items() if r.status != "ended"}
            entries[wid] = (version, replace(state, rentals=rentals, jobs_seen=frozenset()))
            entries.move_to_end(wid)
        for _ in range(len(entries) - self.limit):
            entries.popitem(last=False)

    def evict(self, wallet_ids: Iterable[str]) -> None:
        for wid in wallet_ids:
            self._entries.pop(wid, None)

    def clear(self) -> None:
        self._entries.clear()
