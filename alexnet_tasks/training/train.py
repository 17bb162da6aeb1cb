"""Train AlexNet on the train shard, validating every epoch; resumable, exactly, on any number of devices.

``train()`` is the orchestrator, a sequence of small steps:

1. pick the devices and resolve the recipe for them (``recipe.py``), and
   refuse at once a run whose estimated memory exceeds the device's
   (``memory.py``: ``InsufficientMemoryError``, permanent);
2. fingerprint the run: hyperparameters, data, shard content, code (``fingerprint.py``);
3. load the shards;
4. under the distribution strategy: build and compile the model, and restore
   the last committed epoch if ``state.json`` carries this fingerprint
   (``checkpoints.py``), then ``fit`` there, so a resumed run keeps its
   replicas;
5. save the inference model (with ``ema_momentum``: the averaged weights,
   with BatchNorm statistics measured again for them), the history and
   ``train_summary.json``.

Each completed epoch commits a checkpoint (weights + optimizer state) and then
``state.json``; a retried task restores the last committed epoch and goes on,
so no completed epoch is trained twice and the history holds each epoch once.
The batch order, the augmentation and the dropout draws of an epoch are
functions of (seed, epoch) and the learning rate of a step is a function of
the step and the plan, so a resumed run trains exactly what an uninterrupted
one would. One fixed-column line per epoch goes to the task log and the four
scalars (train/validation loss and accuracy) plus the learning rate go to
TensorBoard under ``<run>/tensorboard``.

Recipes:
- ``reference``: the tutorial exactly: SGD lr 0.001, batch 32, 50 epochs, no
  augmentation, no momentum, no XLA.
- ``fast``: random flip and translation on the device, SGD with Nesterov
  momentum and weight decay, linear warm-up then cosine decay, label
  smoothing, dropout 0.3, a larger batch, XLA on a single GPU (on the CPU
  only where TensorFlow runs without oneDNN); on a GPU also mixed precision
  (bfloat16 from compute capability 8.0, float16 with loss scaling on 7.x),
  on a CPU with AMX bfloat16.

``batch_size`` and ``learning_rate`` are global: N replicas each take
``batch_size / N`` images of every batch and the rate is used as given. With
``max_train_minutes`` the first epoch's time sizes the plan: the schedule then
decays to its end inside the epochs that fit, and a run stopped before its
plan ended is marked truncated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path

import keras

from alexnet_tasks.atomic import exclusive_pid_lock
from alexnet_tasks.errors import SPLIT_PARAMS, require_input
from alexnet_tasks.training.callbacks import TIME_BUDGET, Progress, training_callbacks
from alexnet_tasks.training.checkpoints import CHECKPOINTS, STATE, restore, resumable_state, save_model
from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.jsonio import save_json
from alexnet_tasks.layout import CONFIG, HISTORY, MODEL, TENSORBOARD
from alexnet_tasks.layout import TRAIN_LOCK as LOCK
from alexnet_tasks.layout import TRAIN_SUMMARY as SUMMARY
from alexnet_tasks.training.feeding import ShuffledBatches
from alexnet_tasks.training.fingerprint import run_fingerprint
from alexnet_tasks.training.recipe import (
    SparseCrossentropyWithSmoothing,
    Hyperparameters,
    compile_model,
    cpu_bfloat16_pays,
    learning_rate_at,
    onednn_enabled,
    per_replica_batch,
    precision_policy,
    resolve_hyperparameters,
)
from alexnet_tasks.data.shards import load_split, read_attrs, shard_path
from alexnet_tasks.training.memory import check_training_memory

__all__ = [
    "CHECKPOINTS", "STATE", "ShuffledBatches", "SparseCrossentropyWithSmoothing",
    "Hyperparameters", "compile_model", "distribution_strategy", "learning_rate_at", "precision_policy",
    "resolve_hyperparameters", "train",
]

log = logging.getLogger(__name__)

VALIDATION_BATCH = 512


def train(shards_dir: Path, run_dir: Path, config: PipelineConfig, *, devices: list[str] | None = None,
          on_commit=None) -> dict:
    """Train on ``train.h5`` with ``validation.h5`` every epoch; write the model, logs and summary.

    ``devices``: train data-parallel over these (``["/cpu:0", "/cpu:1"]``);
    by default over every GPU when the worker sees several. ``on_commit(epochs_done,
    checkpoint path)`` runs after each epoch's local commit (``state.json`` written).

    Returns ``{"model", "history", "config", "tensorboard", "epochs",
    "validation_accuracy", "resumed_from", "seconds", "fingerprint", "truncated"}``
    (``seconds``: this attempt's training time). Refuses to run while another
    live process trains the same ``run_dir`` (a duplicate task delivery).
    """
    require_input(Path(shards_dir), "build_shards", SPLIT_PARAMS)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_pid_lock(run_dir / LOCK, "training this run"):
        return _train(Path(shards_dir), run_dir, config, devices, on_commit)


def _train(shards_dir: Path, run_dir: Path, config: PipelineConfig, devices: list[str] | None,
           on_commit=None) -> dict:
    strategy = distribution_strategy(devices)
    replicas = strategy.num_replicas_in_sync
    device_names, compute_capability = describe_devices(devices, replicas)
    onednn = onednn_enabled()
    hyperparameters = resolve_hyperparameters(config, replicas, compute_capability, onednn,
                                cpu_bfloat16=compute_capability is None and cpu_bfloat16_pays(onednn))
    per_device_batch = per_replica_batch(hyperparameters, replicas)
    check_training_memory(
        hyperparameters.image_size, per_device_batch, gpu="CPU" not in device_names, replicas=replicas,
        data_images=sum(read_attrs(shard_path(shards_dir, name))["images_shape"][0] for name in ("train", "validation")),
        momentum=hyperparameters.momentum > 0, ema=hyperparameters.ema_momentum is not None,
        precision=hyperparameters.precision,
    )
    fingerprint = run_fingerprint(config, hyperparameters, shards_dir)
    save_json(run_dir / CONFIG, {
        "pipeline": config.to_dict(), "train": dataclasses.asdict(hyperparameters), "replicas": replicas,
        "devices": device_names, "fingerprint": fingerprint["fingerprint"], "fingerprint_parts": fingerprint["parts"],
    })

    (train_images, train_labels), validation = _load_data(shards_dir, config, hyperparameters)
    steps_per_epoch = math.ceil(len(train_labels) / hyperparameters.batch_size)
    keras.mixed_precision.set_global_policy(hyperparameters.precision)
    state = resumable_state(run_dir, fingerprint)
    with strategy.scope():
        model = _new_model(hyperparameters)
        progress = _progress(hyperparameters, steps_per_epoch, state)
        if state is None:
            shutil.rmtree(run_dir / TENSORBOARD, ignore_errors=True)  # logs of an abandoned attempt
        else:
            restore(model, run_dir, state)
            log.info("resuming from the checkpoint of epoch %d/%d", len(progress.history), progress.epochs_planned)
        log.info(
            "training %s recipe: %d epochs, global batch %d (%d per replica) on %d replica(s) [%s], lr %g, "
            "%s, image_size %d, %d train / %d validation images, fingerprint %s",
            hyperparameters.recipe, progress.epochs_planned, hyperparameters.batch_size,
            hyperparameters.batch_size // replicas, replicas, device_names, hyperparameters.learning_rate,
            hyperparameters.precision, hyperparameters.image_size, len(train_labels), len(validation[1]),
            fingerprint["fingerprint"][:12],
        )
        started = time.monotonic()
        resumed_from = len(progress.history)
        _fit(model, progress, run_dir, fingerprint, (train_images, train_labels), validation, on_commit)
        seconds = time.monotonic() - started

    inference = _inference_copy(model, hyperparameters)
    if hyperparameters.ema_momentum is not None:
        recompute_batchnorm_statistics(inference, train_images, hyperparameters)
    _save_model_and_history(inference, progress, run_dir)
    summary = _summary(hyperparameters, progress, fingerprint, replicas, device_names)
    save_json(run_dir / SUMMARY, summary)
    history = progress.history
    return {
        "model": str(run_dir / MODEL),
        "history": str(run_dir / HISTORY),
        "config": str(run_dir / CONFIG),
        "tensorboard": str(run_dir / TENSORBOARD),
        "epochs": len(history),
        "validation_accuracy": history[-1].get("val_accuracy") if history else None,  # Keras's history key
        "resumed_from": resumed_from,
        "seconds": round(seconds, 2),
        "fingerprint": fingerprint["fingerprint"],
        "truncated": summary["truncated"],
    }


# --------------------------------------------------------------------------- devices
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


def describe_devices(devices: list[str] | None, replicas: int) -> tuple[str, tuple[int, int] | None]:
    """("2 x NVIDIA H200" or "CPU", the lowest compute capability of the GPUs, None on the CPU).

    ``devices`` as given to ``train`` (None: every GPU the worker sees).
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus or (devices is not None and not any("GPU" in device.upper() for device in devices)):
        return ("CPU" if replicas == 1 else f"{replicas} x CPU"), None
    details = [tf.config.experimental.get_device_details(gpu) for gpu in gpus]
    name = details[0].get("device_name", "GPU")
    capabilities = [tuple(detail["compute_capability"]) for detail in details if detail.get("compute_capability")]
    return f"{replicas} x {name}", min(capabilities) if capabilities else None


# --------------------------------------------------------------------------- steps
def _load_data(shards_dir: Path, config: PipelineConfig, hyperparameters: Hyperparameters):
    train_images, train_labels = load_split(shard_path(shards_dir, "train"), config.source_md5)
    validation = load_split(shard_path(shards_dir, "validation"), config.source_md5)
    if len(train_labels) < hyperparameters.batch_size:
        raise ValueError(f"batch_size={hyperparameters.batch_size} exceeds the {len(train_labels)} training images")
    return (train_images, train_labels), validation


def _new_model(hyperparameters: Hyperparameters):
    """AlexNet built and compiled in the current (strategy) scope, initialised from the seed."""
    from alexnet_tasks.training.model import build_alexnet

    keras.utils.set_random_seed(hyperparameters.seed)
    model = build_alexnet(
        hyperparameters.image_size, augment=hyperparameters.augment, seed=hyperparameters.seed,
        max_shift=hyperparameters.max_shift,
        dropout=hyperparameters.dropout, batchnorm_momentum=hyperparameters.batchnorm_momentum,
        kernel_initializer=hyperparameters.kernel_initializer,
    )
    compile_model(model, hyperparameters)
    return model


def _progress(hyperparameters: Hyperparameters, steps_per_epoch: int, state: dict | None) -> Progress:
    """The plan and history: fresh, or as the committed state left them."""
    budget = hyperparameters.max_train_minutes * 60 if hyperparameters.max_train_minutes else None
    if state is None:
        return Progress(hyperparameters, steps_per_epoch, hyperparameters.epochs, budget is None, budget)
    planned = int(state.get("epochs_planned", hyperparameters.epochs))
    return Progress(hyperparameters, steps_per_epoch, planned, True, budget, list(state["history"]))


def _fit(model, progress: Progress, run_dir: Path, fingerprint: dict, train_split, validation,
         on_commit=None) -> None:
    """``fit`` the remaining planned epochs (call inside the strategy scope)."""
    hyperparameters, epochs_done = progress.hyperparameters, len(progress.history)
    if epochs_done >= progress.epochs_planned:
        return
    if progress.budget_seconds is not None and progress.seconds_spent() >= progress.budget_seconds:
        log.info("time budget already spent (%.2f of %.2f min); not training further",
                 progress.seconds_spent() / 60, progress.budget_seconds / 60)
        progress.stopped_reason = TIME_BUDGET
        return
    record = {
        "fingerprint": fingerprint["fingerprint"],
        "fingerprint_parts": fingerprint["parts"],
        "settings": dataclasses.asdict(hyperparameters),
    }
    model.fit(
        ShuffledBatches(*train_split, hyperparameters.batch_size, hyperparameters.seed, first_epoch=epochs_done),
        validation_data=ShuffledBatches(*validation, VALIDATION_BATCH, hyperparameters.seed, shuffle=False),
        epochs=progress.epochs_planned,
        initial_epoch=epochs_done,
        shuffle=False,  # the feeder orders each epoch from (seed, epoch)
        callbacks=training_callbacks(progress, run_dir, record, len(train_split[1]), run_dir / TENSORBOARD,
                                     on_commit),
        verbose=0,
    )


def _save_model_and_history(inference_model, progress: Progress, run_dir: Path) -> None:
    save_model(inference_model, run_dir / MODEL)
    save_json(run_dir / HISTORY, progress.history)


def _summary(hyperparameters: Hyperparameters, progress: Progress, fingerprint: dict, replicas: int,
             devices: str) -> dict:
    """``train_summary.json``: ``seconds`` is the training time of every attempt together."""
    epochs_run = len(progress.history)
    truncated = epochs_run < progress.epochs_planned
    return {
        "fingerprint": fingerprint["fingerprint"],
        "fingerprint_parts": fingerprint["parts"],
        "epochs_planned": progress.epochs_planned,
        "epochs_run": epochs_run,
        "truncated": truncated,
        "stopped_reason": progress.stopped_reason if truncated else None,
        "seconds": round(progress.seconds_spent(), 3),
        "replicas": replicas,
        "devices": devices,
        "recipe": hyperparameters.recipe,
        "image_size": hyperparameters.image_size,
        "batch_size": hyperparameters.batch_size,
        "learning_rate": hyperparameters.learning_rate,
        "seed": hyperparameters.seed,
    }


def _inference_copy(model, hyperparameters: Hyperparameters):
    """The trained weights in a plain float32 AlexNet (no augmentation, no optimizer state).

    With ``ema_momentum`` these are the averaged weights: ``fit`` copies
    them into the model when it ends, and this copies them again for a run
    that had no epoch left to fit (the copy is idempotent).
    """
    from alexnet_tasks.training.model import build_alexnet

    if hyperparameters.ema_momentum is not None:
        model.optimizer.finalize_variable_values(model.trainable_weights)
    keras.mixed_precision.set_global_policy("float32")
    plain = build_alexnet(hyperparameters.image_size)
    trained = {layer.name: layer for layer in model.layers}
    for layer in plain.layers:
        if layer.weights:
            layer.set_weights(trained[layer.name].get_weights())
    return plain  # saved uncompiled: no optimizer state in the published model


BATCHNORM_RECOMPUTE_IMAGES = 10_240  # training images whose statistics replace BatchNorm's moving ones


def recompute_batchnorm_statistics(model, images, hyperparameters: Hyperparameters,
                                   count: int = BATCHNORM_RECOMPUTE_IMAGES) -> int:
    """Set every BatchNorm layer's moving mean and variance to the averages over ``count`` training images.

    Averaged weights (EMA) do not match the moving statistics gathered
    while the raw weights trained, so they are measured again: one forward
    pass in training mode per batch, with the momentum of batch ``k`` set to
    ``k / (k + 1)``, which makes the moving values the plain mean of the
    batches' statistics. The images are the first ``count`` of a fixed
    permutation (the seed's). Returns the number of images used.
    """
    import numpy as np

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    order = np.random.default_rng(hyperparameters.seed).permutation(len(images))[:count]
    batch = min(hyperparameters.batch_size, len(order))
    momenta = [layer.momentum for layer in norms]
    used = 0
    for index, start in enumerate(range(0, len(order) - batch + 1, batch)):
        for layer in norms:
            layer.momentum = index / (index + 1)
        model(np.asarray(images[np.sort(order[start:start + batch])]), training=True)
        used += batch
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum
    log.info("BatchNorm statistics recomputed for the averaged weights on %d training images", used)
    return used
