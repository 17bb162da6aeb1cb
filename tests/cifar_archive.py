"""Small CIFAR-10 archives in the official format, made by the tests themselves.

The official ``cifar-10-python.tar.gz`` is a gzip tar of ``cifar-10-batches-py/``
holding ``data_batch_1..5``, ``test_batch`` and ``batches.meta``: protocol-2
pickles written by Python 2, with bytes keys, uint8 rows of 3,072 values (R,
G and B planes) and label lists. ``write_archive`` writes exactly that, with
images whose class shows in their colour so that a tiny model can learn them.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: bytes as BINSTRING, numpy under numpy.core."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[bytes] = save_bytes


def py2_dumps(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def make_images(count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Rows of 3,072 uint8 values whose colour depends on the class, plus noise; all distinct."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASS_NAMES)
    rng.shuffle(labels)
    palette = np.random.default_rng(7).integers(30, 226, size=(len(CLASS_NAMES), 3))
    images = palette[labels][:, :, None, None] + rng.normal(0, 25, size=(count, 3, 32, 32))
    # A class-specific stripe so that shape matters too.
    for index, label in enumerate(labels):
        images[index, :, :, (label * 3) % 32] += 60
    rows = np.clip(images, 0, 255).astype(np.uint8).reshape(count, 3072)
    return rows, labels.tolist()


def batch_payload(title: str, rows: np.ndarray, labels: list[int]) -> dict:
    return {
        b"batch_label": title.encode(),
        b"labels": labels,
        b"data": rows,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }


def archive_members(train_per_batch: int = 40, test_count: int = 60, seed: int = 0) -> dict[str, bytes]:
    members = {}
    for number in range(1, 6):
        rows, labels = make_images(train_per_batch, seed * 100 + number)
        members[f"cifar-10-batches-py/data_batch_{number}"] = py2_dumps(
            batch_payload(f"training batch {number} of 5", rows, labels)
        )
    rows, labels = make_images(test_count, seed * 100 + 99)
    members["cifar-10-batches-py/test_batch"] = py2_dumps(batch_payload("testing batch 1 of 1", rows, labels))
    members["cifar-10-batches-py/batches.meta"] = py2_dumps(
        {
            b"label_names": [name.encode() for name in CLASS_NAMES],
            b"num_cases_per_batch": train_per_batch,
            b"num_vis": 3072,
        }
    )
    members["cifar-10-batches-py/readme.html"] = b"<html>CIFAR-10</html>"
    return members


def write_tar(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> Path:
    """A gzip tar with fixed metadata (so the same members give the same bytes)."""
    path = Path(path)
    with open(path, "wb") as raw:
        import gzip

        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped:
            with tarfile.open(fileobj=zipped, mode="w") as tar:
                folder = tarfile.TarInfo("cifar-10-batches-py")
                folder.type = tarfile.DIRTYPE
                folder.mode = 0o755
                tar.addfile(folder)
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(data))
                for info in extra or []:
                    tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def write_archive(path: Path, train_per_batch: int = 40, test_count: int = 60, seed: int = 0) -> tuple[Path, str]:
    """Write a small official-format archive; return (path, md5)."""
    write_tar(path, archive_members(train_per_batch, test_count, seed))
    return Path(path), md5_of(path)


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()
