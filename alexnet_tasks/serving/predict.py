"""Score a folder of images with the champion: one line per image and a summary.

``predict(input_folder, published_root, output_dir)`` lists the PNG and JPEG
files under ``input_folder`` (recursively, in name order), reads each one in
any size and colour mode, converts it to RGB, resizes it to 32x32 and
standardizes it with ``alexnet_tasks.data.shards.standardize``: exactly what
the shards hold, so the model sees what training and evaluation saw (it
resizes to its own input size inside). The champion is the run
``published/latest`` points to (``Registry.champion``); its ``model.keras``
scores the images and its ``metrics.json`` names the classes.

It writes ``predictions.csv`` in ``output_dir``: a header ``file,
predicted_class, probability_<class>...`` and one line per scored image (the
file as listed, the class with the highest probability, the probability of
every class, softmax outputs that sum to 1), and ``summary.json``: the
champion, the number of images found, scored and skipped, each skipped file
with its reason, and how many images went to each class. A file that cannot
be read as an image is reported by name (a warning and ``skipped`` in the
summary) and left out; it never stops the batch. Both files are written
atomically: a failed run leaves the previous ones (or none).

Listing and reading go through fsspec (``fsspec.core.url_to_fs``), so
``input_folder`` may be a local folder or any fsspec URL whose filesystem is
installed; a local folder is the one tested. With an object-store artifacts
root, ``ops.stored_steps.predict`` fetches the store's inbox into this host's
cache and passes the store's registry (``registry=``): the champion's
folder, model included, is fetched into the cache, and ``input_name`` (the
inbox's URL) names the files in the output instead of the cache's paths.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from alexnet_tasks.atomic import atomic_write_bytes
from alexnet_tasks.config import IMAGE_SHAPE
from alexnet_tasks.errors import MissingInputError, PermanentError
from alexnet_tasks.jsonio import save_json
from alexnet_tasks.layout import LATEST, METRICS, MODEL
from alexnet_tasks.progress import report
from alexnet_tasks.release.registry import Registry

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
BATCH_IMAGES = 256  # images scored at a time (bounds memory: 256 x 32x32x3 float32 is 3 MB)


class NoChampionError(PermanentError):
    """There is no champion to score with (nothing published, or ``latest`` points to a run without its model)."""


def list_images(input_folder: str) -> tuple[object, list[str]]:
    """``(filesystem, paths)``: every PNG or JPEG file under ``input_folder``, recursively, sorted.

    ``input_folder`` is a local folder or an fsspec URL. Raises
    ``MissingInputError`` when it is not a folder.
    """
    from fsspec.core import url_to_fs

    filesystem, root = url_to_fs(str(input_folder))
    if not filesystem.isdir(root):
        raise MissingInputError(f"{input_folder}: not a folder of images (expected a folder of PNG or JPEG files)")
    paths = [path for path in filesystem.find(root) if path.lower().endswith(IMAGE_SUFFIXES)]
    return filesystem, sorted(paths)


def read_image(filesystem, path: str, name: str | None = None):
    """One image file as a ``(32, 32, 3)`` uint8 RGB array; ValueError naming the file when it is not an image.

    Any size and colour mode (greyscale, palette, RGBA, CMYK, 16-bit): Pillow
    converts it to RGB (transparency dropped) and resizes it with its
    antialiasing bicubic filter. ``name``: how the error names the file (default ``path``).
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with filesystem.open(path, "rb") as handle:
            data = handle.read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format not in ("PNG", "JPEG"):
                raise ValueError(f"a {image.format} image, expected PNG or JPEG")
            rgb = image.convert("RGB").resize(IMAGE_SHAPE[1::-1], Image.Resampling.BICUBIC)
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name or path}: not a readable PNG or JPEG image ({error})") from None
    return np.asarray(rgb, dtype=np.uint8)


def champion_model(published_root: Path, registry: Registry | None = None) -> tuple[dict, Path, list[str]]:
    """``(champion, model path, class names)`` of the run ``published/latest`` points to.

    ``registry`` reads ``published/`` on an object store (default: the
    folder ``published_root``); the champion's folder, model included, is
    then fetched into this host's cache. Raises ``NoChampionError`` without
    a champion, without its model or without the class names in its ``metrics.json``.
    """
    registry = registry or Registry(published_root)
    champion = registry.champion()
    if champion is None:
        raise NoChampionError(f"{registry.store.name_of(LATEST)}: no champion to score with; "
                              "publish a blessed run first")
    champion["folder"] = registry.store.folder(champion["path"], with_model=True)
    model_path = Path(champion["folder"]) / MODEL
    if not model_path.is_file():
        raise NoChampionError(f"{model_path}: the champion {champion['run_id']} has no model")
    names = (champion["metrics"] or {}).get("class_names")
    if not isinstance(names, list) or not names:
        raise NoChampionError(f"{Path(champion['folder']) / METRICS}: no class_names for the champion "
                              f"{champion['run_id']}")
    return champion, model_path, [str(name) for name in names]


def _names(input_folder: str, input_name: str | None):
    """How the output names a listed file: as listed, or ``input_name`` followed by its path below the folder."""
    if input_name is None:
        return lambda path: path
    from fsspec.core import url_to_fs

    root = url_to_fs(str(input_folder))[1].rstrip("/")
    return lambda path: input_name.rstrip("/") + path[len(root):]


def predict(input_folder: str, published_root: Path, output_dir: Path, *, batch_images: int = BATCH_IMAGES,
            registry: Registry | None = None, input_name: str | None = None) -> dict:
    """Score every image under ``input_folder`` with the champion; write ``predictions.csv`` and ``summary.json``.

    Returns the summary (``champion``, ``model``, ``images``, ``scored``,
    ``skipped`` (a list of ``{"file", "error"}``), ``per_class`` counts) with
    the two files' paths. Raises ``NoChampionError`` without a champion,
    ``MissingInputError`` when ``input_folder`` is not a folder; an
    unreadable image is skipped, never raised.

    ``registry``: ``published/`` on an object store (``champion_model``).
    ``input_name``: what the output calls ``input_folder`` (the URL of the
    store's inbox a local copy was fetched from): each file is named by it
    and its path below the folder. Default: the folder and the files as listed.
    """
    import keras
    import numpy as np

    from alexnet_tasks.data.shards import standardize

    champion, model_path, class_names = champion_model(Path(published_root), registry)
    filesystem, paths = list_images(input_folder)
    shown = _names(input_folder, input_name)
    report("predict: %d images under %s, champion %s", len(paths), input_name or input_folder, champion["run_id"])
    model = keras.models.load_model(model_path)
    header = ["file", "predicted_class"] + [f"probability_{name}" for name in class_names]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    skipped, per_class, scored = [], dict.fromkeys(class_names, 0), 0
    for start in range(0, len(paths), batch_images):
        names, images = [], []
        for path in paths[start:start + batch_images]:
            try:
                images.append(read_image(filesystem, path, shown(path)))
                names.append(shown(path))
            except ValueError as error:
                log.warning("%s; skipped", error)
                skipped.append({"file": shown(path), "error": str(error)})
        if not images:
            continue
        batch = standardize(np.stack(images))
        probabilities = np.asarray(model.predict(batch, batch_size=len(batch), verbose=0), dtype=np.float64)
        if probabilities.shape != (len(batch), len(class_names)):
            raise PermanentError(f"{model_path}: gave predictions of shape {probabilities.shape} for "
                                 f"{len(batch)} images of {len(class_names)} classes")
        for name, row in zip(names, probabilities):
            predicted = class_names[int(np.argmax(row))]
            per_class[predicted] += 1
            writer.writerow([name, predicted] + [f"{value:.6f}" for value in row])
        scored += len(names)
    output_dir = Path(output_dir)
    predictions_path = atomic_write_bytes(output_dir / PREDICTIONS_FILE, text.getvalue().encode())
    summary = {
        "input": input_name or str(input_folder),
        "champion": champion["run_id"],
        "model": str(model_path),
        "class_names": class_names,
        "images": len(paths),
        "scored": scored,
        "skipped": skipped,
        "per_class": per_class,
    }
    summary_path = save_json(output_dir / SUMMARY_FILE, summary)
    report("predict: %d scored, %d skipped (%s); %s", scored, len(skipped),
           ", ".join(Path(item["file"]).name for item in skipped) or "none", predictions_path)
    return {**summary, "predictions": str(predictions_path), "summary": str(summary_path)}
