"""Precompute standardized HDF5 shards, one file per split.

Each image is standardized exactly as ``tf.image.per_image_standardization``
does (mean 0, std 1, std floored at 1/sqrt(3072)) and stored as float32 at
the native 32x32, so one shard set serves every model input size: resizing
happens inside the model, on the accelerator. Images are chunked for
sequential batch reads and every dataset carries the fletcher32 checksum, so a
flipped byte fails loudly on read instead of feeding garbage to training.

All 60,000 images: about 740 MB on disk, a few seconds on two cores, and a
few hundred MB of peak memory (images are standardized in blocks).

Bad content (a flipped byte, another preprocessing version or source, a
missing shard) raises ``ShardError``, a permanent error; a read that failed in
the system (an I/O error, a lock, a permission) raises ``ShardReadError``,
which a retry may cure and which never makes ``build_shards`` touch the set.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import time
from pathlib import Path

import h5py
import numpy as np

from alexnet_tasks.progress import report
from alexnet_tasks.atomic import artifact_lock, atomic_directory, remove_stale_temps
from alexnet_tasks.config import IMAGE_SHAPE, PREPROCESSING_VERSION, PipelineConfig
from alexnet_tasks.layout import Layout, shard_name
from alexnet_tasks.data.download import load_cifar10
from alexnet_tasks.errors import SOURCE_PARAMS, SPLIT_PARAMS, PermanentError, require_input

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
CHUNK_IMAGES = 128  # 1.5 MB of float32 images per HDF5 chunk: one read serves several batches
BLOCK_IMAGES = 4096  # images standardized and written at a time (bounds peak memory)


class ShardError(PermanentError, ValueError):
    """A shard is missing, corrupt or of another preprocessing version; the message names it."""


class ShardReadError(OSError):
    """Reading a shard failed in the system, not in its content; the shard may be intact."""


# Errors of the system that say nothing about the file's content (HDF5 puts the errno in its message).
_CONTENT_ERRNOS = frozenset({errno.ENOENT, errno.EISDIR, errno.ENOTDIR})
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


def _read_failure(path: Path, error: OSError, what: str, hint: str = "") -> Exception:
    """``ShardReadError`` for a failure of the system, ``ShardError`` for bad content."""
    found = _ERRNO_IN_MESSAGE.search(str(error))
    code = error.errno or (int(found.group(1)) if found else 0)
    if code and code not in _CONTENT_ERRNOS:
        return ShardReadError(code, f"{path}: reading the shard failed ({error}); the shard was left as it is")
    return ShardError(f"{path}: {what} ({error}){hint}")


def standardize(images: np.ndarray) -> np.ndarray:
    """``tf.image.per_image_standardization`` on a batch of NHWC images, returned as float32.

    Same formula (mean 0, std 1, std floored at 1/sqrt(values per image));
    the statistics are computed in float64, which avoids the cancellation
    that float32 ``E[x^2] - E[x]^2`` suffers on nearly constant images.
    """
    flat = images.reshape(len(images), -1).astype(np.float64)
    mean = flat.mean(axis=1, keepdims=True)
    variance = np.maximum(np.square(flat).mean(axis=1, keepdims=True) - np.square(mean), 0.0)
    adjusted = np.maximum(np.sqrt(variance), 1.0 / np.sqrt(flat.shape[1]))
    return ((flat - mean) / adjusted).astype(np.float32).reshape(images.shape)


def shard_path(shards_dir: Path, split_name: str) -> Path:
    return Path(shards_dir) / shard_name(split_name)


def _write_split(
    path: Path,
    split_name: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    source_md5: str,
) -> str:
    count = len(images)
    digest = hashlib.sha256()
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset(
            "images",
            shape=(count, *IMAGE_SHAPE),
            dtype=np.float32,
            chunks=(max(1, min(CHUNK_IMAGES, count)), *IMAGE_SHAPE),
            fletcher32=True,
        )
        for start in range(0, count, BLOCK_IMAGES):
            block = standardize(images[start : start + BLOCK_IMAGES])
            dataset[start : start + len(block)] = block
            digest.update(block.tobytes())
        handle.create_dataset("labels", data=labels.astype(np.uint8), fletcher32=True, chunks=True)
        handle.attrs["split"] = split_name
        handle.attrs["count"] = count
        handle.attrs["class_names"] = np.array(class_names, dtype=h5py.string_dtype())
        handle.attrs["source_md5"] = source_md5
        handle.attrs["preprocessing_version"] = PREPROCESSING_VERSION
        handle.attrs["preprocessing"] = "tf.image.per_image_standardization, float32, 32x32x3 NHWC"
        handle.attrs["images_sha256"] = digest.hexdigest()
    log.info("shard %-10s %6d images  %7.1f MB", split_name, count, path.stat().st_size / 1e6)
    return digest.hexdigest()


def build_shards(batch_dir: Path, manifest_path: Path, artifacts_root: Path | None, config: PipelineConfig) -> dict:
    """Write ``train.h5``, ``validation.h5`` and ``test.h5`` for the manifest's splits under ``artifacts_root``.

    ``artifacts_root`` None: the default (``alexnet_tasks.layout.Layout()``).

    A complete, intact shard set already there is reused; one with bad
    content is rebuilt and moved aside to ``shards-….broken-*`` (not deleted:
    other runs may be reading it); one that could not be read
    (``ShardReadError``) is left as it is and the error raised. Concurrent
    calls for one shard set take turns on its lock: the second one reuses the
    first one's shards. Returns ``{"shards_dir", "<split>": path, "bytes",
    "reused"}``.
    """
    require_input(Path(batch_dir), "download", SOURCE_PARAMS)
    require_input(Path(manifest_path), "split", SPLIT_PARAMS)
    layout = Layout(Path(artifacts_root)) if artifacts_root else Layout()
    final = layout.shards(config)
    final.parent.mkdir(parents=True, exist_ok=True)
    with artifact_lock(final):
        return _build_locked(Path(batch_dir), Path(manifest_path), config, final)


def _build_locked(batch_dir: Path, manifest_path: Path, config: PipelineConfig, final: Path) -> dict:
    if final.exists():
        try:
            verify_shards(final, config.source_md5)
            report("build_shards: reusing verified shards %s", final)
            return _summary(final, reused=True)
        except ShardError as error:
            log.warning("existing shards are unusable, rebuilding: %s", error)
    remove_stale_temps(final)

    started = time.monotonic()
    manifest = json.loads(Path(manifest_path).read_text())
    if manifest.get("source_md5") != config.source_md5:
        raise ValueError(
            f"{manifest_path}: manifest is for source {manifest.get('source_md5')}, "
            f"expected {config.source_md5}"
        )
    data = load_cifar10(batch_dir)
    sources = {
        "train": (data.train_images, data.train_labels),
        "validation": (data.train_images, data.train_labels),
        "test": (data.test_images, data.test_labels),
    }
    with atomic_directory(final, replace=True) as work:
        digests = {}
        for split_name in SPLITS:
            indices = np.asarray(manifest["splits"][split_name]["indices"], dtype=np.int64)
            images, labels = sources[split_name]
            digests[split_name] = _write_split(
                shard_path(work, split_name),
                split_name,
                images[indices],
                labels[indices],
                list(data.class_names),
                config.source_md5,
            )
        (work / "images_sha256.json").write_text(json.dumps(digests, indent=2) + "\n")
    summary = _summary(final, reused=False)
    report(
        "build_shards: shards written to %s: %.1f MB in %.1f s",
        final, summary["bytes"] / 1e6, time.monotonic() - started,
    )
    return summary


def _summary(shards_dir: Path, reused: bool) -> dict:
    paths = {name: str(shard_path(shards_dir, name)) for name in SPLITS}
    size = sum(Path(p).stat().st_size for p in paths.values())
    return {"shards_dir": str(shards_dir), **paths, "bytes": size, "reused": reused}


# --------------------------------------------------------------------------- reading
def read_attrs(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard is missing")
    try:
        with h5py.File(path, "r") as handle:
            attrs = {key: handle.attrs[key] for key in handle.attrs}
            attrs["images_shape"] = handle["images"].shape
    except OSError as error:
        raise _read_failure(path, error, "not a readable shard") from None
    except KeyError as error:
        raise ShardError(f"{path}: not a readable shard ({error})") from None
    return attrs


def load_split(path: Path, expected_md5: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole shard into memory, checking every chunk's fletcher32 checksum.

    Raises ShardError naming the file on corruption, a wrong preprocessing
    version or a source other than ``expected_md5``; ShardReadError when the
    system failed to read it.
    """
    path = Path(path)
    attrs = read_attrs(path)
    if attrs.get("preprocessing_version") != PREPROCESSING_VERSION:
        raise ShardError(
            f"{path}: preprocessing version {attrs.get('preprocessing_version')}, "
            f"expected {PREPROCESSING_VERSION}; rebuild the shards"
        )
    if expected_md5 is not None and attrs.get("source_md5") != expected_md5:
        raise ShardError(f"{path}: built from source {attrs.get('source_md5')}, expected {expected_md5}")
    try:
        with h5py.File(path, "r") as handle:
            images = np.empty(handle["images"].shape, dtype=np.float32)
            digest = hashlib.sha256()
            for start in range(0, len(images), BLOCK_IMAGES):
                window = np.s_[start : start + BLOCK_IMAGES]
                handle["images"].read_direct(images, window, window)
                digest.update(images[window])
            labels = handle["labels"][...]
    except OSError as error:
        raise _read_failure(path, error, "shard data is corrupt", "; rerun build_shards") from None
    if digest.hexdigest() != attrs.get("images_sha256"):
        raise ShardError(f"{path}: image content does not match its recorded SHA-256")
    return images, labels


def verify_shards(shards_dir: Path, expected_md5: str | None = None) -> dict[str, int]:
    """Read every shard fully; raise ShardError on anything wrong. Returns image counts."""
    return {
        name: len(load_split(shard_path(shards_dir, name), expected_md5)[1]) for name in SPLITS
    }
