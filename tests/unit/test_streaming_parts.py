"""The token path inside a worker child, without a worker or a server: a failed write of the
sink reaches the generating thread, the streamer's batched decoding gives the tokenizer's own
`decode`, and a store outage while a chat request waits is the store's error. The sink's
writes on a real Valkey are tests/integration/test_stream_sink.py."""

import random
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import torch

from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE
from workers.streaming import StreamSink, Target


class Recorder:
    """A sink that keeps what it is given."""

    def __init__(self, rows: int) -> None:
        self.deltas: list[list[str]] = [[] for _ in range(rows)]

    def on_delta(self, i: int, text: str) -> None:
        if text:
            self.deltas[i].append(text)

    def on_reset(self, i: int) -> None:
        self.deltas[i].append("<reset>")

    def flush(self) -> None:
        pass

    def should_stop(self, i: int) -> bool:
        return False

    def any_stop(self) -> bool:
        return False

    def wants_tokens(self, i: int) -> bool:
        return True


def test_a_failed_write_is_raised_in_the_generating_thread_once() -> None:
    from cli.processes import free_port

    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    sink = StreamSink(dead, [Target("x", 0)], flush_interval_s=0)
    sink.on_delta(0, "a")  # handed to the writer: no error here
    with pytest.raises(redis.ConnectionError):
        sink.wait_written()
    sink.wait_written()  # raised once, not again
    sink.stop()


@pytest.fixture(scope="module")
def template(demo_model: Path) -> Any:
    from swift.model import get_processor
    from swift.template import get_template

    return get_template(
        get_processor(str(demo_model), model_type=DEMO_MODEL_TYPE), template_type=DEMO_TEMPLATE
    )


def test_batched_decoding_gives_the_tokenizers_own_text(template: Any) -> None:
    from workers.engines.swift import DeltaStreamer

    rows, steps = 6, 40
    rng = random.Random(7)
    ids = [[rng.randrange(0, template.tokenizer.vocab_size) for _ in range(rows)] for _ in range(steps)]

    def run(batched: bool) -> list[list[str]]:
        sink = Recorder(rows)
        st = DeltaStreamer(template, sink, [], rows, interval_s=0.0)
        assert st._decode_batch is not None  # the demo tokenizer is a fast one
        if not batched:
            st._decode_batch = None
        st.put(torch.zeros(rows, 3, dtype=torch.long))  # the prompt, which is skipped
        for step in ids:
            st.put(torch.tensor(step))
        st.end()
        return sink.deltas

    batched, per_row = run(True), run(False)
    assert batched == per_row
    skip = {template.tokenizer.pad_token_id, template.tokenizer.eos_token_id}
    for row in range(rows):
        full = template.tokenizer.decode(
            [s[row] for s in ids if s[row] not in skip], skip_special_tokens=False
        )
        # held back, if anything: an incomplete character at the end, settled by the final text
        streamed = "".join(batched[row])
        assert full.startswith(streamed)
        assert full == streamed or full.endswith("\ufffd")


def test_a_store_outage_while_a_chat_request_waits_is_the_store_error() -> None:
    """The non-stream wait runs beside a disconnect listener in a task group; a Redis error
    there must leave as itself (answered 503 by its handler), not wrapped in the group's
    ExceptionGroup (which would be a 500)."""
    import asyncio
    from types import SimpleNamespace

    from api import serving_chat as chat
    from schemas.jobs import JobStatus

    class DownRedis:
        async def xread(self, *_: Any, **__: Any) -> Any:
            raise redis.exceptions.ConnectionError("Connection refused")

    class FinishedStore:  # what the clean-up's cancel finds: nothing left to cancel
        async def get(self, _job_id: str) -> Any:
            return SimpleNamespace(status=JobStatus.SUCCEEDED, owner="")

    async def receive() -> dict[str, str]:
        await asyncio.sleep(3600)  # the client stays
        return {"type": "http.disconnect"}

    st = SimpleNamespace(
        stream_redis=DownRedis(), store=FinishedStore(), settings=SimpleNamespace(sse_block_s=15)
    )
    job = SimpleNamespace(id="job_down")
    with pytest.raises(redis.exceptions.ConnectionError):
        asyncio.run(chat.complete(cast(Any, st), cast(Any, job), cast(Any, SimpleNamespace(receive=receive))))
