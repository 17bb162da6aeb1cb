"""What the results pages show of a published run, read through the registry.

``published_registry`` is the registry of ``$ALEXNET_ARTIFACTS/published``:
a local folder (``LocalStore``) or an object store's (``S3Store``, read with
the Airflow connection of the store). ``RunView`` wraps one registry entry (a
run's index line) and, for a run's own page, what its published folder holds
(metrics, history, config, decision). ``runs_page`` gives one page of runs,
newest first; ``find_run`` one run by its id, without reading every index
line. On a local folder a run folder is used only when it resolves inside
``published/``; on a store only when its entry names ``runs/<run>``. Only the
files named in ``ARTIFACTS`` are ever read or served.

Imports nothing heavy (no TensorFlow, NumPy, matplotlib or boto3): Airflow
workers load the plugin that imports it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any
from urllib.parse import quote

from alexnet_tasks.config import GATE_PARAMS
from alexnet_tasks.layout import (
    CONFIG,
    CONFUSION_MATRIX,
    DECISION,
    HISTORY,
    METRICS,
    MODEL,
    PUBLISHED,
    RUNS,
    TEST_SAMPLES,
    artifacts_location,
    artifacts_root,
)
from alexnet_tasks.release.registry import DEFAULT_PAGE_SIZE, LocalStore, Page, Registry

log = logging.getLogger(__name__)

# The files of a published run that may be served, and their media types.
ARTIFACTS = {
    CONFUSION_MATRIX: "image/png",
    TEST_SAMPLES: "image/png",
    METRICS: "application/json",
    CONFIG: "application/json",
    HISTORY: "application/json",
    DECISION: "application/json",
    MODEL: "application/octet-stream",
}
# The gate's checks, in the order it makes them, as the run page names them.
CHECK_NAMES = {
    "finite_loss": "finite test loss",
    "accuracy_floor": "accuracy floor",
    "not_truncated": "whole schedule",
    "class_names": "same classes as the champion",
    "not_worse_than_champion": "not worse than the champion",
}
# Params of the pipeline config that are not hyperparameters: shown after those, in this order.
PIPELINE_PARAMS = ("source_url", "source_md5", "validation_size", "split_seed", "train_limit",
                     "accuracy_floor", "gate_tolerance", "publish_mode")


def published_root() -> Path:
    """``$ALEXNET_ARTIFACTS/published`` (default ``~/alexnet-artifacts/published``) of a local artifacts root."""
    return artifacts_root() / PUBLISHED


def published_registry() -> Registry:
    """The registry of ``$ALEXNET_ARTIFACTS/published``: a local folder's, or that of the object store it names.

    For ``s3://bucket/prefix`` the store is read with the Airflow connection
    ``$ALEXNET_ARTIFACTS_CONN_ID`` (default ``aws_default``: the plugin runs
    in Airflow's API server), the lookup table and fetched files kept in this
    host's cache of the store (``store.store_cache``). boto3 and the Amazon
    provider are imported here, when a page is asked for.
    """
    location = artifacts_location()
    if location.is_local:
        return Registry(location.local_path / PUBLISHED)
    from alexnet_tasks.release.registry import S3Store
    from alexnet_tasks.store import store_cache

    return Registry(store=S3Store.from_connection(location, cache=store_cache(location)))


def is_local(registry: Registry) -> bool:
    """Whether the registry's ``published/`` is a folder on this host (else an object store's)."""
    return isinstance(registry.store, LocalStore)


def published_location(registry: Registry) -> str:
    """Where ``published/`` is, as the pages name it: a folder, or ``s3://bucket/prefix/published``."""
    store = registry.store
    return str(store.root) if is_local(registry) else f"s3://{store.bucket}/{store.prefix}"


def _inside(root: Path, candidate: Path) -> Path | None:
    """``candidate`` with every link resolved, or None when that leaves ``root``."""
    resolved = candidate.resolve()
    return resolved if resolved != root and resolved.is_relative_to(root) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def duration(seconds: float | None) -> str | None:
    """``754`` -> ``12 min 34 s``; ``4000`` -> ``1 h 06 min``; None for None."""
    if seconds is None:
        return None
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


@dataclass
class Check:
    """One of the gate's checks as the run page shows it."""

    name: str
    passed: bool
    detail: str


@dataclass
class RunView:
    """One published run: its registry entry, its folder and (for its own page) what its files say."""

    entry: dict  # the run's index line, every field of INDEX_FIELDS and "latest"
    # The run's published folder: on a local published/ the folder inside it (a Path), on an
    # object store its path under published/ (runs/<run>); None when missing or outside.
    folder: PurePath | None
    metrics: dict = field(default_factory=dict)  # metrics.json
    history: list = field(default_factory=list)  # history.json: one dict per epoch
    saved_config: dict = field(default_factory=dict)  # config.json: "pipeline" and "train" settings
    decision: dict | None = None  # decision.json of the gate

    # ---- from the index line
    @property
    def run_id(self) -> str:
        return self.entry["run_id"]

    @property
    def quoted(self) -> str:
        return quote(self.run_id, safe="")

    @property
    def champion(self) -> bool:
        return bool(self.entry.get("latest"))

    @property
    def published_at(self) -> str:
        return str(self.entry["published_at"] or "")

    @property
    def test_accuracy(self) -> float | None:
        return _number(self.entry["test_accuracy"])

    @property
    def test_time_augmentation(self) -> str:
        """The views the headline accuracy averaged: none (also runs from before it existed), flip, flip_shift."""
        return str(self.entry["test_time_augmentation"] or "none")

    @property
    def test_accuracy_plain(self) -> float | None:
        """The accuracy of the image alone (the headline one when there was no test-time augmentation)."""
        if self.test_time_augmentation == "none":
            return self.test_accuracy
        return _number(self.entry["test_accuracy_plain"])

    @property
    def test_loss(self) -> float | None:
        return _number(self.entry["test_loss"])

    @property
    def validation_accuracy(self) -> float | None:
        return _number(self.entry["validation_accuracy"])

    @property
    def epochs(self) -> str | None:
        run, planned = self.entry["epochs_run"], self.entry["epochs_planned"]
        if run is None:
            return None if planned is None else f"? / {planned}"
        return f"{run} / {planned}" if planned is not None and planned != run else str(run)

    def _setting(self, name: str) -> Any:
        """A param as the run trained with it: the resolved hyperparameters, else the pipeline's config."""
        for source in (self.entry["hyperparameters"], self.saved_config.get("train"), self.entry["config"]):
            if isinstance(source, dict) and source.get(name) is not None:
                return source[name]
        return None

    @property
    def recipe(self) -> str | None:
        return self._setting("recipe")

    @property
    def image_size(self) -> int | None:
        return self._setting("image_size")

    @property
    def training_time(self) -> str | None:
        return duration(_number(self.entry["seconds"]))

    @property
    def devices(self) -> str | None:
        """As train describes them: ``CPU``, ``2 x NVIDIA H200``."""
        return self.entry["devices"] or None

    @property
    def fingerprint(self) -> str | None:
        return self.entry["fingerprint"]

    @property
    def truncated(self) -> bool | None:
        return self.entry["truncated"]

    @property
    def blessed(self) -> bool | None:
        return self.entry["blessed"]

    @property
    def reasons(self) -> list[str]:
        return list(self.entry["reasons"] or [])

    # ---- from the run's files (its own page)
    @property
    def resolved_config(self) -> list[tuple[str, Any, bool]]:
        """``(param, value the run used, resolved)`` rows: the hyperparameters, then the pipeline config's others.

        ``resolved`` is True where the form left the param empty and the
        recipe gave the value (``batch_size``, ``learning_rate``, ...).
        """
        pipeline = dict(self.saved_config.get("pipeline") or self.entry["config"] or {})
        # The gate's params as the gate and publish used them (the index line's), not as train saw them.
        published = self.entry["config"] if isinstance(self.entry["config"], dict) else {}
        pipeline.update({name: published[name] for name in GATE_PARAMS if name in published})
        train = self.saved_config.get("train") or self.entry["hyperparameters"] or {}
        rows = [(name, value, pipeline.get(name, value) is None and value is not None)
                for name, value in sorted(train.items())]
        rows += [(name, pipeline[name], False) for name in PIPELINE_PARAMS if name in pipeline]
        if not train:  # a run without its resolved hyperparameters: the config as it was given
            rows = [(name, value, False) for name, value in sorted(pipeline.items())]
        return rows

    @property
    def checks(self) -> list[Check]:
        """The gate's checks, in the order it made them."""
        checks = (self.decision or {}).get("checks")
        if not isinstance(checks, dict):
            return []
        order = list(CHECK_NAMES)  # decision.json keeps its keys sorted: show them in the gate's order
        ranked = sorted(checks.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
        return [Check(CHECK_NAMES.get(name, name.replace("_", " ")), check.get("passed") is True,
                      str(check.get("detail") or ""))
                for name, check in ranked if isinstance(check, dict)]


def run_folder(registry: Registry, entry: dict) -> PurePath | None:
    """The run folder an entry points to: a folder inside a local ``published/``, or on a store ``runs/<run>``.

    A store has no links or folders: its entry's path must be exactly
    ``runs/<run>`` (one name, not ``.`` or ``..``), as publish writes it.
    """
    if not is_local(registry):
        path = PurePosixPath(entry["path"])
        well_formed = (str(path) == entry["path"] and len(path.parts) == 2 and path.parts[0] == RUNS
                       and path.name not in (".", ".."))
        return path if well_formed else None
    root = registry.store.root
    relative = Path(entry["path"])
    if relative.is_absolute():
        return None
    folder = _inside(root.resolve(), root / relative)
    return folder if folder is not None and folder.is_dir() else None


def artifact_path(run: RunView, root: Path, name: str) -> Path | None:
    """A named artifact of a run on a local ``published/`` (``root``), if it exists as a file inside ``root``."""
    if name not in ARTIFACTS or run.folder is None:
        return None
    path = _inside(root.resolve(), Path(run.folder) / name)
    return path if path is not None and path.is_file() else None


def artifact_names(registry: Registry, run: RunView) -> set[str]:
    """The named artifacts (``ARTIFACTS``) the run's published folder holds (on a store: one listing)."""
    if run.folder is None:
        return set()
    store = registry.store
    if is_local(registry):
        return {name for name in ARTIFACTS if artifact_path(run, store.root, name) is not None}
    prefix = store.key(f"{run.folder}/")
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix, Delimiter="/")
    return {item["Key"][len(prefix):] for item in listed.get("Contents", [])} & set(ARTIFACTS)


def read_artifact(registry: Registry, run: RunView, name: str) -> bytes | None:
    """The bytes of a named artifact of the run; None when it is not one, or missing."""
    if name not in ARTIFACTS or run.folder is None:
        return None
    if is_local(registry):
        path = artifact_path(run, registry.store.root, name)
        try:
            return None if path is None else path.read_bytes()
        except OSError as error:
            log.warning("%s: unreadable (%s)", path, error)
            return None
    return registry.store.read_bytes(f"{run.folder}/{name}")


@dataclass
class StoredArtifact:
    """A named artifact of a run on an object store, opened: its body (read in chunks) and its size."""

    body: Any  # botocore's StreamingBody
    size: int


def open_stored_artifact(registry: Registry, run: RunView, name: str) -> StoredArtifact | None:
    """A named artifact of the run on the registry's object store, opened for streaming; None when missing."""
    from botocore.exceptions import ClientError

    if name not in ARTIFACTS or run.folder is None or is_local(registry):
        return None
    store = registry.store
    try:
        answer = store.client.get_object(Bucket=store.bucket, Key=store.key(f"{run.folder}/{name}"))
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    return StoredArtifact(answer["Body"], answer["ContentLength"])


def _view(registry: Registry, entry: dict) -> RunView:
    return RunView(entry=entry, folder=run_folder(registry, entry))


def runs_page(registry: Registry, offset: int = 0, size: int = DEFAULT_PAGE_SIZE,
              **filters) -> tuple[list[RunView], Page]:
    """One page of runs, newest first (``Registry.page``'s arguments and errors)."""
    page = registry.page(offset, size, **filters)
    return [_view(registry, entry) for entry in page.runs], page


def find_run(registry: Registry, run_id: str) -> RunView | None:
    """One run by its id, without its files; None when the index has no such run."""
    entry = registry.find(run_id)
    return None if entry is None else _view(registry, entry)


def champion_id(registry: Registry) -> str | None:
    """The run id of the champion, when an index entry names its folder (no file of it is read)."""
    path = registry.store.champion_path()
    entry = registry.find_path(path) if path else None
    return entry["run_id"] if entry else None


def load_details(registry: Registry, run: RunView) -> RunView:
    """Read the run's metrics, history, config and decision from its folder (what is missing stays empty)."""
    def load(name):
        data = read_artifact(registry, run, name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as error:
            log.warning("%s of %s: unreadable (%s)", name, run.run_id, error)
            return None

    metrics, history, config, decision = load(METRICS), load(HISTORY), load(CONFIG), load(DECISION)
    run.metrics = metrics if isinstance(metrics, dict) else {}
    run.history = history if isinstance(history, list) else []
    run.saved_config = config if isinstance(config, dict) else {}
    run.decision = decision if isinstance(decision, dict) else None
    return run
