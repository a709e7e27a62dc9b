"""NATS subjects and JetStream streams of the contract (DESIGN sections 3 and 5).

Production uses the names exactly as the contract writes them. A non-empty namespace
(``BILLING_NATS_NAMESPACE``) prefixes every subject (``<ns>.billing.in.>``) and stream
(``<NS>_BILLING_IN``), so that each test run, or a staging copy sharing a NATS server, has its
own streams and never collides with another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ledger.invariants import require

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]{0,40}$")


@dataclass(frozen=True, slots=True)
class NatsNames:
    namespace: str = ""

    def __post_init__(self) -> None:
        require(_NAMESPACE_RE.match(self.namespace) is not None, f"bad NATS namespace {self.namespace!r}")

    def subject(self, contract_subject: str) -> str:
        return f"{self.namespace}.{contract_subject}" if self.namespace else contract_subject

    def stream(self, contract_stream: str) -> str:
        return f"{self.namespace.upper().replace('-', '_')}_{contract_stream}" if self.namespace else contract_stream

    def strip(self, subject: str) -> str:
        """The contract subject of a namespaced one."""
        prefix = f"{self.namespace}." if self.namespace else ""
        require(subject.startswith(prefix), f"subject {subject!r} outside namespace {self.namespace!r}")
        return subject[len(prefix) :]

    # Streams and their subjects.
    @property
    def in_stream(self) -> str:
        return self.stream("BILLING_IN")

    @property
    def in_subjects(self) -> str:
        return self.subject("billing.in.>")

    def in_subject(self, wallet_id: str) -> str:
        return self.subject(f"billing.in.{wallet_id}")

    @property
    def dlq_stream(self) -> str:
        return self.stream("BILLING_DLQ")

    @property
    def dlq_subjects(self) -> str:
        return self.subject("billing.dlq.>")

    def dlq_subject(self, reason: str) -> str:
        return self.subject(f"billing.dlq.{reason}")

    @property
    def commands_stream(self) -> str:
        return self.stream("COMPUTE_COMMANDS")

    @property
    def stop_subject(self) -> str:
        return self.subject("compute.commands.stop")

    @property
    def out_stream(self) -> str:
        return self.stream("BILLING_OUT")

    @property
    def out_subjects(self) -> str:
        return self.subject("billing.out.>")

    @property
    def admission_rental(self) -> str:
        return self.subject("billing.admission.rental")

    @property
    def admission_serverless(self) -> str:
        return self.subject("billing.admission.serverless")
