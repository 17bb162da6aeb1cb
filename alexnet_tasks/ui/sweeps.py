"""What the sweep page shows: a sweep's trials from its record, best first, and one chart per swept setting.

A sweep's record (``published/sweeps/<run>.json``, written by
``alexnet_tasks.release.sweeps.select_trial``) holds every trial with its
settings and validation figures; the chosen trial is also a published run
(its index line names the sweep). The record is read through the registry,
from a local ``published/`` or an object store's. Imports nothing heavy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from markupsafe import Markup

from alexnet_tasks.layout import SWEEPS, run_folder_name
from alexnet_tasks.release.registry import Registry
from alexnet_tasks.sweeps import setting_value
from alexnet_tasks.ui.charts import setting_chart
from alexnet_tasks.ui.runs import duration


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class TrialView:
    """One trial of a sweep as the page shows it."""

    number: int  # from 1, in the order the sweep lists its trials
    label: str  # what it changes
    params: dict  # each swept param's value
    run_id: str
    finished: bool
    chosen: bool
    validation_accuracy: float | None
    validation_loss: float | None
    epochs: int | None
    training_time: str | None

    @property
    def quoted(self) -> str:
        return quote(self.run_id, safe="")


@dataclass
class SweepView:
    """A sweep: its trials best first (highest validation accuracy; unfinished last), the swept settings, charts."""

    sweep_id: str
    recorded_at: str | None
    swept: list[str]  # the settings the trials change, dotted (recipe_options.dropout)
    trials: list[TrialView]
    charts: list[Markup]

    @property
    def chosen(self) -> TrialView | None:
        return next((trial for trial in self.trials if trial.chosen), None)

    @property
    def finished(self) -> int:
        return sum(trial.finished for trial in self.trials)


def read_record(registry: Registry, sweep_id: str) -> dict | None:
    """The record of the sweep run ``sweep_id`` (``published/sweeps/<run>.json``); None when missing or unreadable.

    Read as ``release.sweeps.read_sweep`` reads a local one: a JSON object with a list of ``trials``.
    """
    try:
        data = registry.store.read_bytes(f"{SWEEPS}/{run_folder_name(sweep_id)}.json")
        record = None if data is None else json.loads(data)
    except (OSError, ValueError):  # a local file that is unreadable, or not JSON
        return None
    return record if isinstance(record, dict) and isinstance(record.get("trials"), list) else None


def load_sweep(published: Registry | Path, sweep_id: str) -> SweepView | None:
    """The sweep run ``sweep_id`` as the page shows it; None when it has no (readable) record.

    ``published``: the registry of ``published/``, or a local ``published/`` folder.
    """
    record = read_record(published if isinstance(published, Registry) else Registry(published), sweep_id)
    if record is None:
        return None
    swept = [name for name in record.get("swept") or [] if isinstance(name, str)]
    chosen = record.get("chosen")
    trials = []
    for position, trial in enumerate(record["trials"]):
        if not isinstance(trial, dict):
            continue
        index = trial.get("index") if isinstance(trial.get("index"), int) else position
        trials.append(TrialView(
            number=index + 1, label=str(trial.get("label") or "base"),
            params={name: setting_value(trial, name) for name in swept},
            run_id=str(trial.get("run_id") or ""), finished=bool(trial.get("finished")),
            chosen=chosen is not None and index == chosen,
            validation_accuracy=_number(trial.get("validation_accuracy")),
            validation_loss=_number(trial.get("validation_loss")),
            epochs=trial.get("epochs_run") if isinstance(trial.get("epochs_run"), int) else None,
            training_time=duration(_number(trial.get("seconds"))),
        ))
    in_order = sorted(trials, key=lambda trial: trial.number)
    charts = []
    for name in swept:
        points = [(trial.params[name], trial.validation_accuracy) for trial in in_order
                  if trial.params[name] is not None]
        chosen_at = next((position for position, trial in enumerate(
            [trial for trial in in_order if trial.params[name] is not None]) if trial.chosen), None)
        charts.append(setting_chart(name, points, chosen_at))
    best_first = sorted(trials, key=lambda trial: (
        trial.validation_accuracy is None, -(trial.validation_accuracy or 0),
        math.inf if trial.validation_loss is None else trial.validation_loss, trial.number))
    return SweepView(sweep_id, record.get("recorded_at"), swept, best_first, charts)
