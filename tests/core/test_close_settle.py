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
