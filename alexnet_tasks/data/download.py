"""Download, verify and safely extract the CIFAR-10 python archive.

``download()`` fetches ``cifar-10-python.tar.gz`` from an http(s) URL, a
``file://`` URL or a plain path, checks its MD5 while streaming, extracts it
refusing every unsafe member, and loads every batch with a restricted
unpickler (numpy arrays and plain containers only) to check shapes and labels.
The result lands atomically in ``data/<md5>/source/``; a verified copy already
there is reused without fetching again. Concurrent downloads of one archive
take turns on its lock: the second one reuses the first one's copy.

A bad archive raises ``ArchiveError``, a permanent error; a source that cannot
be reached, answers 5xx/408/429 or stops mid-transfer raises
``SourceUnavailableError``, which a retry may cure.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import pickle
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from alexnet_tasks.progress import report
from alexnet_tasks.atomic import artifact_lock, atomic_directory, remove_stale_temps
from alexnet_tasks.config import CLASS_NAMES, IMAGE_SHAPE, Layout, save_json
from alexnet_tasks.errors import PermanentError, SourceUnavailableError

log = logging.getLogger(__name__)

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
ROW_VALUES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]  # 3,072 uint8 values per image
CHUNK = 1 << 20
# HTTP answers that say "not now" rather than "never": the request may pass on a later try.
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class ArchiveError(PermanentError, ValueError):
    """The archive is not a usable CIFAR-10 python archive; the message says why."""


@dataclass
class Cifar10:
    """The decoded archive: NHWC uint8 images and int labels, train batches 1..5 in order."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


# --------------------------------------------------------------------------- fetch
def _open_source(source_url: str) -> tuple[BinaryIO, int | None]:
    parsed = urllib.parse.urlparse(source_url)
    if parsed.scheme in ("http", "https"):
        try:
            response = urllib.request.urlopen(source_url, timeout=60)  # noqa: S310 (scheme checked)
        except urllib.error.HTTPError as error:
            message = f"{source_url}: HTTP {error.code} {error.reason}"
            if error.code in RETRYABLE_HTTP:
                raise SourceUnavailableError(f"{message}; the server may answer on a later try") from None
            raise ArchiveError(message) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            raise SourceUnavailableError(f"{source_url}: cannot connect ({reason})") from None
        length = response.headers.get("Content-Length")
        return response, int(length) if length and length.isdigit() else None
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
    elif not parsed.scheme:
        path = Path(source_url).expanduser()
    else:
        raise ArchiveError(
            f"{source_url}: unsupported source; expected an http(s):// or file:// URL or a path"
        )
    if not path.is_file():
        raise ArchiveError(f"{source_url}: no such file ({path})")
    return open(path, "rb"), path.stat().st_size


def fetch(source_url: str, destination: Path) -> str:
    """Stream ``source_url`` into ``destination``, logging progress; return the MD5."""
    source, total = _open_source(source_url)
    digest = hashlib.md5()
    received = 0
    next_report = 0.0
    started = time.monotonic()
    with source, open(destination, "wb") as out:
        while True:
            try:
                block = source.read(CHUNK)
            except (OSError, http.client.HTTPException) as error:
                raise SourceUnavailableError(
                    f"{source_url}: the transfer failed after {received} bytes ({error!r})"
                ) from None
            if not block:
                break
            out.write(block)
            digest.update(block)
            received += len(block)
            fraction = received / total if total else None
            if (fraction is not None and (fraction >= next_report or received == total)) or (
                fraction is None and received >= next_report
            ):
                elapsed = max(time.monotonic() - started, 1e-6)
                shown = f"{fraction:6.1%}" if fraction is not None else "   ?  "
                report(
                    "download %s %8.1f MB / %s  %6.1f MB/s",
                    shown,
                    received / 1e6,
                    f"{total / 1e6:.1f} MB" if total else "unknown",
                    received / 1e6 / elapsed,
                )
                next_report = (fraction + 0.1) if fraction is not None else received + 16 * CHUNK
    if total is not None and received != total:
        raise SourceUnavailableError(
            f"{source_url}: received {received} bytes, expected {total} (connection cut short)"
        )
    return digest.hexdigest()


def describe_bad_archive(path: Path) -> str:
    """Say what a file that is not the expected archive looks like."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    size = path.stat().st_size
    if not head:
        return "the file is empty"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "it is an HTML/XML page (an error page?), not a gzip archive"
    if head[:2] != b"\x1f\x8b":
        return f"it is not a gzip file (first bytes {head[:4].hex()}, {size} bytes)"
    return f"it is a gzip file of {size} bytes with different content"


# --------------------------------------------------------------------------- extract
def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or Path(name).is_absolute():
        raise ArchiveError(f"{archive}: refusing member with absolute path {name!r}")
    if ".." in parts:
        raise ArchiveError(f"{archive}: refusing member that escapes the folder {name!r}")
    if member.issym() or member.islnk():
        raise ArchiveError(f"{archive}: refusing link member {name!r} -> {member.linkname!r}")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"{archive}: refusing special member {name!r} (device, fifo or other)")


def extract(archive: Path, destination: Path) -> None:
    """Extract regular files and folders only; refuse the whole archive on any unsafe member."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            for member in members:
                target = destination / member.name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ArchiveError(
            f"{archive}: cannot read the archive, it is truncated or corrupt ({error})"
        ) from None


# --------------------------------------------------------------------------- unpickle
class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"forbidden global {module}.{name}: only numpy array reconstruction is allowed"
            )
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
        return getattr(np, name)


def load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            payload = RestrictedUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise ArchiveError(f"{path}: missing member {path.name}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ArchiveError(f"{path}: not a valid CIFAR-10 pickle ({error})") from None
    if not isinstance(payload, dict):
        raise ArchiveError(f"{path}: expected a dict, got {type(payload).__name__}")
    return payload


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle(path)
    data = batch.get(b"data")
    labels = batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_VALUES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise ArchiveError(
            f"{path}: b'data' must be uint8 rows of {ROW_VALUES} values, got shape {shape} dtype {dtype}"
        )
    if not isinstance(labels, list) or len(labels) != len(data):
        got = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise ArchiveError(f"{path}: b'labels' must list {len(data)} labels, got {got}")
    labels_array = np.asarray(labels, dtype=np.int64)
    if labels_array.size and (labels_array.min() < 0 or labels_array.max() >= num_classes):
        raise ArchiveError(f"{path}: labels must lie in 0..{num_classes - 1}")
    # Rows hold the R, G and B planes; store images as NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels_array.astype(np.uint8)


def load_cifar10(batch_dir: Path) -> Cifar10:
    """Load an extracted ``cifar-10-batches-py`` folder with the restricted unpickler."""
    batch_dir = Path(batch_dir)
    meta = load_pickle(batch_dir / META)
    names = meta.get(b"label_names")
    if not isinstance(names, list) or len(names) != len(CLASS_NAMES):
        raise ArchiveError(f"{batch_dir / META}: expected {len(CLASS_NAMES)} label names, got {names!r}")
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    train = [_read_batch(batch_dir / name, len(class_names)) for name in TRAIN_BATCHES]
    test_images, test_labels = _read_batch(batch_dir / TEST_BATCH, len(class_names))
    return Cifar10(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
    )


# --------------------------------------------------------------------------- step
def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(source_url: str, source_md5: str, artifacts_root: Path | None = None) -> dict:
    """Fetch, verify and extract the archive into the content-addressed source folder.

    Returns ``{"source_dir", "batch_dir", "source_md5", "train_images",
    "test_images", "reused"}``. Raises ``ArchiveError`` (a ValueError and a
    ``PermanentError``) naming the file and what was expected when anything is
    wrong, ``SourceUnavailableError`` when the source cannot be read now;
    nothing is left where a later step would read it. A cached copy that fails
    its checksum is replaced, and kept aside as ``source.broken-*``.
    """
    layout = Layout(Path(artifacts_root)) if artifacts_root else Layout()
    final = layout.source(source_md5)
    final.parent.mkdir(parents=True, exist_ok=True)
    with artifact_lock(final):
        return _download_locked(source_url, source_md5, layout, final)


def _download_locked(source_url: str, source_md5: str, layout: Layout, final: Path) -> dict:
    summary_path = final / "source.json"
    if summary_path.is_file() and (final / ARCHIVE_NAME).is_file():
        if _file_md5(final / ARCHIVE_NAME) == source_md5:
            summary = json.loads(summary_path.read_text())
            report("download: reusing verified archive %s", final / ARCHIVE_NAME)
            return {**summary, "reused": True}
        log.warning("cached archive %s fails its checksum; fetching again", final / ARCHIVE_NAME)
    elif final.exists():
        log.warning("%s is incomplete; fetching again", final)
    remove_stale_temps(final)
    started = time.monotonic()
    with atomic_directory(final, replace=True) as work:
        archive = work / ARCHIVE_NAME
        log.info("fetching %s", source_url)
        actual = fetch(source_url, archive)
        if actual != source_md5:
            raise ArchiveError(
                f"{source_url}: MD5 mismatch, expected {source_md5}, got {actual}; "
                f"{describe_bad_archive(archive)}"
            )
        extract(archive, work / "extracted")
        batch_dir = work / "extracted" / BATCH_DIR
        if not batch_dir.is_dir():
            raise ArchiveError(f"{source_url}: archive has no {BATCH_DIR}/ folder")
        try:
            data = load_cifar10(batch_dir)
        except ArchiveError as error:
            # Name the member inside the source, not the temporary folder it was read from.
            raise ArchiveError(str(error).replace(f"{work / 'extracted'}/", f"{source_url}!")) from None
        summary = {
            "source_md5": source_md5,
            "source_url": source_url,
            "source_dir": str(final),
            "batch_dir": str(layout.batches(source_md5)),
            "train_images": int(len(data.train_labels)),
            "test_images": int(len(data.test_labels)),
            "class_names": list(data.class_names),
        }
        save_json(work / "source.json", summary)
    report(
        "download: verified %s: %d training and %d test images in %.1f s",
        source_url, summary["train_images"], summary["test_images"], time.monotonic() - started,
    )
    return {**summary, "reused": False}
