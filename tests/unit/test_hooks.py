"""Hooks (models.hooks): loading them from entry points and the setting, what a hook's answer
becomes, the default system prompt, and their metrics; no services."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from api import status_view
from api.main import create_app
from core import metrics
from core.config import Settings
from models.hooks import (
    HookFailed,
    HookLoadError,
    Hooks,
    LoadedHook,
    Refusal,
    Timing,
    load,
    with_system_prompt,
)
from schemas.openai import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, Usage
from tests.support import hooks as house


def _request(text: str, system: str | None = None) -> ChatCompletionRequest:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return ChatCompletionRequest.model_validate({"model": "tiny", "messages": messages})


def _result(text: str = "hello") -> ChatCompletion:
    choice = Choice(index=0, message=AssistantMessage(content=text), finish_reason="stop")
    return ChatCompletion(
        model="tiny", choices=[choice], usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    )


def _package(root: Path, name: str, entry: str, module: str = "", source: str = "") -> None:
    """An installed distribution on `root` whose entry point `name` in inferq.hooks is `entry`."""
    info = root / f"{name}_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[inferq.hooks]\n{name} = {entry}\n")
    if module:
        (root / f"{module}.py").write_text(source)


# --- loading ---------------------------------------------------------------------------


def test_the_setting_loads_module_attribute() -> None:
    hooks = load(["tests.support.hooks:house"], group="inferq.hooks.none")
    assert hooks.names == ["tests.support.hooks:house"]
    assert hooks.has_before and hooks.has_after


def test_entry_points_load_first_by_name_then_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = "def after(request, result):\n    return result\n"
    _package(tmp_path, "zeta", "zeta_hook_mod", "zeta_hook_mod", source)
    _package(tmp_path, "alpha", "tests.support.hooks:house")
    monkeypatch.syspath_prepend(str(tmp_path))
    hooks = load(["tests.support.hooks:house"], group="inferq.hooks")
    assert hooks.names == ["alpha", "zeta", "tests.support.hooks:house"]
    zeta = hooks.hooks[1]
    assert zeta.before is None and zeta.after is not None  # a module with after() only


@pytest.mark.parametrize(
    ("path", "words"),
    [
        (
            "tests.support.no_such_module:house",
            ["INFERQ_HOOKS", "tests.support.no_such_module:house", "ModuleNotFoundError"],
        ),
        ("tests.support.hooks:nobody", ["INFERQ_HOOKS", "tests.support.hooks:nobody", "AttributeError"]),
        ("tests.support.hooks", ["INFERQ_HOOKS", "'tests.support.hooks'", "module:attribute"]),
        ("tests.support.hooks:REDACTED", ["tests.support.hooks:REDACTED", "neither before() nor after()"]),
    ],
)
def test_a_bad_path_fails_with_one_line_naming_it(path: str, words: list[str]) -> None:
    with pytest.raises(HookLoadError) as err:
        load([path], group="inferq.hooks.none")
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_a_broken_entry_point_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _package(tmp_path, "broken", "missing_hook_mod:hook")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        HookLoadError, match=r"hook 'broken' \(entry point 'missing_hook_mod:hook' in group inferq.hooks\)"
    ):
        load([], group="inferq.hooks")


def test_the_api_refuses_to_start_with_a_bad_hook() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", hooks=["tests.support.no_such_module:house"])
    with pytest.raises(SystemExit, match=r"tests\.support\.no_such_module:house"):
        create_app(settings)


# --- running ---------------------------------------------------------------------------


def _before(text: str, timings: list[Timing] | None = None) -> ChatCompletionRequest:
    hooks = load(["tests.support.hooks:house"], group="inferq.hooks.none")
    return asyncio.run(hooks.run_before(_request(text), [] if timings is None else timings))


def test_before_passes_a_request_on_and_times_it() -> None:
    timings: list[Timing] = []
    assert _before("hello", timings) == _request("hello")
    assert [(t.stage, t.hook, t.outcome) for t in timings] == [("before", "tests.support.hooks:house", "ok")]


def test_a_returned_refusal_carries_the_hooks_message() -> None:
    timings: list[Timing] = []
    with pytest.raises(HookFailed) as err:
        _before(f"say {house.REFUSE}", timings)
    assert err.value.refused and err.value.code == "refused_by_hook"
    assert err.value.message == house.REFUSAL_MESSAGE
    assert timings[0].outcome == "refused"


def test_a_hook_that_raises_is_named_with_its_exception() -> None:
    with pytest.raises(HookFailed) as err:
        _before(house.BREAK_BEFORE)
    assert err.value.code == "hook_failed" and not err.value.refused
    assert err.value.message == (
        "hook 'tests.support.hooks:house' before() failed: ValueError: the house filter broke on purpose"
    )


class _Odd:
    async def before(self, request: ChatCompletionRequest) -> Any:
        return "not a request"

    async def after(self, request: ChatCompletionRequest, result: ChatCompletion) -> ChatCompletion:
        return result.model_copy(update={"model": "rewritten"})


odd = _Odd()


def test_async_hooks_and_what_they_must_return() -> None:
    hooks = load([f"{__name__}:odd"], group="inferq.hooks.none")
    with pytest.raises(HookFailed, match="returned str, not a ChatCompletionRequest or Refusal"):
        asyncio.run(hooks.run_before(_request("hi"), []))
    assert hooks.run_after(_request("hi"), _result(), []).model == "rewritten"


def test_after_rewrites_refuses_or_fails() -> None:
    hooks = load(["tests.support.hooks:house"], group="inferq.hooks.none")
    timings: list[Timing] = []
    out = hooks.run_after(_request(house.REWRITE), _result(), timings)
    assert out.choices[0].message.content == house.REDACTED
    assert hooks.run_after(_request("plain"), _result(), timings).choices[0].message.content == "hello"
    with pytest.raises(HookFailed) as err:
        hooks.run_after(_request(house.BREAK_AFTER), _result(), timings)
    assert (
        err.value.code == "hook_failed"
        and "RuntimeError: the house redactor broke on purpose" in err.value.message
    )
    with pytest.raises(HookFailed) as err:
        hooks.run_after(_request(house.VETO), _result(), timings)
    assert err.value.refused and err.value.message == "The house withholds this answer."
    assert [t.outcome for t in timings][-2:] == ["failed", "refused"]


def test_refusal_can_be_raised_from_before() -> None:
    class Raiser:
        def before(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
            raise Refusal("no")

    raiser = Raiser()
    hooks = Hooks((LoadedHook("raiser", raiser.before, None),))
    with pytest.raises(HookFailed, match="no") as err:
        asyncio.run(hooks.run_before(_request("hi"), []))
    assert err.value.refused


# --- the system prompt -----------------------------------------------------------------


def test_the_default_system_prompt_goes_first_only_without_one() -> None:
    prompts = {"tiny": "You are the house assistant."}
    out = with_system_prompt(_request("hi"), prompts)
    assert [(m.role, m.text()) for m in out.messages] == [
        ("system", "You are the house assistant."),
        ("user", "hi"),
    ]
    own = _request("hi", system="Be brief.")
    assert with_system_prompt(own, prompts) is own
    other = _request("hi").model_copy(update={"model": "other"})
    assert with_system_prompt(other, prompts) is other


# --- metrics ---------------------------------------------------------------------------


class _Pipe:
    """What observe_hook writes, as the hash would hold it."""

    def __init__(self) -> None:
        self.hash: dict[str, float] = {}

    def hincrby(self, _key: str, field: str, n: int) -> None:
        self.hash[field] = self.hash.get(field, 0) + n

    hincrbyfloat = hincrby

    def expire(self, _key: str, _ttl: int) -> None:
        pass


def test_hook_time_and_outcomes_reach_metrics() -> None:
    pipe = _Pipe()
    metrics.observe_hook(pipe, "before", "pkg:house", 0.002, "ok", 60)
    metrics.observe_hook(pipe, "after", "pkg:house", 0.3, "failed", 60)
    snap = metrics.decode({k: str(v) for k, v in pipe.hash.items()}, ["inferq.jobs"])
    view = status_view.SystemView(snap, [], [])
    text = status_view.render(view, CollectorRegistry()).decode()
    assert 'inferq_hook_seconds_count{hook="pkg:house",stage="before"} 1.0' in text
    assert 'inferq_hook_seconds_bucket{hook="pkg:house",le="0.0025",stage="before"} 1.0' in text
    assert 'inferq_hook_seconds_sum{hook="pkg:house",stage="after"} 0.3' in text
    assert 'inferq_hook_outcomes_total{hook="pkg:house",outcome="failed",stage="after"} 1.0' in text
