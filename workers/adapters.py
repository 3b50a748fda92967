"""LoRA adapters served by name: the directory scan, and the engine's set of loaded ones.

Why our own on PEFT rather than ms-swift's per-request adapters: once one is loaded, ms-swift
4.6 fails every call of more than one row. PEFT injects the LoRA layers into the engine's model
once, and a call whose rows use different adapters runs in one `generate`
(`adapter_names=`, "__base__" for the base model's rows).

A changed adapter (new weights) loads under a new internal name; the old one stays until the
`generate` using it ends, which is when a reload can run at all (the engine's lock): jobs that
started keep the weights they started with.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BASE = "__base__"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterDir:
    name: str
    path: Path
    #: changes when its files change (a new checkpoint copied over the old one)
    version: str


def describe(name: str, path: Path) -> AdapterDir | None:
    """The adapter in `path` (config and weights), or None if it holds none (yet)."""
    files = [path / "adapter_config.json", *(path / w for w in _WEIGHTS)]
    try:
        stats = [(f.name, f.stat()) for f in files if f.is_file()]
    except (OSError, ValueError):  # unreadable, or not a path at all (a NUL byte)
        return None
    if len(stats) < 2 or stats[0][0] != "adapter_config.json":
        return None
    version = ",".join(f"{n}:{s.st_size}:{s.st_mtime_ns}" for n, s in stats)
    return AdapterDir(name, path, version)


def scan(root: Path | None) -> dict[str, AdapterDir]:
    """Every subdirectory of `root` that holds a PEFT adapter (config and weights), by name.
    Hidden and half-copied ones (no weights yet) are left for a later scan."""
    if root is None or not root.is_dir():
        return {}
    found = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if (spec := describe(entry.name, Path(entry.path))) is not None:
            found[entry.name] = spec
    return found


@dataclass
class Plan:
    """What one sync serves, and what the on-demand requests it read came to."""

    serve: dict[str, AdapterDir]
    #: on-demand loads that cannot be (name -> why), for the load endpoint to answer with
    problems: dict[str, str]
    #: on-demand unloads that no longer hold (name -> the override as read): their adapter's
    #: directory entry changed since, for the worker to delete (if no newer request replaced it)
    ended: dict[str, str]


class Unloads:
    """On-demand unloads (`keys.ADAPTER_OVERRIDES`) over the directory, which is the truth:
    an unload hides the adapter of the same name in the directory only while that entry stays
    as this worker first saw it with the unload. Once it appears, or its files change, the
    unload has ended: someone put an adapter there to be served. (A worker's start ends every
    unload as well: tasks.child.)"""

    def __init__(self) -> None:
        #: name -> (the override as read, the directory entry's version then: None if absent)
        self._seen: dict[str, tuple[str, str | None]] = {}

    def holds(self, name: str, raw: str, spec: AdapterDir | None) -> bool:
        """Whether the unload `raw` of `name` still hides it (`spec`: the directory's now)."""
        version = spec.version if spec is not None else None
        seen = self._seen.get(name)
        if seen is None or seen[0] != raw:  # a new unload: it holds, against the entry as it is
            self._seen[name] = (raw, version)
            if spec is not None:
                logger.warning(
                    "adapter %r in %s is hidden by an on-demand unload (POST /v1/unload_lora_adapter); "
                    "it is served again when its files change or a worker starts",
                    name,
                    spec.path,
                )
            return True
        if seen[1] == version:
            return True
        del self._seen[name]
        how = "appeared" if seen[1] is None else "changed"
        logger.info("adapter %r %s in the directory: its on-demand unload ends", name, how)
        return False

    def keep_only(self, names: set[str]) -> None:
        """Forget the unloads no longer asked for."""
        for name in [n for n in self._seen if n not in names]:
            del self._seen[name]


def is_unload(raw: str) -> bool:
    """Whether an override (`keys.ADAPTER_OVERRIDES`) is an on-demand unload."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return False
    return isinstance(entry, dict) and bool(entry.get("unloaded"))


def wanted(root: Path | None, overrides: dict[str, str], unloads: Unloads) -> Plan:
    """What to serve: the directory's adapters, then the on-demand loads and unloads
    (`keys.ADAPTER_OVERRIDES`), an unload only while `unloads` says it holds."""
    found = scan(root)
    plan = Plan(found, {}, {})
    unloaded = set()
    for name, raw in overrides.items():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if entry.get("unloaded"):
            unloaded.add(name)
            if unloads.holds(name, raw, found.get(name)):
                found.pop(name, None)
            else:
                plan.ended[name] = raw
        elif (spec := describe(name, Path(entry["path"]))) is not None:
            found[name] = spec
        else:
            plan.problems[name] = f"no adapter_config.json and adapter weights in {entry['path']}"
    unloads.keep_only(unloaded)
    return plan


def check_config(path: Path) -> str | None:
    """Why an adapter cannot be served, before its weights are read (None: try it)."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"adapter_config.json is unreadable: {exc}"
    if str(config.get("peft_type", "")).upper() != "LORA":
        return f"peft_type is {config.get('peft_type')!r}, not LORA"
    return None


class AdapterSlots:
    """The adapters one model serves through PEFT, by name: `available` (servable), of which
    at most `cap` are `loaded` at once (0: all); the least recently used one is unloaded to
    make room, and an unloaded one is loaded again when a call needs it."""

    def __init__(self, model: Any, cap: int = 0) -> None:
        self.model = model
        self.cap = cap
        self.peft: Any = None
        self.available: dict[str, AdapterDir] = {}
        #: served name -> (internal PEFT name, version), least recently used first
        self.loaded: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._generation = 0
        #: name -> (the version last refused, why): not retried until its files change
        self._refused: dict[str, tuple[str, str]] = {}
        self.loads = 0
        self.unloads = 0
        self.last_refused: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.available)

    @property
    def refused(self) -> dict[str, str]:
        """The adapters wanted but not served because they were refused (name -> why): for
        the heartbeat, so that a request for one is told why rather than "does not exist"."""
        return {n: why for n, (_, why) in list(self._refused.items()) if n not in self.available}

    def sync(self, wanted: dict[str, AdapterDir]) -> dict[str, str]:
        """Serve `wanted`: load what is new or changed (while there is room), unload what is
        gone. A broken adapter is refused with a log line naming it and changes nothing
        else. Returns the refusals (name -> why) of this call; a refused version is not tried
        again until its files change."""
        refused: dict[str, str] = {}
        self.last_refused = refused
        for name in [n for n in self.available if n not in wanted]:
            del self.available[name]
            if name in self.loaded:
                self._unload(name)
            logger.info("adapter %r was removed; no longer served", name)
        for name in [n for n in self._refused if n not in wanted]:
            del self._refused[name]
        for name, spec in wanted.items():
            if self.available.get(name) == spec or self._refused.get(name, ("",))[0] == spec.version:
                continue
            current = self.loaded.get(name)
            had = self.available.get(name)
            problem = check_config(spec.path)
            if problem is None and (current is not None or not self.cap or len(self.loaded) < self.cap):
                problem = self._load(name, spec)
            if problem is not None:
                self._refuse(name, spec, problem, refused)
                continue
            self.available[name] = spec
            self._refused.pop(name, None)
            # routine (INFO): the directory or an admin asked for it; refusals are ERRORs
            logger.info("adapter %r %s from %s", name, "changed" if had else "served", spec.path)
        return refused

    def ensure(self, names: set[str]) -> dict[str, str]:
        """Load the adapters a call needs (at most `cap` of them), unloading the least
        recently used others; returns why any could not be loaded."""
        problems: dict[str, str] = {}
        for name in sorted(names):
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while self.cap and len(self.loaded) >= self.cap:
                victim = next((n for n in self.loaded if n not in names), None)
                if victim is None:
                    break
                self._unload(victim)
            spec = self.available[name]
            if (problem := self._load(name, spec)) is not None:
                self._refuse(name, spec, problem, problems)
        return problems

    def _refuse(self, name: str, spec: AdapterDir, problem: str, into: dict[str, str]) -> None:
        logger.error("adapter %r at %s refused: %s", name, spec.path, problem)
        if name in self.loaded:
            logger.error("adapter %r keeps its earlier weights", name)
        self._refused[name] = (spec.version, problem)
        into[name] = problem

    def _load(self, name: str, spec: AdapterDir) -> str | None:
        self._generation += 1
        internal = f"{name}@{self._generation}"
        try:
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self.model, str(spec.path), adapter_name=internal)
                self.peft.eval()
            else:
                self.peft.load_adapter(str(spec.path), adapter_name=internal, is_trainable=False)
        except Exception as exc:  # wrong base, shapes that do not fit, unreadable weights
            self._drop(internal)
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        old = self.loaded.pop(name, None)
        self.loaded[name] = (internal, spec.version)
        self.loads += 1
        if old is not None:
            self._drop(old[0])
        return None

    def _unload(self, name: str) -> None:
        internal, _ = self.loaded.pop(name)
        self.unloads += 1
        self._drop(internal)

    def _drop(self, internal: str) -> None:
        if self.peft is None or internal not in self.peft.peft_config:
            return
        try:
            # another adapter active first: PEFT deleting the active one moves the layers'
            # record of it but not the wrapper's, which a later load_adapter then trips on
            # (each row names its own adapter anyway)
            if others := [n for n in self.peft.peft_config if n != internal]:
                self.peft.set_adapter(others[0])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "deleting the active adapter": the last one
                self.peft.delete_adapter(internal)
        except Exception:
            logger.exception("unloading adapter %s failed", internal)

    def internal_names(self, adapters: Sequence[str]) -> list[str] | None:
        """The PEFT names for a call's rows ("" or the base: the base model), or None when no
        adapter was ever loaded (the model then has no LoRA layers to steer)."""
        if self.peft is None:
            return None
        return [self.loaded[a][0] if a else BASE for a in adapters]

    @contextmanager
    def rows(self, adapters: Sequence[str]) -> Iterator[None]:
        """Around one `generate`: each row through its own adapter. PEFT's per-row path
        gathers each adapter's rows in every LoRA layer at every step; a call whose rows all
        use one adapter, or none, takes the plain path instead (the adapter set active, or
        the LoRA layers off), so base-model traffic pays nothing for the adapters loaded."""
        names = self.internal_names(adapters)
        if names is None or not self.peft.peft_config:  # no adapter in the layers: the base
            yield
            return
        distinct = set(names)
        if distinct == {BASE}:
            tuner = self.peft.base_model
            tuner.disable_adapter_layers()
            try:
                yield
            finally:
                tuner.enable_adapter_layers()
        elif len(distinct) == 1:
            self.peft.set_adapter(names[0])
            yield
        else:
            with self.peft.base_model._enable_peft_forward_hooks(adapter_names=names):
                yield


def pack(requests: Sequence[str], idxs: list[int], rows: int, cap: int) -> list[list[int]]:
    """The calls to run `idxs` in (each `requests[i]` is its row's adapter, "" the base): at
    most `rows` rows per call and, with a `cap`, at most `cap` adapters per call; in order
    when the cap allows it, grouped by adapter when it does not."""
    adapters = {requests[i] for i in idxs} - {""}
    if not cap or len(adapters) <= cap:
        return [idxs[s : s + rows] for s in range(0, len(idxs), rows)]
    groups: dict[str, list[int]] = {}
    for i in idxs:
        groups.setdefault(requests[i], []).append(i)
    calls: list[list[int]] = []
    call: list[int] = []
    used: set[str] = set()
    for adapter, members in groups.items():
        for i in members:
            if len(call) == rows or (adapter and adapter not in used and len(used) == cap):
                calls.append(call)
                call, used = [], set()
            call.append(i)
            if adapter:
                used.add(adapter)
    if call:
        calls.append(call)
    return calls
