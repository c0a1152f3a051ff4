"""Prometheus metrics of a client, for apps that already export ``prometheus_client``.

::

    from meter_core.prometheus import register_client_metrics

    register_client_metrics(client)        # into prometheus_client's default registry

The collector reads ``client.stats()`` at each scrape (no work between scrapes) and
exports, with a ``client`` label (default ``"default"``; several clients go in one
registry under different names):

- counters ``meter_events_recorded_total``, ``meter_events_sent_total``,
  ``meter_events_retried_total``, ``meter_events_failed_total``,
  ``meter_events_stored_total``, ``meter_events_dropped_total``,
  ``meter_events_resent_total``, ``meter_produce_requests_total``;
- gauges ``meter_queue_depth`` (events waiting in memory) and ``meter_failed_in_memory``.

The counters are this process's: under a server with several worker processes, each
worker exports its own (scrape each, or add a label that tells them apart), and
``prometheus_client``'s multiprocess mode, which collects only the metrics it writes to
its files, leaves them out.

``prometheus_client`` is an optional dependency (``litewave-meter[prometheus]``);
without it, :func:`register_client_metrics` raises ConfigurationError saying so.
"""

from __future__ import annotations

import threading
import weakref
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
    ("resent", "meter_events_resent", "Failed events kept in memory, delivered later."),
    ("batches", "meter_produce_requests", "Produce requests made."),
)
_GAUGES = (
    ("queue_depth", "meter_queue_depth", "Usage events waiting in memory."),
    ("failed_in_memory", "meter_failed_in_memory", "Failed events kept in memory."),
)


class MeterCollector:
    """A ``prometheus_client`` custom collector over the :meth:`stats` of clients, each
    exported under its own ``client`` label.

    Built with a client (``MeterCollector(client, name)``) it exports that one;
    :meth:`add` adds more. :func:`register_client_metrics` keeps one per registry, since
    a registry takes each metric name from one collector only.
    """

    def __init__(self, client: MeterClient | None = None, name: str = "default") -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, MeterClient] = {}
        if client is not None:
            self.add(client, name)

    def add(self, client: MeterClient, name: str = "default") -> None:
        """Export ``client`` under ``name``. A name given again takes the new client
        when the one it had is closed (a client rebuilt with new settings), or is the
        same; raises ConfigurationError when another open client has it."""
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"register_client_metrics(name): must be a non-empty str, got {name!r}"
            )
        with self._lock:
            current = self._clients.get(name)
            if current is not None and current is not client and not current.closed:
                raise ConfigurationError(
                    f"register_client_metrics: another open client is exported as {name!r}; "
                    "give this one its own name= (the client label of its metrics)"
                )
            other = next((n for n, c in self._clients.items() if c is client and n != name), None)
            if other is not None:  # (its counters would be summed twice)
                raise ConfigurationError(
                    f"register_client_metrics: this client is exported as {other!r} already"
                )
            self._clients[name] = client

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            clients = list(self._clients.items())
        stats = [(name, client.stats()) for name, client in clients]
        for key, metric, doc in _COUNTERS:
            family = CounterMetricFamily(metric, doc, labels=["client"])
            for name, values in stats:
                family.add_metric([name], values[key])
            yield family
        for key, metric, doc in _GAUGES:
            gauge = GaugeMetricFamily(metric, doc, labels=["client"])
            for name, values in stats:
                gauge.add_metric([name], values[key])
            yield gauge

    def describe(self) -> Iterator[Any]:
        # Describing without reading the clients keeps registration free of side effects.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for _, metric, doc in _COUNTERS:
            yield CounterMetricFamily(metric, doc, labels=["client"])
        for _, metric, doc in _GAUGES:
            yield GaugeMetricFamily(metric, doc, labels=["client"])


_collectors_lock = threading.Lock()
# The collector this module registered in each registry (a registry refuses a second
# collector of the same metric names).
_collectors: weakref.WeakKeyDictionary[Any, MeterCollector] = weakref.WeakKeyDictionary()


def register_client_metrics(
    client: MeterClient, *, name: str = "default", registry: Any = None
) -> MeterCollector:
    """Export ``client``'s counters in ``registry`` (default:
    ``prometheus_client.REGISTRY``) under the label ``client=name``, and return the
    registry's :class:`MeterCollector`. Several clients go in one registry under
    different names; registering a client again is harmless, and a name whose client
    was closed takes the new one. Raises ConfigurationError when ``prometheus_client``
    is not installed, or when another open client already has ``name`` there."""
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            "register_client_metrics: prometheus_client is not installed "
            "(pip install 'litewave-meter[prometheus]')"
        ) from None
    target = registry if registry is not None else prometheus_client.REGISTRY
    with _collectors_lock:
        collector = _collectors.get(target)
        if collector is not None and not _still_registered(target, collector):
            collector = None  # (unregistered since: a test's teardown, an app factory)
        if collector is None:
            collector = MeterCollector()
            collector.add(client, name)  # (checked before the registry takes it)
            target.register(collector)
            _collectors[target] = collector
            return collector
    collector.add(client, name)
    return collector


def _still_registered(registry: Any, collector: MeterCollector) -> bool:
    """Whether ``collector`` is still in ``registry``: registering it again fails then;
    if it succeeds, it was not, and is taken out again."""
    try:
        registry.register(collector)
    except ValueError:  # (Duplicated timeseries: it is there)
        return True
    registry.unregister(collector)
    return False
