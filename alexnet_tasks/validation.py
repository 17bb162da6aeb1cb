"""Params checked the way Airflow checks them: the jsonschema library, against the DAG's own schemas.

Airflow validates a run's params before the run exists (the trigger form,
the REST API, ``airflow dags test``) with ``jsonschema`` against each
``Param``'s schema. ``check_params`` runs the same library, with the
validator class Airflow's check picks, against the same schemas: the
``Param`` keyword arguments the DAG is built from
(``alexnet_tasks.config.param_specs()``). So what one accepts the other
accepts, for every param and every key of ``recipe_options``. The first
failure becomes a ValueError that names the param (or
``recipe_options.<key>``), the value and what was expected.

Two rules cover what JSON leaves open:

* JSON has one kind of number and JSON Schema counts 1.0 as an integer, so
  an integral float given for an integer param or option is taken as that
  integer: ``{"epochs": 1.0}`` trains, names its folders and fingerprints
  exactly as ``{"epochs": 1}``.
* NaN and infinity are not JSON numbers. Infinity fails every maximum, but
  NaN compares false with every bound, so no JSON Schema can refuse it (and
  Airflow's check lets it through); a non-finite number is refused here, with
  the bounds it misses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jsonschema import FormatChecker
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.validators import validator_for

# The keyword arguments of Airflow's Param that are not part of its JSON schema.
NOT_SCHEMA = ("default", "description", "source")


def param_schema(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema ``Param(**spec)`` validates with: every keyword argument but the default and description."""
    return {key: value for key, value in spec.items() if key not in NOT_SCHEMA}


def check_params(
    values: Mapping[str, Any],
    specs: Mapping[str, Mapping[str, Any]],
    pattern_meanings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``values`` checked against the params' schemas, each integral float of an integer made that integer.

    ``specs`` maps each param's name to the keyword arguments of its
    ``Param`` (``param_specs()``); ``pattern_meanings`` words a param's
    ``pattern`` in messages (``"32 lowercase hex digits"``). Names missing
    from ``values`` stay missing (their defaults apply). Raises ValueError
    for a ``values`` that is not a mapping, an unknown name, or the first
    value its schema refuses, naming it, the value and what was expected.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"settings must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(map(repr, unknown))}; expected some of: {', '.join(sorted(specs))}"
        )
    meanings = pattern_meanings or {}
    return {
        name: check_value(name, value, param_schema(specs[name]), meanings.get(name))
        for name, value in values.items()
    }


def check_value(name: str, value: Any, schema: Mapping[str, Any], pattern_meaning: str | None = None) -> Any:
    """``value`` checked against one param's JSON schema and normalised; a ValueError naming ``name`` if refused."""
    validator = validator_for(schema)(schema, format_checker=FormatChecker())
    error = best_match(validator.iter_errors(value))
    if error is not None:
        where = ".".join([name, *map(str, error.absolute_path)])
        raise ValueError(_message(where, error, pattern_meaning))
    return _normalised(name, value, schema)


def _kinds(schema: Mapping[str, Any]) -> list[str]:
    kind = schema.get("type", [])
    return kind if isinstance(kind, list) else [kind]


def _normalised(where: str, value: Any, schema: Mapping[str, Any]) -> Any:
    """An integral float of an integer as that integer; a ValueError for a NaN the schema could not see."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be {_expected_number(schema)}, got {value!r}")
        if value.is_integer() and "integer" in _kinds(schema):
            return int(value)
    if isinstance(value, dict) and "properties" in schema:
        return {key: _normalised(f"{where}.{key}", item, schema["properties"].get(key, {}))
                for key, item in value.items()}
    return value


_KINDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
          "object": "a JSON object", "array": "a JSON list"}


def _expected_number(schema: Mapping[str, Any]) -> str:
    """``between 0 and 1`` or ``in (0, 10]``: the bounds of a number's schema, as the messages word them."""
    high = schema.get("maximum")
    if "exclusiveMinimum" in schema:
        return f"in ({schema['exclusiveMinimum']}, {high}]"
    if "minimum" in schema and high is not None:
        return f"between {schema['minimum']} and {high}"
    if "minimum" in schema:
        return f"at least {schema['minimum']}"
    return f"at most {high}" if high is not None else "a finite number"


def _message(where: str, error: ValidationError, pattern_meaning: str | None) -> str:
    schema, value, keyword = error.schema, error.instance, error.validator
    if keyword == "type":
        if value is None:
            return f"{where} must be set, got null"
        expected = " or ".join(_KINDS.get(kind, kind) for kind in _kinds(schema) if kind != "null")
        return f"{where} must be {expected}, got {value!r}"
    if keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{where} must be {_expected_number(schema)}, got {value!r}"
    if keyword == "enum":
        return f"{where} must be one of {tuple(schema['enum'])}, got {value!r}"
    if keyword == "pattern":
        return f"{where} must be {pattern_meaning or 'text matching ' + schema['pattern']}, got {value!r}"
    if keyword in ("minLength", "maxLength"):
        return (f"{where} must be {schema.get('minLength', 0)} to {schema.get('maxLength', 'any number of')} "
                f"characters long, got {len(value)}")
    if keyword == "additionalProperties":
        known = list(schema.get("properties", {}))
        unknown = sorted(set(value) - set(known))
        return f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected some of: {', '.join(known)}"
    return f"{where}: {error.message}"
