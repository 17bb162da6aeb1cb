"""Download, verify and safely extract the CIFAR-10 python archive.

``download()`` fetches ``cifar-10-python.tar.gz`` from an http(s) URL, a
``file://`` URL or a plain path, checks its MD5 while streaming, extracts the
members the pipeline reads refusing every unsafe or oversized member (each
has a size bound, checked on its header and again on the bytes written), and
loads every batch with a restricted unpickler (numpy arrays, bytes and plain
containers at pickle protocols 0 to 5; nothing that can run code) to check
shapes and labels.
The result lands atomically in ``data/<md5>/source/``; a verified copy already
there is reused without fetching again. Concurrent downloads of one archive
take turns on its lock: the second one reuses the first one's copy.

A bad archive raises ``ArchiveError``, a permanent error; a source that cannot
be reached, answers 5xx/408/429 or stops mid-transfer raises
``SourceUnavailableError``, which a retry may cure.
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import gzip
import hashlib
import http.client
import json
import logging
import pickle
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
from alexnet_tasks.config import CLASS_NAMES, IMAGE_SHAPE
from alexnet_tasks.layout import ARCHIVE as ARCHIVE_NAME
from alexnet_tasks.layout import BATCHES as BATCH_DIR
from alexnet_tasks.layout import EXTRACTED, Layout
from alexnet_tasks.errors import PermanentError, SourceUnavailableError
from alexnet_tasks.jsonio import save_json

log = logging.getLogger(__name__)

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
# The members the pipeline reads, and the most bytes each may expand to. The official archive's
# largest member is data_batch_1, 30,949,709 bytes (every batch 30.95 MB, batches.meta 158 bytes;
# measured on the archive shared/cifar10/make_archive.py writes in the official format). A batch
# pickled again by Python 3 at protocol 1 or 2 stores its pixel bytes as UTF-8 text, 2 bytes for
# each value of 128 and more: 44.7 MB for the real data_batch_1, 61.9 MB when every pixel is 255.
# 64 MiB per batch holds that worst case with 8% to spare; 64 KiB is 400 times the real meta.
BATCH_MEMBER_LIMIT = 64 << 20
META_MEMBER_LIMIT = 64 << 10
MEMBER_LIMITS = {
    **{f"{BATCH_DIR}/{name}": BATCH_MEMBER_LIMIT for name in (*TRAIN_BATCHES, TEST_BATCH)},
    f"{BATCH_DIR}/{META}": META_MEMBER_LIMIT,
}
# What extraction may write in all: every member read at its limit (6 x 64 MiB + 64 KiB).
EXTRACT_LIMIT = sum(MEMBER_LIMITS.values())


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or Path(name).is_absolute():
        raise ArchiveError(f"{archive}: refusing member with absolute path {name!r}")
    if ".." in parts:
        raise ArchiveError(f"{archive}: refusing member that escapes the folder {name!r}")
    if member.issym() or member.islnk():
        raise ArchiveError(f"{archive}: refusing link member {name!r} -> {member.linkname!r}")
    if member.issparse():
        raise ArchiveError(f"{archive}: refusing sparse member {name!r} (declared {member.size} bytes)")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"{archive}: refusing special member {name!r} (device, fifo or other)")
    limit = MEMBER_LIMITS.get(name.rstrip("/"), BATCH_MEMBER_LIMIT)
    if member.isfile() and member.size > limit:
        raise ArchiveError(
            f"{archive}: refusing member {name!r}: it declares {member.size} bytes, more than the "
            f"{limit} bytes any CIFAR-10 member can take (the largest official one has 30,949,709)"
        )


def _copy_bounded(source: BinaryIO, out: BinaryIO, name: str, limit: int) -> int:
    """Copy ``source`` to ``out`` in chunks, refusing (before writing it) a chunk that passes ``limit`` bytes.

    Counts the bytes really read, whatever the tar header declared. Returns
    the bytes written; raises ``ArchiveError`` naming ``name`` and the limit.
    """
    written = 0
    while True:
        block = source.read(min(CHUNK, limit + 1 - written))
        if not block:
            return written
        if written + len(block) > limit:
            raise ArchiveError(f"refusing member {name!r}: it holds more than {limit} bytes")
        out.write(block)
        written += len(block)


def _not_gzip_but_tar(archive: Path) -> bool:
    with open(archive, "rb") as handle:
        if handle.read(2) == b"\x1f\x8b":
            return False
    try:
        return tarfile.is_tarfile(archive)
    except OSError:
        return False


def extract(archive: Path, destination: Path) -> list[str]:
    """Extract the members the pipeline reads (``MEMBER_LIMITS``); refuse the whole archive on any unsafe member.

    Every header is checked before anything is written: a link, a device, a
    sparse member, a path outside the folder, or a member declaring more
    bytes than its limit (``BATCH_MEMBER_LIMIT``, ``META_MEMBER_LIMIT``) is
    refused as it is read, before its content is decompressed. Members the
    pipeline does not read (``readme.html``, macOS ``._`` files) are skipped.
    While copying, the bytes really read are counted against the member's
    limit and ``EXTRACT_LIMIT`` for all of them. Returns the names written.
    Raises ``ArchiveError`` (permanent) naming the member; the caller's
    temporary folder then goes, so nothing is left behind.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            wanted = []
            for member in tar:  # headers one by one: a refusal comes before the member's content is read
                _check_member(archive, member)
                if member.isfile() and member.name in MEMBER_LIMITS:
                    wanted.append(member)
            written = 0
            for member in wanted:
                target = destination / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                limit = min(MEMBER_LIMITS[member.name], member.size, EXTRACT_LIMIT - written)
                with tar.extractfile(member) as source, open(target, "wb") as out:
                    try:
                        written += _copy_bounded(source, out, member.name, limit)
                    except ArchiveError as error:
                        raise ArchiveError(f"{archive}: {error} (declared {member.size} bytes)") from None
            return [member.name for member in wanted]
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        if _not_gzip_but_tar(archive):
            raise ArchiveError(
                f"{archive}: it is an intact tar archive but not gzip-compressed; the pipeline reads "
                f"{ARCHIVE_NAME} as published: compress it (gzip -n {archive.name}) and set source_md5 "
                f"to the compressed file's MD5"
            ) from None
        raise ArchiveError(
            f"{archive}: cannot read the archive, it is truncated or corrupt ({error})"
        ) from None


# --------------------------------------------------------------------------- unpickle
PICKLE_HELP = (
    "re-save the batch as a dict of a uint8 numpy array and a list of int labels with "
    "pickle.dump(batch, file, protocol=4)"
)
# Globals that run code, read or write files or the network, or import modules: refused as unsafe.
_UNSAFE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "pty", "socket",
    "ctypes", "code", "codeop", "pickle", "_pickle", "marshal", "types", "functools", "operator",
    "builtins", "__builtin__", "io", "_io", "pathlib", "tempfile", "multiprocessing", "threading",
    "webbrowser", "urllib", "http", "asyncio", "signal", "platform", "pdb", "timeit", "cProfile",
})


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as pickle protocols 0-2 use it for bytes: ``(str, "latin1")`` only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not how pickle stores bytes")
    return text.encode("latin1")


def _bytearray(*args: Any) -> bytearray:
    """``bytearray`` as pickle protocols 0-4 rebuild it: from bytes only (never a length to allocate)."""
    if len(args) > 1 or (args and not isinstance(args[0], bytes | bytearray)):
        raise pickle.UnpicklingError("bytearray is rebuilt from bytes only")
    return bytearray(*args)


def _container(kind: type) -> Any:
    def build(*args: Any) -> Any:
        if len(args) > 1 or (args and not isinstance(args[0], list | tuple | set | frozenset)):
            raise pickle.UnpicklingError(f"{kind.__name__} is rebuilt from a list only")
        return kind(*args)

    return build


def _complex(*args: Any) -> complex:
    if len(args) > 2 or not all(isinstance(arg, int | float) and not isinstance(arg, bool) for arg in args):
        raise pickle.UnpicklingError("complex is rebuilt from numbers only")
    return complex(*args)


def _numpy_globals() -> dict[str, Any]:
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
    frombuffer = np.ndarray.__reduce_ex__(np.zeros(1), 5)[0]  # numpy's own _frombuffer
    scalar = np.uint8(0).__reduce__()[0]  # numpy's own scalar
    table = {}
    for package in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 module names
        table[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{package}.numeric", "_frombuffer")] = frombuffer
        table[(f"{package}.multiarray", "scalar")] = scalar
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    return table


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` for numpy arrays only (protocol 0 and 1 objects without a ``__reduce__``)."""
    if not (isinstance(cls, type) and issubclass(cls, np.ndarray) and base in (np.ndarray, object)):
        raise pickle.UnpicklingError("copyreg._reconstructor is allowed for numpy arrays only")
    return copyreg._reconstructor(cls, base, state)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, bytes and plain containers at every protocol Python 3 writes (0 to 5).

    Allowed: numpy's reconstruction functions under their numpy 1 and 2 names
    (``_reconstruct``, ``_frombuffer``, ``scalar``, ``ndarray``, ``dtype``),
    ``_codecs.encode`` for bytes at protocols 0-2, ``bytearray``, ``set``,
    ``frozenset``, ``complex`` and ``collections.OrderedDict`` (under Python 3
    and Python 2 names), ``copyreg._reconstructor`` for arrays. Any other
    global raises ``pickle.UnpicklingError``: one that could run code says
    so and nothing runs; another names the object and how to re-save.
    Protocol 5 out-of-band buffers are refused the same way.
    """

    _ALLOWED = {
        **_numpy_globals(),
        **{(module, name): build for module in ("builtins", "__builtin__") for name, build in (
            ("bytearray", _bytearray), ("set", _container(set)), ("frozenset", _container(frozenset)),
            ("complex", _complex))},
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): _container(collections.OrderedDict),
        ("copyreg", "_reconstructor"): _reconstructor,
        ("copy_reg", "_reconstructor"): _reconstructor,
    }

    def __init__(self, file: BinaryIO, *args: Any, **kwargs: Any):
        super().__init__(file, *args, **kwargs)
        self.protocol = "0 or 1"
        if file.seekable():
            start = file.tell()
            head = file.read(2)
            file.seek(start)
            if len(head) == 2 and head[0] == 0x80:
                self.protocol = str(head[1])

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        # Python 2 names (commands, __builtin__...) are judged by the Python 3 module they load.
        python3_module = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(
            module, module), name))[0]
        if {module.split(".")[0], python3_module.split(".")[0]} & _UNSAFE_MODULES:
            raise pickle.UnpicklingError(
                f"forbidden global {module}.{name}: it could run code, so it was not loaded and nothing ran"
            )
        raise pickle.UnpicklingError(
            f"pickle protocol {self.protocol} stores a {module}.{name} object, which the loader does not "
            f"rebuild (it reads numpy arrays, bytes and plain containers only); {PICKLE_HELP}"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(
            f"pickle protocol {self.protocol} refers to a persistent object ({pid!r}), which the loader "
            f"cannot resolve; {PICKLE_HELP}"
        )


def load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            payload = RestrictedUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise ArchiveError(f"{path}: missing member {path.name}") from None
    except pickle.UnpicklingError as error:
        if "out-of-band" in str(error):
            raise ArchiveError(
                f"{path}: a pickle protocol 5 file whose arrays were written out-of-band (buffer_callback), "
                f"so their data is not in the file; {PICKLE_HELP}"
            ) from None
        raise ArchiveError(f"{path}: not a valid CIFAR-10 pickle ({error})") from None
    except ValueError as error:
        if "unsupported pickle protocol" in str(error):
            raise ArchiveError(
                f"{path}: {error}; Python 3.11 reads protocols 0 to 5: {PICKLE_HELP}"
            ) from None
        raise ArchiveError(f"{path}: not a valid CIFAR-10 pickle ({error})") from None
    except MemoryError as error:  # an array shape no real batch has (numpy refuses to allocate it)
        raise ArchiveError(f"{path}: not a valid CIFAR-10 pickle, it asks for an impossible array ({error})") from None
    except (EOFError, TypeError, AttributeError) as error:
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
        extract(archive, work / EXTRACTED)
        batch_dir = work / EXTRACTED / BATCH_DIR
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
