"""One /metrics page for every process: the engine's series and each edge's, summed.

Each process keeps its own series (service/metrics.py); an edge sends its rendered page to the
engine with every status request, and its fresh one with a /metrics request, which the engine
answers with every page summed sample by sample: counters, histograms and gauges add up across
processes (`*_created` takes the earliest). An edge that has gone keeps its counters and
histograms in the sum (so they never go backwards), not its gauges.
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
    """The pages of the engine and its edges; `render` sums them."""

    def __init__(self) -> None:
        self._gone = _Sum()  # counters and histograms of edges that have gone

    def retire(self, text: bytes) -> None:
        self._gone.add(text, gauges=False)

    def render(self, pages: Iterable[bytes]) -> bytes:
        total = _Sum()
        for key, samples in self._gone.families.items():
            total.families[key] = dict(samples)
        for page in pages:
            total.add(page)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(total)  # type: ignore[arg-type]
        return generate_latest(registry)
