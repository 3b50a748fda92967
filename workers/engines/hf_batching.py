"""transformers' continuous batching as the continuous engine drives it: every attribute of
it that is not transformers' public API is reached here, and nowhere else, and checked.

Why: `init_continuous_batching`, `add_request`, `cancel_request` and `stop` are public, but
the engine also needs what is not: the manager's logits-processor list (to add
`SlotSampler`), its output queue (polled, no thread per request), its loop's thread (a
daemon one: `start()` makes a non-daemon one) and fatal error, and each request's processor
kwargs (the row's slot). These change between transformers releases without notice, and a
change showed as an AttributeError deep in the generation loop. So this module checks, when
it is imported, the transformers version against the range these accesses were checked on,
and the classes; and the manager's own attributes each time it makes one. Anything else
fails with one `UnsupportedTransformers` naming the version installed, the range checked and
what is missing.

Moving to a new transformers: check each access below against it, then widen `CHECKED`.

Only the worker child imports this module (torch).
"""

from __future__ import annotations

import dataclasses
import inspect
import queue
import threading
from typing import Any

import transformers
from packaging.version import InvalidVersion, Version
from transformers import GenerationMixin
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import ContinuousBatchingManager, RequestState
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)
from transformers.generation.continuous_batching.requests import FutureRequestState, GenerationOutput

__all__ = [
    "CHECKED",
    "ContinuousBatchingLogitsProcessor",
    "UnsupportedTransformers",
    "check_classes",
    "check_manager",
    "check_version",
    "fatal_error",
    "output_queue",
    "processor_kwargs",
    "start_manager",
]

#: transformers releases whose continuous-batching internals these accesses were checked on:
#: >= the first (major, minor), < the second
CHECKED = ((5, 19), (5, 20))

#: what the engine reaches on each class: methods (with the keyword arguments it passes; `**`:
#: any other keyword), class attributes, dataclass fields
_CLASSES: dict[type, tuple[str, ...]] = {
    GenerationMixin: (
        "init_continuous_batching(generation_config, continuous_batching_config)",
        "destroy_cached_continuous_batching_manager",
    ),
    ContinuousBatchingConfig: (
        "max_requests_per_batch",
        "per_request_processors",
        "allow_block_sharing",
        "page_size",
        "num_blocks",
        "max_batch_tokens",
        "max_memory_percent",
    ),
    ContinuousBatchingManager: (
        "add_request(request_id, max_new_tokens, streaming, eos_token_id, **)",
        "cancel_request",
        "stop(block, timeout, hard_stop)",
        "warmup",
        "is_running",
        "_run_generation_loop",
    ),
    ContinuousBatchingLogitsProcessor: (
        "supported_kwargs",
        "ignored_kwargs",
        "fill_defaults",
        "prepare_tensor_args",
    ),
    FutureRequestState: ("state",),
    RequestState: ("logit_processor_kwargs",),
    GenerationOutput: ("request_id", "generated_tokens", "error", "is_finished"),
}

#: what each manager has once made (instance attributes): dotted paths from the manager
_MANAGER = (
    "_generation_thread",
    "logit_processor.logits_processor",
    "logit_processor.tensors_required",
    "logit_processor.supported_keys",
    "logit_processor.do_processing",
    "output_router.output_queue",
    "background_thread_status.clear",
    "background_thread_status.fatal_error",
)


class UnsupportedTransformers(RuntimeError):
    """The installed transformers is not one the continuous engine was checked on."""


def _range() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = CHECKED
    return f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def _unsupported(why: str, version: str | None = None) -> UnsupportedTransformers:
    installed = transformers.__version__ if version is None else version
    return UnsupportedTransformers(
        f"INFERQ_ENGINE_MODE=continuous needs transformers{_range()} (the continuous-batching "
        f"internals it drives were checked on those), and this is transformers {installed}: {why}. "
        f"Install 'transformers{_range()}', or serve with INFERQ_ENGINE_MODE=static (to support this "
        "transformers, check workers/engines/hf_batching.py against it and widen its CHECKED)"
    )


def check_version(version: str | None = None) -> None:
    """Raises `UnsupportedTransformers` unless `version` (the installed transformers') is in
    `CHECKED`."""
    text = transformers.__version__ if version is None else version
    try:
        release = Version(text).release[:2]
    except InvalidVersion:
        raise _unsupported("a version that cannot be read", text) from None
    if not CHECKED[0] <= release < CHECKED[1]:
        raise _unsupported("not a release they were checked on", text)


def _lacks(cls: type, spec: str) -> list[str]:
    """What of `spec` (an entry of `_CLASSES`) `cls` lacks, each as `Class.name` or
    `Class.name(argument)`."""
    name, _, args = spec.partition("(")
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if not (name in fields or hasattr(cls, name) or name in getattr(cls, "__annotations__", {})):
        return [f"{cls.__name__}.{name}"]
    if not args:
        return []
    params = inspect.signature(getattr(cls, name)).parameters
    wanted = [a.strip() for a in args.rstrip(")").split(",")]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return [
        f"{cls.__name__}.{name}({a})"
        for a in wanted
        if (a == "**" and not var_kw) or (a != "**" and a not in params)
    ]


def check_classes() -> None:
    """Raises `UnsupportedTransformers` naming every method, field or argument it lacks."""
    missing = [gap for cls, specs in _CLASSES.items() for spec in specs for gap in _lacks(cls, spec)]
    if missing:
        raise _unsupported("it lacks " + ", ".join(missing))


def check_manager(manager: Any) -> None:
    """Raises `UnsupportedTransformers` naming every attribute a new manager lacks."""
    missing = []
    for path in _MANAGER:
        obj = manager
        for part in path.split("."):
            if not hasattr(obj, part):
                missing.append(path)
                break
            obj = getattr(obj, part)
    if missing:
        raise _unsupported(f"its {type(manager).__name__} lacks " + ", ".join(missing))


def start_manager(
    model: Any,
    generation_config: Any,
    config: ContinuousBatchingConfig,
    processor: ContinuousBatchingLogitsProcessor,
    *,
    warmup: bool,
) -> Any:
    """`model`'s manager, with `processor` as its only logits processor besides the ones of
    `generation_config`, warmed up if asked (CUDA graphs), its loop running in a daemon thread.

    `manager.start()`, but the loop's thread is a daemon: a non-daemon one kept every process
    that loaded the engine alive at exit (a worker child, a benchmark, pytest)."""
    manager = model.init_continuous_batching(
        generation_config=generation_config, continuous_batching_config=config
    )
    check_manager(manager)
    lp = manager.logit_processor
    lp.logits_processor.append(processor)
    lp.tensors_required += 1
    lp.supported_keys.update(processor.supported_kwargs)
    lp.do_processing = True
    if warmup:
        manager.warmup()
    manager.background_thread_status.clear()
    manager._generation_thread = threading.Thread(
        target=manager._run_generation_loop, name="inferq-continuous-loop", daemon=True
    )
    manager._generation_thread.start()
    return manager


def output_queue(manager: Any) -> queue.Queue[Any]:
    """Where the loop puts each request's outputs (`GenerationOutput`), in order."""
    out: queue.Queue[Any] = manager.output_router.output_queue
    return out


def fatal_error(manager: Any) -> Any:
    """What stopped the manager's loop, if it died of an error (else None)."""
    return getattr(manager.background_thread_status, "fatal_error", None)


def processor_kwargs(request: FutureRequestState) -> dict[str, Any]:
    """The logits-processor kwargs a request was added with (`add_request(..., **kwargs)`)."""
    return request.state.logit_processor_kwargs


check_version()
check_classes()
