"""How many lanes the intake splits a batch into, and where a message goes (consumers.settings,
consumers.intake.lane_of / lane_key)."""

from __future__ import annotations

import pytest

from consumers.intake import LANE_MESSAGES, MAX_LANES, lane_key, lane_of, worker_lanes
from consumers.names import NatsNames, partition_of
from consumers.settings import Settings


@pytest.mark.parametrize(
    ("env", "cpus", "workers", "lanes"),
    [
        ({}, 2, 2, 2),  # default on 2 CPUs: 2 worker processes, a lane each
        ({}, 1, 0, 4),  # one CPU: threads, 4 lanes unpartitioned
        ({"intake_partitions": 8}, 1, 0, 1),  # partitioned: the partitions already run side by side
        ({"intake_workers": 0}, 8, 0, 4),
        ({"intake_workers": 0, "intake_lanes": 3}, 8, 0, 3),
        ({"intake_workers": 3, "intake_lanes": 7}, 1, 3, 3),  # the processes are the lanes
    ],
)
def test_effective_workers_and_lanes(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, int], cpus: int, workers: int, lanes: int
) -> None:
    monkeypatch.setattr("consumers.settings.os.cpu_count", lambda: cpus)
    s = Settings(**env)  # type: ignore[arg-type]
    assert s.effective_intake_workers() == workers
    assert s.effective_intake_lanes() == lanes


def test_a_wallets_subjects_share_a_lane_in_both_shapes() -> None:
    names = NatsNames("ns")
    for i in range(200):
        wallet = f"w{i:04d}"
        flat = names.in_subject(wallet)
        partitioned = names.in_partition_subject(partition_of(wallet, 8), wallet)
        assert lane_key(flat) == lane_key(partitioned) == wallet
        assert lane_of(lane_key(flat), 4) == lane_of(wallet, 4)


def test_lanes_spread_the_wallets_of_one_partition() -> None:
    """crc32 for lanes, not the partitions' FNV-1a: within partition 3 of 8, 2 lanes both get wallets."""
    wallets = [f"w{i:05d}" for i in range(2000) if partition_of(f"w{i:05d}", 8) == 3]
    counts = [sum(1 for w in wallets if lane_of(w, 2) == lane) for lane in (0, 1)]
    assert min(counts) > 0.35 * len(wallets), counts


def test_worker_lanes_one_per_process_and_at_most_lane_messages_each() -> None:
    """A large batch becomes several lanes (queued for the processes): a lane's transaction holds
    its wallets' locks, which a scheduler tick waits out, so lanes stay at about LANE_MESSAGES."""
    assert worker_lanes(1, 2) == 2  # one per process (empty lanes are not run)
    assert worker_lanes(LANE_MESSAGES, 2) == 2
    assert worker_lanes(2 * LANE_MESSAGES + 1, 2) == 3
    assert worker_lanes(4 * LANE_MESSAGES, 1) == 4
    assert worker_lanes(100 * LANE_MESSAGES, 2) == MAX_LANES
