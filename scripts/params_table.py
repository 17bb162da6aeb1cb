#!/usr/bin/env python3
"""Print the params tables of docs/params.md from PipelineConfig's fields (their defaults, bounds and descriptions).

One table per section of the DAG's form, in the form's order, each under a
``####`` heading that names the section.

    .venv/bin/python scripts/params_table.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alexnet_tasks.config import SECTIONS, PipelineConfig  # noqa: E402


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
    blocks = []
    for section in SECTIONS:
        rows = [f"#### {section}", "", "| param | default | allowed | meaning |", "|---|---|---|---|"]
        for setting in dataclasses.fields(PipelineConfig):
            if setting.metadata["section"] == section:
                rows.append(f"| `{setting.name}` | {_default(setting)} | {_allowed(setting)} | "
                            f"{setting.metadata['description']} |")
        blocks.append("\n".join(rows) + "\n")
    return "\n".join(blocks)


if __name__ == "__main__":
    sys.stdout.write(params_table())
