"""The collector's settings for a long-lived server process, applied once the models are loaded.

On CPython's generational collector (3.11-3.13; 3.14's incremental one reads these differently,
so it keeps its defaults): allocations between two young collections (CPython 3.11: 700), and
middle-generation collections between two full ones (CPython: 10).
"""

from __future__ import annotations

import gc
import sys

TUNE_COLLECTOR = sys.version_info < (3, 14)
YOUNG_COLLECTION_EVERY = 50_000
FULL_COLLECTION_EVERY = 2


def tune_collector() -> None:
    """Once the models are loaded: freeze what lives as long as the process, and collect the
    young generation less often (what each part measured: docs/benchmarks/gc_tuning.md)."""
    # Everything alive once the models are loaded (torch, the framework, the models) lives as
    # long as the process: out of the collector's sight, a full collection scans only what
    # requests and sessions allocate.
    gc.collect()
    gc.freeze()
    # A young collection promotes whatever is alive then, and with hundreds of requests in
    # flight that is mostly their objects, which the older generations then scan again:
    # collecting the young less often lets most of them die first. A full collection after 2
    # middle-generation ones comes about as often as with CPython's defaults, so cycles that
    # outlive the young collections wait no longer than before.
    if TUNE_COLLECTOR:
        _, middle, _ = gc.get_threshold()
        gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, FULL_COLLECTION_EVERY)
