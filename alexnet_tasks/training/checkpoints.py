"""Commit and restore training progress: one checkpoint per completed epoch, then ``state.json``.

A checkpoint (weights and optimizer state) is written under a temporary
name and renamed; ``state.json`` is replaced atomically after it, so the
state always names a complete checkpoint. A run resumes only from a state
whose run fingerprint equals its own; restoring loads into a model already
built and compiled under the run's distribution strategy, so the resumed
run keeps its devices.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from alexnet_tasks.layout import CHECKPOINTS, STATE

log = logging.getLogger(__name__)



def save_model(model, path: Path) -> Path:
    """``model.save`` under a temporary name, then rename (the name must end in .keras)."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def commit_epoch(run_dir: Path, model, epochs_done: int, record: dict) -> Path:
    """Checkpoint ``model`` after ``epochs_done`` epochs, then commit ``record`` as the state."""
    from alexnet_tasks.jsonio import save_json

    folder = run_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = save_model(model, folder / f"epoch-{epochs_done:04d}.keras")
    save_json(run_dir / STATE, {**record, "epochs_done": epochs_done, "checkpoint": checkpoint.name})
    for old in folder.glob("epoch-*.keras"):
        if old != checkpoint:
            old.unlink(missing_ok=True)
    return checkpoint


def differing_parts(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two fingerprint part trees."""
    names = []
    for key in sorted(set(saved) | set(current)):
        left, right = saved.get(key), current.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            names += differing_parts(left, right, f"{prefix}{key}.")
        elif left != right:
            names.append(f"{prefix}{key}")
    return names


def resumable_state(run_dir: Path, fingerprint: dict) -> dict | None:
    """The committed state of ``run_dir`` if it belongs to this fingerprint, else None (and why, in the log)."""
    path = run_dir / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError as error:
        log.warning("%s is unreadable (%s); starting over", path, error)
        return None
    if state.get("fingerprint") != fingerprint["fingerprint"]:
        differ = differing_parts(state.get("fingerprint_parts") or {}, fingerprint["parts"])
        log.warning(
            "%s belongs to another run fingerprint (%s differ); starting over",
            path, ", ".join(differ) or "fingerprint",
        )
        return None
    if not (run_dir / CHECKPOINTS / state["checkpoint"]).is_file():
        log.warning("%s names checkpoint %s, which is missing; starting over", path, state["checkpoint"])
        return None
    return state


def restore(model, run_dir: Path, state: dict) -> None:
    """Load the checkpoint's weights and optimizer state into ``model`` (built and compiled already).

    Call it inside the strategy scope the model was built under.
    """
    model.optimizer.build(model.trainable_variables)
    model.load_weights(run_dir / CHECKPOINTS / state["checkpoint"])
