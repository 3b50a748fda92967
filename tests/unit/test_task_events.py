"""The worker parent's task events for Flower go out together (tasks.events.send_later), on
Celery's own buffering dispatcher: one message for many events, not one per job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

from tasks import events


class _Timer:
    """Celery's timer as the consumer has it: records what is armed, fires on demand."""

    def __init__(self) -> None:
        self.armed: list[tuple[float, Callable[[], None]]] = []

    def call_after(self, delay: float, fn: Callable[[], None]) -> None:
        self.armed.append((delay, fn))

    def fire(self) -> None:
        armed, self.armed = self.armed, []
        for _, fn in armed:
            fn()


def _dispatcher() -> tuple[Any, list[tuple[str, list[str]]]]:
    app = Celery(broker="memory://")
    dispatcher = app.events.Dispatcher(
        app.connection_for_write(), hostname="w@h", enabled=True, buffer_group=["task"]
    )
    sent: list[tuple[str, list[str]]] = []

    def publish(batch: Any, producer: Any, routing_key: str, **kw: Any) -> None:
        sent.append((routing_key, [event["type"] for event in batch]))

    dispatcher._publish = publish
    return dispatcher, sent


def test_events_wait_for_the_timer_and_go_as_one_message() -> None:
    dispatcher, sent = _dispatcher()
    timer = _Timer()
    events.send_later(dispatcher, timer)
    for i in range(5):
        dispatcher.send("task-received", uuid=f"j{i}", name="inferq.run_job")
        dispatcher.send("task-succeeded", uuid=f"j{i}", runtime=0.1)
    assert sent == []  # Celery alone would have sent at its loop's next turn
    assert [delay for delay, _ in timer.armed] == [events.AFTER_S]  # armed once for all ten
    timer.fire()
    assert sent == [("task.multi", ["task-received", "task-succeeded"] * 5)]
    timer.fire()  # nothing armed, nothing more sent; an empty buffer is not published
    dispatcher.send("task-received", uuid="k", name="inferq.run_job")
    assert len(timer.armed) == 1  # the next event arms it again
    timer.fire()
    assert [types for _, types in sent] == [["task-received", "task-succeeded"] * 5, ["task-received"]]


def test_a_full_buffer_goes_at_once() -> None:
    dispatcher, sent = _dispatcher()
    events.send_later(dispatcher, _Timer())
    for i in range(events.AT_ONCE):
        dispatcher.send("task-received", uuid=f"j{i}", name="inferq.run_job")
    assert len(sent) == 1 and len(sent[0][1]) == events.AT_ONCE


def test_a_failed_send_does_not_reach_the_consumer() -> None:
    dispatcher, _ = _dispatcher()
    timer = _Timer()
    events.send_later(dispatcher, timer)

    def broken(*args: Any, **kw: Any) -> None:
        raise ConnectionError("broker gone")

    dispatcher._publish = broken
    dispatcher.send("task-received", uuid="j", name="inferq.run_job")
    timer.fire()  # logged, not raised into Celery's event loop
