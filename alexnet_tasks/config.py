"""Pipeline settings and the artifact layout.

One typed, frozen dataclass holds every setting a run can change; it is built
from the DAG's params (or any dict), rejects unknown keys and impossible values
with a ValueError that names the key, and is saved next to the results.

Every artifact lives under one root (``$ALEXNET_ARTIFACTS``, default
``~/alexnet-artifacts``)::

    data/<source_md5>/source/              verified archive + extracted batches
    data/<source_md5>/split-<key>/         manifest.json (exact source indices)
    data/<source_md5>/shards-<key>/        train.h5, validation.h5, test.h5
    runs/<run>/                            config, checkpoint, model, logs, metrics
    published/runs/<run>/                  the published copy of a finished run
    published/latest -> runs/<run>         moved atomically once a run is complete
    published/index.jsonl                  one line of metrics per published run

A run's folder ``<run>`` is its id made safe for a folder name plus a short
hash of the raw id (``safe_run_id``), so two run ids never share a folder.
Data folders are content-addressed: their names hold the source checksum and
the settings that shape them, so a rerun reuses them and a single step (for
example ``airflow tasks test``) finds its inputs from the params alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
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
# Test-time augmentation: "flip" averages the softmax of each image and its mirror image,
# "flip_shift" adds both shifted by one pixel in each of the four directions (10 views).
TEST_TIME_AUGMENTATIONS = ("none", "flip", "flip_shift")
RECIPE_TEST_TIME_AUGMENTATION = {"reference": "none", "fast": "flip"}  # test_time_augmentation "recipe"
# The recipe settings ``recipe_options`` may override: JSON-schema type and bounds (or enum).
# alexnet_tasks.training.recipe.TrainSettings has a field of each name (a test checks).
RECIPE_OPTIONS: dict[str, dict[str, Any]] = {
    "momentum": {"type": "number", "minimum": 0, "maximum": 0.999},
    "nesterov": {"type": "boolean"},
    "weight_decay": {"type": ["number", "null"], "minimum": 0, "maximum": 0.1},
    "weight_decay_norm_and_bias": {"type": "boolean"},
    "label_smoothing": {"type": "number", "minimum": 0, "maximum": 0.5},
    "warmup_epochs": {"type": "number", "minimum": 0, "maximum": 100},
    "decay": {"type": "string", "enum": ["constant", "cosine", "linear"]},
    "augment": {"type": "boolean"},
    "max_shift": {"type": "integer", "minimum": 0, "maximum": 8},
    "dropout": {"type": "number", "minimum": 0, "maximum": 0.9},
    "batchnorm_momentum": {"type": "number", "minimum": 0, "maximum": 0.999},
    "kernel_initializer": {"type": "string", "enum": ["glorot_uniform", "he_normal"]},
    "ema_momentum": {"type": ["number", "null"], "minimum": 0.5, "maximum": 0.9999},
    "precision": {"type": "string", "enum": ["float32", "mixed_bfloat16", "mixed_float16"]},
}
PUBLISH_MODES = ("gated", "always")
# Settings of the gate alone: they decide what is published, not what is trained.
GATE_SETTINGS = ("accuracy_floor", "gate_tolerance", "publish_mode")

# Bump when the stored shard content changes meaning; it is part of the shard key.
PREPROCESSING_VERSION = 1
MAX_SEED = 2**31 - 1
# Run types (Airflow's DagRunType values) whose training seed comes from the logical date;
# every other run (manual, asset- or operator-triggered) trains with the form's seed.
DATE_SEEDED_RUN_TYPES = ("scheduled", "backfill")


def _setting(default: Any, *, kind: str, title: str, description: str, shown_default: str | None = None,
             pattern_meaning: str | None = None, **schema: Any) -> Any:
    """A PipelineConfig field with the facts the DAG's form, ``validate()`` and README share.

    ``kind`` is the JSON-schema type (``"null"`` is added when the default is
    None); ``schema`` holds the JSON-schema bounds (minimum, maximum,
    exclusiveMinimum, enum, pattern, minLength, maxLength). ``shown_default``
    is how the README's table shows the default; ``pattern_meaning`` words the
    pattern in error messages.
    """
    facts = {"type": kind, "title": title, "description": description, "schema": schema,
             "shown_default": shown_default, "pattern_meaning": pattern_meaning}
    return field(default=default, metadata=facts)


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of one run; the DAG's params are generated from these fields one to one.

    Each field's metadata holds its title, description and bounds, so the UI
    form, ``validate()`` and the README's params table (``scripts/params_table.py``)
    all come from here.
    """

    source_url: str = _setting(
        OFFICIAL_URL, kind="string", pattern=r"\S", maxLength=2048, title="Source URL",
        pattern_meaning="a non-empty URL or path", shown_default="official URL",
        description="Where cifar-10-python.tar.gz comes from: an http(s):// or file:// URL, or a path on the worker.",
    )
    source_md5: str = _setting(
        OFFICIAL_MD5, kind="string", pattern="^[0-9a-f]{32}$", title="Source MD5",
        pattern_meaning="32 lowercase hex digits",
        description="Expected MD5 of the archive (32 lowercase hex digits); it also keys the data cache.",
    )
    recipe: str = _setting(
        "fast", kind="string", enum=list(RECIPES), title="Recipe",
        description="fast: augmentation, Nesterov momentum, weight decay, label smoothing, dropout 0.3, warm-up + "
        "cosine decay, flip-averaged test predictions. "
        "reference: the tutorial exactly (plain SGD, no augmentation, no XLA).",
    )
    epochs: int | None = _setting(
        None, kind="integer", minimum=1, maximum=1000, title="Epochs", shown_default="recipe's",
        description="Passes over the training split; empty takes the recipe's (reference 50, fast 30).",
    )
    batch_size: int | None = _setting(
        None, kind="integer", minimum=1, maximum=8192, title="Batch size", shown_default="recipe's",
        description="Global batch size: all devices together, whatever their number; "
        "empty takes the recipe's (reference 32, fast 256).",
    )
    learning_rate: float | None = _setting(
        None, kind="number", exclusiveMinimum=0, maximum=10, title="Learning rate", shown_default="recipe's",
        description="Peak SGD learning rate for the global batch, whatever the number of devices; "
        "empty takes the recipe's (reference 0.001, fast 0.04).",
    )
    image_size: int = _setting(
        227, kind="integer", minimum=MIN_IMAGE_SIZE, maximum=1024, title="Image size",
        description="Side the model resizes the 32x32 images to, on the device "
        f"(227 as in the tutorial; {MIN_IMAGE_SIZE} is the smallest). Memory grows with its square: "
        "train estimates what the run needs (weights, gradients, momentum, the activations of the "
        "per-device batch) and refuses at once a run its device cannot hold, naming the largest size "
        "and batch that fit. With a batch of 256 per device, 227 needs about 6.7 GB and 1024 about 110 GB; "
        "a 24 GB CPU worker holds up to about 474.",
    )
    validation_size: int = _setting(
        5000, kind="integer", minimum=NUM_CLASSES, maximum=49_000, title="Validation size",
        description="Images held out of the 50,000 training images for validation, stratified by class.",
    )
    split_seed: int = _setting(
        42, kind="integer", minimum=0, maximum=MAX_SEED, title="Split seed",
        description="Draws the validation images (and the train_limit subset); it keys the split and shard "
        "folders, so runs with the same split seed share one shard set.",
    )
    seed: int = _setting(
        42, kind="integer", minimum=0, maximum=MAX_SEED, title="Training seed",
        description="Drives the weight initialisation, the shuffle order, augmentation and dropout. Manual runs "
        "use this value; scheduled runs derive theirs from the logical date, so each night tries a new one.",
    )
    train_limit: int | None = _setting(
        None, kind="integer", minimum=NUM_CLASSES, maximum=50_000, title="Training image limit",
        description="Optional cap on training images (stratified) for a quick run; empty uses them all.",
    )
    max_train_minutes: float | None = _setting(
        None, kind="number", exclusiveMinimum=0, maximum=100_000, title="Training time budget (minutes)",
        description="Optional time budget for training; empty means none. A run that stops before its "
        "schedule ends is marked truncated in metrics.json and the published index.",
    )
    test_time_augmentation: str = _setting(
        "recipe", kind="string", enum=["recipe", *TEST_TIME_AUGMENTATIONS], title="Test-time augmentation",
        description="How evaluate predicts: none, flip (mean softmax of each test image and its mirror image) "
        "or flip_shift (also both shifted by 1 px in four directions: 10 views); recipe takes the recipe's "
        "(fast flip, reference none). metrics.json keeps the plain accuracy too.",
    )
    recipe_options: dict | None = _setting(
        None, kind="object", title="Recipe options", shown_default="none",
        properties=RECIPE_OPTIONS, additionalProperties=False,
        description="Optional JSON object overriding the recipe's training settings, e.g. "
        '{"dropout": 0.5, "decay": "linear"}; allowed keys: ' + ", ".join(RECIPE_OPTIONS) + ".",
    )
    accuracy_floor: float = _setting(
        0.25, kind="number", minimum=0, maximum=1, title="Gate: accuracy floor",
        description="Lowest test accuracy a run may have to be published (0.25 is two and a half times "
        "chance); below it the gate refuses the run.",
    )
    gate_tolerance: float = _setting(
        0.0, kind="number", minimum=0, maximum=1, title="Gate: tolerance",
        description="How far below the champion's (the run published/latest points to) test accuracy a run "
        "may score and still be published; 0 means it must do at least as well.",
    )
    publish_mode: str = _setting(
        "gated", kind="string", enum=list(PUBLISH_MODES), title="Publish mode",
        description="gated: publish only what the gate blesses, otherwise record the run and keep the "
        "champion. always: publish this run whatever the gate finds (its checks are still recorded).",
    )

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
        if values.get("recipe_options") == {}:
            values = {**values, "recipe_options": None}  # no overrides, one way: the same fingerprint
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError naming the first setting outside its field's bounds (the form's)."""
        for setting in dataclasses.fields(self):
            _check_setting(setting, getattr(self, setting.name))

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

    def resolved_test_time_augmentation(self) -> str:
        """The test-time augmentation evaluate uses: the param's, or the recipe's for ``recipe``."""
        if self.test_time_augmentation == "recipe":
            return RECIPE_TEST_TIME_AUGMENTATION[self.recipe]
        return self.test_time_augmentation

    # -- content addresses -------------------------------------------------
    def split_key(self) -> str:
        """The settings that shape the split; the training seed is not one of them.

        ``seed<N>`` is the split seed: the name is the one folders had when a
        single seed drew the split too, so shards built then are reused.
        """
        limit = "all" if self.train_limit is None else str(self.train_limit)
        return f"val{self.validation_size}-seed{self.split_seed}-limit{limit}"

    def shards_key(self) -> str:
        return f"{self.split_key()}-prep{PREPROCESSING_VERSION}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def settings_digest(self) -> str:
        """SHA-256 (hex) of every setting that shapes the trained model, the same however they were given.

        The gate's settings (``GATE_SETTINGS``) are left out: they decide what
        is published, not what is trained, so a step tested alone with another
        accuracy floor or publish mode finds the run already trained.
        """
        trained = {key: value for key, value in self.to_dict().items() if key not in GATE_SETTINGS}
        return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()


def seed_for_date(logical_date: datetime) -> int:
    """The training seed of a scheduled run: a fixed function of its logical date, 0 to ``MAX_SEED``.

    The same instant always gives the same seed (whatever timezone it is
    written in), so rerunning a night retrains its model; another night gives
    another seed. Raises ValueError for a date without a timezone.
    """
    if not isinstance(logical_date, datetime):
        raise ValueError(f"logical_date must be a datetime, got {logical_date!r}")
    if logical_date.tzinfo is None or logical_date.utcoffset() is None:
        raise ValueError(f"logical_date {logical_date.isoformat()} has no timezone; a seed needs an exact instant")
    instant = logical_date.astimezone(timezone.utc).isoformat()
    digest = hashlib.sha256(f"alexnet-cifar10 training seed {instant}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SEED + 1)


def settings_for_run(config: PipelineConfig, run_type: Any, logical_date: datetime | None) -> PipelineConfig:
    """The settings a run trains with: a scheduled (or backfill) run's training seed comes from its date.

    ``run_type`` is Airflow's DagRunType (or its value). Manual and triggered
    runs keep the form's ``seed``; nothing else changes, the split seed least
    of all, so every night reuses the same shards.
    """
    kind = getattr(run_type, "value", run_type)
    if kind not in DATE_SEEDED_RUN_TYPES:
        return config
    if logical_date is None:
        raise ValueError(f"a {kind} run without a logical date has no training seed to derive")
    return dataclasses.replace(config, seed=seed_for_date(logical_date))


# `make run` without CONF on a machine where TensorFlow sees no GPU: a run that fits a laptop.
CPU_PRESET = {"image_size": 67, "max_train_minutes": 15}


def local_run_conf(conf_text: str, gpus: int) -> tuple[dict[str, Any], str | None]:
    """The params of a local ``make run``: ``(params, note)``.

    Explicit params (any non-empty JSON object) are used as given. Without
    them, a machine with a GPU takes the defaults (227x227, the recipe's
    epochs) and one without takes ``CPU_PRESET``; ``note`` then says so and
    how to ask for more. Raises ValueError naming the text when it is not a
    JSON object.
    """
    text = (conf_text or "").strip() or "{}"
    try:
        params = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"CONF must be a JSON object, got {text!r} ({error})") from None
    if not isinstance(params, dict):
        raise ValueError(f"CONF must be a JSON object, got {text!r}")
    if params or gpus > 0:
        return params, None
    note = (
        "TensorFlow sees no GPU here: using the CPU preset "
        f"{json.dumps(CPU_PRESET, sort_keys=True)} (AlexNet at 67x67, training sized to 15 minutes). "
        "For the full run pass params explicitly, e.g. "
        "make run CONF='{\"image_size\": 227}' (days on a CPU), or CONF='{\"image_size\": 67, \"max_train_minutes\": 60}' for a longer budget."
    )
    return dict(CPU_PRESET), note


def param_specs() -> dict[str, dict[str, Any]]:
    """Each setting's form facts as keyword arguments for Airflow's ``Param(**spec)``."""
    specs = {}
    for setting in dataclasses.fields(PipelineConfig):
        facts = setting.metadata
        specs[setting.name] = {
            "default": setting.default,
            "type": ["null", facts["type"]] if setting.default is None else facts["type"],
            "title": facts["title"],
            "description": facts["description"],
            **facts["schema"],
        }
    return specs


def _check_setting(setting: dataclasses.Field, value: Any) -> None:
    """Raise ValueError unless ``value`` fits the setting's type and bounds."""
    name, facts = setting.name, setting.metadata
    schema = facts["schema"]
    if value is None:
        if setting.default is None:
            return
        raise ValueError(f"{name} must be set, got None")
    kind = facts["type"]
    if kind == "object":
        check_recipe_options(value)
        return
    if kind == "string":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        if "enum" in schema and value not in schema["enum"]:
            raise ValueError(f"{name} must be one of {tuple(schema['enum'])}, got {value!r}")
        if "pattern" in schema and not _search(schema["pattern"], value):
            raise ValueError(f"{name} must be {facts['pattern_meaning']}, got {value!r}")
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            raise ValueError(
                f"{name} must be {schema.get('minLength', 0)} to {schema.get('maxLength', 'any number of')} "
                f"characters long, got {len(value)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, int if kind == "integer" else (int, float)):
        raise ValueError(f"{name} must be {'an integer' if kind == 'integer' else 'a number'}, got {value!r}")
    high = schema["maximum"]
    if "exclusiveMinimum" in schema:
        if not schema["exclusiveMinimum"] < value <= high:  # NaN fails too
            raise ValueError(f"{name} must be in ({schema['exclusiveMinimum']}, {high}], got {value!r}")
    elif not schema["minimum"] <= value <= high:
        raise ValueError(f"{name} must be between {schema['minimum']} and {high}, got {value}")


def check_recipe_options(options: Any) -> None:
    """Raise ValueError naming the first key of ``options`` that is unknown or outside its bounds."""
    if not isinstance(options, dict):
        raise ValueError(f"recipe_options must be a JSON object, got {options!r}")
    unknown = sorted(set(options) - set(RECIPE_OPTIONS))
    if unknown:
        raise ValueError(
            f"recipe_options: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"expected some of: {', '.join(RECIPE_OPTIONS)}"
        )
    for name, value in options.items():
        schema = RECIPE_OPTIONS[name]
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        where = f"recipe_options.{name}"
        if value is None:
            if "null" in kinds:
                continue
            raise ValueError(f"{where} must be set, got null")
        if "boolean" in kinds:
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
        elif "string" in kinds:
            if value not in schema["enum"]:
                raise ValueError(f"{where} must be one of {tuple(schema['enum'])}, got {value!r}")
        else:
            integer = "integer" in kinds
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                raise ValueError(f"{where} must be {'an integer' if integer else 'a number'}, got {value!r}")
            if not schema["minimum"] <= value <= schema["maximum"]:  # NaN fails too
                raise ValueError(f"{where} must be between {schema['minimum']} and {schema['maximum']}, got {value}")


def _search(pattern: str, value: str) -> bool:
    """JSON-schema pattern semantics: a search, where a final ``$`` does not allow a trailing newline."""
    if pattern.endswith("$"):
        pattern = pattern[:-1] + r"\Z"
    return re.search(pattern, value) is not None


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


RUN_NAME_LENGTH = 100  # readable part of a run folder's name, before its hash


def safe_run_id(run_id: str) -> str:
    """The folder name of a run: a readable form of the id plus a short hash of the raw id.

    Airflow's run ids contain ':' and '+', which become '_' in the readable
    part; the hash keeps ids that read the same (``a:b`` and ``a_b``) apart.
    The same id always gives the same name, which is how the steps of one run
    find each other's outputs.
    """
    if not run_id or not isinstance(run_id, str):
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    if run_id in {".", ".."}:
        raise ValueError(f"run_id {run_id!r} is not usable as a folder name")
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:RUN_NAME_LENGTH]
    return f"{readable}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def json_safe(payload: Any, _where: str = "") -> tuple[Any, list[str]]:
    """``(payload with every NaN or infinite number replaced by None, where they were)``.

    JSON has no NaN or infinity (Python writes them as bare tokens that strict
    readers refuse); a diverged run's loss is one. Places are dotted keys and
    list indices, for example ``["test_loss", "history.3.loss"]``.
    """
    if isinstance(payload, float) and not math.isfinite(payload):
        return None, [_where or "."]
    if isinstance(payload, dict):
        clean, places = {}, []
        for key, value in payload.items():
            clean[key], found = json_safe(value, f"{_where}.{key}" if _where else str(key))
            places += found
        return clean, places
    if isinstance(payload, (list, tuple)):
        clean, places = [], []
        for index, value in enumerate(payload):
            item, found = json_safe(value, f"{_where}.{index}" if _where else str(index))
            clean.append(item)
            places += found
        return clean, places
    return payload, []


def load_json_object(path: Path, advice: str = "") -> dict:
    """The JSON object in ``path``; a ValueError naming the file (plus ``advice``) when it is not one."""
    try:
        payload = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}){advice}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


def save_json(path: Path, payload: Any) -> Path:
    """Write strict JSON atomically (temporary name, fsync, rename); NaN and infinity are written as null."""
    from alexnet_tasks.atomic import atomic_write_bytes

    payload, _ = json_safe(payload)
    return atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
