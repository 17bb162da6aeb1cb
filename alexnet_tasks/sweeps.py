"""A sweep's trials: the grid expanded, each trial checked whole, named, and the best one chosen.

A sweep (``dags/alexnet_cifar10_sweep.py``) takes the main DAG's params plus:

* ``trials``: a list of override objects (``[{"learning_rate": 0.02},
  {"recipe_options": {"dropout": 0.5}}]``) or a grid object whose values are
  lists (``{"learning_rate": [0.02, 0.04], "recipe_options.dropout": [0.3,
  0.5]}``), expanded to every combination, the first key varying slowest;
* ``max_trials``: the most trials a sweep may have;
* ``parallel``: the most trials training at once.

A trial is the main params with its overrides (a ``recipe_options``
override merges key by key into the form's), validated whole by
``PipelineConfig.from_dict``: the same schemas as the main DAG's form. Only
the training settings (``TRIAL_PARAMS``) may be overridden; the data steps
run once for every trial.

``trial_slot`` holds one of a sweep's ``parallel`` slots while a trial
trains: lock files on a local root, leases on an object store. Nothing heavy
imported.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from alexnet_tasks.config import TRAINING, PipelineConfig, param_specs
from alexnet_tasks.layout import Layout
from alexnet_tasks.validation import check_value

# The settings a trial may override: those of the form's Training section.
TRIAL_PARAMS = tuple(name for name, spec in param_specs().items() if spec["section"] == TRAINING)
SWEEP = "Sweep"  # the form section of the sweep's own params
GPU_WORKERS_ENV = "ALEXNET_GPU_WORKERS"
MAX_TRIALS = 100  # the highest cap ``max_trials`` accepts
TRIAL_SEPARATOR = "__trial"  # run id of a trial: <sweep run id>__trial<NN>


def gpu_workers() -> int:
    """``$ALEXNET_GPU_WORKERS`` (default 1): how many workers serve the ``gpu`` queue. ValueError if not 1 or more."""
    text = os.environ.get(GPU_WORKERS_ENV, "1").strip() or "1"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{GPU_WORKERS_ENV}={text!r}: expected a whole number, 1 or more")
    return value


def sweep_param_specs(parallel_default: int = 1) -> dict[str, dict[str, Any]]:
    """The sweep's own params as keyword arguments for Airflow's ``Param`` (trials, max_trials, parallel)."""
    return {
        "trials": {
            "default": {"recipe_options.dropout": [0.3, 0.5]},
            "type": ["array", "object"],
            "title": "Trials",
            "section": SWEEP,
            "description": "A list of objects, each overriding training settings ("
            + ", ".join(TRIAL_PARAMS) + "), or a grid object whose values are lists, e.g. "
            '{"learning_rate": [0.02, 0.04], "recipe_options.dropout": [0.3, 0.5]} (4 trials).',
        },
        "max_trials": {
            "default": 16, "type": "integer", "minimum": 1, "maximum": MAX_TRIALS, "title": "Most trials",
            "section": SWEEP, "description": "A sweep with more trials than this is refused before anything runs.",
        },
        "parallel": {
            "default": parallel_default, "type": "integer", "minimum": 1, "maximum": 64,
            "title": "Trials at once", "section": SWEEP,
            "description": f"The most trials training at the same time (default: {GPU_WORKERS_ENV}, "
            "the number of gpu workers).",
        },
    }


SWEEP_PARAMS = tuple(sweep_param_specs())


def expand_grid(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a grid's values, as override objects; the first key varies slowest.

    ``{"learning_rate": [0.02, 0.04], "recipe_options.dropout": [0.3, 0.5]}``
    gives four trials; a dotted key sets one key of an object setting
    (``{"recipe_options": {"dropout": 0.3}}``). Raises ValueError for an
    empty grid or a value that is not a non-empty list, naming the key.
    """
    if not grid:
        raise ValueError("trials: an empty grid; expected keys with lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"trials.{key}: a grid's values must be a non-empty list, got {json.dumps(values)}")
        head = key.partition(".")[0]
        if head != key and head in grid:
            raise ValueError(f"trials: {key!r} and {head!r} both set {head}; give one of them")
    trials = []
    for combination in itertools.product(*grid.values()):
        overrides: dict[str, Any] = {}
        for key, value in zip(grid, combination):
            _set(overrides, key, value)
        trials.append(overrides)
    return trials


def _set(overrides: dict, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if not rest:
        overrides[head] = value
        return
    _set(overrides.setdefault(head, {}), rest, value)


def _flat(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def trial_label(overrides: Mapping[str, Any]) -> str:
    """What a trial changes, in one line: ``learning_rate=0.02, recipe_options.dropout=0.5`` (``base`` for none)."""
    flat = _flat(overrides)
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in flat.items()) or "base"


def trial_run_id(sweep_run_id: str, index: int) -> str:
    """The run id of trial ``index`` (from 0) of a sweep: ``<sweep run id>__trial00``; it names its run folder."""
    return f"{sweep_run_id}{TRIAL_SEPARATOR}{index:02d}"


def trial_slot(layout: Layout, sweep_run_id: str, slots: int):
    """A context manager holding one of the ``slots`` of the sweep run ``sweep_run_id`` while a trial trains.

    ``sweeps/<run>/slots/`` under the layout's root: lock files
    (``atomic.slot_lock``) on a local root, leases ``<n>.json`` on the
    layout's object store (``store.lease_slot``); a trial waits for a free one.
    """
    from alexnet_tasks.atomic import slot_lock
    from alexnet_tasks.store import lease_slot

    folder = layout.sweep_slots(sweep_run_id)
    if layout.store is None:
        return slot_lock(folder, slots)
    return lease_slot(layout.store, folder.relative_to(layout.root).as_posix(), slots,
                      f"a trial of the sweep {sweep_run_id}")


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the pipeline's params, the sweep's own params) of a sweep run's params."""
    pipeline = {key: value for key, value in params.items() if key not in SWEEP_PARAMS}
    sweep = {key: value for key, value in params.items() if key in SWEEP_PARAMS}
    return pipeline, sweep


def plan_trials(params: Mapping[str, Any], parallel_default: int = 1) -> list[dict[str, Any]]:
    """A sweep run's trials, each checked whole: ``[{"index", "label", "overrides", "params"}, ...]``.

    ``params`` are the sweep run's params (the pipeline's plus ``trials``,
    ``max_trials``, ``parallel``); a trial's ``params`` are the pipeline's
    with its overrides, accepted by ``PipelineConfig.from_dict``. Raises
    ValueError, before anything runs, for bad sweep params, a grid that does
    not expand, more trials than ``max_trials``, two trials with the same
    settings, or a trial whose key is not a training setting or whose value
    its schema refuses; the message names the trial (number from 1 and what
    it changes) and the key.
    """
    pipeline, sweep = split_params(params)
    specs = sweep_param_specs(parallel_default)
    sweep = {name: check_value(name, sweep.get(name, spec["default"]), _schema(spec)) for name, spec in specs.items()}
    base = PipelineConfig.from_dict(pipeline).to_dict()
    trials = sweep["trials"]
    overrides_list = expand_grid(trials) if isinstance(trials, Mapping) else list(trials)
    if not overrides_list:
        raise ValueError("trials: an empty list; expected at least one trial")
    if len(overrides_list) > sweep["max_trials"]:
        raise ValueError(f"trials: {len(overrides_list)} trials exceed max_trials={sweep['max_trials']}")
    planned, seen = [], {}
    for index, overrides in enumerate(overrides_list):
        where = f"trial {index + 1}"
        if not isinstance(overrides, Mapping):
            raise ValueError(f"{where}: expected an object of settings, got {json.dumps(overrides)}")
        label = trial_label(overrides)
        where = f"trial {index + 1} ({label})"
        for key in overrides:
            if key not in TRIAL_PARAMS:
                raise ValueError(f"{where}: {key!r} is not a training setting a trial may change; "
                                 f"expected some of: {', '.join(TRIAL_PARAMS)}")
        merged = {**base, **overrides}
        if isinstance(overrides.get("recipe_options"), Mapping) and isinstance(base.get("recipe_options"), Mapping):
            merged["recipe_options"] = {**base["recipe_options"], **overrides["recipe_options"]}
        try:
            config = PipelineConfig.from_dict(merged)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        digest = config.config_digest()
        if digest in seen:
            raise ValueError(f"{where}: the same settings as trial {seen[digest] + 1}")
        seen[digest] = index
        planned.append({"index": index, "label": label, "overrides": dict(overrides), "params": config.to_dict()})
    return planned


def _schema(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in spec.items() if key not in ("default", "description", "title", "section")}


def swept_params(trials: Sequence[Mapping[str, Any]]) -> list[str]:
    """The dotted names of the settings the trials change, in the order they first appear."""
    names: list[str] = []
    for trial in trials:
        for name in _flat(trial.get("overrides") or {}):
            if name not in names:
                names.append(name)
    return names


def setting_value(trial: Mapping[str, Any], name: str) -> Any:
    """A trial's value of the dotted setting ``name``, from its full params (``recipe_options.dropout``)."""
    value: Any = trial.get("params") or {}
    for part in name.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:  # the recipe's value: only the override says what it was
        value = _flat(trial.get("overrides") or {}).get(name)
    return value


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best_trial(results: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The trial to test: the highest ``validation_accuracy``, ties by the lower ``validation_loss``, then ``index``.

    ``results`` are finished trials (``index``, ``validation_accuracy``,
    ``validation_loss``: the last epoch's); a trial whose validation accuracy
    is missing or not finite is never chosen. None when no trial can be.
    """
    candidates = [result for result in results if _finite(result.get("validation_accuracy")) is not None]
    if not candidates:
        return None

    def key(result):
        loss = _finite(result.get("validation_loss"))
        return (-result["validation_accuracy"], math.inf if loss is None else loss, result["index"])

    return min(candidates, key=key)
