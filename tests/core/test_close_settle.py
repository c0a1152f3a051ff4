"""close() waits for the sender thread to settle a batch that it did not take over: the
outcome of that batch (a retry, a failure) is written to the store from the sender
thread, and a process exiting as close() returns would otherwise cut that write short."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from meter_core import BackendUnavailable, MemoryFailureStore, MemoryTransport, MeterClient
from meter_core.events import UsageEvent

RECORD = {"tenant_id": "acme", "meter_id": "page.processed.basic", "total_usage": 1}


class SlowStore(MemoryFailureStore):
    """A failure store whose writes take 0.7 s (a database under load)."""

    def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> int:
        time.sleep(0.7)
        return super().store(events, **kwargs)


def test_close_returns_once_the_batch_the_sender_was_settling_is_stored() -> None:
    go = threading.Event()
    transport = MemoryTransport(lambda tenant: f"cust-{tenant}")

    def produce(records: Any) -> Any:
        go.wait(10)  # (the sender is sending while close() begins)
        raise BackendUnavailable("produce failed: HTTP 503")

    transport.produce = produce  # type: ignore[method-assign]
    store = SlowStore()
    client = MeterClient(transport=transport, device_id="d", failure_store=store,
                         flush_interval=0.01, max_retries=3)  # fmt: skip
    event_id = client.record(**RECORD)
    time.sleep(0.2)  # the sender has the event in flight
    closing = threading.Thread(target=client.close, kwargs={"timeout": 0.1})
    closing.start()
    time.sleep(0.15)  # close() is past its flush, waiting for the sender thread (0.5 s)
    go.set()  # the send fails now: the sender settles the batch itself, at close, in a
    closing.join(10)  # write that outlasts close()'s wait for the thread (0.5 s)
    # close() returned: the event is in the store, not in a write still under way
    assert [s.event.event_id for s in store.events()] == [event_id]


def test_a_second_close_with_a_timeout_waits_no_more_than_its_own() -> None:
    # An app's close(None) and the exit hook's close(0.2) at once, while the sender
    # stores a failed batch (3 s): the second one's wait is its own (it raised
    # OverflowError, waiting for the first one's infinite deadline).
    go = threading.Event()
    transport = MemoryTransport(lambda tenant: f"cust-{tenant}")

    def produce(records: Any) -> Any:
        go.wait(10)
        raise BackendUnavailable("produce failed: HTTP 503")

    transport.produce = produce  # type: ignore[method-assign]

    class SlowerStore(MemoryFailureStore):
        def store(self, events: Sequence[UsageEvent], **kwargs: Any) -> int:
            time.sleep(3.0)
            return super().store(events, **kwargs)

    store = SlowerStore()
    client = MeterClient(transport=transport, device_id="d", failure_store=store,
                         flush_interval=0.01, max_retries=0)  # fmt: skip
    event_id = client.record(**RECORD)
    time.sleep(0.2)
    outcomes: dict[str, object] = {}

    def close(name: str, timeout: float | None) -> None:
        started = time.monotonic()
        try:
            client.close(timeout=timeout)
        except BaseException as exc:
            outcomes[name] = exc
        else:
            outcomes[name] = time.monotonic() - started

    first = threading.Thread(target=close, args=("first", None))
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=close, args=("second", 0.2))
    second.start()
    time.sleep(0.1)
    go.set()  # the send fails for good: the sender stores the batch, for 3 s
    second.join(10)
    first.join(10)
    took = outcomes["second"]
    assert isinstance(took, float) and took < 2.5, took  # its own deadline, and a write
    assert isinstance(outcomes["first"], float)
    assert [s.event.event_id for s in store.events()] == [event_id]
