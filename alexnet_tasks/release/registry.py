"""The registry of published runs: ``published/index.jsonl``, the champion, and the lookup table.

``published/index.jsonl`` is the table of runs: one JSON object per line,
appended once per publish and never rewritten. A run id published again (a
retrained run, a recorded run now blessed) gets a new line; **a run's last
line is its entry**, and the runs are ordered by their entries' positions
(publish order). Each line holds ``INDEX_FIELDS``; lines written before a
field existed lack it and read it as None; a line that is not a JSON object
with a string ``run_id`` and ``path`` is malformed: it is skipped with one
warning naming the file and line, by every reader (publish, gate, retention,
the UI), and never stops a publish.

``published/latest`` (a relative symlink ``runs/<run>``) names the champion;
``promote`` moves it in one atomic rename and appends the change to
``published/promotions.jsonl``, the promotion history: one JSON object per
change of champion (``PROMOTION_FIELDS``: when, the new and the previous run,
why, who and the Airflow run that made it), appended and never rewritten. A
malformed history line is skipped with one warning naming the file and line,
as an index line is.

``published/index.sqlite`` is a lookup table derived from ``index.jsonl``:
one row per run (its entry, its position and the columns a page filters on),
so finding one run or one page of runs reads a few rows rather than every
line. It is brought up to date from the bytes appended since it was last
read, rebuilt whole when ``index.jsonl`` was replaced or rewritten, and may be deleted at
any time. Where ``published/`` is not writable it is built in memory.

Storage goes through ``LocalStore`` (a folder on a local disk) or ``S3Store``
(an S3 bucket, without rename, lock or symlink: conditional writes instead),
which implement the same few methods. Imports nothing heavy (no TensorFlow, NumPy or h5py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from typing import TYPE_CHECKING

from alexnet_tasks.atomic import atomic_write_bytes, file_lock, temp_sibling
from alexnet_tasks.layout import (
    INDEX, INDEX_TABLE, LATEST, METRICS, MODEL, PROMOTIONS, PUBLISHED, RUNS, TENSORBOARD, data_key, published_path,
)

if TYPE_CHECKING:
    from alexnet_tasks.config import PipelineConfig

log = logging.getLogger(__name__)

# Copied from metrics.json into the index line (null where metrics.json lacks them).
TRAINING_INDEX_FIELDS = ("fingerprint", "truncated", "epochs_run", "epochs_planned", "devices", "seconds",
                         "validation_accuracy", "test_time_augmentation", "test_accuracy_plain")
# Every field of an index line. The first five are in every line ever written; lines written
# before the others existed lack them, and reading fills them with None.
INDEX_FIELDS = ("run_id", "published_at", "test_accuracy", "test_loss", "path") + TRAINING_INDEX_FIELDS + (
    "config", "data_key", "code_version", "blessed", "reasons", "hyperparameters", "approval", "sweep", "trial",
)
# Lines written before ``reasons`` held the decision's reasons joined by "; " as ``blessed_reason``.
_OLD_REASONS = "blessed_reason"
# Lines written before ``hyperparameters`` held them as ``train_settings``.
_OLD_HYPERPARAMETERS = "train_settings"
LATER_INDEX_FIELDS = INDEX_FIELDS[5:]
# The columns a page of runs can be filtered on: name -> the value an entry gives it.
FILTERS = {
    "blessed": lambda line: line.get("blessed"),
    "recipe": lambda line: (line.get("config") or {}).get("recipe") if isinstance(line.get("config"), dict) else None,
    "data_key": lambda line: line.get("data_key"),
    "sweep": lambda line: line.get("sweep"),  # the run id of the sweep a trial belongs to
}
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_SCHEMA_VERSION = "3"
# Why a run became the champion: the gate blessed it (publish_mode gated or always), a named user
# approved the gate's blessing (publish_mode approval), or a named user promoted it by hand
# (the alexnet_cifar10_promote DAG).
PROMOTION_REASONS = ("gate", "approved", "by_hand")
# Every field of a promotion history line. ``changed_at`` is ISO 8601 UTC; ``previous_*`` are None
# for the first champion; ``user`` is None for the gate; ``comment`` is the user's words (or None).
PROMOTION_FIELDS = ("changed_at", "run_id", "path", "fingerprint", "previous_run_id", "previous_path", "reason",
                    "user", "comment", "dag_id", "dag_run_id")


# --------------------------------------------------------------------------- one line
def index_line(
    run_id: str,
    metrics: dict,
    published_at: str,
    config: PipelineConfig | None,
    code_version: dict | str | None = None,
    decision: dict | None = None,
    hyperparameters: dict | None = None,
    approval: dict | None = None,
    sweep: dict | None = None,
) -> dict:
    """The index line of a publish: every field of ``INDEX_FIELDS`` (README, "Artifacts").

    ``metrics`` is the run's ``metrics.json`` (``test_accuracy`` and
    ``test_loss`` required), ``published_at`` an ISO 8601 UTC time,
    ``decision`` the gate's ``decision.json`` (None: blessed and its reasons null),
    ``approval`` the run's ``approval.json`` (publish_mode approval; None otherwise).
    ``sweep`` for a sweep's trial ``{"sweep": <sweep run id>, "trial": <what it changes>}``
    (None: both fields null).
    """
    return {
        "run_id": run_id,
        "published_at": published_at,
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "path": published_path(run_id),
        **{key: metrics.get(key) for key in TRAINING_INDEX_FIELDS},
        "config": None if config is None else config.to_dict(),
        "data_key": None if config is None else data_key(config),
        "code_version": code_version,
        "blessed": None if decision is None else decision["blessed"],
        "reasons": None if decision is None else list(decision.get("reasons", [])),
        "hyperparameters": hyperparameters,
        "approval": approval,
        "sweep": None if sweep is None else sweep["sweep"],
        "trial": None if sweep is None else sweep["trial"],
    }


def parse_line(text: str | bytes, where: str) -> dict | None:
    """An index line as a dict with every field of ``INDEX_FIELDS``; None (and a warning) when malformed.

    ``where`` names the line in the warning (``.../index.jsonl:12``).
    Malformed: not JSON, not an object, or no string ``run_id`` and ``path``.
    """
    line = _object_line(text, where, "an index line")
    return None if line is None else _with_every_field(line)


def _object_line(text: str | bytes, where: str, kind: str) -> dict | None:
    """The one policy for a malformed line of index.jsonl or promotions.jsonl: warn naming it, return None."""
    try:
        line = json.loads(text)
    except ValueError as error:
        log.warning("%s: not valid JSON (%s); skipped", where, error)
        return None
    if not isinstance(line, dict) or not isinstance(line.get("run_id"), str) or not isinstance(line.get("path"), str):
        log.warning("%s: not %s (a JSON object with a string run_id and path); skipped", where, kind)
        return None
    return line


def parse_history_line(text: str | bytes, where: str) -> dict | None:
    """A promotion history line with every field of ``PROMOTION_FIELDS``; None (and a warning) when malformed.

    Malformed, as for the index: not JSON, not an object, or no string
    ``run_id`` and ``path``. ``where`` names the line in the warning.
    """
    line = _object_line(text, where, "a promotion line")
    return None if line is None else {key: line.get(key) for key in PROMOTION_FIELDS}


def _with_every_field(line: dict) -> dict:
    """``line`` with the old names of ``reasons`` and ``hyperparameters`` read, and the fields it lacks set to None."""
    if _OLD_REASONS in line:
        old = line.pop(_OLD_REASONS)
        line.setdefault("reasons", [old] if isinstance(old, str) and old else None)
    if _OLD_HYPERPARAMETERS in line:
        line.setdefault("hyperparameters", line.pop(_OLD_HYPERPARAMETERS))
    for key in INDEX_FIELDS:
        line.setdefault(key, None)
    return line


def same_entry(first: dict, second: dict) -> bool:
    """Whether two entries record the same publish: run, folder, known fingerprint and decision."""
    return (first["run_id"] == second["run_id"] and first["path"] == second["path"]
            and first["fingerprint"] is not None and first["fingerprint"] == second["fingerprint"]
            and first["blessed"] == second["blessed"])


# --------------------------------------------------------------------------- storage
class LocalStore:
    """``published/`` on a local disk: an appended file, a lock, a symlink, a lookup table beside them.

    The registry's only storage calls; another store provides the same
    methods. On an object store (no append, lock, rename or symlink; ``S3Store``) they map
    to: ``index_version`` the index object's name and size, ``read_index`` a
    ranged GET, ``append_index`` a rewrite of the object conditional on the
    ETag read (``If-Match``, retried on conflict) with ``index_lock`` doing
    nothing, ``champion_path``/``point_champion`` a pointer object moved the
    same way, and ``table_path`` a file in the host's local cache.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def exists(self) -> bool:
        return (self.root / INDEX).is_file()

    def index_name(self) -> str:
        return str(self.root / INDEX)

    def index_version(self) -> tuple[int, int] | None:
        """(identity, size) of the index: the identity changes when the file is replaced, not appended to."""
        try:
            stat = os.stat(self.root / INDEX)
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_size

    def read_index(self, start: int, end: int | None = None) -> bytes:
        """The index's bytes from ``start`` (to ``end``)."""
        with open(self.root / INDEX, "rb") as handle:
            handle.seek(start)
            return handle.read() if end is None else handle.read(end - start)

    @contextlib.contextmanager
    def index_lock(self) -> Iterator[None]:
        """Held by one writer of the index at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / f".{INDEX}.lock"):
            yield

    def _append_lines(self, name: str, text: bytes) -> None:
        """Append complete lines to ``name``, durably; a partial last line left by a killed writer is cut first."""
        with open(self.root / name, "a+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            complete = _complete_length(handle, size)
            if complete != size:  # a writer killed mid-line: that line was never complete, nor read
                handle.truncate(complete)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def append_index(self, text: bytes) -> None:
        """Append complete lines to the index, durably. Called with ``index_lock`` held."""
        self._append_lines(INDEX, text)

    def champion_path(self) -> str | None:
        """Where ``latest`` points (``runs/<run>``), or None."""
        try:
            return os.readlink(self.root / LATEST)
        except OSError:
            return None

    @contextlib.contextmanager
    def champion_lock(self) -> Iterator[None]:
        """Held by one writer of ``latest`` and the promotion history at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / f".{LATEST}.lock"):
            yield

    def point_champion(self, path: str) -> None:
        """Point ``latest`` at ``path`` in one atomic rename. Called with ``champion_lock`` held."""
        link = self.root / LATEST
        tmp = temp_sibling(link)
        os.symlink(path, tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def history_name(self) -> str:
        return str(self.root / PROMOTIONS)

    def read_history(self) -> bytes:
        """The promotion history's bytes (empty when there is none yet)."""
        try:
            return (self.root / PROMOTIONS).read_bytes()
        except FileNotFoundError:
            return b""

    def append_history(self, text: bytes) -> None:
        """Append complete lines to the promotion history, durably. Called with ``champion_lock`` held."""
        self._append_lines(PROMOTIONS, text)

    def read_json(self, path: str, name: str) -> dict | None:
        """A JSON object of a published run folder (``path`` as in its index line), or None if unreadable."""
        try:
            payload = json.loads((self.root / path / name).read_text())
        except (OSError, ValueError):
            return None
        return payload if isinstance(payload, dict) else None

    def folder(self, path: str, with_model: bool = False) -> Path:
        """The published folder ``path`` (``runs/<run>``) on this disk."""
        return self.root / path

    def has_file(self, path: str, name: str) -> bool:
        """Whether the published folder ``path`` holds the file ``name`` (``model.keras``)."""
        return (self.root / path / name).is_file()

    def name_of(self, name: str) -> str:
        """The file ``name`` under ``published/`` as messages name it: its path on this disk."""
        return str(self.root / name)

    def read_bytes(self, name: str) -> bytes | None:
        """The file ``name`` under ``published/`` (``sweeps/<run>.json``), or None when it does not exist."""
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace the file ``name`` under ``published/`` in one atomic rename."""
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / name, data)

    def put_folder(self, path: str, local: Path) -> None:
        """Make ``local`` the published folder ``path``: here it already is (publish builds it in place)."""
        if Path(local).resolve() != (self.root / path).resolve():
            raise ValueError(f"{local}: expected the published folder {self.root / path}")

    def table_path(self) -> Path:
        """Where the lookup table lives (for a remote store: a file in the host's cache)."""
        return self.root / INDEX_TABLE


class S3Store:
    """``published/`` on an S3 bucket: the same methods as ``LocalStore``, on conditional writes.

    ``location`` is a parsed ``s3://bucket/prefix`` (``store.parse_location``);
    ``client`` a boto3 S3 client (default: boto3's, with its usual
    credentials and ``AWS_ENDPOINT_URL``). There is no append, lock, rename or
    symlink: ``index.jsonl`` is one object that each append rewrites as
    itself plus the new lines, conditional on the ETag it read
    (``If-Match``; ``If-None-Match: *`` for the first line), and ``latest`` an
    object holding the champion's path (``runs/<run>``), moved the same way;
    a conflict (HTTP 412, or 409 while another write is in progress) reads
    again and retries. A reader sees the index and the pointer before or
    after a write, never half of one. The lookup table lives in this host's
    cache (``$ALEXNET_CACHE``).
    """

    CONFLICTS = ("PreconditionFailed", "ConditionalRequestConflict")
    ATTEMPTS = 100

    def __init__(self, location, client=None, cache: Path | None = None):
        from alexnet_tasks.store import cache_root

        if location.scheme != "s3":
            raise ValueError(f"{location.value}: S3Store needs an s3://bucket/prefix URL")
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.location = location
        self.client = client
        self.bucket, _, prefix = location.path.partition("/")
        self.prefix = f"{prefix}/{PUBLISHED}" if prefix else PUBLISHED
        self.cache = Path(cache or cache_root())

    @classmethod
    def from_connection(cls, location, conn_id: str | None = None, cache: Path | None = None) -> S3Store:
        """The store with the boto3 client of an Airflow ``aws`` connection (Airflow's S3 hook).

        ``conn_id`` defaults to ``$ALEXNET_ARTIFACTS_CONN_ID`` or ``aws_default``.
        """
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from alexnet_tasks.store import connection_id

        return cls(location, S3Hook(aws_conn_id=conn_id or connection_id()).get_conn(), cache)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _head(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise

    def _get(self, name: str, **ranged) -> tuple[bytes, str] | None:
        """The object's bytes (a ``Range`` if given) and its ETag, or None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key(name), **ranged)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return answer["Body"].read(), answer["ETag"]

    def _swap(self, name: str, change) -> None:
        """Replace object ``name`` with ``change(current bytes or None)``, conditional on what was read; retried."""
        from botocore.exceptions import ClientError

        for _ in range(self.ATTEMPTS):
            current = self._get(name)
            condition = {"IfNoneMatch": "*"} if current is None else {"IfMatch": current[1]}
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key(name),
                                       Body=change(None if current is None else current[0]), **condition)
                return
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in self.CONFLICTS:
                    raise
        raise TimeoutError(f"s3://{self.bucket}/{self.key(name)}: still changed by other writers after "
                           f"{self.ATTEMPTS} attempts")

    def exists(self) -> bool:
        return self._head(INDEX) is not None

    def index_name(self) -> str:
        return f"s3://{self.bucket}/{self.key(INDEX)}"

    def index_version(self) -> tuple[str, int] | None:
        """(the index's URL, its size): every append changes the ETag, so the table tells a rewrite by its tail."""
        head = self._head(INDEX)
        return None if head is None else (self.index_name(), head["ContentLength"])

    def read_index(self, start: int, end: int | None = None) -> bytes:
        """The index's bytes from ``start`` (to ``end``), by a ranged GET (an appended index keeps its prefix)."""
        from botocore.exceptions import ClientError

        if end is not None and end <= start:
            return b""
        try:
            found = self._get(INDEX, Range=f"bytes={start}-{'' if end is None else end - 1}")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "InvalidRange":  # start at the end: nothing more
                return b""
            raise
        return b"" if found is None else found[0]

    @contextlib.contextmanager
    def index_lock(self) -> Iterator[None]:
        """No lock: each append is a conditional rewrite."""
        yield

    def append_index(self, text: bytes) -> None:
        """Append complete lines: a rewrite conditional on the ETag read, retried on conflict."""
        self._swap(INDEX, lambda current: (current or b"") + text)

    def champion_path(self) -> str | None:
        """The path the ``latest`` object holds (``runs/<run>``), or None."""
        found = self._get(LATEST)
        return None if found is None else found[0].decode().strip() or None

    @contextlib.contextmanager
    def champion_lock(self) -> Iterator[None]:
        """No lock: ``latest`` and the history each move by a conditional rewrite (compare-and-swap)."""
        yield

    def point_champion(self, path: str) -> None:
        """Point ``latest`` at ``path``: a write conditional on the ETag read (compare-and-swap), retried."""
        self._swap(LATEST, lambda current: path.encode())

    def history_name(self) -> str:
        return f"s3://{self.bucket}/{self.key(PROMOTIONS)}"

    def read_history(self) -> bytes:
        """The promotion history's bytes (empty when there is none yet)."""
        found = self._get(PROMOTIONS)
        return b"" if found is None else found[0]

    def append_history(self, text: bytes) -> None:
        """Append complete lines to the history: a rewrite conditional on the ETag read, retried on conflict."""
        self._swap(PROMOTIONS, lambda current: (current or b"") + text)

    def read_json(self, path: str, name: str) -> dict | None:
        """A JSON object of a published run folder on the store, or None if missing or unreadable."""
        found = self._get(f"{path}/{name}")
        try:
            payload = None if found is None else json.loads(found[0])
        except ValueError:
            return None
        return payload if isinstance(payload, dict) else None

    def folder(self, path: str, with_model: bool = False) -> Path:
        """This host's cached copy of the published folder ``path`` (``runs/<run>``), fetched now.

        Every object of the folder is fetched (each under a temporary name,
        then renamed) except ``model.keras`` and the TensorBoard logs, unless
        ``with_model``; a folder the store does not have is an empty one.
        """
        from alexnet_tasks.store import note_etags, noted_etags

        local = self.cache / PUBLISHED / path
        noted, fetched = noted_etags(local), {}
        for name, (size, etag) in self._listing(path, etags=True).items():
            if (name == MODEL and not with_model) or name.startswith(f"{TENSORBOARD}/"):
                continue
            target = local / name
            if target.is_file() and target.stat().st_size == size and noted.get(name) == etag:
                continue  # this host holds the object's current version (its ETag noted at the last fetch)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = temp_sibling(target)
            try:
                self.client.download_file(self.bucket, self.key(f"{path}/{name}"), str(temporary))
                os.replace(temporary, target)
            finally:
                temporary.unlink(missing_ok=True)
            fetched[name] = etag
        note_etags(local, fetched)
        return local

    def has_file(self, path: str, name: str) -> bool:
        """Whether the published folder ``path`` on the store holds the object ``name`` (a HEAD, nothing fetched)."""
        return self._head(f"{path}/{name}") is not None

    def name_of(self, name: str) -> str:
        """The object ``name`` under ``published/`` as messages name it: its ``s3://`` URL."""
        return f"s3://{self.bucket}/{self.key(name)}"

    def _listing(self, path: str, etags: bool = False) -> dict:
        """``{relative name: size}`` of every object under the published folder ``path`` (``(size, ETag)`` with ``etags``)."""
        prefix = self.key(f"{path}/")
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"][len(prefix):]] = (item["Size"], item.get("ETag")) if etags else item["Size"]
        return found

    def read_bytes(self, name: str) -> bytes | None:
        """The object ``name`` under ``published/`` (``sweeps/<run>.json``), or None when it does not exist."""
        found = self._get(name)
        return None if found is None else found[0]

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace the object ``name`` under ``published/`` (one PUT: readers see the old or the new one)."""
        self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data)

    def put_folder(self, path: str, local: Path) -> None:
        """Make the published folder ``path`` on the store hold exactly the files of ``local``.

        Every file is uploaded (``metrics.json`` last), then the objects
        ``local`` does not have are removed. The index line written after it
        is what makes the folder visible to readers.
        """
        local = Path(local)
        names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        names.sort(key=lambda name: name == METRICS)
        for name in names:
            self.client.upload_file(str(local / name), self.bucket, self.key(f"{path}/{name}"))
        for name in set(self._listing(path)) - set(names):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(f"{path}/{name}"))

    def table_path(self) -> Path:
        """The lookup table: a file in this host's cache, one per store."""
        digest = hashlib.sha256(self.index_name().encode()).hexdigest()[:16]
        folder = self.cache / PUBLISHED
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{INDEX_TABLE}.{digest}"


# --------------------------------------------------------------------------- the registry
@dataclass
class Page:
    """One page of runs, newest first."""

    runs: list[dict]  # entries, each with every field of INDEX_FIELDS and "latest"
    total: int  # runs that match the filters
    offset: int  # of the first run on this page, from 0
    size: int  # the page size asked for

    @property
    def has_newer(self) -> bool:
        return self.offset > 0

    @property
    def has_older(self) -> bool:
        return self.offset + len(self.runs) < self.total


class Registry:
    """The published runs of one ``published/`` folder."""

    def __init__(self, published_root: Path | str | None = None, store: LocalStore | S3Store | None = None):
        self.store = store or LocalStore(Path(published_root))

    # ---- the lookup table
    def _connect(self) -> sqlite3.Connection:
        path = self.store.table_path()
        if os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK)):
            try:
                return self._open(path)
            except sqlite3.DatabaseError as error:
                if type(error) is not sqlite3.DatabaseError:  # locked, full disk: not a damaged table
                    raise
                log.warning("%s: unreadable (%s); rebuilt from %s", path, error, self.store.index_name())
                path.unlink(missing_ok=True)
                return self._open(path)
        return self._open(":memory:")  # published/ is read-only here: build the table for this read

    def _open(self, path) -> sqlite3.Connection:
        connection = sqlite3.connect(path, timeout=60, isolation_level=None)
        try:
            connection.execute("PRAGMA synchronous=OFF")  # a cache: rebuilt from index.jsonl when in doubt
            self._create(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    @staticmethod
    def _create(connection: sqlite3.Connection) -> None:
        existing = [row[1] for row in connection.execute("PRAGMA table_info(runs)").fetchall()]
        if existing and not set(FILTERS) <= set(existing):
            # A table an older version built, without a column a filter now needs: rebuilt from the index.
            connection.executescript("DROP TABLE runs; DROP TABLE IF EXISTS source;")
        columns = "".join(f", {name}" for name in FILTERS)
        connection.executescript(
            "CREATE TABLE IF NOT EXISTS source (name TEXT PRIMARY KEY, value TEXT);"
            f"CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, position INTEGER, path TEXT{columns}, line TEXT);"
            "CREATE INDEX IF NOT EXISTS runs_position ON runs(position);"
            "CREATE INDEX IF NOT EXISTS runs_path ON runs(path);"
            + "".join(f"CREATE INDEX IF NOT EXISTS runs_{name} ON runs({name}, position);" for name in FILTERS)
        )

    @contextlib.contextmanager
    def _table(self) -> Iterator[sqlite3.Connection]:
        """The lookup table, up to date with every complete line of the index."""
        connection = self._connect()
        try:
            self._catch_up(connection)
            yield connection
        finally:
            connection.close()

    def _catch_up(self, connection: sqlite3.Connection) -> None:
        version = self.store.index_version()
        recorded = dict(connection.execute("SELECT name, value FROM source").fetchall())
        identity, size = version if version is not None else (None, 0)
        if (recorded.get("identity") == str(identity) and recorded.get("schema") == _SCHEMA_VERSION
                and int(recorded.get("offset", -1)) == size):
            return  # nothing appended: the common case, one small query
        connection.execute("BEGIN IMMEDIATE")
        try:
            recorded = dict(connection.execute("SELECT name, value FROM source").fetchall())
            offset, number = int(recorded.get("offset", 0)), int(recorded.get("lines", 0))
            if (recorded.get("identity") != str(identity) or recorded.get("schema") != _SCHEMA_VERSION
                    or offset > size or self._tail(offset) != recorded.get("tail", "")):
                connection.execute("DELETE FROM runs")  # another file than the one read so far
                offset, number = 0, 0
            if size > offset:
                data = self.store.read_index(offset, size)
                complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
                self._add(connection, complete, offset, number)
                number += complete.count(b"\n")
                offset += len(complete)
            for name, value in (("identity", str(identity)), ("offset", str(offset)), ("lines", str(number)),
                                ("schema", _SCHEMA_VERSION), ("tail", self._tail(offset))):
                connection.execute("INSERT OR REPLACE INTO source VALUES (?, ?)", (name, value))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def _tail(self, offset: int) -> str:
        """A digest of the last line read so far (ending at ``offset``), to tell an appended index from a rewritten one."""
        if not offset:
            return ""
        data = self.store.read_index(max(0, offset - 65536), offset)
        return hashlib.sha256(data[data.rfind(b"\n", 0, len(data) - 1) + 1:]).hexdigest()

    def _add(self, connection: sqlite3.Connection, data: bytes, offset: int, number: int) -> None:
        name = self.store.index_name()
        rows = []
        position = offset
        for text in data.split(b"\n")[:-1]:
            number += 1
            if text.strip():
                line = parse_line(text, f"{name}:{number}")
                if line is not None:
                    rows.append((line["run_id"], position, line["path"],
                                 *(_column(getter(line)) for getter in FILTERS.values()),
                                 _as_text(text, line)))
            position += len(text) + 1
        marks = ", ".join("?" * (4 + len(FILTERS)))
        connection.executemany(f"INSERT OR REPLACE INTO runs VALUES ({marks})", rows)

    # ---- reading
    def _entries(self, rows, champion: str | None) -> list[dict]:
        return [{**_with_every_field(json.loads(text)), "latest": path == champion} for path, text in rows]

    def entries(self) -> list[dict]:
        """Every run's entry (its last index line, every field of ``INDEX_FIELDS``), oldest first."""
        if not self.store.exists():
            return []
        with self._table() as table:
            rows = table.execute("SELECT line FROM runs ORDER BY position").fetchall()
        return [_with_every_field(json.loads(text)) for (text,) in rows]

    def find(self, run_id: str) -> dict | None:
        """One run's entry, with ``latest``; None when the run id is not in the index."""
        if not self.store.exists():
            return None
        with self._table() as table:
            rows = table.execute("SELECT path, line FROM runs WHERE run_id = ?", (run_id,)).fetchall()
        return self._entries(rows, self.store.champion_path())[0] if rows else None

    def find_path(self, path: str) -> dict | None:
        """The entry whose ``path`` is ``path`` (the newest when several name it); None if none."""
        if not self.store.exists():
            return None
        with self._table() as table:
            rows = table.execute("SELECT path, line FROM runs WHERE path = ? ORDER BY position DESC LIMIT 1",
                                 (path,)).fetchall()
        return self._entries(rows, self.store.champion_path())[0] if rows else None

    def page(self, offset: int = 0, size: int = DEFAULT_PAGE_SIZE, **filters) -> Page:
        """Runs newest first, ``size`` from ``offset``, those whose ``FILTERS`` columns equal ``filters``.

        ``size`` is 1 to ``MAX_PAGE_SIZE``, ``offset`` at least 0; a filter
        named outside ``FILTERS`` raises ValueError. A filter value of None
        leaves that column free.
        """
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_PAGE_SIZE:
            raise ValueError(f"page size {size!r}: expected a whole number from 1 to {MAX_PAGE_SIZE}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"page offset {offset!r}: expected a whole number, at least 0")
        unknown = sorted(set(filters) - set(FILTERS))
        if unknown:
            raise ValueError(f"no filter {unknown[0]!r}; the runs can be filtered on {', '.join(FILTERS)}")
        if not self.store.exists():
            return Page([], 0, offset, size)
        chosen = {name: _column(value) for name, value in filters.items() if value is not None}
        where = " AND ".join(f"{name} = ?" for name in chosen) or "1"
        with self._table() as table:
            total = table.execute(f"SELECT COUNT(*) FROM runs WHERE {where}", tuple(chosen.values())).fetchone()[0]
            rows = table.execute(f"SELECT path, line FROM runs WHERE {where} ORDER BY position DESC LIMIT ? OFFSET ?",
                                 (*chosen.values(), size, offset)).fetchall()
        return Page(self._entries(rows, self.store.champion_path()), total, offset, size)

    def values(self, name: str) -> list:
        """The distinct values of the filter column ``name`` among the runs, sorted (None left out)."""
        if name not in FILTERS:
            raise ValueError(f"no filter {name!r}; the runs can be filtered on {', '.join(FILTERS)}")
        if not self.store.exists():
            return []
        with self._table() as table:
            rows = table.execute(f"SELECT DISTINCT {name} FROM runs WHERE {name} IS NOT NULL").fetchall()
        return sorted(value for (value,) in rows)

    def champion(self) -> dict | None:
        """The champion (the run ``latest`` points to): ``{"run_id", "path", "folder", "metrics", "entry"}``.

        None without a champion. ``run_id`` comes from the index entry naming
        that folder (the folder's name where none does); ``metrics`` is its
        ``metrics.json`` (None when unreadable); ``entry`` the index entry or None.
        """
        path = self.store.champion_path()
        if path is None:
            return None
        entry = self.find_path(path)
        return {
            "run_id": entry["run_id"] if entry else Path(path).name,
            "path": path,
            "folder": self.store.folder(path),
            "metrics": self.store.read_json(path, METRICS),
            "entry": entry,
        }

    # ---- writing
    def record(self, entry: dict) -> bool:
        """Make ``entry`` the run's entry (append it to the index); False when it already is.

        The run's current entry with the same known fingerprint and decision
        is kept as it is, so publishing the same training again changes
        nothing. Raises ValueError for an entry that readers would skip.
        """
        text = json.dumps(entry, sort_keys=True)
        if parse_line(text, "the new index line") is None or set(entry) != set(INDEX_FIELDS):
            raise ValueError(f"an index line needs exactly the fields {INDEX_FIELDS}, got {sorted(entry)}")
        with self.store.index_lock():
            current = self.find(entry["run_id"])
            if current is not None and same_entry(current, entry):
                return False
            self.store.append_index((text + "\n").encode())
        return True

    def promote(self, path: str, reason: str = "gate", *, user: str | None = None, comment: str | None = None,
                dag_id: str | None = None, dag_run_id: str | None = None) -> dict | None:
        """Make the published folder ``path`` (``runs/<run>``) the champion and append the change to the history.

        ``reason`` is one of ``PROMOTION_REASONS``; ``approved`` and
        ``by_hand`` need the ``user`` who decided. ``dag_id`` and
        ``dag_run_id`` name the Airflow run that made the change. Returns the
        history line appended, or None when ``latest`` already pointed at
        ``path`` with the training the history last recorded there (no
        change of champion). Raises ValueError for a path outside ``runs/``,
        an unknown reason or a missing user.
        """
        if not path.startswith(f"{RUNS}/"):
            raise ValueError(f"champion path {path!r}: expected {RUNS}/<run>")
        if reason not in PROMOTION_REASONS:
            raise ValueError(f"promotion reason {reason!r}: expected one of {', '.join(PROMOTION_REASONS)}")
        if reason != "gate" and not (isinstance(user, str) and user):
            raise ValueError(f"a promotion for the reason {reason!r} needs the name of the user who decided")
        entry = self.find_path(path)
        run_id = entry["run_id"] if entry else Path(path).name
        fingerprint = entry["fingerprint"] if entry else None
        with self.store.champion_lock():
            previous = self.store.champion_path()
            history = self.history()
            last = history[0] if history else None
            if (previous == path and last is not None and last["path"] == path
                    and last["fingerprint"] == fingerprint):
                return None
            previous_entry = self.find_path(previous) if previous else None
            line = {
                "changed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "run_id": run_id,
                "path": path,
                "fingerprint": fingerprint,
                "previous_run_id": (previous_entry["run_id"] if previous_entry else Path(previous).name)
                if previous else None,
                "previous_path": previous,
                "reason": reason,
                "user": user,
                "comment": comment,
                "dag_id": dag_id,
                "dag_run_id": dag_run_id,
            }
            self.store.point_champion(path)
            self.store.append_history((json.dumps(line, sort_keys=True) + "\n").encode())
        return line

    def history(self) -> list[dict]:
        """Every change of champion, newest first: dicts with every field of ``PROMOTION_FIELDS``.

        A line that is not a JSON object with a string ``run_id`` and
        ``path`` is skipped with one warning naming the file and line; a
        last line without its newline (a writer killed mid-line) is not read.
        """
        data = self.store.read_history()
        name = self.store.history_name()
        lines = []
        for number, text in enumerate(data[: data.rfind(b"\n") + 1].split(b"\n")[:-1], start=1):
            if text.strip():
                line = parse_history_line(text, f"{name}:{number}")
                if line is not None:
                    lines.append(line)
        return lines[::-1]


def _as_text(text: bytes, line: dict) -> str:
    """A line as the table stores it: as written (read back through ``_with_every_field``)."""
    try:
        return text.decode()
    except UnicodeDecodeError:  # JSON in another encoding than UTF-8
        return json.dumps(line, sort_keys=True)


def _complete_length(handle, size: int) -> int:
    """Bytes of an open file up to and including its last newline (0 when it has none)."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        handle.seek(start)
        cut = handle.read(end - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def _column(value):
    """A filter value as the table stores it: booleans as 0/1, text and numbers as they are."""
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, (str, int, float)) or value is None else json.dumps(value, sort_keys=True)


def load_runs(published_root: Path) -> list[dict]:
    """The table of published runs, newest first: one dict per run with every field of ``INDEX_FIELDS``.

    A run's entry is its last index line; fields a line lacks (written
    before they existed) are None; ``latest`` is True on the champion. For
    scripts and UIs; imports nothing heavy.
    """
    registry = Registry(published_root)
    champion = registry.store.champion_path()
    return [{**entry, "latest": entry["path"] == champion} for entry in reversed(registry.entries())]


def read_index(published_root: Path) -> list[dict]:
    """Every run's entry, oldest first (every field of ``INDEX_FIELDS``)."""
    return Registry(published_root).entries()
