"""A small local Stripe for tests: the endpoints the official ``stripe`` library calls, over real HTTP.

Runs a ``ThreadingHTTPServer`` on 127.0.0.1 with a free port; point a ``stripe.StripeClient`` at it
with ``base_addresses={"api": fake.url}`` (:meth:`FakeStripe.client` does). Nothing leaves the
machine.

What it speaks, as Stripe does:

- ``POST /v1/payment_intents`` (form-encoded, nested ``metadata[walletId]=...``), honouring
  ``Idempotency-Key``: the same key with the same parameters replays the first answer (header
  ``Idempotent-Replayed: true``); with other parameters it is a 400 ``idempotency_error``.
- ``GET /v1/payment_intents/{id}``, ``GET /v1/charges/{id}``, ``GET /v1/refunds/{id}``,
  ``GET /v1/disputes/{id}``: the object, or a 404 ``resource_missing``.
- ``GET /v1/payment_intents`` and ``GET /v1/refunds`` (filters ``charge``, ``payment_intent``): lists,
  newest first, with ``limit``, ``starting_after`` and ``has_more``, for reconciliation.
- ``Authorization: Bearer <api key>`` is checked (401 otherwise).

Tests move money with Python calls (:meth:`succeed`, :meth:`refund`, :meth:`dispute`,
:meth:`close_dispute`), build webhook events with :meth:`event`, and sign them with
:func:`sign_webhook` exactly as Stripe signs: ``t=<ts>,v1=<hex HMAC-SHA256(secret, f"{ts}.{payload}")>``.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import stripe

API_KEY = "sk_test_fake_billing"
API_VERSION = "2025-10-29.clover"
MIN_AMOUNT_CENTS = 50  # Stripe's minimum charge in USD
MAX_AMOUNT_CENTS = 99_999_999  # Stripe's maximum charge in USD ($999,999.99)


def sign_webhook(payload: str | bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header Stripe would send for ``payload`` at ``timestamp``."""
    ts = int(time.time()) if timestamp is None else timestamp
    text = payload.decode() if isinstance(payload, bytes) else payload
    mac = hmac.new(secret.encode(), f"{ts}.{text}".encode(), hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


@dataclass
class RecordedRequest:
    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str | None


@dataclass
class _Idempotent:
    params: dict[str, Any]
    status: int
    body: dict[str, Any]


@dataclass
class FakeStripe:
    api_key: str = API_KEY
    payment_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    disputes: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)
    """HTTP statuses to answer the next requests with (a 500 makes the library raise APIError)."""

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self._idempotency: dict[str, _Idempotent] = {}
        self._seq = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> FakeStripe:
        fake = self

        class Handler(_Handler):
            stripe_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-stripe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def client(self, **kwargs: Any) -> stripe.StripeClient:
        return stripe.StripeClient(self.api_key, base_addresses={"api": self.url}, max_network_retries=0, **kwargs)

    # ------------------------------------------------------------------------------- objects

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._seq):06d}{secrets.token_hex(6)}"

    def create_payment_intent(
        self,
        amount: int,
        *,
        currency: str = "usd",
        metadata: dict[str, str] | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            pi_id = self._id("pi")
            pi = {
                "id": pi_id,
                "object": "payment_intent",
                "amount": amount,
                "amount_received": 0,
                "currency": currency,
                "status": "requires_payment_method",
                "client_secret": f"{pi_id}_secret_{secrets.token_hex(8)}",
                "metadata": dict(metadata or {}),
                "description": description,
                "created": int(time.time()),
                "latest_charge": None,
                "livemode": False,
            }
            self.payment_intents[pi_id] = pi
            return copy.deepcopy(pi)

    def set_status(self, pi_id: str, status: str) -> dict[str, Any]:
        with self.lock:
            self.payment_intents[pi_id]["status"] = status
            return copy.deepcopy(self.payment_intents[pi_id])

    def succeed(self, pi_id: str, amount_received: int | None = None) -> dict[str, Any]:
        """The customer paid: the PaymentIntent succeeds and gets a charge (metadata copied to it)."""
        with self.lock:
            pi = self.payment_intents[pi_id]
            received = pi["amount"] if amount_received is None else amount_received
            ch_id = self._id("ch")
            self.charges[ch_id] = {
                "id": ch_id,
                "object": "charge",
                "amount": received,
                "amount_captured": received,
                "amount_refunded": 0,
                "currency": pi["currency"],
                "payment_intent": pi_id,
                "metadata": dict(pi["metadata"]),
                "paid": True,
                "refunded": False,
                "disputed": False,
                "status": "succeeded",
                "created": int(time.time()),
                "livemode": False,
            }
            pi.update(status="succeeded", amount_received=received, latest_charge=ch_id)
            return copy.deepcopy(pi)

    def charge_of(self, pi_id: str, *, embed_refunds: bool = True) -> dict[str, Any]:
        """The PaymentIntent's charge as a ``charge.*`` webhook carries it (refunds embedded)."""
        with self.lock:
            ch_id = self.payment_intents[pi_id]["latest_charge"]
            assert ch_id, f"{pi_id} has no charge: succeed() it first"
            return self._charge_view(ch_id, embed_refunds=embed_refunds)

    def _charge_view(self, ch_id: str, *, embed_refunds: bool = True) -> dict[str, Any]:
        charge = copy.deepcopy(self.charges[ch_id])
        if embed_refunds:
            mine = [copy.deepcopy(r) for r in self._newest_first(self.refunds) if r["charge"] == ch_id]
            charge["refunds"] = {
                "object": "list",
                "data": mine,
                "has_more": False,
                "total_count": len(mine),
                "url": f"/v1/charges/{ch_id}/refunds",
            }
        return charge

    def refund(self, pi_id: str, amount: int | None = None, *, status: str = "succeeded") -> dict[str, Any]:
        with self.lock:
            pi = self.payment_intents[pi_id]
            charge = self.charges[pi["latest_charge"]]
            value = charge["amount"] - charge["amount_refunded"] if amount is None else amount
            re_id = self._id("re")
            self.refunds[re_id] = {
                "id": re_id,
                "object": "refund",
                "amount": value,
                "charge": charge["id"],
                "payment_intent": pi_id,
                "currency": charge["currency"],
                "status": status,
                "metadata": {},
                "created": int(time.time()),
            }
            if status == "succeeded":
                charge["amount_refunded"] += value
                charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
            return copy.deepcopy(self.refunds[re_id])

    def dispute(self, pi_id: str, amount: int | None = None) -> dict[str, Any]:
        with self.lock:
            pi = self.payment_intents[pi_id]
            charge = self.charges[pi["latest_charge"]]
            dp_id = self._id("dp")
            self.disputes[dp_id] = {
                "id": dp_id,
                "object": "dispute",
                "amount": charge["amount"] if amount is None else amount,
                "charge": charge["id"],
                "payment_intent": pi_id,
                "currency": charge["currency"],
                "status": "needs_response",
                "reason": "fraudulent",
                "metadata": {},
                "created": int(time.time()),
            }
            charge["disputed"] = True
            return copy.deepcopy(self.disputes[dp_id])

    def close_dispute(self, dp_id: str, *, won: bool) -> dict[str, Any]:
        with self.lock:
            self.disputes[dp_id]["status"] = "won" if won else "lost"
            return copy.deepcopy(self.disputes[dp_id])

    def event(
        self, type_: str, obj: dict[str, Any], *, event_id: str | None = None, created: int | None = None
    ) -> dict[str, Any]:
        """A webhook event as Stripe posts it (a snapshot of ``obj`` in ``data.object``)."""
        return {
            "id": event_id or self._id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()) if created is None else created,
            "data": {"object": copy.deepcopy(obj)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type_,
        }

    def count(self, method: str, path_prefix: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.method == method and r.path.startswith(path_prefix))

    @staticmethod
    def _newest_first(objects: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        # Insertion order is creation order; Stripe lists newest first.
        return list(reversed(objects.values()))

    # ---------------------------------------------------------------------------- the API

    def handle(
        self, method: str, path: str, params: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self.lock:
            key = headers.get("idempotency-key")
            self.requests.append(RecordedRequest(method, path, params, key))
            if self.fail_next:
                status = self.fail_next.pop(0)
                return status, _error("api_error", f"fake failure {status}"), {}
            if headers.get("authorization") != f"Bearer {self.api_key}":
                return 401, _error("invalid_request_error", "Invalid API Key provided"), {}
            if method == "POST" and key:
                seen = self._idempotency.get(key)
                if seen is not None:
                    if seen.params != params:
                        message = (
                            "Keys for idempotent requests can only be used with the same parameters they were "
                            f"first used with. Try using a key other than '{key}' if you meant to execute a "
                            "different request."
                        )
                        return 400, _error("idempotency_error", message), {}
                    return seen.status, copy.deepcopy(seen.body), {"Idempotent-Replayed": "true"}
            status, body = self._route(method, path, params)
            if method == "POST" and key and status < 500:
                self._idempotency[key] = _Idempotent(params, status, copy.deepcopy(body))
            return status, body, {}

    def _route(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if method == "POST" and path == "/v1/payment_intents":
            return self._create_pi(params)
        if method == "GET" and path == "/v1/payment_intents":
            return self._list(self._newest_first(self.payment_intents), params, path)
        if method == "GET" and path == "/v1/refunds":
            items = self._newest_first(self.refunds)
            if "charge" in params:
                items = [r for r in items if r["charge"] == params["charge"]]
            if "payment_intent" in params:
                items = [r for r in items if r["payment_intent"] == params["payment_intent"]]
            return self._list(items, params, path)
        match = re.fullmatch(r"/v1/(payment_intents|charges|refunds|disputes)/([^/]+)", path)
        if method == "GET" and match is not None:
            kind, obj_id = match.groups()
            if kind == "charges":
                if obj_id in self.charges:
                    return 200, self._charge_view(obj_id)
            else:
                store = {"payment_intents": self.payment_intents, "refunds": self.refunds, "disputes": self.disputes}
                if obj_id in store[kind]:
                    return 200, copy.deepcopy(store[kind][obj_id])
            message = f"No such {kind[:-1].replace('_', '')}: '{obj_id}'"
            return 404, _error("invalid_request_error", message, code="resource_missing", param="id")
        return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path})")

    def _create_pi(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            amount = int(params.get("amount", ""))
        except ValueError:
            return 400, _error("invalid_request_error", "Invalid integer: amount", param="amount")
        currency = params.get("currency")
        if not currency:
            return 400, _error("invalid_request_error", "Missing required param: currency.", param="currency")
        if amount < MIN_AMOUNT_CENTS:
            return 400, _error(
                "invalid_request_error", "Amount must be at least $0.50 usd", code="amount_too_small", param="amount"
            )
        if amount > MAX_AMOUNT_CENTS:
            return 400, _error(
                "invalid_request_error",
                "Amount must be no more than $999,999.99",
                code="amount_too_large",
                param="amount",
            )
        metadata = params.get("metadata") or {}
        pi = self.create_payment_intent(
            amount, currency=str(currency), metadata=dict(metadata), description=params.get("description")
        )
        return 200, pi

    def _list(self, items: list[dict[str, Any]], params: dict[str, Any], url: str) -> tuple[int, dict[str, Any]]:
        try:
            limit = int(params.get("limit", 10))
        except ValueError:
            return 400, _error("invalid_request_error", "Invalid integer: limit", param="limit")
        if not 1 <= limit <= 100:
            return 400, _error("invalid_request_error", "limit must be between 1 and 100", param="limit")
        after = params.get("starting_after")
        if after is not None:
            ids = [i["id"] for i in items]
            if after not in ids:
                return 400, _error("invalid_request_error", f"No such object: '{after}'", param="starting_after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return 200, {
            "object": "list",
            "data": copy.deepcopy(page),
            "has_more": len(items) > limit,
            "url": url,
        }


def _error(type_: str, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"type": type_, "message": message}
    if code is not None:
        err["code"] = code
    if param is not None:
        err["param"] = param
    return {"error": err}


def decode_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding: ``metadata[walletId]=w`` -> ``{"metadata": {"walletId": "w"}}``;
    ``expand[0]=a`` -> ``{"expand": {"0": "a"}}`` (kept as a mapping: the fake never needs lists)."""
    result: dict[str, Any] = {}
    for raw_key, value in pairs:
        parts = re.findall(r"[^\[\]]+", raw_key)
        if not parts:
            continue
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return result


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stripe_fake: FakeStripe

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        pairs = parse_qsl(split.query, keep_blank_values=True) + parse_qsl(body, keep_blank_values=True)
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, payload, extra = self.stripe_fake.handle(method, split.path, decode_form(pairs), headers)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", f"req_{secrets.token_hex(6)}")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")
