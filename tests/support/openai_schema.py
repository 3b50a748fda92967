"""Validate our answers against OpenAI's published schemas (vendored in openai_schemas/ here).

    assert_openai("CreateChatCompletionResponse", resp.json())

The spec says OpenAPI 3.1 but still writes many fields the 3.0 way (`nullable: true` beside
`type`, or beside `$ref`), which JSON Schema 2020-12 ignores: a field the spec means as
"string or null" would refuse null. So `nullable` is turned into JSON Schema as the document is
loaded (see `from_openapi30`). Everything else is validated as written, with a registry that
resolves the `#/components/schemas/...` references.

The validator is `jsonschema_rs` (what schemathesis validates with, so it comes with the dev
extras); formats (`unixtime`, `uri`, ...) are annotations here, as in 2020-12 by default.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs

from tests.support.openai_schemas.vendor import map_subschemas

VENDORED = Path(__file__).resolve().parent / "openai_schemas" / "openai.json"
#: the base URI the vendored document is registered under
URI = "urn:openai-openapi:vendored"


def from_openapi30(schema: Any) -> Any:
    """`nullable: true` as JSON Schema: `type: [T, "null"]` (and null added to an `enum`), or,
    beside a `$ref` or with no plain `type`, `anyOf: [<the schema>, {type: null}]`."""
    if isinstance(schema, list):
        return [from_openapi30(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = map_subschemas(schema, from_openapi30)
    nullable = out.pop("nullable", False)
    if nullable is not True:
        return out
    if "$ref" not in out and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [out, {"type": "null"}]}


@cache
def document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(VENDORED.read_text(encoding="utf-8"))
    schemas = doc["components"]["schemas"]
    doc["components"]["schemas"] = {name: from_openapi30(s) for name, s in schemas.items()}
    return doc


def names() -> list[str]:
    return sorted(document()["components"]["schemas"])


@cache
def _validator(name: str) -> jsonschema_rs.Validator:
    if name not in document()["components"]["schemas"]:
        raise KeyError(f"{name!r} is not vendored; known: {', '.join(names())}")
    registry = jsonschema_rs.Registry([(URI, document())], draft=jsonschema_rs.Draft202012)
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"{URI}#/components/schemas/{name}"}, registry=registry
    )


def _path(parts: list[str | int]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(err: jsonschema_rs.ValidationError, indent: str = "") -> list[str]:
    where = "/".join(str(p) for p in err.schema_path)
    lines = [f"{indent}{_path(err.instance_path)}: {_short(err.message)}  [schema: {where}]"]
    kind = err.kind
    if isinstance(
        kind,
        jsonschema_rs.ValidationErrorKind.AnyOf
        | jsonschema_rs.ValidationErrorKind.OneOfNotValid
        | jsonschema_rs.ValidationErrorKind.OneOfMultipleValid,
    ):
        for n, branch in enumerate(kind.context):
            for sub in branch:
                lines += _describe(sub, f"{indent}    branch {n}: ")
    return lines


def openai_errors(name: str, obj: Any) -> list[str]:
    """Every way `obj` breaks schema `name`, one line each (with sub-lines for anyOf/oneOf
    branches), sorted by where in `obj`; empty when it conforms."""
    errors = sorted(_validator(name).iter_errors(obj), key=lambda e: [str(p) for p in e.instance_path])
    return [line for err in errors for line in _describe(err)]


def assert_openai(name: str, obj: dict[str, Any]) -> None:
    """Raise AssertionError naming every path where `obj` does not match OpenAI's `name`."""
    errors = openai_errors(name, obj)
    if errors:
        count = sum(1 for e in errors if not e.startswith(" "))
        raise AssertionError(
            f"not a valid OpenAI {name} ({count} error{'s' if count > 1 else ''}):\n  "
            + "\n  ".join(errors)
            + f"\nobject: {_short(json.dumps(obj), 2000)}"
        )


def assert_openai_all(cases: Iterable[tuple[str, Any]]) -> None:
    """Validate many (schema name, object) pairs, then fail once with every distinct error:
    the same error in several objects (each stream chunk, each batch line) is listed once,
    with how many of them had it."""
    seen: dict[str, int] = {}
    totals: dict[str, int] = {}
    for name, obj in cases:
        totals[name] = totals.get(name, 0) + 1
        for line in dict.fromkeys(openai_errors(name, obj)):
            key = f"{name}: {line}"
            seen[key] = seen.get(key, 0) + 1
    if seen:
        lines = [f"{key}  (in {n} of {totals[key.split(':')[0]]})" for key, n in seen.items()]
        raise AssertionError(f"{len(seen)} distinct schema errors:\n  " + "\n  ".join(lines))
