"""Prometheus metrics of the service (``GET /metrics``).

Each :class:`Metrics` has its own registry, so several instances (an in-process test beside
another, or two intakes in one test run) never collide on metric names in the global registry.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_BATCH_SIZE_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_in = Counter(
            "billing_intake_messages",
            "Messages of billing.in.> handled, by what became of them (accepted, duplicate, rejected, retry).",
            ["disposition"],
            registry=r,
        )
        self.dead_letters = Counter(
            "billing_dead_letters",
            "Inputs dead-lettered to billing.dlq.<reason>, by reason.",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "billing_intake_batch_size",
            "Messages per intake batch (one database transaction).",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "billing_intake_batch_seconds",
            "Time to handle one batch: parse, transaction, commit, acks and dead letters.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_failures = Counter(
            "billing_intake_batch_failures",
            "Batch transactions that failed and were retried (kind: database unavailable, or error).",
            ["kind"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "billing_intake_consumer_lag",
            "Messages of billing.in.> not yet delivered to the intake (from the last delivery's metadata).",
            registry=r,
        )

        # --- intake: hostile input (helper "intake", issue 13) ---
        r.register(_UnreadableMessages())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ProcessCounter:
    """A count shared by every thread of this process, for the code that has no registry at hand
    (the nats-py patch of consumers.nats.safety counts unreadable messages here)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._value += n

    def value(self) -> int:
        with self._lock:
            return self._value


# Messages this process's NATS connections could not read at all (dropped, logged).
UNREADABLE_MESSAGES: Final = ProcessCounter()


class _UnreadableMessages(Collector):
    """``billing_intake_unreadable_messages_total``: messages this process's NATS client could not
    read at all and dropped (consumers.nats.safety counts them process-wide, for every connection)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "billing_intake_unreadable_messages",
            "NATS messages the client could not read (dropped and logged; a JetStream delivery is redelivered).",
            value=UNREADABLE_MESSAGES.value(),
        )
