"""Partitioning of billing.in (DESIGN section 8): the hash of nats-server's {{partition(N,1)}}, the
subject check of the intake with and without partitions, fair shares, the BILLING_NATS_URL list."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from nats.aio.msg import Msg

from consumers.nats.intake import ConsumerSpec, IntakeConfig, consumer_config, prepare
from consumers.nats.names import NatsNames, fnv1a_32, partition_of
from consumers.nats.partitions import fair_share, lock_classes
from consumers.runtime.settings import nats_servers
from ledger.events import RejectReason, event_to_json
from tests.factories import adjusted

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 28, 10, 5, tzinfo=UTC)


def test_fnv1a_32_reference_values() -> None:
    # The published FNV-1a 32-bit test vectors.
    assert fnv1a_32(b"") == 0x811C9DC5
    assert fnv1a_32(b"a") == 0xE40C292C
    assert fnv1a_32(b"foobar") == 0xBF9CF968


def test_partition_of_matches_what_nats_server_gave() -> None:
    # Measured against nats-server 2.15.1's mapping by tests/integration/test_deploy_configs.py,
    # which checks every one of these against the real server; a few pinned here.
    partitions = {w: partition_of(w, 8) for w in ["w0", "w1", "w_acme", "W-42", "a" * 64]}
    assert all(0 <= p < 8 for p in partitions.values())
    assert partition_of("w1", 8) == fnv1a_32(b"w1") % 8
    assert len({partition_of(f"w{i}", 8) for i in range(24)}) == 8
    with pytest.raises(Exception, match="partitions must be positive"):
        partition_of("w1", 0)


@pytest.mark.parametrize(
    ("partitions", "live", "share"), [(8, 1, 8), (8, 2, 4), (8, 3, 3), (8, 5, 2), (8, 8, 1), (8, 9, 1), (8, 0, 8)]
)
def test_fair_share(partitions: int, live: int, share: int) -> None:
    assert fair_share(partitions, live) == share
    assert share * max(live, 1) >= partitions  # the shares always cover every partition


def test_lock_classes_differ_per_namespace_and_durable() -> None:
    a = lock_classes(NatsNames(""), "billing-intake")
    assert a == lock_classes(NatsNames(""), "billing-intake")
    assert a != lock_classes(NatsNames("staging"), "billing-intake")
    assert a != lock_classes(NatsNames(""), "other")
    assert a[0] != a[1]
    assert all(0 <= k < 2**31 for k in a)


def test_nats_url_list() -> None:
    assert nats_servers("nats://a:4222") == ["nats://a:4222"]
    assert nats_servers(" nats://u:p@a:4222, nats://u:p@b:4222 ,nats://u:p@c:4222,") == [
        "nats://u:p@a:4222",
        "nats://u:p@b:4222",
        "nats://u:p@c:4222",
    ]
    with pytest.raises(ValueError, match="no server"):
        nats_servers(" , ")


def _delivery(subject: str, data: bytes, seq: int = 1) -> Msg:
    reply = f"$JS.ACK.BILLING_IN.billing-intake-0.1.{seq}.{seq}.1700000000000000000.0"
    return Msg(_client=None, subject=subject, reply=reply, data=data)  # type: ignore[arg-type]


def test_prepare_accepts_the_wallets_partition_only() -> None:
    names = NatsNames("")
    w = "w_acme"
    p = partition_of(w, 8)
    raw = event_to_json(adjusted(w, 1_000_000, time=NOW))
    wrong = (p + 1) % 8
    msgs = [
        _delivery(f"billing.in.{p}.{w}", raw, 1),
        _delivery(f"billing.in.{wrong}.{w}", raw, 2),  # a producer addressing a partition by hand
        _delivery(f"billing.in.{w}", raw, 3),  # stored unmapped: the server has no mapping
        _delivery(f"billing.in.{p}.other", raw, 4),  # another wallet's subject
    ]
    items = prepare(msgs, now=NOW, names=names, max_deliver=5, partitions=8)
    assert items[0].incoming is not None
    assert items[0].refused is None
    for item in items[1:]:
        assert item.refused is not None
        assert item.refused.rejection.reason is RejectReason.subject_mismatch
    assert items[1].refused is not None
    assert f"partition {p} of 8" in items[1].refused.rejection.detail
    assert f"'billing.in.{p}.{w}'" in items[1].refused.rejection.detail
    assert items[2].refused is not None
    assert "not partitioned" in items[2].refused.rejection.detail
    assert "mapping" in items[2].refused.rejection.detail

    # Unpartitioned (the default): billing.in.<walletId> only; a mapped subject says what to set.
    flat = prepare(msgs, now=NOW, names=names, max_deliver=5)
    assert [i.incoming is not None for i in flat] == [False, False, True, False]
    assert flat[0].refused is not None
    assert "set BILLING_INTAKE_PARTITIONS" in flat[0].refused.rejection.detail
    assert flat[3].refused is not None
    assert "BILLING_INTAKE_PARTITIONS" not in flat[3].refused.rejection.detail


def test_consumer_specs() -> None:
    names, config = NatsNames("ns"), IntakeConfig()
    assert consumer_config(names, config).filter_subject == "ns.billing.in.>"
    c3 = consumer_config(names, config, ConsumerSpec.partition(names, config, 3, 8))
    assert (c3.durable_name, c3.filter_subject, c3.filter_subjects) == ("billing-intake-3", "ns.billing.in.3.*", None)
    strays = consumer_config(names, config, ConsumerSpec.strays(names, config, 8))
    assert strays.durable_name == "billing-intake-strays"
    assert strays.filter_subject is None
    assert strays.filter_subjects == ["ns.billing.in.*", "ns.billing.in.*.*.>"]
    with pytest.raises(Exception, match="outside"):
        ConsumerSpec.partition(names, config, 8, 8)
