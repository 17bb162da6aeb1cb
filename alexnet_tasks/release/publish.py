"""Publish a finished run as the gate decided: copy, then index, then move ``latest``.

A run the gate blessed (``decision.json``; a run without one is treated as
blessed) is published whole and becomes ``latest``. A run it did not bless is
recorded: its copy holds everything but ``model.keras`` (the model stays in
``runs/<run>/``; publishing it later with ``publish_mode=always`` copies it),
its index line says ``blessed: false`` and why, and ``latest`` stays on the
champion.

The run's model, metrics, per-image test predictions, pictures, config,
history, training summary, gate decision and TensorBoard logs are copied into ``published/runs/<run>/`` (the same folder
name as ``runs/<run>/``) through a temporary folder and one rename; only then
is the run's line put in ``published/index.jsonl`` (the whole index is
rewritten under a lock and renamed, so it never holds a partial or duplicate
line) and the ``published/latest`` symlink swapped to it with one atomic
rename. A publish killed at any point leaves ``latest`` on a complete run.

A run id is published once per fingerprint, and a published copy never mixes
two trainings:

* the same fingerprint published again changes nothing (no copy, the same
  index line); only ``latest`` is pointed at it again;
* a different fingerprint (or an unknown one on either side: a run trained
  without ``train_summary.json``) replaces the published copy whole: the new
  copy is built under a temporary name and exchanged with the old one in one
  atomic step (``renameat2(RENAME_EXCHANGE)`` on Linux; two renames where the
  system lacks it), then the run's index line is replaced and ``latest``
  pointed at it again;
* metrics that were computed for another training than the run's current
  model (trained again after evaluate) are refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from alexnet_tasks.progress import report
from alexnet_tasks.release import retention
from alexnet_tasks.atomic import (
    atomic_write_bytes,
    exchange,
    file_lock,
    fsync_dir,
    remove_stale_temps,
    temp_sibling,
)
from alexnet_tasks.config import PipelineConfig, load_json_object, safe_run_id
from alexnet_tasks.training.run_summary import TRAIN_SUMMARY, read_train_summary, same_run

log = logging.getLogger(__name__)

INDEX = "index.jsonl"
LATEST = "latest"
DECISION = "decision.json"
# What a published run holds; the first two are required.
MODEL = "model.keras"
REQUIRED = (MODEL, "metrics.json")
OPTIONAL = ("config.json", "history.json", TRAIN_SUMMARY, "predictions.npy", "predictions_plain.npy", DECISION,
            "confusion_matrix.png", "test_samples.png", "tensorboard")
# Copied from metrics.json into the index line (null where metrics.json lacks them).
TRAINING_INDEX_FIELDS = ("fingerprint", "truncated", "epochs_run", "epochs_planned", "devices", "seconds",
                         "validation_accuracy", "test_time_augmentation", "test_accuracy_plain")
# Every field of an index line. The first five are in every line ever written; lines written
# before the others existed lack them, and read_index fills them with None.
INDEX_FIELDS = ("run_id", "published_at", "test_accuracy", "test_loss", "path") + TRAINING_INDEX_FIELDS + (
    "config", "data_key", "code_version", "blessed", "blessed_reason", "train_settings",
)
LATER_INDEX_FIELDS = INDEX_FIELDS[5:]


def _copy_run(run_dir: Path, destination: Path, with_model: bool = True) -> None:
    for name in REQUIRED + OPTIONAL:
        source = run_dir / name
        if name == MODEL and not with_model:
            continue
        if not source.exists():
            if name in REQUIRED:
                raise FileNotFoundError(f"{source}: missing; train and evaluate must finish first")
            continue
        if source.is_dir():
            shutil.copytree(source, destination / name)
        else:
            shutil.copy2(source, destination / name)


def _build_copy(run_dir: Path, final: Path, with_model: bool = True) -> Path:
    """A complete, synced copy of the run in a temporary sibling of ``final``."""
    tmp = temp_sibling(final)
    tmp.mkdir(parents=True)
    try:
        _copy_run(run_dir, tmp, with_model)
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _replace_directory(new: Path, final: Path) -> None:
    """Put the complete folder ``new`` in place of ``final`` and remove the old copy."""
    if exchange(new, final):
        old = new  # the exchange left the old copy under the temporary name
    else:
        old = temp_sibling(final)
        os.rename(final, old)
        os.rename(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _published_fingerprint(final: Path) -> str | None:
    try:
        return json.loads((final / "metrics.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def read_decision(run_dir: Path) -> dict | None:
    """The gate's ``decision.json`` of ``run_dir``, checked; None when the run has none."""
    path = run_dir / DECISION
    if not path.is_file():
        return None
    decision = load_json_object(path)
    if not isinstance(decision.get("blessed"), bool):
        raise ValueError(f"{path}: blessed must be true or false, got {decision.get('blessed')!r}")
    reasons = decision.get("reasons", [])
    if not isinstance(reasons, list) or not all(isinstance(reason, str) for reason in reasons):
        raise ValueError(f"{path}: reasons must be a list of strings, got {reasons!r}")
    return decision


def _fingerprint_part(run_dir: Path, name: str):
    """A part of the fingerprint train recorded in ``train_summary.json``; None if unknown.

    ``code_version`` (package, git commit, uncommitted changes) and
    ``settings`` (the resolved recipe the run trained with: every epoch count,
    batch, rate and precision as used, not as the form left them empty).
    """
    summary = read_train_summary(run_dir) or {}
    parts = summary.get("fingerprint_parts")
    return parts.get(name) if isinstance(parts, dict) else None


def _index_line(
    run_id: str,
    metrics: dict,
    published_at: str,
    config: PipelineConfig | None,
    code_version: dict | str | None = None,
    decision: dict | None = None,
    train_settings: dict | None = None,
) -> dict:
    return {
        "run_id": run_id,
        "published_at": published_at,
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "path": f"runs/{safe_run_id(run_id)}",
        **{key: metrics.get(key) for key in TRAINING_INDEX_FIELDS},
        "config": None if config is None else config.to_dict(),
        "data_key": None if config is None else f"{config.source_md5}/shards-{config.shards_key()}",
        "code_version": code_version,
        "blessed": None if decision is None else decision["blessed"],
        "blessed_reason": None if decision is None else "; ".join(decision.get("reasons", [])) or None,
        "train_settings": train_settings,
    }


def read_index(published_root: Path) -> list[dict]:
    """Every line of the index, oldest first; fields older lines lack read as None."""
    path = Path(published_root) / INDEX
    if not path.is_file():
        return []
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
        for key in LATER_INDEX_FIELDS:
            line.setdefault(key, None)
        lines.append(line)
    return lines


def load_runs(published_root: Path) -> list[dict]:
    """The table of published runs, newest first: one dict per index line with every field of ``INDEX_FIELDS``.

    Fields a line lacks (written before they existed, or unknown) are None;
    ``latest`` is True on the run ``published/latest`` points to. For scripts
    and UIs; imports nothing heavy.
    """
    published_root = Path(published_root)
    try:
        latest = os.readlink(published_root / LATEST)
    except OSError:
        latest = None
    return [
        {**{key: line.get(key) for key in INDEX_FIELDS}, "latest": line["path"] == latest}
        for line in reversed(read_index(published_root))
    ]


def _update_index(published_root: Path, entry: dict) -> bool:
    """Put ``entry`` in the index in place of any earlier line of the same run; False if already there.

    A line of the same run with the same known fingerprint and the same
    decision is kept as it is, so publishing the same training again changes
    nothing.
    """
    with file_lock(published_root / f".{INDEX}.lock"):
        lines = read_index(published_root)
        if any(
            line["run_id"] == entry["run_id"] and line["path"] == entry["path"]
            and same_run(line["fingerprint"], entry["fingerprint"]) and line["blessed"] == entry["blessed"]
            for line in lines
        ):
            return False
        lines = [line for line in lines if line["run_id"] != entry["run_id"]]
        lines.append(entry)
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
        atomic_write_bytes(published_root / INDEX, text.encode())
        return True


def _point_latest(published_root: Path, target: str) -> None:
    link = published_root / LATEST
    tmp = temp_sibling(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; evaluate must finish first")
    metrics = json.loads(path.read_text())
    summary = read_train_summary(run_dir)
    if summary is not None and summary["fingerprint"] != metrics.get("fingerprint"):
        raise ValueError(
            f"{path}: computed for another training (fingerprint {metrics.get('fingerprint')}) than the "
            f"run's model ({summary['fingerprint']}, {run_dir / TRAIN_SUMMARY}); evaluate again before publishing"
        )
    return metrics


def _check_decision(decision: dict | None, metrics: dict, run_dir: Path) -> None:
    """Refuse a decision the gate made for another training than the evaluated one."""
    if decision is None:
        return
    made_for, evaluated = decision.get("fingerprint"), metrics.get("fingerprint")
    if made_for is not None and evaluated is not None and made_for != evaluated:
        raise ValueError(
            f"{run_dir / DECISION}: made for another training (fingerprint {made_for}) than the evaluated "
            f"one ({evaluated}); run the gate again before publishing"
        )


def _latest_target(published_root: Path) -> str | None:
    try:
        return os.readlink(published_root / LATEST)
    except OSError:
        return None


def publish(run_dir: Path, run_id: str, published_root: Path, config: PipelineConfig | None = None,
            keep_runs: int | None = None) -> dict:
    """Publish ``run_dir`` as ``run_id`` as the gate decided; returns the published path and headline metrics.

    ``config``, the run's pipeline settings, goes into the index line with the
    data key it implies (both None if not given); the gate's ``decision.json``,
    when the run has one, gives the line's ``blessed`` and ``blessed_reason``.

    A blessed run (or one without a decision) is copied whole, indexed and
    becomes ``latest``. A run the gate did not bless is recorded: its copy
    holds everything but ``model.keras`` (the model stays in the run folder),
    its index line says ``blessed: false`` and why, and ``latest`` stays on the
    champion. The result's ``blessed`` is the decision's (None without one).

    Then retention (``alexnet_tasks.release.retention.retain``) drops the run's
    checkpoints and prunes ``runs/`` beyond the newest ``keep_runs``
    (default ``$ALEXNET_KEEP_RUNS`` or 10).
    """
    run_dir, published_root = Path(run_dir), Path(published_root)
    keep = retention.keep_runs(keep_runs)  # a bad setting is refused before anything is published
    metrics = _read_metrics(run_dir)
    decision = read_decision(run_dir)
    _check_decision(decision, metrics, run_dir)
    blessed = None if decision is None else decision["blessed"]
    promote = blessed is not False
    code_version = _fingerprint_part(run_dir, "code_version")
    fingerprint = metrics.get("fingerprint")
    final = published_root / "runs" / safe_run_id(run_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not promote and not (run_dir / MODEL).is_file():
        raise FileNotFoundError(f"{run_dir / MODEL}: missing; train and evaluate must finish first")
    with file_lock(published_root / f".{final.name}.lock"):
        remove_stale_temps(final)
        previous = _published_fingerprint(final) if final.is_dir() else None
        if not promote and _latest_target(published_root) == f"runs/{final.name}":
            # A retrained run id whose earlier training is the champion: keep that one as published.
            log.warning("%s is not blessed and its run id's earlier training is the champion; the champion "
                        "stays as published (%s)", run_id, decision.get("reason"))
            result = _result(final, published_root, metrics, fingerprint, "kept", blessed, decision)
            return {**result, **retention.retain(run_dir, published_root, keep)}
        if not final.is_dir():
            os.rename(_build_copy(run_dir, final, with_model=promote), final)
            fsync_dir(final.parent)
            action = "published" if promote else "recorded"
        elif same_run(previous, fingerprint) and (not promote or (final / MODEL).is_file()):
            action = "unchanged"
            if decision is not None:  # the same training gated again: the copy carries the new decision
                atomic_write_bytes(final / DECISION, (run_dir / DECISION).read_bytes())
        else:
            # Another training, or this one recorded without its model and now blessed.
            _replace_directory(_build_copy(run_dir, final, with_model=promote), final)
            other_training = not same_run(previous, fingerprint)
            action = "recorded" if not promote else "replaced" if other_training else "published"
            if other_training:
                log.warning(
                    "%s held another training (fingerprint %s); replaced it with this run's (%s)",
                    final, previous or "unknown", fingerprint or "unknown",
                )
        entry = _index_line(run_id, metrics, datetime.now(timezone.utc).isoformat(timespec="seconds"), config,
                            code_version, decision, _fingerprint_part(run_dir, "settings"))
        _update_index(published_root, entry)
        if promote:
            with file_lock(published_root / f".{LATEST}.lock"):
                _point_latest(published_root, f"runs/{final.name}")
    if promote:
        report(
            "publish: %s %s (test accuracy %.4f, fingerprint %s); latest -> %s",
            action, final, metrics["test_accuracy"], fingerprint or "unknown", final.name,
        )
    else:
        report(
            "publish: %s %s without its model: not blessed (%s); latest stays on %s",
            action, final, decision.get("reason"), _latest_target(published_root) or "nothing",
        )
    result = _result(final, published_root, metrics, fingerprint, action, blessed, decision)
    return {**result, **retention.retain(run_dir, published_root, keep)}


def _result(final: Path, published_root: Path, metrics: dict, fingerprint: str | None, action: str,
            blessed: bool | None, decision: dict | None) -> dict:
    return {
        "published": str(final),
        "latest": str(published_root / LATEST),
        "index": str(published_root / INDEX),
        "test_accuracy": metrics["test_accuracy"],
        "fingerprint": fingerprint,
        "action": action,
        "blessed": blessed,
        "reason": None if decision is None else "; ".join(decision.get("reasons", [])) or None,
    }
