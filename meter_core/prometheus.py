"""Prometheus metrics of a client, for apps that already export ``prometheus_client``.

::

    from meter_core.prometheus import register_client_metrics

    register_client_metrics(client)        # into prometheus_client's default registry

The collector reads ``client.stats()`` at each scrape (no work between scrapes) and
exports, with a ``client`` label (default ``"default"``):

- counters ``meter_events_recorded_total``, ``meter_events_sent_total``,
  ``meter_events_retried_total``, ``meter_events_failed_total``,
  ``meter_events_stored_total``, ``meter_events_dropped_total``,
  ``meter_produce_requests_total``;
- gauges ``meter_queue_depth`` (events waiting in memory) and ``meter_failed_in_memory``.

``prometheus_client`` is an optional dependency (``litewave-meter[prometheus]``);
without it, :func:`register_client_metrics` raises ConfigurationError saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from meter_core.errors import ConfigurationError

if TYPE_CHECKING:
    from meter_core.client import MeterClient

__all__ = ["MeterCollector", "register_client_metrics"]

_COUNTERS = (
    ("recorded", "meter_events_recorded", "Usage events accepted by record()."),
    ("sent", "meter_events_sent", "Usage events the backend confirmed."),
    ("retried", "meter_events_retried", "Retries of usage events scheduled."),
    ("failed", "meter_events_failed", "Usage events that failed for good."),
    ("stored", "meter_events_stored", "Usage events written to the failure store."),
    ("dropped", "meter_events_dropped", "Usage events dropped (each also logged)."),
    ("batches", "meter_produce_requests", "Produce requests made."),
)
_GAUGES = (
    ("queue_depth", "meter_queue_depth", "Usage events waiting in memory."),
    ("failed_in_memory", "meter_failed_in_memory", "Failed events kept in memory."),
)


class MeterCollector:
    """A ``prometheus_client`` custom collector over one client's :meth:`stats`."""

    def __init__(self, client: MeterClient, name: str = "default") -> None:
        self._client = client
        self._name = name

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._client.stats()
        for key, metric, doc in _COUNTERS:
            family = CounterMetricFamily(metric, doc, labels=["client"])
            family.add_metric([self._name], stats[key])
            yield family
        for key, metric, doc in _GAUGES:
            gauge = GaugeMetricFamily(metric, doc, labels=["client"])
            gauge.add_metric([self._name], stats[key])
            yield gauge

    def describe(self) -> Iterator[Any]:
        # Describing without reading the client keeps registration free of side effects.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for _, metric, doc in _COUNTERS:
            yield CounterMetricFamily(metric, doc, labels=["client"])
        for _, metric, doc in _GAUGES:
            yield GaugeMetricFamily(metric, doc, labels=["client"])


def register_client_metrics(
    client: MeterClient, *, name: str = "default", registry: Any = None
) -> MeterCollector:
    """Register a :class:`MeterCollector` for ``client`` in ``registry`` (default:
    ``prometheus_client.REGISTRY``) and return it. Raises ConfigurationError when
    ``prometheus_client`` is not installed."""
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            "register_client_metrics: prometheus_client is not installed "
            "(pip install 'litewave-meter[prometheus]')"
        ) from None
    collector = MeterCollector(client, name)
    (registry if registry is not None else prometheus_client.REGISTRY).register(collector)
    return collector
