"""Extract the few OpenAI component schemas our tests validate against, with everything they
`$ref`, from the openai/openai-openapi spec into tests/support/openai_schemas/openai.json.

    git -C <clone of openai/openai-openapi> show f85dbe2:openapi.json > /tmp/openapi.json
    git -C <clone of openai/openai-openapi> show 498c71d:openapi.yaml > /tmp/openapi-498c71d.yaml
    python tests/support/openai_schemas/vendor.py /tmp/openapi.json \
        --legacy-spec /tmp/openapi-498c71d.yaml

The per-line object of batch output and error files (`BatchRequestOutput`) is no longer in the
current spec; `--legacy-spec` takes it (and only it) from the last spec that had it.

Schemas are copied as they are, less their annotations (`description`, `example`, `x-oaiMeta`),
which validation never reads. OpenAPI 3.0's `nullable` is left in: tests/support/openai_schema.py
turns it into JSON Schema when it loads the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Set
from pathlib import Path
from typing import Any

import yaml

REPO = "https://github.com/openai/openai-openapi"
COMMIT = "f85dbe223d40e1a31cba812ab2d755c7e98a92a3"
LEGACY_COMMIT = "498c71ddf6f1c45b983f972ccabca795da211a3e"

#: what our API answers with, by the spec's names
ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ListModelsResponse",
    "Model",
    "OpenAIFile",
    "ListFilesResponse",
    "DeleteFileResponse",
    "Batch",
    "ListBatchesResponse",
    "ErrorResponse",
    "Error",
]
LEGACY_ROOTS = ["BatchRequestOutput"]

PREFIX = "#/components/schemas/"
ANNOTATIONS = {"description", "example", "x-oaiMeta"}
#: keywords whose value maps names to subschemas (the names are not keywords)
SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
SCHEMA_ONE = {
    "items",
    "additionalItems",
    "additionalProperties",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
}

OUT = Path(__file__).resolve().parent / "openai.json"


def load(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(doc, dict) or "components" not in doc:
        sys.exit(f"{path}: not an OpenAPI document")
    return doc


def map_subschemas(
    schema: dict[str, Any], fn: Callable[[Any], Any], drop: Set[str] = frozenset()
) -> dict[str, Any]:
    """One schema object with `fn` applied to each subschema in it (a list of them, or a
    map of names to them, as the keyword has it); other values, such as property names
    called `description`, are kept as they are; keywords in `drop` are left out."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in drop:
            continue
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: fn(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS or key in SCHEMA_ONE:
            out[key] = fn(value)
        else:
            out[key] = value
    return out


def strip(schema: Any) -> Any:
    """A schema less its annotations."""
    if isinstance(schema, list):
        return [strip(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return map_subschemas(schema, strip, ANNOTATIONS)


def raw_refs(node: Any) -> set[str]:
    """Every reference below (`$ref` values and discriminator mappings)."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value)
            elif key == "mapping" and isinstance(value, dict):
                found.update(v for v in value.values() if isinstance(v, str))
            else:
                found |= raw_refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= raw_refs(value)
    return found


def refs(node: Any) -> set[str]:
    """The component names referenced below."""
    names = set()
    for ref in raw_refs(node):
        if not ref.startswith(PREFIX):
            sys.exit(f"unsupported $ref {ref!r}: only {PREFIX}... is vendored")
        names.add(ref.removeprefix(PREFIX))
    return names


def closure(schemas: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        if name not in schemas:
            sys.exit(f"schema {name!r} is not in the spec")
        out[name] = strip(schemas[name])
        todo.extend(refs(out[name]) - out.keys())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", type=Path, help="openapi.json or openapi.yaml of openai/openai-openapi")
    ap.add_argument("--commit", default=COMMIT, help="the commit SPEC was taken from")
    ap.add_argument("--legacy-spec", type=Path, help="an older spec that still has BatchRequestOutput")
    ap.add_argument("--legacy-commit", default=LEGACY_COMMIT, help="the commit --legacy-spec was taken from")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args(argv)

    spec = load(args.spec)
    schemas = closure(spec["components"]["schemas"], ROOTS)
    sources: list[dict[str, Any]] = [
        {
            "commit": args.commit,
            "file": "openapi" + args.spec.suffix,
            "openapi": spec.get("openapi"),
            "info_version": spec.get("info", {}).get("version"),
            "roots": ROOTS,
        }
    ]
    if args.legacy_spec:
        legacy = load(args.legacy_spec)
        extra = closure(legacy["components"]["schemas"], LEGACY_ROOTS)
        clash = sorted(extra.keys() & schemas.keys())
        if clash:
            sys.exit(f"legacy schemas clash with current ones: {clash}")
        schemas.update(extra)
        sources.append(
            {
                "commit": args.legacy_commit,
                "file": "openapi" + args.legacy_spec.suffix,
                "openapi": legacy.get("openapi"),
                "info_version": legacy.get("info", {}).get("version"),
                "roots": LEGACY_ROOTS,
                "why": "no longer in the current spec: the last one that defines the batch output line",
            }
        )
    doc = {
        "x-vendored": {
            "repository": REPO,
            "sources": sources,
            "license": "MIT",
            "copyright": "Copyright (c) OpenAI (https://openai.com)",
            "generated_by": "tests/support/openai_schemas/vendor.py",
            "changes": "only the listed roots and what they $ref; annotations "
            "(description, example, x-oaiMeta) removed; nothing else changed",
        },
        "components": {"schemas": dict(sorted(schemas.items()))},
    }
    args.output.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(schemas)} schemas to {args.output}")


if __name__ == "__main__":
    main()
