"""Evaluate the trained model on the test split.

With test-time augmentation (``flip``: each image and its mirror image;
``flip_shift``: both also shifted by one pixel in each of four directions,
zero-filled) the prediction is the mean softmax over the views; the plain
prediction (the image alone) is kept beside it. Writes ``predictions.npy``
(the predicted class of every test image, uint8, in the test shard's order,
so two runs scored on the same images compare image by image; with test-time
augmentation also ``predictions_plain.npy``), ``metrics.json`` (the kind of
test-time augmentation, test loss, accuracy, ``test_accuracy_plain`` and
``test_accuracy_augmented`` (null without augmentation), per-class accuracy,
confusion matrix, the test shard's ``images_sha256``, ``finite`` and ``nonfinite`` (a diverged
model's NaN or infinite figures are written as null and named there), the last epoch's
validation accuracy from ``history.json`` (null without one), and what train recorded in ``train_summary.json``: the run's
fingerprint, whether its schedule was truncated, epochs run and planned,
training seconds and devices; null where train wrote no summary),
``confusion_matrix.png``, ``test_samples.png`` (a grid of test images with
their predicted and true classes) and the same figures to TensorBoard under
``<run>/tensorboard/test``.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexnet_tasks.progress import report
from alexnet_tasks.atomic import atomic_write_bytes
from alexnet_tasks.config import TEST_TIME_AUGMENTATIONS, PipelineConfig
from alexnet_tasks.jsonio import json_safe, save_json
from alexnet_tasks.layout import HISTORY, METRICS, PLAIN_PREDICTIONS, PREDICTIONS
from alexnet_tasks.layout import CONFUSION_MATRIX as CONFUSION_PNG
from alexnet_tasks.layout import TEST_SAMPLES as SAMPLES_PNG
from alexnet_tasks.layout import TENSORBOARD
from alexnet_tasks.errors import RUN_PARAMS, SPLIT_PARAMS, MissingInputError, require_input
from alexnet_tasks.training.run_summary import training_fields
from alexnet_tasks.data.shards import load_split, read_attrs, shard_path

log = logging.getLogger(__name__)

SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (rows, columns) of flip_shift's one-pixel shifts


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return matrix


def summarize(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Loss, accuracy, per-class accuracy and the confusion matrix from softmax outputs."""
    if probabilities.shape != (len(labels), len(class_names)):
        raise ValueError(
            f"expected predictions of shape {(len(labels), len(class_names))}, got {probabilities.shape}"
        )
    picked = probabilities[np.arange(len(labels)), labels.astype(np.int64)]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
    predictions = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, len(class_names))
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    return {
        "test_loss": loss,
        "test_accuracy": float((predictions == labels).mean()),
        "test_images": int(len(labels)),
        "per_class_accuracy": {name: float(v) for name, v in zip(class_names, per_class)},
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
    }


def shifted(images: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``images`` (N, H, W, C) moved down ``rows`` and right ``columns`` pixels (negative: up, left), zero-filled.

    Zero is the mean of a standardized image, as in the training augmentation.
    """
    out = np.zeros_like(images)
    height, width = images.shape[1:3]
    out[:, max(rows, 0):height + min(rows, 0), max(columns, 0):width + min(columns, 0)] = \
        images[:, max(-rows, 0):height + min(-rows, 0), max(-columns, 0):width + min(-columns, 0)]
    return out


def test_time_views(images: np.ndarray, kind: str):
    """The views ``kind`` predicts from, one at a time, the images themselves first."""
    if kind not in TEST_TIME_AUGMENTATIONS:
        raise ValueError(f"test_time_augmentation must be one of {TEST_TIME_AUGMENTATIONS}, got {kind!r}")
    yield images
    if kind == "none":
        return
    mirrored = images[:, :, ::-1]
    yield mirrored
    if kind == "flip_shift":
        for rows, columns in SHIFTS:
            yield shifted(images, rows, columns)
            yield shifted(mirrored, rows, columns)


def predict_views(model, images: np.ndarray, kind: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(plain, augmented)`` softmax outputs: the images alone, and the mean over ``kind``'s views."""
    plain, total, views = None, None, 0
    for view in test_time_views(images, kind):
        probabilities = np.asarray(model.predict(np.ascontiguousarray(view), batch_size=batch_size, verbose=0),
                                   dtype=np.float64)
        plain = probabilities if plain is None else plain
        total = probabilities if total is None else total + probabilities
        views += 1
    return plain, total / views


def finite_metrics(metrics: dict) -> dict:
    """``metrics`` as valid JSON: NaN and infinity become null, listed in ``nonfinite``, with ``finite`` false.

    A diverged model's loss (and any figure it makes NaN) is kept as a fact
    the gate reads, instead of a value no JSON reader accepts.
    """
    clean, places = json_safe({key: value for key, value in metrics.items() if key not in ("finite", "nonfinite")})
    return {**clean, "finite": not places, "nonfinite": places}


def last_validation_accuracy(run_dir: Path) -> float | None:
    """The last epoch's validation accuracy in ``history.json``; None when there is no history."""
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return None
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); train again to rewrite it") from None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise ValueError(f"{path}: expected a list of per-epoch objects")
    value = history[-1].get("val_accuracy") if history else None
    return None if value is None else float(value)


def predictions_bytes(predictions: np.ndarray, num_classes: int) -> bytes:
    """``predictions.npy``'s content: one uint8 class index per image."""
    predictions = np.asarray(predictions)
    if predictions.ndim != 1 or (len(predictions) and not 0 <= predictions.min() <= predictions.max() < num_classes):
        raise ValueError(f"expected one class index below {num_classes} per image, got shape {predictions.shape}")
    buffer = io.BytesIO()
    np.save(buffer, predictions.astype(np.uint8), allow_pickle=False)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _png(figure) -> bytes:
    """Render a figure to PNG bytes and free it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _pyplot().close(figure)
    return buffer.getvalue()


def confusion_figure(matrix: np.ndarray, class_names: list[str], accuracy: float) -> bytes:
    plt = _pyplot()
    matrix = np.asarray(matrix)
    fraction = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, axes = plt.subplots(figsize=(8, 7), dpi=100)
    image = axes.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"CIFAR-10 test confusion matrix (accuracy {accuracy:.1%})")
    for row in ticks:
        for column in ticks:
            axes.text(
                column, row, str(matrix[row, column]), ha="center", va="center", fontsize=8,
                color="white" if fraction[row, column] > 0.5 else "black",
            )
    figure.tight_layout()
    return _png(figure)


def samples_figure(
    images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, class_names: list[str]
) -> bytes:
    plt = _pyplot()
    count = min(32, len(labels))
    columns = 8
    rows = max(1, -(-count // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6), dpi=100, squeeze=False)
    for slot, axis in enumerate(axes.flat):
        axis.axis("off")
        if slot >= count:
            continue
        image = images[slot]
        shown = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)  # undo standardization for display
        axis.imshow(shown)
        right = predictions[slot] == labels[slot]
        axis.set_title(
            f"{class_names[predictions[slot]]}\n({class_names[labels[slot]]})",
            fontsize=7, color="green" if right else "red",
        )
    figure.suptitle("test images: predicted (true)", fontsize=9)
    figure.tight_layout()
    return _png(figure)


def _write_tensorboard(log_dir: Path, metrics: dict, confusion_png: bytes, samples_png: bytes) -> None:
    import tensorflow as tf

    shutil.rmtree(log_dir, ignore_errors=True)  # a re-evaluation replaces, never duplicates
    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        tf.summary.scalar("test_loss", metrics["test_loss"], step=0)
        tf.summary.scalar("test_accuracy", metrics["test_accuracy"], step=0)
        tf.summary.scalar("test_accuracy_plain", metrics["test_accuracy_plain"], step=0)
        for name, value in metrics["per_class_accuracy"].items():
            tf.summary.scalar(f"test_accuracy_per_class/{name}", value, step=0)
        for tag, png in (("confusion_matrix", confusion_png), ("test_samples", samples_png)):
            tf.summary.image(tag, tf.expand_dims(tf.image.decode_png(png, channels=4), 0), step=0)
    writer.flush()
    writer.close()


@dataclass
class _Evaluation:
    """What evaluate's phases pass on: the run, its test split and, once predicted, its figures."""

    model_path: Path
    run_dir: Path
    test_time_augmentation: str  # none, flip or flip_shift
    images: np.ndarray  # (N, 32, 32, 3) standardized test images, in the shard's order
    labels: np.ndarray  # (N,) true classes
    class_names: list[str]
    images_sha256: str  # the test shard's
    training: dict  # what train recorded (training_fields)
    validation_accuracy: float | None  # the last epoch's, from history.json
    plain: np.ndarray | None = None  # (N, classes) softmax of the images alone
    probabilities: np.ndarray | None = None  # (N, classes) mean softmax over the views

    @property
    def augmented(self) -> bool:
        return self.test_time_augmentation != "none"


def _load(model_path: Path, shards_dir: Path, run_dir: Path, source_md5: str | None,
          test_time_augmentation: str) -> _Evaluation:
    """Load phase: the test split and what train recorded, checked before any prediction."""
    if not model_path.is_file():
        raise MissingInputError(f"{model_path}: no trained model; run the train step first, with the same {RUN_PARAMS}")
    require_input(Path(shards_dir), "build_shards", SPLIT_PARAMS)
    training = training_fields(run_dir)
    validation_accuracy = last_validation_accuracy(run_dir)
    test_path = shard_path(shards_dir, "test")
    images, labels = load_split(test_path, source_md5)
    test_attrs = read_attrs(test_path)
    if test_time_augmentation not in TEST_TIME_AUGMENTATIONS:
        raise ValueError(f"test_time_augmentation must be one of {TEST_TIME_AUGMENTATIONS}, "
                         f"got {test_time_augmentation!r}")
    return _Evaluation(model_path, run_dir, test_time_augmentation, images, labels,
                       [str(name) for name in test_attrs["class_names"]], str(test_attrs["images_sha256"]),
                       training, validation_accuracy)


def _predict(run: _Evaluation, batch_size: int) -> None:
    """Predict phase: the model's softmax outputs on the images alone and over the test-time views."""
    import keras

    model = keras.models.load_model(run.model_path)
    run.plain, run.probabilities = predict_views(model, run.images, run.test_time_augmentation, batch_size)


def _summarize(run: _Evaluation) -> dict:
    """Summarize phase: ``metrics.json``'s figures (before ``finite_metrics``)."""
    metrics = summarize(run.probabilities, run.labels, run.class_names)
    metrics["test_time_augmentation"] = run.test_time_augmentation
    metrics["test_accuracy_plain"] = float((run.plain.argmax(axis=1) == run.labels).mean())
    metrics["test_accuracy_augmented"] = metrics["test_accuracy"] if run.augmented else None
    metrics["model"] = str(run.model_path)
    metrics["test_images_sha256"] = run.images_sha256
    metrics["validation_accuracy"] = run.validation_accuracy
    metrics.update(run.training)
    return metrics


def _write(run: _Evaluation, metrics: dict) -> dict:
    """Write phase: predictions, pictures, TensorBoard, then ``metrics.json``; returns the metrics as written."""
    run_dir, class_names = run.run_dir, run.class_names
    predicted = run.probabilities.argmax(axis=1)  # a row of NaN (a diverged model) counts as class 0
    confusion_png = confusion_figure(np.array(metrics["confusion_matrix"]), class_names, metrics["test_accuracy"])
    samples_png = samples_figure(run.images, run.labels, predicted, class_names)
    atomic_write_bytes(run_dir / PREDICTIONS, predictions_bytes(predicted, len(class_names)))
    if run.augmented:
        atomic_write_bytes(run_dir / PLAIN_PREDICTIONS, predictions_bytes(run.plain.argmax(axis=1), len(class_names)))
    else:
        (run_dir / PLAIN_PREDICTIONS).unlink(missing_ok=True)  # a re-evaluation without augmentation
    atomic_write_bytes(run_dir / CONFUSION_PNG, confusion_png)
    atomic_write_bytes(run_dir / SAMPLES_PNG, samples_png)
    _write_tensorboard(run_dir / TENSORBOARD / "test", metrics, confusion_png, samples_png)
    _report(run, metrics)
    metrics = finite_metrics(metrics)
    if not metrics["finite"]:
        log.warning("not finite (the model diverged?): %s; written as null in %s",
                    ", ".join(metrics["nonfinite"]), METRICS)
    save_json(run_dir / METRICS, metrics)
    return metrics


def _report(run: _Evaluation, metrics: dict) -> None:
    report(
        "evaluate: test accuracy %.4f%s  loss %.4f on %d images; worst class %s (%.3f); fingerprint %s%s",
        metrics["test_accuracy"],
        f" with test-time augmentation {run.test_time_augmentation} (plain {metrics['test_accuracy_plain']:.4f})"
        if run.augmented else "", metrics["test_loss"], len(run.labels),
        *min(metrics["per_class_accuracy"].items(), key=lambda item: item[1]),
        metrics["fingerprint"] or "unknown", "; training was truncated" if metrics["truncated"] else "",
    )


def _result(run: _Evaluation, metrics: dict) -> dict:
    run_dir = run.run_dir
    return {
        "metrics": str(run_dir / METRICS),
        "predictions": str(run_dir / PREDICTIONS),
        "confusion_matrix": str(run_dir / CONFUSION_PNG),
        "test_accuracy": metrics["test_accuracy"],
        "test_accuracy_plain": metrics["test_accuracy_plain"],
        "test_time_augmentation": run.test_time_augmentation,
        "test_loss": metrics["test_loss"],
        "fingerprint": metrics["fingerprint"],
        "truncated": metrics["truncated"],
    }


def evaluate(model_path: Path, shards_dir: Path, run_dir: Path, config: PipelineConfig | None = None, *,
             batch_size: int = 256) -> dict:
    """Evaluate ``model_path`` on ``shards_dir``'s ``test.h5``, writing into ``run_dir``; returns the headline
    metrics and file paths.

    ``config`` gives the source's MD5 the shard must carry and the test-time
    augmentation (``config.resolved_test_time_augmentation()``: ``none``,
    ``flip`` or ``flip_shift``); the headline figures (``test_accuracy``,
    ``test_loss``, the confusion matrix, ``predictions.npy``) are the
    augmented prediction's. Without ``config``: no MD5 check, no augmentation.

    Phases, in order: load (the test split, checked), predict, summarize,
    write.
    """
    source_md5 = None if config is None else config.source_md5
    kind = "none" if config is None else config.resolved_test_time_augmentation()
    run = _load(Path(model_path), Path(shards_dir), Path(run_dir), source_md5, kind)
    _predict(run, batch_size)
    metrics = _write(run, _summarize(run))
    return _result(run, metrics)
