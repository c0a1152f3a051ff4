"""The Prometheus collector exports the client's real counters at scrape time."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from meter_core import ConfigurationError, MeterClient
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


def test_several_clients_share_a_registry_under_their_names(
    backend: DevServer, make_client: Callable[..., MeterClient]
) -> None:
    web, jobs = make_client(), make_client()
    registry = CollectorRegistry()
    collector = register_client_metrics(web, name="web", registry=registry)
    assert register_client_metrics(jobs, name="jobs", registry=registry) is collector
    assert register_client_metrics(web, name="web", registry=registry) is collector  # again
    web.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    for _ in range(2):
        jobs.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    assert web.flush(10) and jobs.flush(10)
    text = generate_latest(registry).decode()
    assert 'meter_events_sent_total{client="web"} 1.0' in text
    assert 'meter_events_sent_total{client="jobs"} 2.0' in text


def test_a_name_is_refused_to_a_second_open_client_and_passed_on_once_closed(
    backend: DevServer, make_client: Callable[..., MeterClient]
) -> None:
    first, second = make_client(), make_client()
    registry = CollectorRegistry()
    register_client_metrics(first, registry=registry)
    with pytest.raises(ConfigurationError, match="another open client is exported as 'default'"):
        register_client_metrics(second, registry=registry)
    first.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
    first.close(10)  # rebuilt with new settings, say: the new client takes the name
    register_client_metrics(second, registry=registry)
    text = generate_latest(registry).decode()
    assert 'meter_events_sent_total{client="default"} 0.0' in text


def test_registering_again_after_an_unregister_exports_again(
    backend: DevServer, make_client: Callable[..., MeterClient]
) -> None:
    # (a test's teardown, an app factory: the collector taken out of the registry)
    registry = CollectorRegistry()
    for round_ in range(2):
        client = make_client()
        collector = register_client_metrics(client, name="web", registry=registry)
        client.record(tenant_id="acme", meter_id="page.processed.basic", total_usage=1)
        assert client.flush(10)
        text = generate_latest(registry).decode()
        assert 'meter_events_sent_total{client="web"} 1.0' in text, round_
        registry.unregister(collector)
        client.close(5)


def test_a_client_is_exported_under_one_name_only(
    backend: DevServer, make_client: Callable[..., MeterClient]
) -> None:
    client = make_client()
    registry = CollectorRegistry()
    register_client_metrics(client, name="a", registry=registry)
    with pytest.raises(ConfigurationError, match="exported as 'a' already"):
        register_client_metrics(client, name="b", registry=registry)
