"""Make a published run the champion by hand (a rollback, or a run the gate or a person refused).

``promote_run`` is the step of the ``alexnet_cifar10_promote`` DAG: it finds
the run in the registry, checks that its published copy has its model, runs
the gate's sanity checks that do not depend on a training budget (finite test
loss and accuracy, the champion's class names, the champion's test images),
then points ``published/latest`` at it and appends the change to the
promotion history with the user who asked and why. ``published/`` is a local
folder or, through a given registry, on an object store. Imports nothing heavy.
"""

from __future__ import annotations

import math
from pathlib import Path

from alexnet_tasks.errors import PermanentError
from alexnet_tasks.layout import METRICS, MODEL
from alexnet_tasks.progress import report
from alexnet_tasks.release.registry import Registry


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def promote_run(published_root: Path, *, run_id: str, comment: str, user: str, dag_id: str | None = None,
                dag_run_id: str | None = None, registry: Registry | None = None) -> dict:
    """Make the published run ``run_id`` the champion; returns what the publish task's asset event carries.

    ``comment`` (non-empty: why, in the user's words; the promote DAG's
    ``reason`` param) is recorded in the promotion history with ``user``
    (who asked), the promotion reason ``by_hand`` and the Airflow run
    (``dag_id``, ``dag_run_id``). Returns ``run_id``, ``published`` (the
    folder), ``test_accuracy``, ``fingerprint``, ``previous_run_id`` and
    ``changed`` (False when it already was the champion).

    Raises ``PermanentError`` (the same on every try) naming the run when it
    is not in ``published/index.jsonl``, when its published copy has no
    ``model.keras`` (recorded without it: not blessed), when its
    ``metrics.json`` is unreadable, its test loss or accuracy is not finite,
    or its class names or test images differ from the champion's; ValueError
    for an empty ``run_id``, ``comment`` or ``user``.

    ``registry``: ``published/`` on an object store
    (``Registry(store=S3Store(...))``; default: the folder ``published_root``).
    The published copy is then checked on the store and its files other than
    the model fetched into ``published_root`` (this host's cache); the
    champion moves by compare-and-swap there.
    """
    for name, value in (("run_id", run_id), ("comment", comment), ("user", user)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"promote: {name} must be a non-empty string, got {value!r}")
    registry = registry or Registry(published_root)
    entry = registry.find(run_id)
    if entry is None:
        raise PermanentError(f"run {run_id!r} is not in {registry.store.index_name()}: only a published run "
                             "can become the champion")
    folder = registry.store.folder(entry["path"])
    if not registry.store.has_file(entry["path"], MODEL):
        raise PermanentError(f"run {run_id!r} has no model in {folder} (it was recorded without it: "
                             f"{'; '.join(entry['reasons'] or ['not blessed'])}); publish it with "
                             "publish_mode=always to copy its model first")
    metrics = registry.store.read_json(entry["path"], METRICS)
    if metrics is None:
        raise PermanentError(f"run {run_id!r}: {folder / METRICS} is missing or not a JSON object")
    problems = [f"test {name} {metrics.get(key)!r} is not a finite number"
                for name, key in (("loss", "test_loss"), ("accuracy", "test_accuracy")) if not _finite(metrics.get(key))]
    champion = registry.champion()
    champion_metrics = champion["metrics"] if champion is not None else None
    if champion_metrics is not None and champion["path"] != entry["path"]:
        names, theirs = metrics.get("class_names"), champion_metrics.get("class_names")
        if theirs is not None and list(names or []) != list(theirs):
            problems.append(f"class names {names} differ from the champion {champion['run_id']}'s {theirs}")
        ours, theirs = metrics.get("test_images_sha256"), champion_metrics.get("test_images_sha256")
        if ours is not None and theirs is not None and ours != theirs:
            problems.append(f"scored on other test images (sha256 {ours[:12]}) than the champion "
                            f"{champion['run_id']} ({theirs[:12]})")
    if problems:
        raise PermanentError(f"run {run_id!r} cannot become the champion: {'; '.join(problems)}")
    line = registry.promote(entry["path"], "by_hand", user=user, comment=comment.strip(), dag_id=dag_id,
                            dag_run_id=dag_run_id)
    previous = None if champion is None else champion["run_id"]
    report("promote: %s is the champion (test accuracy %.4f)%s; by %s: %s", run_id, metrics["test_accuracy"],
           "" if line is None else f", was {previous or 'none'}", user, comment.strip())
    return {
        "run_id": run_id,
        "published": str(folder),
        "test_accuracy": metrics["test_accuracy"],
        "fingerprint": metrics.get("fingerprint"),
        "previous_run_id": previous,
        "changed": line is not None,
    }
