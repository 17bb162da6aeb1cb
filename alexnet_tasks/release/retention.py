"""Retention: a finished run keeps its model, not its checkpoints; old unpublished runs go.

* ``drop_checkpoints(run_dir)``: once a run is published its per-epoch
  checkpoints (``checkpoints/``, weights and optimizer state, only needed to
  resume a training) are removed; the model, metrics, history, summaries,
  predictions, pictures, TensorBoard logs and ``state.json`` stay.
* ``prune_runs(published_root, runs_root, keep=)``: the run folders in
  ``runs/`` beyond the newest ``keep`` (``ALEXNET_KEEP_RUNS``, default 10)
  are removed unless they are the champion (``published/latest``) or blessed
  (their line in ``published/index.jsonl`` says ``blessed: true``, or has no
  ``blessed`` at all: published before the gate existed). Never removed
  either: a run whose training lock is held, and a run changed within the
  last ``min_idle_seconds`` (a run still being written or retried).

A folder is removed by renaming it aside (``.<name>.pruned-…``) and then
deleting it, so no reader ever sees half a run; leftovers of a removal that
was killed are deleted by the next one. Nothing here changes ``published/`` (reading
the registry may bring its lookup table up to date).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from alexnet_tasks.atomic import TEMP_MARK, file_lock, remove_stale_temps, temp_sibling
from alexnet_tasks.layout import CHECKPOINTS, MODEL, TRAIN_LOCK
from alexnet_tasks.release.registry import Registry

log = logging.getLogger(__name__)

KEEP_ENV = "ALEXNET_KEEP_RUNS"
DEFAULT_KEEP = 10
DEFAULT_MIN_IDLE_SECONDS = 24 * 3600
PRUNED_MARK = ".pruned-"
LOCK = ".retention.lock"


def keep_runs(value: int | str | None = None) -> int:
    """How many of the newest runs are always kept: ``value``, else ``$ALEXNET_KEEP_RUNS``, else 10."""
    source = "keep"
    if value is None:
        value = os.environ.get(KEEP_ENV, "").strip() or DEFAULT_KEEP
        source = KEEP_ENV
    try:
        keep = int(value)
    except (TypeError, ValueError):
        keep = None
    if keep is None or isinstance(value, float) or keep < 1:
        raise ValueError(f"{source}={value!r}: expected a whole number of runs, at least 1")
    return keep


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            total += stat.st_size
    return total


@contextlib.contextmanager
def _unless_training(run_dir: Path) -> Iterator[bool]:
    """Hold the run's training lock while the block runs; yields False (holding nothing) if a training holds it."""
    path = run_dir / TRAIN_LOCK
    if not path.exists():
        yield True
        return
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove(folder: Path) -> None:
    """Rename ``folder`` aside in one step, then delete it."""
    aside = folder.with_name(f".{folder.name}{PRUNED_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def drop_checkpoints(run_dir: Path) -> int:
    """Remove the per-epoch checkpoints of the finished run ``run_dir``; returns the bytes freed.

    Only a run with its ``model.keras`` is touched, and not while a training
    of it holds its lock (it would resume from them).
    """
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINTS
    remove_stale_temps(folder)  # a drop that was killed midway
    if not folder.is_dir():
        return 0
    if not (run_dir / MODEL).is_file():
        log.warning("%s has no %s: not finished, its checkpoints are kept", run_dir, MODEL)
        return 0
    with _unless_training(run_dir) as free:
        if not free:
            log.warning("%s is being trained (its %s is held): its checkpoints are kept", run_dir, TRAIN_LOCK)
            return 0
        size = folder_bytes(folder)
        aside = temp_sibling(folder)
        os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)
    log.info("dropped the checkpoints of %s (%.1f MB); kept the model, metrics, history and logs "
             "(%.1f MB)", run_dir.name, size / 1e6, folder_bytes(run_dir) / 1e6)
    return size


def _last_change(run_dir: Path) -> float:
    """The newest modification time of the folder and its direct entries."""
    times = [run_dir.lstat().st_mtime]
    with os.scandir(run_dir) as entries:
        for entry in entries:
            try:
                times.append(entry.stat(follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                pass
    return max(times)


def _kept_by_the_index(published_root: Path, registry: Registry | None = None) -> tuple[str | None, set[str], set[str]]:
    """(the champion's folder name, the blessed runs' folder names, every published run's folder name)."""
    registry = registry or Registry(published_root)
    champion = registry.store.champion_path()
    blessed, published = set(), set()
    for entry in registry.entries():
        name = Path(entry["path"]).name
        published.add(name)
        if entry["blessed"] is not False:  # true, or a line from before the gate: it was published
            blessed.add(name)
    return None if champion is None else Path(champion).name, blessed, published


def prune_runs(published_root: Path, runs_root: Path, *, keep: int | None = None,
               protect: Iterable[str] = (), min_idle_seconds: float = DEFAULT_MIN_IDLE_SECONDS,
               now: float | None = None, registry: Registry | None = None) -> list[str]:
    """Remove the run folders of ``runs_root`` beyond the newest ``keep`` that nothing keeps; returns their names.

    Kept whatever their age: the champion, blessed runs, the folders named in
    ``protect``, runs whose training lock is held and runs changed within
    ``min_idle_seconds``. Newest means most recently changed. ``registry``
    reads ``published/`` on another store (default: the folder ``published_root``).
    """
    runs_root, published_root = Path(runs_root), Path(published_root)
    keep = keep_runs(keep)
    if not runs_root.is_dir():
        return []
    now = time.time() if now is None else now
    with file_lock(runs_root / LOCK):
        for leftover in runs_root.glob(f".*{PRUNED_MARK}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        champion, blessed, published = _kept_by_the_index(published_root, registry)
        runs = []
        for entry in runs_root.iterdir():
            if entry.name.startswith(".") or TEMP_MARK in entry.name or entry.is_symlink() or not entry.is_dir():
                continue
            try:
                runs.append((_last_change(entry), entry))
            except FileNotFoundError:
                continue
        runs.sort(key=lambda item: (item[0], item[1].name), reverse=True)
        protected = set(protect)
        pruned = []
        for changed, run_dir in runs[keep:]:
            name = run_dir.name
            if name == champion or name in blessed or name in protected:
                continue
            if now - changed < min_idle_seconds:
                log.info("retention: keeping %s, changed %.0f s ago (it may still be written)", name, now - changed)
                continue
            with _unless_training(run_dir) as free:
                if not free:
                    log.info("retention: keeping %s, its training is running", name)
                    continue
                size = folder_bytes(run_dir)
                try:
                    _remove(run_dir)
                except OSError as error:
                    log.warning("retention: could not remove %s: %s", run_dir, error)
                    continue
            why = "published, not blessed" if name in published else "never published"
            log.info("retention: removed %s (%s, older than the newest %d runs, %.1f MB)", run_dir, why, keep,
                     size / 1e6)
            pruned.append(name)
    return pruned


def retain(published_root: Path, run_dir: Path, *, keep: int | None = None, registry: Registry | None = None) -> dict:
    """After publishing ``run_dir``: drop its checkpoints, then prune ``runs/`` (keeping ``run_dir``).

    ``published_root``'s index says which runs are kept (``prune_runs``).
    """
    run_dir = Path(run_dir)
    freed = drop_checkpoints(run_dir)
    pruned = prune_runs(published_root, run_dir.parent, keep=keep, protect=(run_dir.name,), registry=registry)
    return {"checkpoint_bytes_freed": freed, "pruned_runs": pruned}
