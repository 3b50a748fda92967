"""Hooks: the plugin seam around a job, as the article this product grew from asks for
(sensitive words refused before, schema checks or redaction after, a house system prompt).

A hook is any object (a module, an instance) with `before(request)`, `after(request,
result)` or both, plain or `async def`:

- `before(request: ChatCompletionRequest) -> ChatCompletionRequest | Refusal` runs in the API
  before the job is queued (chat completions, /v1/jobs, responses and each batch line); what
  it returns goes on to the next hook and then to the queue. A `Refusal` (returned or raised)
  answers 400 `refused_by_hook` with its message.
- `after(request, result: ChatCompletion) -> ChatCompletion` runs in the worker before the
  result is written, so every reader (a poll, the `done` event, a batch's output line) sees
  the same answer. A refusal or an exception fails that job alone.

Why here (`models`): the API and the worker both run hooks, and this is the lowest layer that
knows the request and result shapes and sits under both. Why loaded once per process, at its
start: a hook that cannot be imported is a deployment mistake, said in one line before the
process serves anything, not a 500 on the first request.

Loading order: the `inferq.hooks` entry points (sorted by name, so every process runs them
in the same order), then `INFERQ_HOOKS` (`module:attribute`) in the setting's order.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal, Protocol

import anyio

from schemas.openai import ChatCompletion, ChatCompletionRequest, ChatMessage

#: the entry point group a package registers its hooks in
GROUP = "inferq.hooks"

Stage = Literal["before", "after"]
Outcome = Literal["ok", "refused", "failed"]


class Refusal(Exception):
    """What a hook says to refuse a request (return it from `before`, or raise it from
    either); `message` is shown to the client as it is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BeforeHook(Protocol):
    def before(self, request: ChatCompletionRequest, /) -> ChatCompletionRequest | Refusal: ...


class AfterHook(Protocol):
    def after(self, request: ChatCompletionRequest, result: ChatCompletion, /) -> ChatCompletion: ...


class HookLoadError(Exception):
    """A hook that cannot be loaded; the message is the one line a process prints at start."""


class HookFailed(Exception):
    """A hook refused (`code` "refused_by_hook", `message` the hook's own words) or broke
    (`code` "hook_failed", `message` naming the hook and its exception)."""

    def __init__(self, hook: str, stage: Stage, code: str, message: str) -> None:
        super().__init__(message)
        self.hook, self.stage, self.code, self.message = hook, stage, code, message

    @property
    def refused(self) -> bool:
        return self.code == "refused_by_hook"


@dataclass(frozen=True)
class Timing:
    """One hook's run, for the metrics (core.metrics.observe_hook)."""

    stage: Stage
    hook: str
    seconds: float
    outcome: Outcome


@dataclass(frozen=True)
class LoadedHook:
    name: str
    before: Callable[..., Any] | None
    after: Callable[..., Any] | None


def _refusal(hook: str, stage: Stage, refusal: Refusal) -> HookFailed:
    return HookFailed(hook, stage, "refused_by_hook", refusal.message)


def _broke(hook: str, stage: Stage, exc: BaseException) -> HookFailed:
    return HookFailed(
        hook, stage, "hook_failed", f"hook '{hook}' {stage}() failed: {type(exc).__name__}: {exc}"
    )


@dataclass(frozen=True)
class Hooks:
    """The hooks of this process, in order; empty when none is configured (the common case,
    which then costs nothing)."""

    hooks: tuple[LoadedHook, ...] = ()

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hooks]

    @property
    def has_before(self) -> bool:
        return any(h.before is not None for h in self.hooks)

    @property
    def has_after(self) -> bool:
        return any(h.after is not None for h in self.hooks)

    async def run_before(
        self, request: ChatCompletionRequest, timings: list[Timing]
    ) -> ChatCompletionRequest:
        """Each `before` in turn, on what the previous one returned. A plain function runs in
        a worker thread: a slow one (a call to a moderation service) must not stop the
        event loop. Raises HookFailed; every hook that ran is in `timings`."""
        for hook in self.hooks:
            if hook.before is None:
                continue
            t0 = time.perf_counter()
            outcome: Outcome = "failed"
            try:
                out = await _call_async(hook.before, request)
                if isinstance(out, Refusal):
                    raise out
                request = _checked_request(hook.name, out)
                outcome = "ok"
            except Refusal as refusal:
                outcome = "refused"
                raise _refusal(hook.name, "before", refusal) from refusal
            except HookFailed:
                raise
            except Exception as exc:
                raise _broke(hook.name, "before", exc) from exc
            finally:
                timings.append(Timing("before", hook.name, time.perf_counter() - t0, outcome))
        return request

    def run_after(
        self, request: ChatCompletionRequest, result: ChatCompletion, timings: list[Timing]
    ) -> ChatCompletion:
        """Each `after` in turn, in the worker's thread (an `async def` one in an event loop of
        its own). Raises HookFailed; every hook that ran is in `timings`."""
        for hook in self.hooks:
            if hook.after is None:
                continue
            t0 = time.perf_counter()
            outcome: Outcome = "failed"
            try:
                out = hook.after(request, result)
                if inspect.isawaitable(out):
                    out = asyncio.run(_awaited(out))
                result = _checked_result(hook.name, out)
                outcome = "ok"
            except Refusal as refusal:
                outcome = "refused"
                raise _refusal(hook.name, "after", refusal) from refusal
            except HookFailed:
                raise
            except Exception as exc:
                raise _broke(hook.name, "after", exc) from exc
            finally:
                timings.append(Timing("after", hook.name, time.perf_counter() - t0, outcome))
        return result


async def _awaited(value: Any) -> Any:
    return await value


async def _call_async(fn: Callable[..., Any], *args: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    out = await anyio.to_thread.run_sync(fn, *args)
    return await out if inspect.isawaitable(out) else out


def _checked_request(hook: str, out: object) -> ChatCompletionRequest:
    """What `before` returned, validated again: a hook may have built an invalid request with
    `model_copy(update=...)`, which skips validation."""
    if not isinstance(out, ChatCompletionRequest):
        raise HookFailed(
            hook,
            "before",
            "hook_failed",
            f"hook '{hook}' before() returned {type(out).__name__}, not a ChatCompletionRequest or Refusal",
        )
    return ChatCompletionRequest.model_validate(out.model_dump(exclude_unset=True))


def _checked_result(hook: str, out: object) -> ChatCompletion:
    if not isinstance(out, ChatCompletion):
        raise HookFailed(
            hook,
            "after",
            "hook_failed",
            f"hook '{hook}' after() returned {type(out).__name__}, not a ChatCompletion",
        )
    return ChatCompletion.model_validate(out.model_dump())


# --- loading -----------------------------------------------------------------------------


def _as_hook(name: str, obj: object) -> LoadedHook:
    before, after = getattr(obj, "before", None), getattr(obj, "after", None)
    if any(fn is not None and not callable(fn) for fn in (before, after)):
        raise HookLoadError(f"hook '{name}': its before/after attribute is not callable")
    if before is None and after is None:
        raise HookLoadError(f"hook '{name}' has neither before() nor after()")
    return LoadedHook(name, before, after)


def _from_entry_point(ep: EntryPoint) -> LoadedHook:
    try:
        obj = ep.load()
    except Exception as exc:
        raise HookLoadError(
            f"hook '{ep.name}' (entry point '{ep.value}' in group {GROUP}) cannot be loaded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return _as_hook(ep.name, obj)


def _from_path(path: str) -> LoadedHook:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise HookLoadError(f"INFERQ_HOOKS: '{path}' is not 'module:attribute' (e.g. 'my_pkg.hooks:house')")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise HookLoadError(
            f"INFERQ_HOOKS: hook '{path}' cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    return _as_hook(path, obj)


def load(paths: Sequence[str], group: str = GROUP) -> Hooks:
    """The entry points of `group` (by name), then `paths`; raises HookLoadError naming the
    first hook that cannot be loaded."""
    found = [_from_entry_point(ep) for ep in sorted(entry_points(group=group), key=lambda e: e.name)]
    found += [_from_path(p) for p in paths]
    return Hooks(tuple(found))


@cache
def _loaded(paths: tuple[str, ...]) -> Hooks:
    return load(paths)


def hooks_for(paths: Sequence[str]) -> Hooks:
    """This process's hooks for the setting `hooks`, loaded on the first call only (call it at
    start-up, so a bad hook stops the process there)."""
    return _loaded(tuple(paths))


def with_system_prompt(request: ChatCompletionRequest, prompts: Mapping[str, str]) -> ChatCompletionRequest:
    """The model's default system prompt (`INFERQ_SYSTEM_PROMPTS`) first, for a request that
    brings no system or developer message of its own. Applied in the API before the hooks and
    the prompt count, so both see the conversation the engine will run."""
    prompt = prompts.get(request.model)
    if not prompt or any(m.role in ("system", "developer") for m in request.messages):
        return request
    return request.model_copy(
        update={"messages": [ChatMessage(role="system", content=prompt), *request.messages]}
    )
