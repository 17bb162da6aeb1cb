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

On an object-store artifacts root (``s3://bucket/prefix``) there is no
rename and no lock; ``drop_stored_checkpoints`` and ``prune_stored_runs``
apply the same policy to the store's ``runs/``. A run's last change is the
newest ``LastModified`` of its objects, compared with the store's own clock
(the ``Date`` of its answer), so the hosts' clocks never matter. The run's
training lease (``runs/<run>/lease.json``, ``store.Lease``) stands for the
training lock: a run whose lease is held and unexpired is kept, and retention
holds the lease itself while it removes objects, so no training starts on a
run being removed. A run's objects go ``state.json`` and
``train_summary.json`` first: a run removed halfway can never be resumed or
taken for a finished training, and the next prune removes the rest.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from alexnet_tasks.atomic import TEMP_MARK, file_lock, remove_stale_temps, temp_sibling
from alexnet_tasks.layout import CHECKPOINTS, LEASE, MODEL, RUNS, STATE, TRAIN_LOCK, TRAIN_SUMMARY
from alexnet_tasks.release.registry import Registry
from alexnet_tasks.store import Lease, LeaseHeldError, ObjectStore

log = logging.getLogger(__name__)

KEEP_ENV = "ALEXNET_KEEP_RUNS"
DEFAULT_KEEP = 10
DEFAULT_MIN_IDLE_SECONDS = 24 * 3600
PRUNED_MARK = ".pruned-"
LOCK = ".retention.lock"
# On a store, removed before a run's other objects: without them a run is neither resumed nor trusted.
REMOVED_FIRST = (STATE, TRAIN_SUMMARY)


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


def _kept_by_the_index(published_root: Path | None, registry: Registry | None = None) -> tuple[str | None, set[str], set[str]]:
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


# --------------------------------------------------------------------------- on an object store
@dataclass(frozen=True)
class StoredRun:
    """A run folder of a store's ``runs/``: its objects (relative names, with sizes) and its last change."""

    name: str
    objects: dict[str, int]  # name relative to runs/<run>/ -> size in bytes
    last_change: datetime  # the newest LastModified of its objects, on the store's clock

    @property
    def size(self) -> int:
        return sum(self.objects.values())


def stored_runs(store: ObjectStore, only: str | None = None) -> tuple[list[StoredRun], datetime | None]:
    """The run folders of the store's ``runs/`` (``only``: just ``runs/<only>/``) and the store's clock.

    One listing of the objects (paginated); an object directly under
    ``runs/`` is no run. The clock is the ``Date`` of the store's first
    answer (None when the store sends none).
    """
    from email.utils import parsedate_to_datetime

    root = store.object_key(RUNS) + "/"
    listed = root if only is None else f"{root}{only}/"
    objects: dict[str, dict[str, int]] = {}
    changed: dict[str, datetime] = {}
    server_now = None
    for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=listed):
        date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if server_now is None and date:
            server_now = parsedate_to_datetime(date)
        for item in page.get("Contents", []):
            name, slash, rest = item["Key"][len(root):].partition("/")
            if not slash or not rest:
                continue
            objects.setdefault(name, {})[rest] = item["Size"]
            changed[name] = max(changed.get(name, item["LastModified"]), item["LastModified"])
    return [StoredRun(name, objects[name], changed[name]) for name in objects], server_now


def _stored_run(store: ObjectStore, name: str) -> StoredRun | None:
    """The run folder ``runs/<name>/`` of the store as it is now; None when it holds no object."""
    runs, _ = stored_runs(store, name)
    return runs[0] if runs else None


@contextlib.contextmanager
def _unless_training_on(store: ObjectStore, name: str, purpose: str) -> Iterator[bool]:
    """Hold the run's training lease while the block runs; yields False (holding nothing) if a live owner holds it.

    An expired lease (its owner stopped renewing it) is taken over, as the
    run's next training would take it over. A lease that cannot be released
    (the store went away) expires by itself.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    lease = Lease(store, f"{RUNS}/{name}/{LEASE}", f"{purpose} of {name}")
    try:
        lease.acquire()
    except LeaseHeldError as error:
        log.info("retention: %s", error)
        yield False
        return
    try:
        yield True
    finally:
        try:
            lease.release()
        except (BotoCoreError, ClientError, OSError) as error:
            log.warning("retention: could not release %s (%s); it expires in %.0f s", store.url(lease.key), error,
                        lease.seconds)


def _remove_stored(store: ObjectStore, name: str, objects: Iterable[str]) -> None:
    """Delete objects of ``runs/<name>/`` (relative names): ``state.json`` and ``train_summary.json`` first.

    Never the lease: its holder releases it.
    """
    objects = [relative for relative in objects if relative != LEASE]
    first = [relative for relative in REMOVED_FIRST if relative in objects]
    for relative in first + sorted(set(objects) - set(first)):
        store.delete_object(f"{RUNS}/{name}/{relative}")
    store.filesystem.invalidate_cache()  # fsspec's cached listings of the store no longer hold


def drop_stored_checkpoints(store: ObjectStore, name: str) -> int:
    """Remove the per-epoch checkpoints of the finished run ``runs/<name>/`` on ``store``; returns the bytes freed.

    As ``drop_checkpoints`` on a folder: only a run whose ``model.keras`` is
    on the store is touched, and not while a training holds its lease.
    """
    run = _stored_run(store, name)
    where = store.url(f"{RUNS}/{name}")
    if run is None or not any(relative.startswith(f"{CHECKPOINTS}/") for relative in run.objects):
        return 0
    if MODEL not in run.objects:
        log.warning("%s has no %s: not finished, its checkpoints are kept", where, MODEL)
        return 0
    with _unless_training_on(store, name, "dropping the checkpoints") as free:
        if not free:
            log.warning("%s is being trained (its %s is held): its checkpoints are kept", where, LEASE)
            return 0
        run = _stored_run(store, name)  # as it is now, under the lease
        dropped = {relative: size for relative, size in run.objects.items() if relative.startswith(f"{CHECKPOINTS}/")}
        _remove_stored(store, name, dropped)
    size = sum(dropped.values())
    log.info("dropped the checkpoints of %s (%.1f MB); kept the model, metrics, history and logs (%.1f MB)",
             where, size / 1e6, (run.size - size) / 1e6)
    return size


def prune_stored_runs(store: ObjectStore, registry: Registry, *, keep: int | None = None,
                      protect: Iterable[str] = (), min_idle_seconds: float = DEFAULT_MIN_IDLE_SECONDS,
                      cached_runs: Path | None = None) -> list[str]:
    """Remove the run folders of the store's ``runs/`` beyond the newest ``keep`` that nothing keeps; their names.

    ``prune_runs``'s policy on an object store: kept whatever their age are
    the champion and the blessed runs (``registry``: the store's
    ``published/``), the folders named in ``protect``, runs whose training
    lease is held and unexpired, and runs changed within
    ``min_idle_seconds`` by the store's clock. Newest means most recently
    changed (a run's newest ``LastModified``). ``cached_runs``: this host's
    copy of ``runs/`` (in ``store.store_cache``), where the copy of a pruned
    run is removed too.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    keep = keep_runs(keep)
    runs, server_now = stored_runs(store)
    if len(runs) <= keep:
        return []
    now = server_now or datetime.now(timezone.utc)
    champion, blessed, published = _kept_by_the_index(None, registry)
    runs.sort(key=lambda run: (run.last_change, run.name), reverse=True)
    protected = set(protect)
    pruned = []
    for run in runs[keep:]:
        name, where = run.name, store.url(f"{RUNS}/{run.name}")
        if name == champion or name in blessed or name in protected:
            continue
        idle = (now - run.last_change).total_seconds()
        if idle < min_idle_seconds:
            log.info("retention: keeping %s, changed %.0f s ago (it may still be written)", where, idle)
            continue
        with _unless_training_on(store, name, "retention") as free:
            if not free:
                log.info("retention: keeping %s, its training is running", where)
                continue
            current = _stored_run(store, name)  # under the lease: no training adds to it any more
            try:
                _remove_stored(store, name, current.objects if current else ())
            except (BotoCoreError, ClientError, OSError) as error:  # the next prune removes the rest
                log.warning("retention: could not remove %s: %s", where, error)
                continue
            if cached_runs is not None and (Path(cached_runs) / name).is_dir():
                with file_lock(Path(cached_runs) / LOCK):
                    try:
                        _remove(Path(cached_runs) / name)
                    except OSError as error:  # a cache: whatever is left there is never read as the store's
                        log.warning("retention: could not remove this host's copy %s: %s", Path(cached_runs) / name,
                                    error)
        why = "published, not blessed" if name in published else "never published"
        log.info("retention: removed %s (%s, older than the newest %d runs, %.1f MB)", where, why, keep,
                 run.size / 1e6)
        pruned.append(name)
    return pruned
