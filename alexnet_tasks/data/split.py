"""Split CIFAR-10 into train, validation and test, and write the manifest.

The official 10,000 test images are the test split. ``validation_size``
images are held out of the 50,000 training images, stratified by class and
drawn with ``split_seed`` (the training ``seed`` plays no part, so runs that
differ only in it share one split and one shard set); ``train_limit``
optionally caps the rest (stratified too) for a quick run. The manifest
records the exact source indices and class counts of every split, and the
step fails, with the count, if any identical image (by content hash) appears
in two splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from alexnet_tasks.progress import report
from alexnet_tasks.atomic import artifact_lock, atomic_directory, remove_stale_temps
from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.jsonio import save_json
from alexnet_tasks.layout import MANIFEST, Layout
from alexnet_tasks.data.download import load_cifar10
from alexnet_tasks.errors import SOURCE_PARAMS, require_input

log = logging.getLogger(__name__)



def stratified_take(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``count`` indices with class shares as close as possible to ``labels``'.

    Each class gets its proportional share rounded down; the leftover places go
    to the classes with the largest remainders. Returns sorted indices.
    """
    if not 0 <= count <= len(labels):
        raise ValueError(f"cannot take {count} of {len(labels)} images")
    classes, sizes = np.unique(labels, return_counts=True)
    exact = sizes * count / len(labels)
    quota = np.floor(exact).astype(int)
    leftover = count - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    picked = [
        rng.permutation(np.flatnonzero(labels == cls))[:share]
        for cls, share in zip(classes, quota)
    ]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=int)


def content_hashes(images: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images]


def count_cross_split_duplicates(splits: dict[str, np.ndarray]) -> int:
    """Images whose exact content appears in more than one split."""
    owner: dict[bytes, str] = {}
    duplicates = 0
    for name, images in splits.items():
        for digest in set(content_hashes(images)):
            if owner.setdefault(digest, name) != name:
                duplicates += 1
    return duplicates


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()


def split(batch_dir: Path, artifacts_root: Path | None, config: PipelineConfig) -> dict:
    """Write ``data/<md5>/split-<key>/manifest.json`` under ``artifacts_root``; reuse it when already there.

    ``artifacts_root`` None: the default (``alexnet_tasks.layout.Layout()``).

    Returns ``{"manifest", "train", "validation", "test", "reused"}`` with the
    image count of each split. Concurrent calls for one split take turns on
    its lock: the second one reuses the first one's manifest.
    """
    require_input(Path(batch_dir), "download", SOURCE_PARAMS)
    layout = Layout(Path(artifacts_root)) if artifacts_root else Layout()
    final = layout.split(config)
    final.parent.mkdir(parents=True, exist_ok=True)
    with artifact_lock(final):
        return _split_locked(Path(batch_dir), config, final)


def _split_locked(batch_dir: Path, config: PipelineConfig, final: Path) -> dict:
    manifest_path = final / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        report("split: reusing %s", final)
        return _summary(manifest_path, manifest, reused=True)

    data = load_cifar10(batch_dir)
    config.check_against_source(len(data.train_labels))
    rng = np.random.default_rng(config.split_seed)
    validation = stratified_take(data.train_labels, config.validation_size, rng)
    remaining = np.setdiff1d(np.arange(len(data.train_labels)), validation)
    if config.train_limit is not None:
        chosen = stratified_take(data.train_labels[remaining], config.train_limit, rng)
        train = remaining[chosen]
    else:
        train = remaining
    test = np.arange(len(data.test_labels))

    duplicates = count_cross_split_duplicates(
        {
            "train": data.train_images[train],
            "validation": data.train_images[validation],
            "test": data.test_images[test],
        }
    )
    if duplicates:
        raise ValueError(
            f"{batch_dir}: {duplicates} identical image(s) appear in more than one split; "
            "refusing a split that leaks images between train, validation and test"
        )

    num_classes = len(data.class_names)
    manifest = {
        "source_md5": config.source_md5,
        "validation_size": config.validation_size,
        "split_seed": config.split_seed,
        "train_limit": config.train_limit,
        "class_names": list(data.class_names),
        "splits": {
            "train": {
                "source": "data_batch_1..5",
                "indices": train.tolist(),
                "class_counts": class_counts(data.train_labels[train], num_classes),
            },
            "validation": {
                "source": "data_batch_1..5",
                "indices": validation.tolist(),
                "class_counts": class_counts(data.train_labels[validation], num_classes),
            },
            "test": {
                "source": "test_batch",
                "indices": test.tolist(),
                "class_counts": class_counts(data.test_labels[test], num_classes),
            },
        },
    }
    remove_stale_temps(final)
    with atomic_directory(final, replace=True) as work:
        save_json(work / MANIFEST, manifest)
    report(
        "split: %d train, %d validation, %d test images; no image shared between splits",
        len(train), len(validation), len(test),
    )
    return _summary(manifest_path, manifest, reused=False)


def _summary(path: Path, manifest: dict, reused: bool) -> dict:
    counts = {name: len(part["indices"]) for name, part in manifest["splits"].items()}
    return {"manifest": str(path), **counts, "reused": reused}
