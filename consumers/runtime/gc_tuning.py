"""Garbage collector settings of the service's processes (``billing up`` and its one-shot commands)."""

from __future__ import annotations

import gc
from typing import Final

# The cyclic collector's first-generation threshold (CPython's default is 700 allocations). A batch
# allocates hundreds of thousands of short-lived objects (parsed events, states, postings) that
# reference counting frees on its own; with the default the collector runs thousands of times a
# second for almost nothing, and each older-generation pass walks every live object.
GC_GEN0_THRESHOLD: Final = 50_000


def tune_gc() -> None:
    """Move what start-up made (modules, schemas, the app) out of the collector's sight for good
    (``gc.freeze``), and raise the first-generation threshold (see GC_GEN0_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
