"""A sweep's results: each trial's validation figures read from its run folder, the best chosen, the record kept.

Every trial of a sweep run trains in its own run folder
(``runs/<sweep run id>__trial<NN>``). ``select_trial`` reads what each one
left (``train_summary.json`` is written only when a training completes, so a
trial without one did not finish), chooses the best on the validation split
alone (``alexnet_tasks.sweeps.best_trial``) and writes the sweep's record,
``published/sweeps/<run>.json``: every trial with its settings and validation
figures (no test figures: only the chosen trial is evaluated on the test
split, then gated and published like a run of the main DAG, its index line
naming the sweep and the trial). The record is written and read through the
registry's storage: the folder ``published/``, or an object store
(``Registry(store=S3Store(...))``). Imports nothing heavy.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alexnet_tasks.errors import PermanentError
from alexnet_tasks.jsonio import json_bytes
from alexnet_tasks.layout import HISTORY, Layout, run_folder_name, sweep_record_name
from alexnet_tasks.progress import report
from alexnet_tasks.release.registry import Registry
from alexnet_tasks.sweeps import best_trial, swept_params, trial_run_id
from alexnet_tasks.training.run_summary import read_train_summary


class NoTrialFinishedError(PermanentError):
    """Every trial of a sweep failed: there is nothing to choose."""


def _history(run_dir: Path) -> list:
    try:
        history = json.loads((run_dir / HISTORY).read_text())
    except (OSError, ValueError):
        return []
    return history if isinstance(history, list) else []


def trial_result(layout: Layout, sweep_run_id: str, trial: dict) -> dict[str, Any]:
    """One trial as the record keeps it: its plan (index, label, overrides, params) and what its training left.

    Adds ``run_id``, ``folder`` (``runs/<run>``), ``finished`` (its
    training completed), and, when finished, ``validation_accuracy`` and
    ``validation_loss`` of its last epoch, ``epochs_run``, ``seconds``
    (training time of every attempt), ``truncated`` and ``fingerprint``.
    """
    run_id = trial_run_id(sweep_run_id, trial["index"])
    run_dir = layout.run(run_id)
    try:
        summary = read_train_summary(run_dir)
    except ValueError:
        summary = None
    history = _history(run_dir) if summary is not None else []
    last = history[-1] if history and isinstance(history[-1], dict) else {}
    return {
        **{key: trial[key] for key in ("index", "label", "overrides", "params")},
        "run_id": run_id,
        "folder": f"runs/{run_folder_name(run_id)}",
        "finished": summary is not None,
        "validation_accuracy": last.get("val_accuracy"),
        "validation_loss": last.get("val_loss"),
        "epochs_run": None if summary is None else summary.get("epochs_run"),
        "seconds": None if summary is None else summary.get("seconds"),
        "truncated": None if summary is None else summary.get("truncated"),
        "fingerprint": None if summary is None else summary.get("fingerprint"),
    }


def select_trial(trials: list[dict], layout: Layout, *, sweep_run_id: str, dag_id: str | None = None,
                 registry: Registry | None = None) -> dict:
    """Choose the best finished trial on validation, record the sweep, return the chosen trial's result.

    Reads each trial's ``train_summary.json`` and ``history.json`` in
    ``layout``'s run folders. Writes ``published/sweeps/<run>.json``
    (``read_sweep``) with every trial, finished or not, through
    ``registry``'s storage (default: the folder ``layout.published``).
    Raises ``NoTrialFinishedError`` (permanent), after recording the sweep,
    when no trial finished with a finite validation accuracy.
    """
    results = [trial_result(layout, sweep_run_id, trial) for trial in trials]
    chosen = best_trial([result for result in results if result["finished"]])
    record = {
        "sweep": sweep_run_id,
        "dag_id": dag_id,
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "swept": swept_params(results),
        "chosen": None if chosen is None else chosen["index"],
        "chosen_run_id": None if chosen is None else chosen["run_id"],
        "trials": results,
    }
    store = (registry or Registry(layout.published)).store
    name = sweep_record_name(sweep_run_id)
    store.write_bytes(name, json_bytes(record))
    path = store.name_of(name)
    finished = sum(result["finished"] for result in results)
    if chosen is None:
        raise NoTrialFinishedError(
            f"sweep {sweep_run_id}: none of its {len(results)} trials finished with a validation accuracy "
            f"({finished} finished); recorded in {path}")
    report("select: trial %d of %d (%s) is the best of %d finished: validation accuracy %.4f",
           chosen["index"] + 1, len(results), chosen["label"], finished, chosen["validation_accuracy"])
    return chosen


def read_sweep(published_root: Path | None, sweep_run_id: str, registry: Registry | None = None) -> dict | None:
    """The record of a sweep run (``select_trial``'s), or None when it has none or it is unreadable.

    ``registry`` reads ``published/`` on another store (``published_root`` is then not used; default: the
    folder ``published_root``).
    """
    try:
        data = (registry or Registry(published_root)).store.read_bytes(sweep_record_name(sweep_run_id))
        record = None if data is None else json.loads(data)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("trials"), list) else None
