#!/usr/bin/env python3
"""Print the params table of docs/params.md from PipelineConfig's fields (their defaults, bounds and descriptions).

    .venv/bin/python scripts/params_table.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alexnet_tasks.config import PipelineConfig  # noqa: E402


def _default(setting: dataclasses.Field) -> str:
    shown = setting.metadata["shown_default"]
    if shown is not None:
        return shown
    if setting.default is None:
        return "none"
    return f"`{setting.default}`" if isinstance(setting.default, str) else str(setting.default)


def _allowed(setting: dataclasses.Field) -> str:
    facts, schema = setting.metadata, setting.metadata["schema"]
    if "enum" in schema:
        text = " or ".join(f"`{value}`" for value in schema["enum"])
    elif "pattern" in schema:
        text = facts["pattern_meaning"]
    elif "exclusiveMinimum" in schema:
        text = f"{facts['type']} in ({schema['exclusiveMinimum']}, {schema['maximum']}]"
    elif "minimum" in schema:
        text = f"{facts['type']} {schema['minimum']} to {schema['maximum']}"
    else:
        text = facts["type"]
    return text + (", or empty" if setting.default is None else "")


def params_table() -> str:
    rows = ["| param | default | allowed | meaning |", "|---|---|---|---|"]
    for setting in dataclasses.fields(PipelineConfig):
        rows.append(
            f"| `{setting.name}` | {_default(setting)} | {_allowed(setting)} | {setting.metadata['description']} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(params_table())
