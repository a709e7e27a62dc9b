"""The last step of `make bench`: the figures of both configurations (one instance, 2 instances x 8
partitions; ``bench_e2e.py --json-out``) side by side per shape, and the scaling of the second over
the first, three ways, each printed with its method:

* wall: drain events/s of 2 x 8 / of one instance, on the same 2 cores (the instances, PostgreSQL,
  NATS and the bench share them: on this machine it measures contention, not scaling);
* pinned: the same with each instance (and its child processes) on its own core by ``taskset``
  (one instance on core 0; two on cores 0 and 1); PostgreSQL and NATS still float over both;
* per service core-second: events per second of service CPU (the kernel's figure, psutil) of 2 x 8
  over one instance's, times 2: what two instances each with a core would do if each kept that
  efficiency (a projection from measured figures, not a measurement).

    python bench/bench_summary.py ONE.json PARTITIONED.json [WRITERS.json]

WRITERS.json, when given: one instance with BILLING_INTAKE_PARTITIONS=8 and BILLING_INTAKE_WRITERS=2
(its partitions owned by two writer processes), printed beside the others with its drain over the
unpartitioned instance's (both one instance on the same 2 cores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_e2e import print_side_by_side

SCALING_GOAL = 1.8


def _ratio(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if a is not None and b else None


def _goal(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f} x ({'>=' if x >= SCALING_GOAL else '<'} {SCALING_GOAL})"


def scaling_lines(one: dict[str, Any], two: dict[str, Any]) -> list[str]:
    wall = _ratio(two["drain"], one["drain"])
    pinned = _ratio(two.get("drain_pinned"), one.get("drain_pinned"))
    eff = _ratio(two["drain_events_per_service_core_s"], one["drain_events_per_service_core_s"])
    return [
        f"  {one['shape']}: 2 x 8 partitions / one instance, drain events/s:",
        f"    wall, shared 2 cores:                 {_goal(wall)}"
        f"  ({two['drain']:,.0f} / {one['drain']:,.0f} events/s)",
        f"    pinned, taskset one core an instance: {_goal(pinned)}"
        + (
            f"  ({two['drain_pinned']:,.0f} / {one['drain_pinned']:,.0f} events/s; service cores busy"
            f" {two['drain_pinned_service_cores']:.2f} / {one['drain_pinned_service_cores']:.2f})"
            if pinned is not None
            else "  (no pinned drain: bench_e2e.py --pin-drain)"
        ),
        f"    per service core-second, x 2:         {_goal(2 * eff if eff is not None else None)}"
        f"  (events per service core-second {two['drain_events_per_service_core_s']:,.0f}"
        f" / {one['drain_events_per_service_core_s']:,.0f}; a projection, not a measurement)",
    ]


def writers_lines(one: dict[str, Any], writers: dict[str, Any]) -> list[str]:
    wall = _ratio(writers["drain"], one["drain"])
    return [
        f"  {one['shape']}: one instance, 8 partitions over 2 writer processes / one instance unpartitioned:"
        f" {wall:.2f} x ({writers['drain']:,.0f} / {one['drain']:,.0f} events/s)"
        if wall is not None
        else f"  {one['shape']}: n/a"
    ]


def main() -> None:
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    one, two, *more = (json.loads(Path(p).read_text()) for p in sys.argv[1:])
    by_shape = {c["shape"]: c for c in one}
    writers = {c["shape"]: c for c in more[0]} if more else {}
    columns = [
        col
        for c in two
        if c["shape"] in by_shape
        for col in (by_shape[c["shape"]], *([writers[c["shape"]]] if c["shape"] in writers else []), c)
    ]
    print(f"==== make bench: {'all three' if writers else 'both'} configurations, side by side ====")
    print_side_by_side(columns)
    print()
    print("scaling (the goal: 2 instances x 8 partitions >= 1.8 x one instance where the cores allow):")
    for c in two:
        if c["shape"] in by_shape:
            print("\n".join(scaling_lines(by_shape[c["shape"]], c)))
    if writers:
        print("one instance with its partitions over writer processes (BILLING_INTAKE_WRITERS):")
        for shape, c in writers.items():
            if shape in by_shape:
                print("\n".join(writers_lines(by_shape[shape], c)))


if __name__ == "__main__":
    main()
