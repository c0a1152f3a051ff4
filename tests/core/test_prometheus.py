"""The Prometheus collector exports the client's real counters at scrape time."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest

from meter_core import MeterClient
from meter_core.devserver import DevServer
from meter_core.prometheus import register_client_metrics


def test_scrape_shows_recorded_and_sent_events(
    backend: DevServer, make_client: Callable[..., MeterClient]
) -> None:
    client = make_client()
    registry = CollectorRegistry()
    register_client_metrics(client, name="web", registry=registry)
    for _ in range(3):
        client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    assert client.flush(10)

    text = generate_latest(registry).decode()
    assert 'meter_events_recorded_total{client="web"} 3.0' in text
    assert 'meter_events_sent_total{client="web"} 3.0' in text
    assert 'meter_queue_depth{client="web"} 0.0' in text
    assert len(backend.event_ids()) == 3
