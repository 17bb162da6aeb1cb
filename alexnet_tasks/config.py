"""The pipeline's config: ``PipelineConfig``, the form's params validated.

One typed, frozen dataclass holds every param a run can change; it is built
from the DAG's params (or any dict), rejects unknown keys and impossible values
with a ValueError that names the key, and is saved next to the results. Where
the artifacts live is ``alexnet_tasks.layout``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from alexnet_tasks.recipes import RECIPE_DEFAULTS, RECIPE_TEST_TIME_AUGMENTATION, RECIPES, describe, figures
from alexnet_tasks.validation import check_params

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"

CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (32, 32, 3)
MIN_IMAGE_SIZE = 67  # smallest input for which AlexNet's three max-pools keep a 1x1 map
# Test-time augmentation: "flip" averages the softmax of each image and its mirror image,
# "flip_shift" adds both shifted by one pixel in each of the four directions (10 views).
TEST_TIME_AUGMENTATIONS = ("none", "flip", "flip_shift")
# The recipe settings ``recipe_options`` may override: JSON-schema type and bounds (or enum).
# alexnet_tasks.training.recipe.Hyperparameters has a field of each name (a test checks).
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
# The sections of the DAG's form, in the order it shows them; every param is in one.
DATA, TRAINING, EVALUATION, GATE = SECTIONS = ("Data", "Training", "Evaluation", "Gate and publish")
PUBLISH_MODES = ("gated", "always", "approval")
# Params of the gate alone: they decide what is published, not what is trained.
GATE_PARAMS = ("accuracy_floor", "gate_tolerance", "publish_mode", "approval_timeout")

# Bump when the stored shard content changes meaning; it is part of the shard key.
PREPROCESSING_VERSION = 1
MAX_SEED = 2**31 - 1
# Run types (Airflow's DagRunType values) whose training seed comes from the logical date;
# every other run (manual, asset- or operator-triggered) trains with the form's seed.
DATE_SEEDED_RUN_TYPES = ("scheduled", "backfill")


def _recipe_words(recipe: str) -> str:
    """The recipe's defaults in words, for the form (``alexnet_tasks.recipes.describe``)."""
    return describe({**RECIPE_DEFAULTS[recipe], "test_time_augmentation": RECIPE_TEST_TIME_AUGMENTATION[recipe]})


def _setting(default: Any, *, section: str, kind: str, title: str, description: str,
             shown_default: str | None = None, pattern_meaning: str | None = None, **schema: Any) -> Any:
    """A PipelineConfig field with the facts the DAG's form, ``validate()`` and README share.

    ``section`` is the form's section (one of ``SECTIONS``); ``kind`` is the
    JSON-schema type (``"null"`` is added when the default is None);
    ``schema`` holds the JSON-schema bounds (minimum, maximum,
    exclusiveMinimum, enum, pattern, minLength, maxLength). ``shown_default``
    is how the README's table shows the default; ``pattern_meaning`` words the
    pattern in error messages. Raises ValueError for an unknown section.
    """
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {SECTIONS}, got {section!r}")
    facts = {"section": section, "type": kind, "title": title, "description": description, "schema": schema,
             "shown_default": shown_default, "pattern_meaning": pattern_meaning}
    return field(default=default, metadata=facts)


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of one run; the DAG's params are generated from these fields one to one.

    Each field's metadata holds its form section, title, description and
    bounds, so the UI form, ``validate()`` and the README's params tables
    (``scripts/params_table.py``) all come from here.
    """

    source_url: str = _setting(
        OFFICIAL_URL, section=DATA, kind="string", pattern=r"\S", maxLength=2048, title="Source URL",
        pattern_meaning="a non-empty URL or path", shown_default="official URL",
        description="Where cifar-10-python.tar.gz comes from: an http(s):// or file:// URL, or a path on the worker.",
    )
    source_md5: str = _setting(
        OFFICIAL_MD5, section=DATA, kind="string", pattern="^[0-9a-f]{32}$", title="Source MD5",
        pattern_meaning="32 lowercase hex digits",
        description="Expected MD5 of the archive (32 lowercase hex digits); it also keys the data cache.",
    )
    recipe: str = _setting(
        "fast", section=TRAINING, kind="string", enum=list(RECIPES), title="Recipe",
        description=f"fast: {_recipe_words('fast')}. "
        f"reference: the tutorial exactly, {_recipe_words('reference')}, plain SGD, no augmentation, no XLA.",
    )
    epochs: int | None = _setting(
        None, section=TRAINING, kind="integer", minimum=1, maximum=1000, title="Epochs",
        shown_default="recipe's",
        description=f"Passes over the training split; empty takes the recipe's ({figures('epochs')}).",
    )
    batch_size: int | None = _setting(
        None, section=TRAINING, kind="integer", minimum=1, maximum=8192, title="Batch size",
        shown_default="recipe's",
        description="Global batch size: all devices together, whatever their number; "
        f"empty takes the recipe's ({figures('batch_size')}).",
    )
    learning_rate: float | None = _setting(
        None, section=TRAINING, kind="number", exclusiveMinimum=0, maximum=10, title="Learning rate",
        shown_default="recipe's",
        description="Peak SGD learning rate for the global batch, whatever the number of devices; "
        f"empty takes the recipe's ({figures('learning_rate')}).",
    )
    image_size: int = _setting(
        227, section=TRAINING, kind="integer", minimum=MIN_IMAGE_SIZE, maximum=1024, title="Image size",
        description="Side the model resizes the 32x32 images to, on the device "
        f"(227 as in the tutorial; {MIN_IMAGE_SIZE} is the smallest). Memory grows with its square: "
        "train estimates what the run needs (weights, gradients, momentum, the activations of the "
        "per-device batch) and refuses at once a run its device cannot hold, naming the largest size "
        "and batch that fit. With a batch of 256 per device, 227 needs about 6.9 GB and 1024 about 110 GB; "
        "a 24 GB CPU worker holds up to about 470.",
    )
    validation_size: int = _setting(
        5000, section=DATA, kind="integer", minimum=NUM_CLASSES, maximum=49_000, title="Validation size",
        description="Images held out of the 50,000 training images for validation, stratified by class.",
    )
    split_seed: int = _setting(
        42, section=DATA, kind="integer", minimum=0, maximum=MAX_SEED, title="Split seed",
        description="Draws the validation images (and the train_limit subset); it keys the split and shard "
        "folders, so runs with the same split seed share one shard set.",
    )
    seed: int = _setting(
        42, section=TRAINING, kind="integer", minimum=0, maximum=MAX_SEED, title="Training seed",
        description="Drives the weight initialisation, the shuffle order, augmentation and dropout. Manual runs "
        "use this value; scheduled runs derive theirs from the logical date, so each night tries a new one.",
    )
    train_limit: int | None = _setting(
        None, section=DATA, kind="integer", minimum=NUM_CLASSES, maximum=50_000, title="Training image limit",
        description="Optional cap on training images (stratified) for a quick run; empty uses them all.",
    )
    max_train_minutes: float | None = _setting(
        None, section=TRAINING, kind="number", exclusiveMinimum=0, maximum=100_000,
        title="Training time budget (minutes)",
        description="Optional time budget for training; empty means none. A run that stops before its "
        "schedule ends is marked truncated in metrics.json and the published index.",
    )
    test_time_augmentation: str = _setting(
        "recipe", section=EVALUATION, kind="string", enum=["recipe", *TEST_TIME_AUGMENTATIONS],
        title="Test-time augmentation",
        description="How evaluate predicts: none, flip (mean softmax of each test image and its mirror image) "
        "or flip_shift (also both shifted by 1 px in four directions: 10 views); recipe takes the recipe's ("
        + ", ".join(f"{recipe} {views}" for recipe, views in RECIPE_TEST_TIME_AUGMENTATION.items())
        + "). metrics.json keeps the plain accuracy too.",
    )
    recipe_options: dict | None = _setting(
        None, section=TRAINING, kind="object", title="Recipe options", shown_default="none",
        properties=RECIPE_OPTIONS, additionalProperties=False,
        description="Optional JSON object overriding the recipe's training settings, e.g. "
        '{"dropout": 0.5, "decay": "linear"}; allowed keys: ' + ", ".join(RECIPE_OPTIONS) + ".",
    )
    accuracy_floor: float = _setting(
        0.25, section=GATE, kind="number", minimum=0, maximum=1, title="Accuracy floor",
        description="Lowest test accuracy a run may have to be published (0.25 is two and a half times "
        "chance); below it the gate refuses the run.",
    )
    gate_tolerance: float = _setting(
        0.0, section=GATE, kind="number", minimum=0, maximum=1, title="Tolerance",
        description="How far below the champion's (the run published/latest points to) test accuracy a run "
        "may score and still be published; 0 means it must do at least as well.",
    )
    publish_mode: str = _setting(
        "gated", section=GATE, kind="string", enum=list(PUBLISH_MODES), title="Publish mode",
        description="gated: publish only what the gate blesses, otherwise record the run and keep the "
        "champion. always: publish this run whatever the gate finds (its checks are still recorded). "
        "approval: a run the gate blesses waits for a person to approve it (Browse -> Required actions); "
        "Approve makes it the champion, Reject or no answer within approval_timeout keeps the champion.",
    )
    approval_timeout: float = _setting(
        24.0, section=GATE, kind="number", exclusiveMinimum=0, maximum=24 * 30, title="Approval timeout (hours)",
        description="With publish_mode approval: how long the run waits for Approve or Reject; without an "
        "answer by then the champion stays (the run is recorded as not approved).",
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PipelineConfig":
        """Build from a dict (DAG params, JSON), checked as Airflow checks the params (``check_params``).

        Raises ValueError naming the first unknown key or refused value. An
        integral float of an integer setting (``1.0``) is taken as that
        integer, so the config, its folders and its fingerprint are the ones
        of the integer.
        """
        values = check_params(values, param_specs(), pattern_meanings())
        if values.get("recipe_options") == {}:
            values = {**values, "recipe_options": None}  # no overrides, one way: the same fingerprint
        return cls(**values)

    def validate(self) -> None:
        """Raise ValueError naming the first setting its param's schema (the form's) refuses."""
        check_params(self.to_dict(), param_specs(), pattern_meanings())

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

    def config_digest(self) -> str:
        """SHA-256 (hex) of every param that shapes the trained model, the same however they were given.

        The gate's params (``GATE_PARAMS``) are left out: they decide what
        is published, not what is trained, so a step tested alone with another
        accuracy floor or publish mode finds the run already trained.
        """
        trained = {key: value for key, value in self.to_dict().items() if key not in GATE_PARAMS}
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


def config_for_run(config: PipelineConfig, run_type: Any, logical_date: datetime | None) -> PipelineConfig:
    """The config a run trains with: a scheduled (or backfill) run's training seed comes from its date.

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


def param_specs() -> dict[str, dict[str, Any]]:
    """Each setting's form facts as keyword arguments for Airflow's ``Param(**spec)``.

    The DAG builds its params from these, and ``PipelineConfig.from_dict``
    checks values against the same schemas (``alexnet_tasks.validation``).
    """
    specs = {}
    for setting in dataclasses.fields(PipelineConfig):
        facts = setting.metadata
        specs[setting.name] = {
            "default": setting.default,
            "type": ["null", facts["type"]] if setting.default is None else facts["type"],
            "title": facts["title"],
            "description": facts["description"],
            "section": facts["section"],
            **facts["schema"],
        }
    return specs


def pattern_meanings() -> dict[str, str]:
    """How error messages word each setting's ``pattern``: ``{"source_md5": "32 lowercase hex digits", ...}``."""
    return {setting.name: setting.metadata["pattern_meaning"] for setting in dataclasses.fields(PipelineConfig)
            if setting.metadata["pattern_meaning"]}


