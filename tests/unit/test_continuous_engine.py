"""The continuous engine in this process, on the real tiny model: each row keeps its own
settings, a greedy or seeded row gives the text the static engine gives, a cancelled row
ends within a step with what it has, and a request that cannot start fails alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from core.config import Settings
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE
from workers.engine import Engine, GenParams, GenRequest, GenResult
from workers.engines import load_engine


def _settings(model: Path, mode: str, batch: int = 4) -> Settings:
    return Settings(
        model_path=str(model),
        model_type=DEMO_MODEL_TYPE,
        template=DEMO_TEMPLATE,
        max_batch_size=batch,
        served_model_name="tiny",
        engine_mode=mode,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def engines(demo_model: Path) -> Iterator[dict[str, Engine]]:
    loaded = {mode: load_engine(_settings(demo_model, mode)) for mode in ("static", "continuous")}
    yield loaded
    cast(Any, loaded["continuous"]).shutdown()


def _req(i: int, **kw: Any) -> GenRequest:
    return GenRequest(messages=[{"role": "user", "content": f"row {i} " + "x " * i}], params=GenParams(**kw))


MIXED = [
    _req(0, max_tokens=9, temperature=0),
    _req(1, max_tokens=30, temperature=0.8, top_p=0.9),
    _req(2, max_tokens=17, temperature=0),
    _req(3, max_tokens=5, temperature=1.0, top_k=4, seed=11),
    _req(4, max_tokens=40, temperature=0, presence_penalty=1.5, frequency_penalty=0.5),
    _req(5, max_tokens=12, temperature=1.2, seed=99, frequency_penalty=1.0),
    _req(6, max_tokens=21, temperature=0),
]


def _ok(outs: list[GenResult | Exception]) -> list[GenResult]:
    assert all(isinstance(o, GenResult) for o in outs), outs
    return [o for o in outs if isinstance(o, GenResult)]


def test_rows_keep_their_settings_and_match_the_static_engine(engines: dict[str, Engine]) -> None:
    static = _ok(engines["static"].generate(MIXED))
    cont = _ok(engines["continuous"].generate(MIXED))  # 7 rows, 4 at a time: rows join as others end
    alone = [_ok(engines["continuous"].generate([r]))[0] for r in MIXED]
    for req, s, c, a in zip(MIXED, static, cont, alone, strict=True):
        assert c.completion_tokens == req.params.max_tokens and c.finish_reason == "length"
        if req.params.temperature == 0 or req.params.seed is not None:
            assert c.text == s.text == a.text  # greedy and seeded: the same text anywhere
        assert c.prompt_tokens == s.prompt_tokens


def test_a_stop_sequence_ends_its_row_with_the_tokens_up_to_it(engines: dict[str, Engine]) -> None:
    full = _ok(engines["continuous"].generate([_req(7, max_tokens=30, temperature=0)]))[0]
    at = next(
        i
        for i in range(3, len(full.text))
        if full.text[i : i + 2].isascii() and full.text[i : i + 2].isprintable()
    )
    stop = full.text[at : at + 2]
    cut = _ok(engines["continuous"].generate([_req(7, max_tokens=30, temperature=0, stop=(stop,))]))[0]
    static = _ok(engines["static"].generate([_req(7, max_tokens=30, temperature=0, stop=(stop,))]))[0]
    assert cut.text == full.text[: full.text.find(stop)] == static.text
    assert cut.finish_reason == "stop" and cut.completion_tokens == static.completion_tokens < 30


class _CancelRow:
    """A sink that cancels row 1 once it has streamed something."""

    def __init__(self) -> None:
        self.deltas: dict[int, str] = {}

    def on_delta(self, i: int, text: str) -> None:
        self.deltas[i] = self.deltas.get(i, "") + text

    def on_reset(self, i: int) -> None:
        self.deltas[i] = ""

    def flush(self) -> None:
        pass

    def should_stop(self, i: int) -> bool:
        return i == 1 and bool(self.deltas.get(1))

    def any_stop(self) -> bool:
        return bool(self.deltas.get(1))

    def wants_tokens(self, i: int) -> bool:
        return True


def test_a_cancelled_row_ends_with_what_it_has_and_the_others_run_on(engines: dict[str, Engine]) -> None:
    sink = _CancelRow()
    reqs = [_req(8, max_tokens=40, temperature=0), _req(9, max_tokens=1500, temperature=0.7)]
    first, cancelled = _ok(engines["continuous"].generate(reqs, sink))
    assert first.completion_tokens == 40
    assert 0 < cancelled.completion_tokens < 1500
    assert sink.deltas[0] == first.text and sink.deltas[1] == cancelled.text


def test_a_request_that_cannot_start_fails_alone(
    engines: dict[str, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine: Any = engines["continuous"]
    encode = engine.engine.template.encode

    def poisoned(req: Any, **kw: Any) -> Any:
        if "poison" in req.messages[-1]["content"]:
            raise ValueError("this prompt does not encode")
        return encode(req, **kw)

    monkeypatch.setattr(engine.engine.template, "encode", poisoned)
    bad = GenRequest(messages=[{"role": "user", "content": "poison"}], params=GenParams(max_tokens=4))
    outs = engine.generate([MIXED[0], bad, MIXED[2]])
    assert isinstance(outs[1], ValueError)
    assert [o.completion_tokens for o in (outs[0], outs[2])] == [9, 17]


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_the_engine_counts_the_tokens_it_makes(engines: dict[str, Engine], mode: str) -> None:
    """Step by step (the heartbeat's tokens/s): rows that end early (padded in static mode)
    add nothing after their end, so the count is the rows' completion tokens."""
    engine = engines[mode]
    before = engine.generated_tokens()
    outs = _ok(engine.generate(MIXED))
    assert engine.generated_tokens() - before == sum(o.completion_tokens for o in outs)
