"""JSON files: strict JSON written atomically, JSON objects read with errors that name the file.

The steps write their JSON artifacts (``config.json``, ``metrics.json``,
``decision.json``, ``manifest.json``...) with ``save_json`` and read JSON
objects back with ``load_json_object``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from alexnet_tasks.atomic import atomic_write_bytes


def json_safe(payload: Any, _where: str = "") -> tuple[Any, list[str]]:
    """``(payload with every NaN or infinite number replaced by None, where they were)``.

    JSON has no NaN or infinity (Python writes them as bare tokens that strict
    readers refuse); a diverged run's loss is one. Places are dotted keys and
    list indices, for example ``["test_loss", "history.3.loss"]``.
    """
    if isinstance(payload, float) and not math.isfinite(payload):
        return None, [_where or "."]
    if isinstance(payload, dict):
        clean, places = {}, []
        for key, value in payload.items():
            clean[key], found = json_safe(value, f"{_where}.{key}" if _where else str(key))
            places += found
        return clean, places
    if isinstance(payload, (list, tuple)):
        clean, places = [], []
        for index, value in enumerate(payload):
            item, found = json_safe(value, f"{_where}.{index}" if _where else str(index))
            clean.append(item)
            places += found
        return clean, places
    return payload, []


def load_json_object(path: Path, advice: str = "") -> dict:
    """The JSON object in ``path``; a ValueError naming the file (plus ``advice``) when it is not one."""
    try:
        payload = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}){advice}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


def json_bytes(payload: Any) -> bytes:
    """``payload`` as the bytes ``save_json`` writes: strict JSON, indented, keys sorted, NaN and infinity as null."""
    payload, _ = json_safe(payload)
    return (json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def save_json(path: Path, payload: Any) -> Path:
    """Write strict JSON atomically (temporary name, fsync, rename); NaN and infinity are written as null."""
    return atomic_write_bytes(path, json_bytes(payload))
