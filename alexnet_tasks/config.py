"""Pipeline settings and the artifact layout.

One typed, frozen dataclass holds every setting a run can change; it is built
from the DAG's params (or any dict), rejects unknown keys and impossible values
with a ValueError that names the key, and is saved next to the results.

Every artifact lives under one root (``$ALEXNET_ARTIFACTS``, default
``~/alexnet-artifacts``)::

    data/<source_md5>/source/              verified archive + extracted batches
    data/<source_md5>/split-<key>/         manifest.json (exact source indices)
    data/<source_md5>/shards-<key>/        train.h5, validation.h5, test.h5
    runs/<run_id>/                         config, checkpoint, model, logs, metrics
    published/runs/<run_id>/               the published copy of a finished run
    published/latest -> runs/<run_id>      moved atomically once a run is complete
    published/index.jsonl                  one line of metrics per published run

Data folders are content-addressed: their names hold the source checksum and
the settings that shape them, so a rerun reuses them and a single step (for
example ``airflow tasks test``) finds its inputs from the params alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARTIFACTS_ENV = "ALEXNET_ARTIFACTS"
DEFAULT_ARTIFACTS = Path("~/alexnet-artifacts")

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"

CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (32, 32, 3)
MIN_IMAGE_SIZE = 67  # smallest input for which AlexNet's three max-pools keep a 1x1 map
RECIPES = ("reference", "fast")

# Bump when the stored shard content changes meaning; it is part of the shard key.
PREPROCESSING_VERSION = 1

_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of one run; the DAG's params map onto these fields one to one."""

    source_url: str = OFFICIAL_URL  # http(s):// or file:// URL, or a plain path to the archive
    source_md5: str = OFFICIAL_MD5  # expected MD5 of the archive; also keys the data cache
    recipe: str = "fast"  # "reference" (the tutorial, exactly) or "fast" (augmented, scheduled)
    epochs: int | None = None  # None: the recipe's default (reference 50, fast 30)
    batch_size: int | None = None  # None: the recipe's default (reference 32, fast 256)
    learning_rate: float | None = None  # None: the recipe's default (reference 0.001, fast 0.05)
    image_size: int = 227  # side the model resizes 32x32 inputs to, on the device; >= 67
    validation_size: int = 5000  # images held out of the 50,000 training images, stratified
    seed: int = 42  # drives the split, the shuffle order and the weight initialisation
    train_limit: int | None = None  # optional cap on training images, for a quick run
    max_train_minutes: float | None = None  # stop after the epoch that would overrun this budget

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PipelineConfig":
        """Build from a dict (DAG params, JSON), rejecting unknown keys."""
        if not isinstance(values, dict):
            raise ValueError(f"settings must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(map(repr, unknown))}; "
                f"expected some of: {', '.join(sorted(known))}"
            )
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        if not isinstance(self.source_url, str) or not self.source_url.strip():
            raise ValueError("source_url must be a non-empty URL or path")
        if not isinstance(self.source_md5, str) or not _MD5.match(self.source_md5):
            raise ValueError(
                f"source_md5 must be 32 lowercase hex digits, got {self.source_md5!r}"
            )
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        _check_int("epochs", self.epochs, 1, 1000, optional=True)
        _check_int("batch_size", self.batch_size, 1, 8192, optional=True)
        _check_int("image_size", self.image_size, MIN_IMAGE_SIZE, 1024)
        _check_int("validation_size", self.validation_size, NUM_CLASSES, 49_000)
        _check_int("seed", self.seed, 0, 2**31 - 1)
        _check_int("train_limit", self.train_limit, NUM_CLASSES, 50_000, optional=True)
        self._check_budget()
        if self.learning_rate is not None:
            if isinstance(self.learning_rate, bool) or not isinstance(
                self.learning_rate, (int, float)
            ):
                raise ValueError(
                    f"learning_rate must be a number, got {self.learning_rate!r}"
                )
            if not 0 < self.learning_rate <= 10:
                raise ValueError(
                    f"learning_rate must be in (0, 10], got {self.learning_rate!r}"
                )

    def _check_budget(self) -> None:
        if self.max_train_minutes is None:
            return
        if isinstance(self.max_train_minutes, bool) or not isinstance(self.max_train_minutes, (int, float)):
            raise ValueError(f"max_train_minutes must be a number, got {self.max_train_minutes!r}")
        if not 0 < self.max_train_minutes <= 100_000:
            raise ValueError(f"max_train_minutes must be in (0, 100000], got {self.max_train_minutes!r}")

    def check_against_source(self, train_images: int) -> None:
        """Raise ValueError when the split settings cannot fit the archive's training set."""
        if self.validation_size >= train_images:
            raise ValueError(
                f"validation_size={self.validation_size} leaves no training images: "
                f"the archive has {train_images} training images"
            )
        available = train_images - self.validation_size
        if self.train_limit is not None and self.train_limit > available:
            raise ValueError(
                f"train_limit={self.train_limit} exceeds the {available} training images "
                f"left after holding out validation_size={self.validation_size}"
            )

    # -- content addresses -------------------------------------------------
    def split_key(self) -> str:
        limit = "all" if self.train_limit is None else str(self.train_limit)
        return f"val{self.validation_size}-seed{self.seed}-limit{limit}"

    def shards_key(self) -> str:
        return f"{self.split_key()}-prep{PREPROCESSING_VERSION}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_int(name: str, value: Any, low: int, high: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


@dataclass(frozen=True)
class Layout:
    """Where every artifact lives under one root; pure path arithmetic, no I/O."""

    root: Path = field(default_factory=lambda: artifacts_root())

    def data(self, source_md5: str) -> Path:
        return self.root / "data" / source_md5

    def source(self, source_md5: str) -> Path:
        return self.data(source_md5) / "source"

    def batches(self, source_md5: str) -> Path:
        """The extracted ``cifar-10-batches-py`` folder of a verified archive."""
        return self.source(source_md5) / "extracted" / "cifar-10-batches-py"

    def split(self, config: PipelineConfig) -> Path:
        return self.data(config.source_md5) / f"split-{config.split_key()}"

    def shards(self, config: PipelineConfig) -> Path:
        return self.data(config.source_md5) / f"shards-{config.shards_key()}"

    def run(self, run_id: str) -> Path:
        return self.root / "runs" / safe_run_id(run_id)

    @property
    def published(self) -> Path:
        return self.root / "published"


def artifacts_root() -> Path:
    """The artifacts root: ``$ALEXNET_ARTIFACTS`` or ``~/alexnet-artifacts``."""
    return Path(os.environ.get(ARTIFACTS_ENV) or DEFAULT_ARTIFACTS).expanduser().resolve()


def safe_run_id(run_id: str) -> str:
    """A run id usable as one folder name (Airflow's contain ':' and '+')."""
    if not run_id or not isinstance(run_id, str):
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
    if safe in {".", ".."}:
        raise ValueError(f"run_id {run_id!r} is not usable as a folder name")
    return safe


def save_json(path: Path, payload: Any) -> Path:
    """Write JSON atomically (temporary name, fsync, rename)."""
    from alexnet_tasks.atomic import atomic_write_bytes

    return atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
