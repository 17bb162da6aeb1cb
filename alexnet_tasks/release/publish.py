"""Publish a finished run as the gate decided: copy, then index, then move ``latest``.

A run the gate blessed (``decision.json``; a run without one is treated as
blessed) is published whole and becomes ``latest`` (with
``publish_mode=approval`` only when a person approved it too: ``approval.json``,
``alexnet_tasks.release.approval``). A run it did not bless is
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from alexnet_tasks.atomic import (
    atomic_write_bytes,
    exchange,
    file_lock,
    fsync_dir,
    remove_stale_temps,
    temp_sibling,
)
from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.jsonio import load_json_object
from alexnet_tasks.layout import (
    APPROVAL,
    DECISION,
    INDEX,
    LATEST,
    METRICS,
    MODEL,
    PUBLISHED_OPTIONAL,
    PUBLISHED_REQUIRED,
    TRAIN_SUMMARY,
    published_path,
)
from alexnet_tasks.progress import report
from alexnet_tasks.release import approval as approvals
from alexnet_tasks.release import retention
from alexnet_tasks.release.registry import (  # noqa: F401  (INDEX_FIELDS, load_runs, read_index: for scripts)
    INDEX_FIELDS,
    Registry,
    index_line,
    load_runs,
    read_index,
)
from alexnet_tasks.training.run_summary import read_train_summary, same_run

log = logging.getLogger(__name__)


def _copy_run(run_dir: Path, destination: Path, with_model: bool = True) -> None:
    for name in PUBLISHED_REQUIRED + PUBLISHED_OPTIONAL:
        source = run_dir / name
        if name == MODEL and not with_model:
            continue
        if not source.exists():
            if name in PUBLISHED_REQUIRED:
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
        return json.loads((final / METRICS).read_text()).get("fingerprint")
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


def effective_decision(run_dir: Path) -> dict | None:
    """The decision publish follows: the gate's ``decision.json`` with a person's approval applied.

    Outside ``publish_mode=approval`` the gate's decision as it is; in it, a
    blessed run stays blessed only when ``approval.json`` approved it
    (``alexnet_tasks.release.approval.apply``). None when the run has no decision.
    """
    run_dir = Path(run_dir)
    return approvals.apply(read_decision(run_dir), approvals.read(run_dir), run_dir)


def _fingerprint_part(run_dir: Path, name: str):
    """A part of the fingerprint train recorded in ``train_summary.json``; None if unknown.

    ``code_version`` (package, git commit, uncommitted changes) and
    ``settings`` (the resolved recipe the run trained with: every epoch count,
    batch, rate and precision as used, not as the form left them empty).
    """
    summary = read_train_summary(run_dir) or {}
    parts = summary.get("fingerprint_parts")
    return parts.get(name) if isinstance(parts, dict) else None


def _read_metrics(run_dir: Path) -> dict:
    path = run_dir / METRICS
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


@dataclass
class _Publish:
    """What the read and check phases found, for the phases after them."""

    run_dir: Path
    run_id: str
    registry: Registry
    final: Path  # published/runs/<run>
    metrics: dict
    decision: dict | None  # the gate's, with the approval applied (effective_decision)
    approval: dict | None = None  # approval.json, publish_mode approval only
    dag_id: str | None = None  # the Airflow DAG publishing (None outside Airflow)

    @property
    def blessed(self) -> bool | None:
        return None if self.decision is None else self.decision["blessed"]

    @property
    def promote(self) -> bool:
        """Published whole and made the champion: blessed, or no decision at all."""
        return self.blessed is not False

    @property
    def fingerprint(self) -> str | None:
        return self.metrics.get("fingerprint")

    @property
    def reasons(self) -> list[str]:
        return [] if self.decision is None else list(self.decision.get("reasons", []))


def _read(run_dir: Path, run_id: str, published_root: Path, registry: Registry | None = None) -> _Publish:
    """Read phase: the run's metrics and decision, checked to belong to its current model."""
    metrics = _read_metrics(run_dir)
    decision = read_decision(run_dir)
    _check_decision(decision, metrics, run_dir)
    approval = approvals.read(run_dir) if decision is not None and decision.get("publish_mode") == "approval" else None
    decision = approvals.apply(decision, approval, run_dir)
    final = published_root / published_path(run_id)
    return _Publish(run_dir, run_id, registry or Registry(published_root), final, metrics, decision, approval)


def _check(run: _Publish) -> None:
    """Check phase: what the copy needs is there."""
    if not (run.run_dir / MODEL).is_file():
        raise FileNotFoundError(f"{run.run_dir / MODEL}: missing; train and evaluate must finish first")


def _keeps_the_champion(run: _Publish) -> bool:
    """Compare phase: a refused retraining of the champion's run id leaves the champion's copy alone."""
    return not run.promote and run.registry.store.champion_path() == published_path(run.run_id)


def _write_copy(run: _Publish) -> str:
    """Write phase: the run's published copy; returns what happened to it."""
    final = run.final
    previous = _published_fingerprint(final) if final.is_dir() else None
    if not final.is_dir():
        os.rename(_build_copy(run.run_dir, final, with_model=run.promote), final)
        fsync_dir(final.parent)
        return "published" if run.promote else "recorded"
    if same_run(previous, run.fingerprint) and (not run.promote or (final / MODEL).is_file()):
        if run.decision is not None:  # the same training gated again: the copy carries the new decision
            for name in (DECISION, APPROVAL):
                if (run.run_dir / name).is_file():
                    atomic_write_bytes(final / name, (run.run_dir / name).read_bytes())
        return "unchanged"
    # Another training, or this one recorded without its model and now blessed.
    _replace_directory(_build_copy(run.run_dir, final, with_model=run.promote), final)
    other_training = not same_run(previous, run.fingerprint)
    if other_training:
        log.warning("%s held another training (fingerprint %s); replaced it with this run's (%s)",
                    final, previous or "unknown", run.fingerprint or "unknown")
    return "recorded" if not run.promote else "replaced" if other_training else "published"


def _write_index(run: _Publish, config: PipelineConfig | None, sweep: dict | None = None) -> None:
    """Write phase: the run's index line, then (blessed) the champion."""
    entry = index_line(run.run_id, run.metrics, datetime.now(timezone.utc).isoformat(timespec="seconds"), config,
                       _fingerprint_part(run.run_dir, "code_version"), run.decision,
                       _fingerprint_part(run.run_dir, "settings"), run.approval, sweep)
    run.registry.record(entry)
    if run.promote:
        approved = run.approval is not None and run.approval["approved"]
        run.registry.promote(published_path(run.run_id), "approved" if approved else "gate",
                             user=run.approval["user"] if approved else None,
                             comment=run.approval["comment"] if approved else None,
                             dag_id=run.dag_id, dag_run_id=run.run_id if run.dag_id else None)


def publish(run_dir: Path, published_root: Path, config: PipelineConfig | None = None, *, run_id: str,
            keep_runs: int | None = None, dag_id: str | None = None, sweep: dict | None = None,
            registry: Registry | None = None) -> dict:
    """Publish ``run_dir`` as ``run_id`` as the gate decided; returns the published path and headline metrics.

    ``config``, the run's pipeline settings, goes into the index line with the
    data key it implies (both None if not given); ``sweep``, for the chosen
    trial of a sweep, ``{"sweep": <sweep run id>, "trial": <what it changes>}``
    goes into the line's ``sweep`` and ``trial``; the gate's ``decision.json``,
    when the run has one, gives the line's ``blessed`` and ``reasons``.

    A blessed run (or one without a decision) is copied whole, indexed and
    becomes ``latest``. A run the gate did not bless is recorded: its copy
    holds everything but ``model.keras`` (the model stays in the run folder),
    its index line says ``blessed: false`` and why, and ``latest`` stays on the
    champion. The result: ``published``, ``latest`` and ``index`` (paths),
    ``test_accuracy``, ``fingerprint``, ``action`` (published, recorded,
    replaced, unchanged or kept), ``blessed`` (the decision's, None without
    one), ``reasons`` (the decision's, a list of strings) and what retention did.

    Then retention (``alexnet_tasks.release.retention.retain``) drops the run's
    checkpoints and prunes ``runs/`` beyond the newest ``keep_runs``
    (default ``$ALEXNET_KEEP_RUNS`` or 10). A change of champion goes into
    the promotion history (``published/promotions.jsonl``) with ``dag_id``
    and ``run_id`` as the Airflow run that made it (none when ``dag_id`` is
    None). With ``publish_mode=approval`` a blessed run is promoted only when
    its ``approval.json`` approves it; otherwise it is recorded as not blessed,
    with who rejected it or that no answer came. Raises FileNotFoundError when the
    model or metrics are missing and ValueError when they or the decision
    belong to another training.

    Phases, in order: read (metrics and decision), check, compare (does a
    refused run keep the champion's copy?), write (the copy, the index line,
    the champion), report, then retention.

    ``registry``: ``published/`` on an object store (``Registry(store=S3Store(...))``).
    The copy is then built in ``published_root`` (this host's cache) and put on
    the store before the index line is written; retention then prunes this
    host's cached runs (the store's runs: ``alexnet_tasks.ops.stored_steps``).
    """
    run_dir, published_root = Path(run_dir), Path(published_root)
    keep = retention.keep_runs(keep_runs)  # a bad setting is refused before anything is published
    run = _read(run_dir, run_id, published_root, registry)
    run.dag_id = dag_id
    _check(run)
    run.final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(published_root / f".{run.final.name}.lock"):
        remove_stale_temps(run.final)
        if _keeps_the_champion(run):
            log.warning("%s is not blessed and its run id's earlier training is the champion; the champion "
                        "stays as published (%s)", run_id, "; ".join(run.reasons))
            action = "kept"
        else:
            action = _write_copy(run)
            run.registry.store.put_folder(published_path(run_id), run.final)
            _write_index(run, config, sweep)
    _report(run, action)
    return {**_result(run, published_root, action),
            **retention.retain(published_root, run_dir, keep=keep, registry=registry)}


def _report(run: _Publish, action: str) -> None:
    """One progress line for what publish did (none when it kept the champion: that was logged)."""
    if action == "kept":
        return
    if run.promote:
        report("publish: %s %s (test accuracy %.4f, fingerprint %s); latest -> %s",
               action, run.final, run.metrics["test_accuracy"], run.fingerprint or "unknown", run.final.name)
    else:
        report("publish: %s %s without its model: not blessed (%s); latest stays on %s", action, run.final,
               "; ".join(run.reasons), run.registry.store.champion_path() or "nothing")


def _result(run: _Publish, published_root: Path, action: str) -> dict:
    return {
        "published": str(run.final),
        "latest": str(published_root / LATEST),
        "index": str(published_root / INDEX),
        "test_accuracy": run.metrics["test_accuracy"],
        "fingerprint": run.fingerprint,
        "action": action,
        "blessed": run.blessed,
        "reasons": run.reasons,
    }
