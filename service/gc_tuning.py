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
    young generation less often (the measurements are in the comments)."""
    # Everything alive once the models are loaded (torch, the framework, the models)
    # lives as long as the process: take it out of the collector's sight, so a full
    # collection scans only what requests and sessions allocate. With 10,000 sessions
    # this took the p99 of bench/open_loop.py from 146 ms to 50 ms.
    gc.collect()
    gc.freeze()
    # A young collection promotes whatever is alive then, and with hundreds of requests
    # in flight that is mostly their objects, which the older generations then scan
    # again. Collecting the young after 50,000 allocations instead of 700 lets most of
    # them die first: with 1,000 one-row WebSocket sessions, p99 82-89 -> 69-78 ms at
    # 18,200-18,700 -> 18,800-19,000 steps/s (bench/ws_stream.py, alternating pairs;
    # 256 sessions unchanged). A full collection scans every session (~30k objects at
    # 10,000 sessions, ~8 ms); after 2 middle-generation ones it comes about every 1M
    # allocations, as often as with last round's 700 x 10 x 100 (bench/open_loop.py
    # p99 38 ms), so cycles that outlive the young collections wait no longer than then.
    if TUNE_COLLECTOR:
        _, middle, _ = gc.get_threshold()
        gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, FULL_COLLECTION_EVERY)
