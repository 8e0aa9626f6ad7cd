"""Triton's statistics extension (`GET /v2/models[/{name}[/versions/1]]/stats`), read from the
/metrics page the server already keeps (every process's, summed), so the two always agree.

Which Triton field comes from which series is in docs/oip.md ("Statistics"); fields tcnserve does
not measure per model are 0 there, and said so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

NS_PER_S = 1e9
TIMESTEPS = "tcnserve_timesteps_total"
CALLS, COMPUTE_S = "tcnserve_model_compute_seconds_count", "tcnserve_model_compute_seconds_sum"
QUEUE = "tcnserve_batch_queue_delay_seconds"
QUEUED, QUEUE_S = f"{QUEUE}_count", f"{QUEUE}_sum"
SERIES = frozenset((TIMESTEPS, CALLS, COMPUTE_S, QUEUED, QUEUE_S))
# Model calls that compute outputs (a batched step or chunked push, a /predict forward), not
# the pool's opens, closes and resets, the loading or the warm-up; None: a series without ops.
INFERRING = frozenset(("step", "forward", None))
UNMEASURED = ("fail", "cache_hit", "cache_miss")


def model_stats(page: bytes, names: Iterable[str], version: str) -> dict[str, Any]:
    """Triton's `{"model_stats": [...]}` for `names`, from a Prometheus text page."""
    totals: defaultdict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(page.decode()):
        for sample in family.samples:
            model, op = sample.labels.get("model"), sample.labels.get("op")
            if model is not None and sample.name in SERIES and op in INFERRING:
                totals[sample.name, model] += sample.value  # summed over modes and ops
    return {"model_stats": [_one(name, version, totals) for name in names]}


def _one(name: str, version: str, totals: dict[tuple[str, str], float]) -> dict[str, Any]:
    def get(series: str) -> float:
        return totals.get((series, name), 0.0)

    calls = int(get(CALLS))
    compute_ns, queue_ns = int(get(COMPUTE_S) * NS_PER_S), int(get(QUEUE_S) * NS_PER_S)
    stats = {
        "success": {"count": calls, "ns": queue_ns + compute_ns},
        "queue": {"count": int(get(QUEUED)), "ns": queue_ns},
        "compute_infer": {"count": calls, "ns": compute_ns},
        # Copying rows in and outputs out is part of the model call, timed in compute_infer;
        # the counts match it, as perf_analyzer requires of the three compute fields.
        "compute_input": {"count": calls, "ns": 0},
        "compute_output": {"count": calls, "ns": 0},
    }
    return {
        "name": name,
        "version": version,
        "last_inference": 0,
        "inference_count": int(get(TIMESTEPS)),
        "execution_count": calls,
        "inference_stats": stats | {field: {"count": 0, "ns": 0} for field in UNMEASURED},
        "batch_stats": [],
    }
