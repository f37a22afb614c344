"""The vendors' OpenAPI excerpts (../shared/specs, see its README) as validators for what the bot and its fakes send.

`validator(file, schema)` validates against one named schema of openai.json (OpenAPI 3.1) or twilio.json (OpenAPI
3.0); `problems(v, instance)` lists what is wrong, one line each, and, with `closed=True`, names every key the
schema (or the branch that matched) does not declare: the real APIs refuse unknown parameters, plain schema
validation lets them through. `KNOWN_DISCREPANCIES` holds the problems the specs' README lists as the vendor's
schema being stricter than its own examples, which the live APIs accept; pass them as `tolerate`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import FormatChecker
from jsonschema.protocols import Validator
from jsonschema.validators import extend
from openapi_schema_validator import OAS30Validator, OAS31Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4, DRAFT202012

SPECS = Path(__file__).resolve().parents[2] / "shared" / "specs"  # <repo>/../shared/specs, where CI puts them

# OpenAI's oneOf branches overlap (a user message fits both EasyInputMessage and InputMessage): judge oneOf as anyOf.
OAS31 = extend(OAS31Validator, {"oneOf": OAS31Validator.VALIDATORS["anyOf"]})

# Per file and schema: problems the README lists under "Where a vendor's schema is stricter than its own examples".
KNOWN_DISCREPANCIES: dict[tuple[str, str], tuple[str, ...]] = {
    # The live API sends "user": null and a "store" field the schema does not declare.
    ("openai.json", "Response"): (
        r"^\$\.user: None is not of type 'string'$",
        r"^\$\.store: unknown parameter",
    ),
}


@dataclass(frozen=True)
class _Spec:
    file: str
    doc: dict[str, Any]
    registry: Registry
    cls: type[Validator]


@cache
def _spec(file: str) -> _Spec:
    path = SPECS / file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the vendors' OpenAPI excerpts live in <repo>/../shared/specs "
            "(CI puts them there); check them out next to the repository"
        )
    doc = json.loads(path.read_text(encoding="utf-8"))
    oas31 = doc["openapi"].startswith("3.1")
    registry = Registry().with_resource(file, Resource(doc, DRAFT202012 if oas31 else DRAFT4))
    return _Spec(file, doc, registry, OAS31 if oas31 else OAS30Validator)


@cache
def _at(file: str, pointer: str) -> Validator:
    spec = _spec(file)
    return spec.cls({"$ref": f"{file}#{pointer}"}, registry=spec.registry, format_checker=FormatChecker())


def validator(file: str, schema: str) -> Validator:
    """A validator for `#/components/schemas/<schema>` of `file` (openai.json or twilio.json)."""
    if schema not in _spec(file).doc["components"]["schemas"]:
        raise KeyError(f"{file} has no schema {schema!r}")
    return _at(file, f"/components/schemas/{_escape(schema)}")


def problems(v: Validator, instance: Any, *, closed: bool = False, tolerate: Iterable[str] = ()) -> list[str]:
    """What is wrong with `instance`, as "<json path>: <message>" lines; none when it is valid.

    `closed`: also report keys that no schema on the instance's path declares (OpenAI answers 400
    `unknown_parameter` for those). `tolerate`: regular expressions of problems to leave out.
    """
    found = [f"{e.json_path}: {e.message}" for e in v.iter_errors(instance)]
    if closed:
        file, _, pointer = v.schema["$ref"].partition("#")
        found += _Walker(file).unknown([pointer], instance, "$")
    patterns = [re.compile(p) for p in tolerate]
    return [p for p in found if not any(pattern.search(p) for pattern in patterns)]


def known(file: str, schema: str) -> tuple[str, ...]:
    """The problems the specs' README lists for `schema` as accepted by the live API (for `tolerate`)."""
    return KNOWN_DISCREPANCIES.get((file, schema), ())


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


@dataclass
class _Shape:
    """One way a schema reads an instance: the properties it declares (each with its schemas) and array items."""

    properties: dict[str, list[str]] = field(default_factory=dict)
    items: list[str] = field(default_factory=list)
    open: bool = False  # additionalProperties/patternProperties allow any key

    def merge(self, other: _Shape) -> _Shape:
        properties = {k: list(v) for k, v in self.properties.items()}
        for key, pointers in other.properties.items():
            properties.setdefault(key, []).extend(pointers)
        return _Shape(properties, self.items + other.items, self.open or other.open)


class _Walker:
    """Finds the keys of an instance that its schema declares nowhere, following $ref, allOf and matching branches.

    Schemas are handled by their JSON pointer in the document, so every sub-schema can be validated on its own
    (to know which anyOf/oneOf branches an instance matches).
    """

    def __init__(self, file: str) -> None:
        self._file = file
        self._doc = _spec(file).doc

    def _node(self, pointer: str) -> Any:
        node: Any = self._doc
        for part in pointer.lstrip("/").split("/") if pointer else []:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def _shapes(self, pointer: str, instance: Any) -> list[_Shape]:
        node = self._node(pointer)
        if not isinstance(node, dict):
            return [_Shape(open=True)]
        extra = node.get("additionalProperties")
        base = _Shape(
            {k: [f"{pointer}/properties/{_escape(k)}"] for k in node.get("properties", {})},
            [f"{pointer}/items"] if isinstance(node.get("items"), dict) else [],
            open=extra is True or isinstance(extra, dict) or "patternProperties" in node,
        )
        alternatives = [base]
        parts = [node["$ref"].removeprefix("#")] if "$ref" in node else []
        parts += [f"{pointer}/allOf/{i}" for i in range(len(node.get("allOf", [])))]
        for part in parts:
            alternatives = [a.merge(b) for a in alternatives for b in self._shapes(part, instance)]
        for keyword in ("anyOf", "oneOf"):
            if keyword in node:
                branches = [f"{pointer}/{keyword}/{i}" for i in range(len(node[keyword]))]
                matched = [b for b in branches if _at(self._file, b).is_valid(instance)]
                if not matched:
                    return [_Shape(open=True)]  # invalid: plain validation reports it
                alternatives = [a.merge(b) for a in alternatives for m in matched for b in self._shapes(m, instance)]
        return alternatives

    def unknown(self, pointers: list[str], instance: Any, path: str) -> list[str]:
        """Undeclared keys of `instance`, read by every schema in `pointers` at once (they all apply)."""
        if not isinstance(instance, dict | list):
            return []
        shapes = [_Shape()]
        for pointer in pointers:
            shapes = [a.merge(b) for a in shapes for b in self._shapes(pointer, instance)]
        best: list[str] | None = None
        for shape in shapes:
            found: list[str] = []
            if isinstance(instance, dict):
                for key, value in instance.items():
                    where = f"{path}.{key}"
                    if key in shape.properties:
                        found += self.unknown(shape.properties[key], value, where)
                    elif shape.properties and not shape.open:
                        found.append(f"{where}: unknown parameter (not declared by the schema)")
            elif shape.items:
                for i, item in enumerate(instance):
                    found += self.unknown(shape.items, item, f"{path}[{i}]")
            if best is None or len(found) < len(best):
                best = found
        return best or []
