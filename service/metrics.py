"""Prometheus metrics of one app, in its own CollectorRegistry (so tests never collide)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class Metrics:
    """Every tcnserve_ series; labels never carry session ids."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tcnserve_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.grpc_requests = Counter(
            "tcnserve_grpc_requests",
            "gRPC requests by method and status code (on ModelStreamInfer, each request)",
            ["method", "code"],
            registry=r,
        )
        self.request_latency = Histogram(
            "tcnserve_request_duration_seconds",
            "HTTP request latency",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.timesteps = LoopCounter(
            "tcnserve_timesteps", "Timesteps processed", ["model", "mode"], registry=r
        )
        self.active_sessions = Gauge(
            "tcnserve_active_sessions", "Open streaming sessions", ["model"], registry=r
        )
        self.sessions_created = Counter(
            "tcnserve_sessions_created", "Sessions created", ["model"], registry=r
        )
        self.sessions_expired = Counter(
            "tcnserve_sessions_expired", "Sessions closed by their TTL", ["model"], registry=r
        )
        self.sessions_deleted = Counter(
            "tcnserve_sessions_deleted", "Sessions deleted by clients", ["model"], registry=r
        )
        self.step_batch_size = Histogram(
            "tcnserve_step_batch_size",
            "Streams advanced per batched step call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_delay = Histogram(
            "tcnserve_batch_queue_delay_seconds",
            "Time a model call waited in the queue (for a batched step: its oldest push)",
            ["model", "op"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "tcnserve_model_compute_seconds",
            "Model compute time per call",
            ["model", "op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.websocket_connections = Gauge(
            "tcnserve_websocket_connections", "Open WebSocket streams", registry=r
        )
        self.websocket_messages = LoopCounter(
            "tcnserve_websocket_messages",
            "WebSocket pushes answered, by frame kind and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.models_ready = Gauge(
            "tcnserve_models_ready", "1 once every model is loaded and warmed", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoopCounter:
    """A labelled counter counted by the event loop's thread alone: a plain int per label set.

    prometheus_client's Counter takes a lock on every increment (about a microsecond), which a
    counter bumped per WebSocket message or per pushed row pays tens of thousands of times a
    second on the event loop. One writer thread needs no lock: the values are read when
    /metrics is rendered, as `<name>_total` like any counter.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _LoopCount] = {}
        registry.register(self)

    def labels(self, *values: str) -> _LoopCount:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _LoopCount()
        return child

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(key, child.value, created=child.created)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class _LoopCount:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()  # rendered as <name>_created, as prometheus_client does

    def inc(self, amount: int = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount
