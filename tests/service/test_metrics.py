"""LoopCounter: the lock-free counters of per-message metrics render like any Prometheus counter."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_loop_counters_render_as_counters_with_their_labels() -> None:
    metrics = Metrics()
    streamed = metrics.timesteps.labels("m", "stream")
    streamed.inc(3)
    streamed.inc()
    metrics.timesteps.labels("m", "predict").inc(10)
    metrics.websocket_messages.labels("binary", "ok").inc()
    assert metrics.timesteps.labels("m", "stream") is streamed  # one child per label set
    got = samples(metrics)
    assert got[("tcnserve_timesteps_total", (("mode", "stream"), ("model", "m")))] == 4
    assert got[("tcnserve_timesteps_total", (("mode", "predict"), ("model", "m")))] == 10
    key = ("tcnserve_websocket_messages_total", (("kind", "binary"), ("outcome", "ok")))
    assert got[key] == 1
    created = ("tcnserve_timesteps_created", (("mode", "stream"), ("model", "m")))
    assert got[created] > 1.7e9  # a Unix time, as a prometheus_client Counter renders it
    text = metrics.render().decode()
    assert "# TYPE tcnserve_timesteps_total counter" in text
    assert "# HELP tcnserve_websocket_messages_total WebSocket pushes answered" in text


def test_loop_counters_refuse_wrong_labels_and_decrements() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="takes labels"):
        metrics.timesteps.labels("only-one")
    with pytest.raises(ValueError, match="only go up"):
        metrics.timesteps.labels("m", "stream").inc(-1)
    assert metrics.timesteps.labels("m", "stream").value == 0
