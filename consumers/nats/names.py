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

_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bits: the hash of nats-server's ``{{partition(N, k)}}`` subject mapping."""
    h = _FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return h


def partition_of(wallet_id: str, partitions: int) -> int:
    """The partition the mapping ``billing.in.* -> billing.in.{{partition(N,1)}}.{{wildcard(1)}}``
    gives a wallet: FNV-1a-32 of the wallet token, mod N."""
    require(partitions > 0, f"partitions must be positive, not {partitions}")
    return fnv1a_32(wallet_id.encode()) % partitions


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
        """Where producers publish a wallet's usage facts (the contract's subject)."""
        return self.subject(f"billing.in.{wallet_id}")

    # Partitioned intake (DESIGN section 8, deploy/README.md "Partitions"): the NATS subject mapping
    # stores billing.in.<walletId> as billing.in.<p>.<walletId>, p = FNV-1a-32(walletId) mod N.
    def in_partition_subject(self, partition: int, wallet_id: str) -> str:
        """Where the mapping stores a wallet's usage facts: ``billing.in.<p>.<walletId>``."""
        return self.subject(f"billing.in.{partition}.{wallet_id}")

    def in_partition_filter(self, partition: int) -> str:
        """The filter of partition ``p``'s durable consumer: ``billing.in.<p>.*``."""
        return self.subject(f"billing.in.{partition}.*")

    @property
    def in_stray_filters(self) -> tuple[str, str]:
        """What no partition consumer takes: ``billing.in.<one token>`` (stored unmapped: the mapping
        is missing) and ``billing.in.<a>.<b>.>`` (deeper than the partitioned shape)."""
        return self.subject("billing.in.*"), self.subject("billing.in.*.*.>")

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
