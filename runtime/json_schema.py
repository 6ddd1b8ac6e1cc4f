"""The JSON Schema validator shared by the service's protocol headers and a bundle's calibration.

JSON Schema calls 2.0 an integer and NaN a number; neither is one for numpy, a C client or a threshold,
so both type checks are redefined here, once.
"""
from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, validators


def _is_integer(checker, value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(checker, value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and math.isfinite(value))


StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many({"integer": _is_integer, "number": _is_number}))


def packaged_validator(package: str, name: str) -> Draft202012Validator:
    """The strict validator of the schema file ``name`` shipped as package data of ``package``."""
    schema = json.loads(resources.files(package).joinpath(name).read_text())
    Draft202012Validator.check_schema(schema)
    return StrictValidator(schema)


def describe_error(error, doc: Any, schema: dict, kind: str, remedy: str = "") -> str:
    """One line for a schema error, pydicom-validator style: the field (dotted, ``[i]`` for list items),
    its value, and what it must be (the nearest ``description`` in ``schema``); ``kind`` names the
    document ("calibration", "manifest"), ``remedy`` ends a missing field's line."""
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        _, expected = _described(schema, path + [missing], kind)
        return f"field '{_field_name(path + [missing])}' is missing (it must be {expected}){remedy}"
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = _resolve(schema, _schema_at(schema, path)).get("properties", {})
        extra = sorted(set(error.instance) - set(known))[0]
        return f"field '{_field_name(path + [extra])}' is not a {kind} field (known here: {', '.join(known)})"
    described, expected = _described(schema, path, kind)
    must = "it" if described == path else f"'{_field_name(described)}'"
    return f"field '{_field_name(path)}' is {_value_at(doc, path)!r:.80}; {must} must be {expected}"


def _field_name(path: list) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    return schema["$defs"][ref.rsplit("/", 1)[1]] if ref else node


def _child(schema: dict, node: dict, part: Any) -> dict | None:
    node = _resolve(schema, node)
    if isinstance(part, int):
        prefix = node.get("prefixItems", [])
        return prefix[part] if part < len(prefix) else node.get("items")
    sub = node.get("properties", {}).get(part)
    if sub is None and isinstance(node.get("additionalProperties"), dict):
        sub = node["additionalProperties"]
    return sub


def _described(schema: dict, path: list, kind: str) -> tuple[list, str]:
    """The longest prefix of ``path`` whose schema has a description (what the field must be), and it."""
    node: dict | None = schema
    best: tuple[list, str] = ([], f"a {kind} object")
    for i, part in enumerate(path):
        node = _child(schema, node, part) if node is not None else None
        if node is None:
            break
        text = _resolve(schema, node).get("description")
        if text:
            best = (path[:i + 1], text)
    return best


def _value_at(doc: Any, path: list) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _schema_at(schema: dict, path: list) -> dict:
    node = schema
    for part in path:
        node = _child(schema, node, part)
    return node
