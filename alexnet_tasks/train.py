"""Train AlexNet on the train shard, validating every epoch, resumable after a kill.

``train()`` is the orchestrator: resolve the recipe, load the shards, build or
restore the model, ``fit()`` with ``validation_data``, save the model. Each
completed epoch commits a checkpoint (model + optimizer state) and then
``state.json``; a retried task restores the last committed epoch and goes on
from there, so no completed epoch is trained twice and the history holds each
epoch exactly once. One fixed-column line per epoch goes to the task log and
the four scalars (train/validation loss and accuracy) plus the learning rate
go to TensorBoard under ``<run>/tensorboard``.

Recipes:
- ``reference``: the tutorial exactly: SGD lr 0.001, batch 32, 50 epochs, no
  augmentation.
- ``fast``: random flip and translation on the device, SGD with Nesterov
  momentum and weight decay, linear warm-up then cosine decay, label
  smoothing, a larger batch with a scaled learning rate; on a GPU also mixed
  precision.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from alexnet_tasks.atomic import exclusive_pid_lock
from alexnet_tasks.config import PipelineConfig, save_json
from alexnet_tasks.shards import load_split, shard_path

log = logging.getLogger(__name__)

STATE = "state.json"
LOCK = "train.lock"
CHECKPOINTS = "checkpoints"
MODEL = "model.keras"
HISTORY = "history.json"
CONFIG = "config.json"
TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class TrainSettings:
    """The resolved training recipe; saved as ``config.json`` beside the results."""

    recipe: str  # "reference" or "fast"
    epochs: int  # passes over the train split
    batch_size: int  # global batch (per-replica batch x replicas)
    learning_rate: float  # peak learning rate (after warm-up) for the global batch
    image_size: int  # side the model resizes its 32x32 input to
    seed: int  # weight init, dropout, augmentation and shuffle order
    momentum: float = 0.0  # SGD momentum (0 = plain SGD)
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float | None = None  # decoupled weight decay per step, scaled by the lr
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    warmup_epochs: float = 0.0  # linear warm-up from 10% of the peak rate (at most 20% of the run)
    cosine_decay: bool = False  # decay the rate to 0 along a half cosine after warm-up
    augment: bool = False  # random flip + translation, on the device
    mixed_precision: bool = False  # bfloat16 compute on a GPU (never on the CPU)
    jit_compile: bool = True  # XLA-compile the train step (about 2x on the CPU at batch 256)


RECIPE_DEFAULTS = {
    "reference": dict(epochs=50, batch_size=32, learning_rate=0.001),
    "fast": dict(
        epochs=30,
        batch_size=256,
        learning_rate=0.04,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        label_smoothing=0.1,
        warmup_epochs=1.0,
        cosine_decay=True,
        augment=True,
    ),
}


def resolve_settings(config: PipelineConfig, gpus: int = 0) -> TrainSettings:
    """The recipe's defaults, overridden by whatever the config sets explicitly."""
    values = dict(RECIPE_DEFAULTS[config.recipe])
    for name in ("epochs", "batch_size", "learning_rate"):
        if getattr(config, name) is not None:
            values[name] = getattr(config, name)
    if config.recipe == "fast" and gpus > 0:
        values["mixed_precision"] = True
    return TrainSettings(recipe=config.recipe, image_size=config.image_size, seed=config.seed, **values)


# --------------------------------------------------------------------------- data
class ShuffledBatches(keras.utils.PyDataset):
    """Batches of an in-memory split, reshuffled each epoch from (seed, epoch).

    The order of epoch ``e`` depends only on the seed and ``e``, so a resumed
    run sees the same batches as an uninterrupted one. Batches are NumPy
    arrays, so the same pipeline feeds any Keras backend.
    """

    def __init__(self, images, labels, batch_size, seed, first_epoch=0, shuffle=True):
        super().__init__()
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch = first_epoch
        self._order = self._make_order()

    def _make_order(self):
        if not self.shuffle:
            return np.arange(len(self.labels))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.labels))

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index):
        chosen = np.sort(self._order[index * self.batch_size : (index + 1) * self.batch_size])
        return self.images[chosen], self.labels[chosen]

    def on_epoch_end(self):
        self.epoch += 1
        self._order = self._make_order()


# --------------------------------------------------------------------------- model
def learning_rate_schedule(settings: TrainSettings, steps_per_epoch: int):
    if not settings.cosine_decay and settings.warmup_epochs == 0:
        return settings.learning_rate
    total = settings.epochs * steps_per_epoch
    # Warm up for warmup_epochs, but never for more than a fifth of a short run.
    warmup = int(min(settings.warmup_epochs, 0.2 * settings.epochs) * steps_per_epoch)
    if settings.cosine_decay:
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=settings.learning_rate * 0.1 if warmup else settings.learning_rate,
            decay_steps=max(total - warmup, 1),
            alpha=0.0,
            warmup_target=settings.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    return keras.optimizers.schedules.PolynomialDecay(
        settings.learning_rate * 0.1, max(warmup, 1), settings.learning_rate, power=1.0
    )


@keras.saving.register_keras_serializable(package="alexnet_cifar10")
class SparseCrossentropyWithSmoothing(keras.losses.Loss):
    """Sparse categorical cross-entropy with label smoothing (Keras' sparse loss has none)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        classes = keras.ops.shape(y_pred)[-1]
        one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, [-1]), "int32"), classes)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def compile_model(model, settings: TrainSettings, steps_per_epoch: int) -> None:
    optimizer = keras.optimizers.SGD(
        learning_rate=learning_rate_schedule(settings, steps_per_epoch),
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        weight_decay=settings.weight_decay,
    )
    model.compile(
        optimizer=optimizer,
        loss=SparseCrossentropyWithSmoothing(settings.label_smoothing)
        if settings.label_smoothing
        else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=settings.jit_compile,
    )


def _save_model(model, path: Path) -> Path:
    """``model.save`` under a temporary name, then rename (the name must end in .keras)."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def distribution_strategy(devices: list[str] | None = None):
    """MirroredStrategy over ``devices``, or over every GPU when there are several.

    With one device or none, TensorFlow's default strategy.
    """
    import tensorflow as tf

    if devices is None:
        devices = [device.name for device in tf.config.list_logical_devices("GPU")]
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


# --------------------------------------------------------------------------- callbacks
def _callbacks(
    run_dir: Path, settings: TrainSettings, history: list[dict], train_images: int, budget_seconds: float | None
):

    class EpochLog(keras.callbacks.Callback):
        """One fixed-column line per epoch, and the learning rate into the logs."""

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            seconds = time.monotonic() - self._started
            rate = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(np.asarray(rate))
            logs["epoch_seconds"] = seconds
            log.info(
                "epoch %3d/%-3d  loss %7.4f  accuracy %6.4f  val_loss %7.4f  val_accuracy %6.4f"
                "  lr %.5f  %7.1f s  %7.1f img/s",
                epoch + 1, settings.epochs, logs.get("loss", math.nan), logs.get("accuracy", math.nan),
                logs.get("val_loss", math.nan), logs.get("val_accuracy", math.nan),
                logs["learning_rate"], seconds, train_images / max(seconds, 1e-9),
            )

    class CommitEpoch(keras.callbacks.Callback):
        """Checkpoint model + optimizer, then commit ``state.json``: the epoch is done."""

        def on_epoch_end(self, epoch, logs=None):
            entry = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            history.append(entry)
            folder = run_dir / CHECKPOINTS
            folder.mkdir(parents=True, exist_ok=True)
            checkpoint = _save_model(self.model, folder / f"epoch-{epoch + 1:04d}.keras")
            save_json(
                run_dir / STATE,
                {
                    "epochs_done": epoch + 1,
                    "checkpoint": checkpoint.name,
                    "settings": dataclasses.asdict(settings),
                    "history": history,
                },
            )
            for old in folder.glob("epoch-*.keras"):
                if old != checkpoint:
                    old.unlink(missing_ok=True)

    class TimeBudget(keras.callbacks.Callback):
        """Stop after the epoch whose successor would overrun ``max_seconds`` of training."""

        def on_epoch_end(self, epoch, logs=None):
            if budget_seconds is None:
                return
            last = (logs or {}).get("epoch_seconds", 0.0)
            elapsed = sum(entry.get("epoch_seconds", 0.0) for entry in history) + last
            if elapsed + last > budget_seconds:  # the next epoch, as long as this one, would overrun
                log.info("time budget of %.1f min reached after %d epochs; stopping", budget_seconds / 60, epoch + 1)
                self.model.stop_training = True

    tensorboard = keras.callbacks.TensorBoard(
        log_dir=str(run_dir / TENSORBOARD), write_graph=False, update_freq="epoch"
    )
    # EpochLog first: it puts the learning rate into the logs TensorBoard and the state record.
    # TimeBudget before CommitEpoch, which appends the epoch to the history.
    return [EpochLog(), tensorboard, TimeBudget(), CommitEpoch()]


def _restore(run_dir: Path, settings: TrainSettings):
    """(model, epochs_done, history) from the last committed epoch, or None to start fresh."""
    state_path = run_dir / STATE
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    if state.get("settings") != dataclasses.asdict(settings):
        log.warning("%s was written with other settings; starting over", state_path)
        return None
    model = keras.models.load_model(run_dir / CHECKPOINTS / state["checkpoint"])
    return model, int(state["epochs_done"]), list(state["history"])


# --------------------------------------------------------------------------- step
def train(
    shards_dir: Path, run_dir: Path, config: PipelineConfig, devices: list[str] | None = None
) -> dict:
    """Train on ``train.h5`` with ``validation.h5`` every epoch; write the model and logs.

    ``devices``: train data-parallel over these (``["/cpu:0", "/cpu:1"]``);
    by default over every GPU when the worker sees several. ``batch_size`` is
    per replica: the global batch is ``batch_size x replicas`` and the learning
    rate is scaled by the same factor (the linear scaling rule, with the
    recipe's warm-up), so per-example updates match a single device.

    Returns ``{"model", "history", "config", "tensorboard", "epochs",
    "val_accuracy", "resumed_from", "seconds"}``. Refuses to run while another
    live process trains the same ``run_dir`` (a duplicate task delivery).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_pid_lock(run_dir / LOCK, "training this run"):
        return _train(shards_dir, run_dir, config, devices)


def _train(shards_dir: Path, run_dir: Path, config: PipelineConfig, devices: list[str] | None) -> dict:
    import tensorflow as tf

    from alexnet_tasks.model import build_alexnet

    gpus = len(tf.config.list_physical_devices("GPU"))
    settings = resolve_settings(config, gpus)
    strategy = distribution_strategy(devices)
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:
        settings = dataclasses.replace(
            settings,
            batch_size=settings.batch_size * replicas,
            learning_rate=settings.learning_rate * replicas,
            # XLA-compiled steps fail under MirroredStrategy here (a replica's variables are
            # read from another device), so the mirrored step runs without XLA.
            jit_compile=False,
        )
    save_json(run_dir / CONFIG, {"pipeline": config.to_dict(), "train": dataclasses.asdict(settings), "replicas": replicas})

    train_images, train_labels = load_split(shard_path(shards_dir, "train"), config.source_md5)
    val_images, val_labels = load_split(shard_path(shards_dir, "validation"), config.source_md5)
    if len(train_labels) < settings.batch_size:
        raise ValueError(
            f"batch_size={settings.batch_size // replicas} x {replicas} replica(s) exceeds the "
            f"{len(train_labels)} training images"
        )
    if settings.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    steps_per_epoch = math.ceil(len(train_labels) / settings.batch_size)
    restored = _restore(run_dir, settings)
    with strategy.scope():
        if restored is None:
            keras.utils.set_random_seed(settings.seed)
            model = build_alexnet(settings.image_size, augment=settings.augment, seed=settings.seed)
            compile_model(model, settings, steps_per_epoch)
            epochs_done, history = 0, []
            if (run_dir / TENSORBOARD).exists():
                shutil.rmtree(run_dir / TENSORBOARD)  # logs of an abandoned attempt
        else:
            model, epochs_done, history = restored
            keras.utils.set_random_seed(settings.seed + epochs_done)
            log.info("resuming from the checkpoint of epoch %d/%d", epochs_done, settings.epochs)
    log.info(
        "training %s recipe: %d epochs, batch %d on %d replica(s), lr %g, image_size %d, "
        "%d train / %d validation images, %s",
        settings.recipe, settings.epochs, settings.batch_size, replicas, settings.learning_rate,
        settings.image_size, len(train_labels), len(val_labels),
        f"{gpus} GPU(s)" if gpus else "CPU",
    )

    started = time.monotonic()
    budget_seconds = config.max_train_minutes * 60 if config.max_train_minutes else None
    spent = sum(entry.get("epoch_seconds", 0.0) for entry in history)
    if budget_seconds is not None and spent >= budget_seconds:
        log.info("time budget already spent (%.1f of %.1f min); not training further", spent / 60, budget_seconds / 60)
    elif epochs_done < settings.epochs:
        model.fit(
            ShuffledBatches(train_images, train_labels, settings.batch_size, settings.seed, epochs_done),
            validation_data=ShuffledBatches(val_images, val_labels, 512, settings.seed, shuffle=False),
            epochs=settings.epochs,
            initial_epoch=epochs_done,
            callbacks=_callbacks(run_dir, settings, history, len(train_labels), budget_seconds),
            verbose=0,
        )
    seconds = time.monotonic() - started

    final = _inference_copy(model, settings)
    _save_model(final, run_dir / MODEL)
    save_json(run_dir / HISTORY, history)
    return {
        "model": str(run_dir / MODEL),
        "history": str(run_dir / HISTORY),
        "config": str(run_dir / CONFIG),
        "tensorboard": str(run_dir / TENSORBOARD),
        "epochs": len(history),
        "val_accuracy": history[-1].get("val_accuracy") if history else None,
        "resumed_from": epochs_done,
        "seconds": round(seconds, 2),
    }


def _inference_copy(model, settings: TrainSettings):
    """The trained weights in a plain AlexNet (no augmentation, no optimizer state)."""
    from alexnet_tasks.model import build_alexnet

    keras.mixed_precision.set_global_policy("float32")
    plain = build_alexnet(settings.image_size)
    trained = {layer.name: layer for layer in model.layers}
    for layer in plain.layers:
        if layer.weights:
            layer.set_weights(trained[layer.name].get_weights())
    return plain  # saved uncompiled: no optimizer state in the published model
