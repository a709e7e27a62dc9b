"""Property-based fuzzing of the whole HTTP surface: no input yields a 500.

1. Schemathesis reads the API's own OpenAPI document and generates requests for every operation,
   valid ones (positive mode) and schema-violating ones (negative mode), with a valid token; each
   response goes through schemathesis' checks (no server error, documented status codes, content
   types and response schemas, auth not ignored...).
2. Hypothesis generates *correctly signed* Stripe webhooks of the handled types with arbitrary
   objects (the one path schemathesis cannot reach: it cannot sign), and asserts no 5xx other than
   an honest 502 for "Stripe unavailable", and that the ledger still sums to zero.

Each test prints the requests it tried and the failures it found (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from consumers.http.app import create_app
from tests.fake_stripe import FakeStripe
from tests.integration.http_support import BOTH_TOKEN, Clock, ledger_total, make_settings, signed

BOTH_AUTH = {"Authorization": f"Bearer {BOTH_TOKEN}"}  # wallet and finance scopes: every operation

pytestmark = pytest.mark.integration

# BILLING_FUZZ_SCALE=10 runs ten times as many examples (a longer campaign than CI's).
_SCALE = int(os.environ.get("BILLING_FUZZ_SCALE", "1"))
EXAMPLES_PER_OPERATION_AND_MODE = 120 * _SCALE
SIGNED_WEBHOOK_EXAMPLES = 300 * _SCALE


@pytest.fixture(scope="module")
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
def app(app_engine: Engine, fake_stripe: FakeStripe) -> FastAPI:
    return create_app(app_engine, make_settings(), stripe_client=fake_stripe.client(), clock=Clock())


def _describe(error: BaseException) -> str:
    """The checks that failed, by title (a FailureGroup holds one Failure per check)."""
    parts = getattr(error, "exceptions", None) or [error]
    titles = []
    for part in parts:
        title = getattr(part, "title", None) or type(part).__name__
        message = getattr(part, "message", None) or str(part)
        titles.append(f"{title}: {message.strip().splitlines()[0][:160] if message.strip() else ''}")
    return " | ".join(sorted(set(titles)))


def test_schemathesis_finds_no_500_anywhere(app: FastAPI, fake_stripe: FakeStripe) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tried: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[tuple[str, str, str]] = []
    server_errors: list[tuple[str, int, str]] = []
    unauthorized: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    # "Schema-valid data must be accepted" cannot hold for two operations, by design: a webhook
    # needs Stripe's HMAC signature (no schema can say that), and a top-up amount is also bound by
    # R1 (the configured maximum) and whole cents, which JSON numbers cannot express exactly.
    # Every other check runs on them, schema-invalid data must still be rejected, and no 500 anywhere.
    acceptance = schemathesis.checks.positive_data_acceptance
    excluded = {"POST /stripe/webhook": [acceptance], "POST /wallet/create-intent": [acceptance]}
    # Finance reports: a period must not end before it starts (422), which no OpenAPI schema can
    # say of two parameters; and their query strings are read leniently as FastAPI does (unknown
    # parameters ignored, a Unix timestamp taken as an instant), so "schema-violating data is
    # rejected" does not hold for them either. No 500 and the other checks still apply.
    rejection = schemathesis.checks.negative_data_rejection
    for label in ("trial-balance", "debts"):
        excluded[f"GET /finance/{label}"] = [rejection]
    for label in ("statements/{walletId}", "revenue", "rejected", "stripe-reconciliation", "anomalies"):
        excluded[f"GET /finance/{label}"] = [acceptance, rejection]
    assert len(operations) == 12  # 5 wallet/Stripe operations and 7 finance reports

    def fuzz(operation: Any, mode: schemathesis.GenerationMode) -> None:
        label = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION_AND_MODE,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            response = case.call(headers=BOTH_AUTH)
            tried[label] += 1
            statuses[response.status_code] += 1
            if response.status_code == 401:  # negative mode drops the token on purpose
                unauthorized.append(label)
            if response.status_code >= 500:
                server_errors.append((label, response.status_code, response.text[:300]))
            try:
                case.validate_response(response, headers=BOTH_AUTH, excluded_checks=excluded.get(label))
            except BaseException as error:  # schemathesis raises Failure / FailureGroup
                if isinstance(error, KeyboardInterrupt):
                    raise
                failures.append((label, mode.value, _describe(error)))

        run()

    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz(operation, mode)

    total = sum(tried.values())
    print(f"\nschemathesis: {total} requests over {len(operations)} operations (positive and negative)")
    for label, n in sorted(tried.items()):
        print(f"  {n:5d}  {label}")
    print(f"  statuses: {dict(sorted(statuses.items()))}")
    print(f"  check failures: {len(failures)}; server errors: {len(server_errors)}")
    for failure, n in Counter(failures).most_common(20):
        print(f"   {n:4d}x", failure)
    print(f"  401s (negative auth cases): {dict(Counter(unauthorized))}")
    assert server_errors == []
    assert failures == []
    assert total >= 11 * 2 * 20  # hypothesis may stop early on small input spaces, never this early


# --------------------------------------------------------------------------- signed webhooks

_ids = st.one_of(
    st.from_regex(r"\A(pi|ch|re|dp|evt)_[A-Za-z0-9]{1,20}\Z"),
    st.text(max_size=30),
    st.integers(),
    st.none(),
)
_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)
_amounts = st.one_of(st.integers(min_value=-5, max_value=10**12), _json)
_statuses = st.sampled_from(["succeeded", "pending", "failed", "won", "lost", "needs_response", "warning_closed"])
_metadata = st.one_of(
    st.fixed_dictionaries({"walletId": st.one_of(st.from_regex(r"\Afz_[a-z0-9]{1,8}\Z"), st.text(max_size=70))}),
    st.just({}),
    st.none(),
    _json,
)


@st.composite
def _stripe_objects(draw: st.DrawFn, pi_ids: list[str]) -> dict[str, Any]:
    known = st.sampled_from(pi_ids) if pi_ids else _ids
    fields = {
        "id": st.one_of(known, _ids),
        "object": st.sampled_from(["payment_intent", "charge", "dispute", "refund"]),
        "amount": _amounts,
        "amount_received": _amounts,
        "currency": st.sampled_from(["usd", "USD", "eur", ""]) | _json,
        "status": _statuses | _json,
        "metadata": _metadata,
        "payment_intent": st.one_of(known, _ids, st.fixed_dictionaries({"id": known})),
        "charge": _ids,
        "refunds": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {
                    "data": st.lists(
                        st.fixed_dictionaries({"id": _ids, "amount": _amounts, "status": _statuses | _json}),
                        max_size=4,
                    ),
                    "has_more": st.booleans() | _json,
                }
            ),
            _json,
        ),
    }
    chosen = draw(st.sets(st.sampled_from(sorted(fields)), min_size=0, max_size=len(fields)))
    return {name: draw(fields[name]) for name in sorted(chosen)}


def test_signed_webhooks_of_any_shape_never_500(app: FastAPI, fake_stripe: FakeStripe, app_engine: Engine) -> None:
    pi_ids = []
    for i in range(3):  # a few real PaymentIntents, so some fuzzed events reach the ledger
        pi = fake_stripe.create_payment_intent(1000 + i, metadata={"walletId": f"fz_{i}"})
        pi_ids.append(fake_stripe.succeed(pi["id"])["id"])
    tried = 0
    statuses: Counter[int] = Counter()
    problems: list[str] = []

    with TestClient(app, raise_server_exceptions=False) as client:

        @given(
            type_=st.sampled_from(
                ["payment_intent.succeeded", "charge.refunded", "charge.dispute.created", "charge.dispute.closed"]
            )
            | st.text(max_size=20),
            obj=_stripe_objects(pi_ids),
            event_id=st.from_regex(r"\Aevt_[A-Za-z0-9]{1,24}\Z"),
            created=st.one_of(st.none(), st.integers(min_value=-(2**40), max_value=2**40), _json),
        )
        @settings(
            max_examples=SIGNED_WEBHOOK_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(type_: str, obj: dict[str, Any], event_id: str, created: Any) -> None:
            nonlocal tried
            event: dict[str, Any] = {"id": event_id, "object": "event", "type": type_, "data": {"object": obj}}
            if created is not None:
                event["created"] = created
            body, headers = signed(event)
            try:
                response = client.post("/stripe/webhook", content=body, headers=headers)
            except Exception:
                problems.append(traceback.format_exc(limit=3))
                return
            tried += 1
            statuses[response.status_code] += 1
            if response.status_code >= 500 and response.json().get("error") != "stripe_unavailable":
                problems.append(f"{response.status_code} {response.text[:200]} for {json.dumps(event)[:300]}")
            elif response.status_code not in (200, 400, 502, 503):
                problems.append(f"unexpected {response.status_code} {response.text[:200]}")

        run()

    print(f"\nsigned webhooks: {tried} requests; statuses {dict(sorted(statuses.items()))}; failures {len(problems)}")
    for problem in problems[:10]:
        print("   ", problem)
    assert problems == []
    assert ledger_total(app_engine) == 0
