"""One /metrics page for every process: the engine's series and each edge's, summed.

Each process keeps its own series (service/metrics.py); an edge sends its rendered page to the
engine with every status request, and its fresh one with a /metrics request, which the engine
answers with every process's page; the edge sums them sample by sample (counters, histograms
and gauges add up across processes; `*_created` takes the earliest) and keeps the result for
METRICS_CACHE_S (service/engine/runtime.py), so scraping costs neither the engine's loop nor much of
the edge's. An edge that has gone keeps its counters and histograms in the sum, not its gauges;
an engine that restarts starts its own series, and that memory, from zero (Prometheus reads a
counter reset).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

_Key = tuple[str, str, str]  # family name, type, documentation
_Sample = tuple[str, tuple[tuple[str, str], ...]]


class _Sum:
    def __init__(self) -> None:
        self.families: dict[_Key, dict[_Sample, float]] = {}

    def add(self, text: bytes, gauges: bool = True) -> None:
        for family in text_string_to_metric_families(text.decode()):
            if family.type == "gauge" and not gauges and not family.name.endswith("_created"):
                continue
            key = (family.name, family.type, family.documentation)
            samples = self.families.setdefault(key, {})
            earliest = family.name.endswith("_created")
            for s in family.samples:
                k = (s.name, tuple(sorted(s.labels.items())))
                if k in samples:
                    samples[k] = min(samples[k], s.value) if earliest else samples[k] + s.value
                else:
                    samples[k] = s.value

    def collect(self) -> Iterator[Metric]:
        for (name, kind, doc), samples in self.families.items():
            metric = Metric(name, doc, kind)
            for (sample, labels), value in samples.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric


class MetricsSum:
    """The engine's memory of edges that have gone: their counters and histograms, summed."""

    def __init__(self) -> None:
        self._gone: bytes | None = None

    def retire(self, text: bytes) -> None:
        """An edge has gone: keep its counters and histograms (parsed once, here)."""
        self._gone = _render(_summed([self._gone or b"", text], gauges=False))

    def gone(self) -> list[bytes]:
        return [self._gone] if self._gone else []


def summed(pages: Iterable[bytes]) -> bytes:
    """Pages of several processes as one, sample by sample."""
    return _render(_summed(pages))


def _summed(pages: Iterable[bytes], gauges: bool = True) -> _Sum:
    total = _Sum()
    for page in pages:
        total.add(page, gauges)
    return total


def _render(total: _Sum) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(total)  # type: ignore[arg-type]
    return generate_latest(registry)
