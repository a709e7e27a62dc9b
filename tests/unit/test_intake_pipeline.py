"""The pipelined intake's lanes (consumers.intake.Intake._lanes): a lane of the next batch starts
once the lanes of the previous batch that may hold the same wallets are done, and no sooner; the
other lanes go on. The transactions are replaced by futures the test completes by hand."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from consumers.intake import Intake, IntakeConfig, _Action, _Item, _Outcome, lane_of

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def _wallets_in_lanes(lanes: int) -> list[str]:
    """One wallet id per lane of ``lanes`` (lane k at index k)."""
    found: dict[int, str] = {}
    for n in range(1000):
        found.setdefault(lane_of(f"w{n}", lanes), f"w{n}")
        if len(found) == lanes:
            return [found[k] for k in range(lanes)]
    raise AssertionError("no wallet for every lane")


class _Harness:
    """An Intake with only what _lanes needs; each lane transaction waits for the test."""

    def __init__(self, lanes: int) -> None:
        self.intake = Intake.__new__(Intake)
        self.intake._workers = None
        self.intake._config = IntakeConfig(lanes=lanes)
        self.intake._lane_tails = []
        self.started: list[tuple[int, tuple[str, ...]]] = []
        self.gates: dict[tuple[int, tuple[str, ...]], asyncio.Future[str]] = {}
        self.batch = 0
        self.intake._process = self._process  # type: ignore[method-assign]

    async def _process(
        self, idx: list[int], items: list[_Item], now: datetime, stop: asyncio.Event
    ) -> dict[int, _Outcome]:
        batch = items[idx[0]].stream_seq // 1000
        key = (batch, tuple(sorted({items[i].subject.rsplit(".", 1)[-1] for i in idx})))
        self.started.append(key)
        gate = self.gates[key] = asyncio.get_running_loop().create_future()
        action = _Action.release if await gate == "release" else _Action.ack
        return {i: _Outcome(action, action.value) for i in idx}

    def submit(self, wallets: list[str]) -> list[asyncio.Future[dict[int, _Outcome]]]:
        """The next batch, one message per wallet (stream sequence: batch * 1000 + n)."""
        self.batch += 1
        items = [_Item(f"billing.in.{w}", 1, self.batch * 1000 + n, raw=b"{}") for n, w in enumerate(wallets)]
        return self.intake._lanes(items, NOW, asyncio.Event())

    def open(self, batch: int, wallet: str, how: str = "commit") -> None:
        self.gates[(batch, (wallet,))].set_result(how)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lane_waits_for_its_own_lane_of_the_previous_batch_only() -> None:
    h = _Harness(lanes=2)
    a, b = _wallets_in_lanes(2)
    first = h.submit([a, b])
    await _settle()
    second = h.submit([a, b])
    await _settle()
    assert h.started == [(1, (a,)), (1, (b,))]
    h.open(1, b)  # b's lane of batch 1 commits; a's is still in the database
    await _settle()
    assert (2, (b,)) in h.started, "b's next lane goes on while a's lane is blocked"
    assert (2, (a,)) not in h.started, "a's next events wait for a's blocked lane"
    h.open(1, a)
    await _settle()
    assert (2, (a,)) in h.started
    h.open(2, a)
    h.open(2, b)
    for lane in [*first, *second]:
        assert all(o.action is _Action.ack for o in (await lane).values())


async def test_with_another_lane_count_every_lane_waits_for_the_whole_previous_batch() -> None:
    h = _Harness(lanes=2)
    a, b = _wallets_in_lanes(2)
    h.submit([a, b])
    await _settle()
    h.intake._config = IntakeConfig(lanes=3)  # the wallet -> lane mapping changes
    c0, c1, c2 = _wallets_in_lanes(3)
    h.submit([c0, c1, c2])
    await _settle()
    h.open(1, a)
    await _settle()
    assert [s for s in h.started if s[0] == 2] == [], "a lane of batch 2 may hold b's wallets"
    h.open(1, b)
    await _settle()
    assert sorted(s for s in h.started if s[0] == 2) == sorted([(2, (c0,)), (2, (c1,)), (2, (c2,))])


async def test_an_empty_lane_passes_its_predecessors_on() -> None:
    h = _Harness(lanes=2)
    a, b = _wallets_in_lanes(2)
    h.submit([a, b])
    h.submit([b])  # nothing in a's lane
    await _settle()
    third = h.submit([a])
    await _settle()
    assert (3, (a,)) not in h.started, "batch 3's lane of a still follows batch 1's"
    h.open(1, a)
    await _settle()
    assert (3, (a,)) in h.started
    h.open(1, b)
    await _settle()
    h.open(2, b)
    h.open(3, a)
    await third[0]


async def test_a_lane_after_a_released_lane_releases_its_messages_too() -> None:
    h = _Harness(lanes=2)
    a, b = _wallets_in_lanes(2)
    h.submit([a, b])
    await _settle()
    second = h.submit([a])
    await _settle()
    h.open(1, a, "release")  # shutdown with the database away: left for redelivery
    h.open(1, b)
    (lane,) = second
    outcomes = await lane
    assert (2, (a,)) not in h.started, "not run: a's earlier events come back first"
    assert all(o.action is _Action.release for o in outcomes.values())
