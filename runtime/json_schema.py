"""The JSON Schema validator shared by the service's protocol headers and a bundle's calibration.

JSON Schema calls 2.0 an integer and NaN a number; neither is one for numpy, a C client or a threshold,
so both type checks are redefined here, once.
"""
from __future__ import annotations

import json
import math
from importlib import resources

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
