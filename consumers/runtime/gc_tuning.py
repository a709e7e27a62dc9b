"""Garbage collector settings of the service's processes (``billing up`` and its one-shot commands)."""

from __future__ import annotations

import gc
from typing import Final

# The cyclic collector's first-generation threshold (CPython's default is 700): the count of
# container objects allocated and not yet freed since the last collection. A batch of the intake
# holds tens of thousands of them alive at once (parsed events, states, postings, rows), which
# reference counting frees at the batch's end: they are never cyclic garbage. At 50,000 a batch
# crossed the threshold about once, and each of those collections walked the batch's live objects:
# `bench/bench_writer.py` with a gc callback measured 72 collections, 3.6 s over 3 runs of 100k
# events (12 us an event, 8% of the writer's CPU); at 1,000,000, none (writer CPU 132 against 143
# us an event, same run, bench/README.md). The cost: a collection comes only after a million
# net new objects (the wallet cache filling, for instance), and then walks them all (~0.1 s).
GC_GEN0_THRESHOLD: Final = 1_000_000


def tune_gc() -> None:
    """Move what start-up made (modules, schemas, the app) out of the collector's sight for good
    (``gc.freeze``), and raise the first-generation threshold (see GC_GEN0_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
