"""Transactions on the filesystem: build under a temporary name, then rename.

A reader either sees nothing or a complete artifact, never a partial one: a
killed process leaves only ``.tmp-*`` siblings behind, which no step reads and
the next writer of the same artifact removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMP_MARK = ".tmp-"


class DiskFullError(OSError):
    """The filesystem holding an artifact ran out of space; nothing partial was kept."""


def _is_disk_full(error: BaseException) -> bool:
    # h5py reports HDF5 write failures as OSError with the errno only in its message.
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        isinstance(error, OSError) and ("No space left on device" in str(error) or "errno = 28" in str(error))
    )


def _disk_full(final: Path, error: BaseException) -> DiskFullError:
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the filesystem of {final.parent} while writing {final.name}; "
        f"nothing was kept. Free space there (or point ALEXNET_ARTIFACTS elsewhere) and rerun ({error})",
    )


def temp_sibling(path: Path) -> Path:
    """A unique temporary name in the same folder (so the rename stays atomic)."""
    return path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(error):
            raise _disk_full(path, error) from None
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temps(final: Path) -> None:
    """Remove leftovers of earlier, killed attempts at building ``final``."""
    for leftover in final.parent.glob(f"{final.name}{TEMP_MARK}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success rename it to ``final``.

    On any error (a full disk, a bad input, a kill signal turned into an
    exception) the temporary folder is removed and ``final`` is untouched. If
    another process completed ``final`` meanwhile, its copy wins and ours is
    dropped, so concurrent builders of the same content never clash.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(final.parent)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(error):
            raise _disk_full(final, error) from None
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held while the block runs (released if the process dies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive_pid_lock(path: Path, what: str) -> Iterator[None]:
    """Hold ``path`` locked with this process's pid in it; refuse if another live process holds it.

    The kernel drops the lock when the holder dies, so a killed task never
    blocks its retry, while a duplicate delivery of the same task is refused.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RuntimeError(f"{path}: process {holder} is already {what}; refusing to run twice") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
