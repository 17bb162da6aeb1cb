"""Read what train recorded about a run (``train_summary.json``), for evaluate and publish.

Train writes the file when it finishes: the run's fingerprint (one SHA-256
over the resolved settings, the data key, the shards' content and the code
version) and how the schedule went. Runs trained before the file existed
have none; their fingerprint is unknown (None), and an unknown fingerprint is
never taken to equal another one.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from alexnet_tasks.jsonio import load_json_object
from alexnet_tasks.layout import TRAIN_SUMMARY

log = logging.getLogger(__name__)

# Copied from train_summary.json into metrics.json and the published index; null when unknown.
TRAINING_FIELDS = ("fingerprint", "truncated", "epochs_run", "epochs_planned", "seconds", "devices", "stopped_reason")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def read_train_summary(run_dir: Path) -> dict | None:
    """``train_summary.json`` of ``run_dir``, checked; None when train wrote none."""
    path = Path(run_dir) / TRAIN_SUMMARY
    if not path.is_file():
        return None
    summary = load_json_object(path, "; train again to rewrite it")
    fingerprint = summary.get("fingerprint")
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"{path}: fingerprint must be 64 lowercase hex digits, got {fingerprint!r}")
    return summary


def training_fields(run_dir: Path) -> dict:
    """The fields of ``train_summary.json`` that ``metrics.json`` repeats (all None when there is none)."""
    summary = read_train_summary(run_dir)
    if summary is None:
        log.warning("%s: no %s; the run's fingerprint is unknown", run_dir, TRAIN_SUMMARY)
        summary = {}
    return {key: summary.get(key) for key in TRAINING_FIELDS}


def same_run(first: str | None, second: str | None) -> bool:
    """Whether two fingerprints name the same training; an unknown (None) one never does."""
    return first is not None and second is not None and first == second
