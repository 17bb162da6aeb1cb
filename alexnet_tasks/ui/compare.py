"""Two published runs side by side: what differs, by how much, and image by image.

``compare_runs(registry, first, second)`` builds the ``Comparison`` the compare
page shows: the settings that differ, the headline figures and the per-class
test accuracies of both with their deltas (first minus second), and the
paired table of the gate (both right, only the first, only the second, both
wrong, and the McNemar p-value) from the runs' per-image predictions and the
test shard's labels.

The paired table compares accuracies of the same kind, as the gate does: the
headline predictions when both runs used the same test-time augmentation,
otherwise the plain ones. It needs both runs scored on the same test images
(``test_images_sha256``) and the test shard the runs name
(``$ALEXNET_ARTIFACTS/data/<data_key>/test.h5``); without them the page says
why there is no table. On an object store the runs' published folders (but
their models and logs) and the test shard are fetched into this host's cache
of the store, each file checked as the pipeline's steps check it, the shard
once per data key (with the Airflow connection of the store, as the plugin
reads it). NumPy and h5py are imported only when a comparison is made (the
gate's ``paired_counts``), never when the plugin loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alexnet_tasks.layout import DATA, shard_name
from alexnet_tasks.release.gate import _read_predictions, _test_labels, augmentation_kind, figures_of_kind, paired_counts
from alexnet_tasks.release.registry import Registry
from alexnet_tasks.ui.runs import RunView, _inside, _number, find_run, is_local, load_details

log = logging.getLogger(__name__)

# The headline figures: (label, how to read it from a RunView, "percent", "number" or "count").
HEADLINE = (
    ("test accuracy", lambda run: run.test_accuracy, "percent"),
    ("plain test accuracy", lambda run: run.test_accuracy_plain, "percent"),
    ("test loss", lambda run: run.test_loss, "number"),
    ("validation accuracy", lambda run: run.validation_accuracy, "percent"),
    ("epochs run", lambda run: _number(run.entry["epochs_run"]), "count"),
    ("training seconds", lambda run: _number(run.entry["seconds"]), "count"),
)


@dataclass
class Row:
    """One figure of both runs and its delta (first minus second; None where either is unknown)."""

    name: str
    first: Any
    second: Any
    kind: str = "percent"  # how the page formats the values: percent, number or count

    @property
    def delta(self) -> float | None:
        first, second = _number(self.first), _number(self.second)
        return None if first is None or second is None else first - second


@dataclass
class Comparison:
    """What the compare page shows of two runs (``first`` is A, ``second`` is B)."""

    first: RunView
    second: RunView
    params: list[tuple[str, Any, Any]] = field(default_factory=list)  # (param, A's value, B's value), differing only
    headline: list[Row] = field(default_factory=list)
    per_class: list[Row] = field(default_factory=list)
    compared_as: str = "none"  # the predictions the paired table compares: a test-time augmentation or none (plain)
    paired: dict | None = None  # paired_counts() of A against B: only_challenger_right is "only A"
    paired_missing: str | None = None  # why there is no paired table


def _params(run: RunView) -> dict:
    return {name: value for name, value, _ in run.resolved_config}


def differing_params(first: RunView, second: RunView) -> list[tuple[str, Any, Any]]:
    """``(param, first's value, second's value)`` for every param that differs, in the run page's order."""
    ours, theirs = _params(first), _params(second)
    names = list(ours) + [name for name in theirs if name not in ours]
    return [(name, ours.get(name), theirs.get(name)) for name in names if ours.get(name) != theirs.get(name)]


def per_class_rows(first: RunView, second: RunView) -> list[Row]:
    """Per-class test accuracy of both runs, in the first run's class order (``class_names``)."""
    ours, theirs = (run.metrics.get("per_class_accuracy") for run in (first, second))
    ours, theirs = (value if isinstance(value, dict) else {} for value in (ours, theirs))
    ordered = [name for run in (first, second) for name in (run.metrics.get("class_names") or [])
               if isinstance(name, str)]
    names = list(dict.fromkeys(ordered + list(ours) + list(theirs)))
    names = [name for name in names if name in ours or name in theirs]
    return [Row(name, _number(ours.get(name)), _number(theirs.get(name))) for name in names]


class NoShardError(ValueError):
    """The test shard a run names cannot be read here; the message says why."""


def shards_of(registry: Registry, run: RunView) -> Path:
    """The shard folder a run was trained and scored on, with its test shard on this host.

    On a local root, the folder under the artifacts' ``data/``; on a store,
    the test shard fetched into this host's cache of the store. Raises
    ``NoShardError`` naming where it looked.
    """
    key = run.entry.get("data_key")
    if not isinstance(key, str) or not key or Path(key).is_absolute() or ".." in Path(key).parts:
        raise NoShardError(f"the run names no data folder of its test shard (data_key {key!r})")
    if is_local(registry):
        data = (registry.store.root.parent / DATA).resolve()
        folder = _inside(data, data / key)
        if folder is None or not folder.is_dir():
            raise NoShardError(f"the test shard of data {key!r} is not under {registry.store.root.parent / DATA}")
        return folder
    from alexnet_tasks.errors import MissingInputError
    from alexnet_tasks.store import StoreContentError, open_store

    store = open_store(registry.store.location, airflow=True)
    try:
        return store.fetch_folder(f"{DATA}/{key}", registry.store.cache, only=(shard_name("test"),))
    except MissingInputError:
        raise NoShardError(f"the test shard of data {key!r} is not on the store ({store.url(f'{DATA}/{key}')})") from None
    except StoreContentError as error:
        raise NoShardError(str(error)) from None


def local_folder(registry: Registry, run: RunView) -> Path | None:
    """The run's published folder on this host: itself on a local root, else fetched (but its model and logs)."""
    if run.folder is None:
        return None
    return Path(run.folder) if is_local(registry) else registry.store.folder(str(run.folder))


def _paired(registry: Registry, comparison: Comparison) -> None:
    """Fill in the paired table, or the reason there is none."""
    first, second = comparison.first, comparison.second
    kind = augmentation_kind(first.metrics)
    comparison.compared_as = kind if augmentation_kind(second.metrics) == kind else "none"
    ours, theirs = (run.metrics.get("test_images_sha256") for run in (first, second))
    if ours is None or theirs is None or ours != theirs:
        comparison.paired_missing = ("the runs were scored on other test images" if ours and theirs else
                                     "a run does not record which test images it was scored on")
        return
    if first.folder is None or second.folder is None:
        comparison.paired_missing = "a run's published folder is missing"
        return
    paths = [figures_of_kind(run.metrics, local_folder(registry, run), comparison.compared_as)[1]
             for run in (first, second)]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        comparison.paired_missing = f"a run has no per-image predictions ({', '.join(missing)})"
        return
    try:
        labels = _test_labels(shards_of(registry, first), ours)
        comparison.paired = paired_counts(*(_read_predictions(path) for path in paths), labels)
    except NoShardError as error:
        comparison.paired_missing = str(error)
    except (OSError, ValueError) as error:  # ShardError is a ValueError
        log.warning("comparing %s with %s: %s", first.run_id, second.run_id, error)
        comparison.paired_missing = str(error)


def compare_runs(registry: Registry, first_id: str, second_id: str) -> Comparison | None:
    """The comparison of two published runs (A = ``first_id``, B = ``second_id``); None when either is unknown.

    ``registry`` is ``published/``'s. Never raises for what the runs' files
    hold: a missing or unreadable file leaves its part empty and, for the
    paired table, sets ``paired_missing``.
    """
    first, second = find_run(registry, first_id), find_run(registry, second_id)
    if first is None or second is None:
        return None
    for run in (first, second):
        load_details(registry, run)
    comparison = Comparison(
        first=first,
        second=second,
        params=differing_params(first, second),
        headline=[Row(name, read(first), read(second), kind) for name, read, kind in HEADLINE],
        per_class=per_class_rows(first, second),
    )
    _paired(registry, comparison)
    return comparison
