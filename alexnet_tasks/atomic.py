"""Transactions on the filesystem: build under a temporary name, then rename.

A reader either sees nothing or a complete artifact, never a partial one: a
killed process leaves only ``.tmp-*`` siblings behind, which no step reads and
the next writer of the same artifact removes.

Each temporary names its owner (``<final>.tmp-<pid>-<start time>-<random>``)
and its owner holds a shared ``flock`` on it while it lives, so a leftover is
removed only once its owner is gone: never while another process, in this
container or another one sharing the folder, is still writing it. Builders of
one artifact also hold its lock file (``artifact_lock``) from the check for an
existing copy to the rename, so a second builder waits and reuses the first
one's result. A complete artifact found unusable is displaced to
``<final>.broken-<time>``, never deleted under processes that may be reading it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"
BROKEN_MARK = ".broken-"
_OWNER = re.compile(r"(\d+)-(\d+)-[0-9a-f]+")


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


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19].decode() if len(fields) > 19 else None


def temp_sibling(path: Path) -> Path:
    """A unique temporary name in the same folder (so the rename stays atomic), naming its owner."""
    pid = os.getpid()
    return path.with_name(f"{path.name}{TEMP_MARK}{pid}-{_start_time(pid) or 0}-{uuid.uuid4().hex[:8]}")


def _hold(path: Path) -> int:
    """Open ``path`` and take a shared lock on it: the mark of a live owner."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def owner_alive(leftover: Path) -> bool:
    """True while the process that made the temporary ``leftover`` may still be writing it.

    Its name gives the pid and start time of its owner: a process with both is
    alive here. Where the name says nothing (another pid namespace sharing the
    folder, an older name) the owner's shared lock on the temporary decides.
    """
    found = _OWNER.fullmatch(leftover.name.rsplit(TEMP_MARK, 1)[-1])
    if found and _start_time(int(found.group(1))) == found.group(2):
        return True
    if leftover.is_symlink():
        return False
    try:
        fd = os.open(leftover, os.O_RDONLY | (os.O_DIRECTORY if leftover.is_dir() else 0))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


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
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
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
    """Remove leftovers of earlier, killed attempts at building ``final``; keep those of live owners."""
    for leftover in final.parent.glob(f"{final.name}{TEMP_MARK}*"):
        if owner_alive(leftover):
            continue
        log.info("removing %s, left by a process that is gone", leftover)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step; False where the system cannot (then nothing moved)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(-100, os.fsencode(first), -100, os.fsencode(second), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def broken_name(final: Path) -> Path:
    """Where an unusable ``final`` goes: ``<final>.broken-<UTC time>-<pid>``."""
    return final.with_name(f"{final.name}{BROKEN_MARK}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}")


def _displace(new: Path, final: Path) -> Path:
    """Put the complete folder ``new`` in place of ``final``; keep the old one as ``<final>.broken-*``.

    Readers that hold files of the old folder open go on reading them; readers
    that open ``final`` afterwards find the new one (with no moment where it is
    missing, where the system can exchange two names atomically).
    """
    aside = broken_name(final)
    if exchange(new, final):
        os.rename(new, aside)
    else:
        os.rename(final, aside)
        os.rename(new, final)
    return aside


@contextlib.contextmanager
def atomic_directory(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success rename it to ``final``.

    On any error (a full disk, a bad input, a kill signal turned into an
    exception) the temporary folder is removed and ``final`` is untouched.
    The temporary carries its owner's pid and start time and is held locked
    while the block runs, so ``remove_stale_temps`` leaves it alone.

    If ``final`` exists when the block ends: with ``replace`` (the caller
    found it unusable) the new folder takes its place and the old one is kept
    as ``<final>.broken-*``; without, the existing copy wins and ours is
    dropped, so concurrent builders of the same content never clash.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir()
    held = _hold(tmp)
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if replace and final.exists():
            aside = _displace(tmp, final)
            log.warning("moved the unusable %s aside to %s; delete it when nothing reads it", final, aside.name)
        else:
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
    finally:
        os.close(held)


@contextlib.contextmanager
def file_lock(path: Path, what: str | None = None) -> Iterator[None]:
    """An exclusive advisory lock held while the block runs (released if the process dies).

    With ``what``, waiting for another holder is logged, naming it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            started = time.monotonic()
            if what:
                log.info("another process is building %s; waiting for it", what)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if what:
                log.info("waited %.1f s for %s", time.monotonic() - started, what)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def lock_path(final: Path) -> Path:
    """The lock file of the artifact ``final``: ``.<name>.lock`` beside it."""
    final = Path(final)
    return final.with_name(f".{final.name}.lock")


@contextlib.contextmanager
def artifact_lock(final: Path) -> Iterator[None]:
    """Hold ``final``'s lock from the check for a usable copy to the rename of a new one.

    Every builder of ``final`` takes it, so a second builder waits for the
    first one and then finds its result instead of building the same thing.
    """
    with file_lock(lock_path(final), what=str(final)):
        yield


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


@contextlib.contextmanager
def slot_lock(folder: Path, slots: int, poll_seconds: float = 2.0) -> Iterator[int]:
    """Hold one of ``slots`` numbered locks in ``folder`` (``slot-0.lock``...) while the block runs; yields its number.

    At most ``slots`` holders run the block at once, on every host sharing
    ``folder``; the others wait, polling every ``poll_seconds``. A holder
    that dies frees its slot. Raises ValueError when ``slots`` is below 1.
    """
    if slots < 1:
        raise ValueError(f"slots must be 1 or more, got {slots}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started, announced = time.monotonic(), False
    while True:
        for number in range(slots):
            handle = open(folder / f"slot-{number}.lock", "a+b")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            if announced:
                log.info("waited %.1f s for one of %d slots in %s", time.monotonic() - started, slots, folder)
            try:
                yield number
            finally:
                handle.close()
            return
        if not announced:
            log.info("all %d slots in %s are taken; waiting for one", slots, folder)
            announced = True
        time.sleep(poll_seconds)
