"""Publish a finished run: copy, then index, then move ``latest``.

The run's model, metrics, pictures, config, history and TensorBoard logs are
copied into ``published/runs/<run_id>/`` through a temporary folder and one
rename; only then is the run's line put in ``published/index.jsonl`` (the
whole index is rewritten under a lock and renamed, so it never holds a
partial or duplicate line) and the ``published/latest`` symlink swapped to it
with one atomic rename. A publish killed at any point leaves ``latest`` on
the previous complete run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from alexnet_tasks.atomic import atomic_directory, atomic_write_bytes, file_lock, remove_stale_temps, temp_sibling
from alexnet_tasks.config import safe_run_id

log = logging.getLogger(__name__)

INDEX = "index.jsonl"
LATEST = "latest"
# What a published run holds; the first two are required.
REQUIRED = ("model.keras", "metrics.json")
OPTIONAL = ("config.json", "history.json", "confusion_matrix.png", "test_samples.png", "tensorboard")


def _copy_run(run_dir: Path, destination: Path) -> None:
    for name in REQUIRED + OPTIONAL:
        source = run_dir / name
        if not source.exists():
            if name in REQUIRED:
                raise FileNotFoundError(f"{source}: missing; train and evaluate must finish first")
            continue
        if source.is_dir():
            shutil.copytree(source, destination / name)
        else:
            shutil.copy2(source, destination / name)


def _index_line(run_id: str, metrics: dict, published_at: str) -> dict:
    return {
        "run_id": run_id,
        "published_at": published_at,
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "path": f"runs/{safe_run_id(run_id)}",
    }


def read_index(published_root: Path) -> list[dict]:
    path = Path(published_root) / INDEX
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _update_index(published_root: Path, entry: dict) -> None:
    """Rewrite the index with ``entry`` replacing any earlier line of the same run."""
    with file_lock(published_root / f".{INDEX}.lock"):
        lines = [line for line in read_index(published_root) if line["run_id"] != entry["run_id"]]
        lines.append(entry)
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
        atomic_write_bytes(published_root / INDEX, text.encode())


def _point_latest(published_root: Path, target: str) -> None:
    link = published_root / LATEST
    tmp = temp_sibling(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(run_dir: Path, run_id: str, published_root: Path) -> dict:
    """Publish ``run_dir`` as ``run_id``; returns the published path and headline metrics."""
    run_dir, published_root = Path(run_dir), Path(published_root)
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else None
    if metrics is None:
        raise FileNotFoundError(f"{run_dir / 'metrics.json'}: missing; evaluate must finish first")
    final = published_root / "runs" / safe_run_id(run_id)
    remove_stale_temps(final)
    if final.is_dir():
        log.info("%s already published; refreshing its index line and latest pointer", final)
    else:
        with atomic_directory(final) as work:
            _copy_run(run_dir, work)
    entry = _index_line(run_id, metrics, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    _update_index(published_root, entry)
    with file_lock(published_root / f".{LATEST}.lock"):
        _point_latest(published_root, f"runs/{final.name}")
    log.info("published %s (test accuracy %.4f); latest -> %s", final, metrics["test_accuracy"], final.name)
    return {
        "published": str(final),
        "latest": str(published_root / LATEST),
        "index": str(published_root / INDEX),
        "test_accuracy": metrics["test_accuracy"],
    }
