"""The artifact layout: every file and folder name the pipeline writes, defined once.

Every artifact lives under one root (``$ALEXNET_ARTIFACTS``, default
``~/alexnet-artifacts``)::

    data/<source_md5>/source/              verified archive + extracted batches
    data/<source_md5>/split-<key>/         manifest.json (exact source indices)
    data/<source_md5>/shards-<key>/        train.h5, validation.h5, test.h5
    runs/<run>/                            a run: the files named below
    sweeps/<run>/slots/                    a sweep run's slots: at most ``parallel`` trials train at once
                                           (lock files; on an object store, leases ``<n>.json``)
    published/runs/<run>/                  the published copy of a finished run
    published/latest -> runs/<run>         the champion, moved atomically once a run is complete
    published/index.jsonl                  one line per publish (alexnet_tasks.release.registry)
    published/index.sqlite                 a lookup table rebuilt from index.jsonl (may be deleted)
    published/sweeps/<run>.json            a sweep's record: every trial, its validation figures, the chosen one

A run's folder ``<run>`` is its id made safe for a folder name plus a short
hash of the raw id (``run_folder_name``), so two run ids never share a folder.
Data folders are content-addressed: their names hold the source checksum and
the settings that shape them, so a rerun reuses them and a single step (for
example ``airflow tasks test``) finds its inputs from the params alone.

Pure names and path arithmetic: no I/O, nothing heavy imported.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alexnet_tasks.store import Location, UnsupportedStoreError, parse_location

if TYPE_CHECKING:
    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.store import ObjectStore

ARTIFACTS_ENV = "ALEXNET_ARTIFACTS"
DEFAULT_ARTIFACTS = Path("~/alexnet-artifacts")

# Top-level folders of the artifacts root.
DATA = "data"
RUNS = "runs"  # also the folder of the published copies under published/
PUBLISHED = "published"
INBOX = "inbox"  # images the predict DAG scores when its form names no folder
SCORED = "scored"  # scored/<predict run>/: the predict DAG's predictions.csv and summary.json

# Under data/<source_md5>/.
SOURCE = "source"  # the verified archive and, under EXTRACTED, its batches
ARCHIVE = "cifar-10-python.tar.gz"
EXTRACTED = "extracted"
BATCHES = "cifar-10-batches-py"  # the archive's folder of pickled batches
MANIFEST = "manifest.json"  # of a split-<key>/ folder


def shard_name(split_name: str) -> str:
    """The file of one split in a shards-<key>/ folder: ``train`` -> ``train.h5``."""
    return f"{split_name}.h5"

# The files and folders of a run (runs/<run>/ and published/runs/<run>/).
MODEL = "model.keras"
METRICS = "metrics.json"
HISTORY = "history.json"
CONFIG = "config.json"
TRAIN_SUMMARY = "train_summary.json"
DECISION = "decision.json"
APPROVAL = "approval.json"  # publish_mode approval: who approved or rejected the gate's blessing, when, why
PREDICTIONS = "predictions.npy"
PLAIN_PREDICTIONS = "predictions_plain.npy"  # with test-time augmentation: the image alone
CONFUSION_MATRIX = "confusion_matrix.png"
TEST_SAMPLES = "test_samples.png"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"  # per-epoch weights and optimizer state, only needed to resume
STATE = "state.json"  # the last committed epoch of a training
TRAIN_LOCK = "train.lock"
LEASE = "lease.json"  # on an object store, what stands for the training lock: who trains the run now (store.Lease)

# What a published run holds; the first two are required, the rest copied when present.
PUBLISHED_REQUIRED = (MODEL, METRICS)
PUBLISHED_OPTIONAL = (CONFIG, HISTORY, TRAIN_SUMMARY, PREDICTIONS, PLAIN_PREDICTIONS, DECISION, APPROVAL,
                      CONFUSION_MATRIX, TEST_SAMPLES, TENSORBOARD)

# published/
INDEX = "index.jsonl"
INDEX_TABLE = "index.sqlite"
LATEST = "latest"
PROMOTIONS = "promotions.jsonl"  # every change of champion, appended, never rewritten
SWEEPS = "sweeps"  # published/sweeps/<run>.json: one record per sweep run

RUN_NAME_LENGTH = 100  # readable part of a run folder's name, before its hash


def artifacts_location() -> Location:
    """``$ALEXNET_ARTIFACTS`` (or ``~/alexnet-artifacts``) parsed: a local folder or an object-store URL.

    Raises ``store.UnsupportedStoreError`` (a ``PermanentError`` and a
    ``ValueError``) for a URL whose scheme no installed filesystem serves.
    """
    return parse_location(os.environ.get(ARTIFACTS_ENV) or DEFAULT_ARTIFACTS, ARTIFACTS_ENV)


def artifacts_root() -> Path:
    """The local artifacts root: ``$ALEXNET_ARTIFACTS`` or ``~/alexnet-artifacts``, absolute.

    Raises ``store.UnsupportedStoreError`` when ``$ALEXNET_ARTIFACTS`` is an
    object-store URL: the steps read and write a local folder, and a URL is
    never taken for a relative folder named ``s3:``.
    """
    location = artifacts_location()
    if not location.is_local:
        raise UnsupportedStoreError(
            f"{ARTIFACTS_ENV}={location.value}: an object-store URL; the pipeline's steps "
            f"read and write a local folder (set {ARTIFACTS_ENV} to a local path)"
        )
    return location.local_path


def artifacts_layout(airflow: bool = False) -> Layout:
    """The layout of ``$ALEXNET_ARTIFACTS``: the folder itself, or this host's cache of the object store it names.

    ``airflow``: open the store with the Airflow connection
    ``$ALEXNET_ARTIFACTS_CONN_ID`` (the DAG's tasks), else with the library's
    usual credentials (``store.open_store``).
    """
    from alexnet_tasks.store import open_store, store_cache

    location = artifacts_location()
    if location.is_local:
        return Layout(location.local_path)
    return Layout(store_cache(location), open_store(location, airflow=airflow))


def run_folder_name(run_id: str) -> str:
    """The folder name of a run: a readable form of the id plus a short hash of the raw id.

    Airflow's run ids contain ':' and '+', which become '_' in the readable
    part; the hash keeps ids that read the same (``a:b`` and ``a_b``) apart.
    The same id always gives the same name, which is how the steps of one run
    find each other's outputs. Raises ValueError for an empty id, ``.`` or ``..``.
    """
    if not run_id or not isinstance(run_id, str):
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    if run_id in {".", ".."}:
        raise ValueError(f"run_id {run_id!r} is not usable as a folder name")
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:RUN_NAME_LENGTH]
    return f"{readable}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def published_path(run_id: str) -> str:
    """The ``path`` of a run's index line: its published folder relative to ``published/``."""
    return f"{RUNS}/{run_folder_name(run_id)}"


@dataclass(frozen=True)
class Layout:
    """Where every artifact lives under one root; pure path arithmetic, no I/O.

    With an object-store artifacts root (``artifacts_layout``), ``root`` is
    this host's cache of the store, laid out the same way, and ``store`` the
    ``store.ObjectStore`` it mirrors (None for a local root).
    """

    root: Path = field(default_factory=lambda: artifacts_root())
    store: ObjectStore | None = field(default=None, compare=False)

    def data(self, source_md5: str) -> Path:
        return self.root / DATA / source_md5

    def source(self, source_md5: str) -> Path:
        return self.data(source_md5) / SOURCE

    def batches(self, source_md5: str) -> Path:
        """The extracted ``cifar-10-batches-py`` folder of a verified archive."""
        return self.source(source_md5) / EXTRACTED / BATCHES

    def split(self, config: PipelineConfig) -> Path:
        return self.data(config.source_md5) / f"split-{config.split_key()}"

    def manifest(self, config: PipelineConfig) -> Path:
        """The split's ``manifest.json``: the exact source indices of each split."""
        return self.split(config) / MANIFEST

    def shards(self, config: PipelineConfig) -> Path:
        return self.data(config.source_md5) / f"shards-{config.shards_key()}"

    def run(self, run_id: str) -> Path:
        return self.root / RUNS / run_folder_name(run_id)

    @property
    def published(self) -> Path:
        return self.root / PUBLISHED

    @property
    def inbox(self) -> Path:
        """The predict DAG's default folder of images to score."""
        return self.root / INBOX

    def scored(self, run_id: str) -> Path:
        """Where a predict run writes its predictions by default: ``scored/<run folder name>``."""
        return self.root / SCORED / run_folder_name(run_id)

    def sweep_slots(self, run_id: str) -> Path:
        """The slots that cap how many trials of the sweep run ``run_id`` train at once (lock files or leases)."""
        return self.root / SWEEPS / run_folder_name(run_id) / "slots"

    def sweep_record(self, run_id: str) -> Path:
        """The record of the sweep run ``run_id``: ``published/sweeps/<run>.json``."""
        return sweep_record_path(self.published, run_id)


def sweep_record_name(run_id: str) -> str:
    """``sweeps/<run>.json``: the record of the sweep run ``run_id``, relative to ``published/``."""
    return f"{SWEEPS}/{run_folder_name(run_id)}.json"


def sweep_record_path(published_root: Path, run_id: str) -> Path:
    """``<published_root>/sweeps/<run>.json``, the record of the sweep run ``run_id``."""
    return Path(published_root) / sweep_record_name(run_id)


def data_key(config: PipelineConfig) -> str:
    """The shards a run trained on, relative to ``data/``: ``<source_md5>/shards-<key>``."""
    return f"{config.source_md5}/shards-{config.shards_key()}"
