"""Where the artifacts root lives: a local folder (the default) or an object-store URL.

``$ALEXNET_ARTIFACTS`` holds either a local path (``~/alexnet-artifacts``,
``/srv/artifacts``; ``file:///srv/artifacts`` is the same folder) or a URL
``<scheme>://<bucket>/<prefix>`` served by an fsspec filesystem (``s3://``
through s3fs; ``gs://``, ``az://``... through theirs once installed). A URL
whose scheme has no installed filesystem is refused here, naming the value
and the package to install, instead of being taken for a relative folder
named ``s3:``.

``ObjectStore`` keeps the data folders (source, split, shards) on a store:
immutable and content-addressed, each trusted only through its manifest
(``contents.json``), fetched into this host's cache (``$ALEXNET_CACHE``).
``Lease`` is an expiring exclusive claim on one key of a store (a run's
training); ``lease_slot`` holds one of a number of them (a sweep's trials).

Nothing heavy is imported at module level: the filesystem's package is looked
up, not loaded, until a store is opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from alexnet_tasks.errors import PermanentError

# RFC 3986's scheme followed by "://": "s3://bucket/prefix", "gs://b", "file:///srv".
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
LOCAL_SCHEMES = ("file", "local")


class UnsupportedStoreError(PermanentError, ValueError):
    """An artifacts location this installation cannot reach: no filesystem for its scheme."""


@dataclass(frozen=True)
class Location:
    """A parsed artifacts location: ``scheme`` is None for a local folder, else the URL's scheme.

    ``path`` is the local folder (absolute, ``~`` expanded) or the URL's part
    after ``://`` without trailing slashes (``bucket/prefix``).
    """

    value: str
    scheme: str | None
    path: str

    @property
    def is_local(self) -> bool:
        return self.scheme is None

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` for a store; the folder itself for a local location."""
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.value} is an object-store URL, not a local folder")
        return Path(self.path)


def filesystem_package(scheme: str) -> str | None:
    """The module that serves ``scheme`` through fsspec (``s3`` -> ``s3fs``), or None when fsspec has none."""
    from fsspec.registry import known_implementations, registry

    if scheme in registry:  # registered at run time by an installed package
        return registry[scheme].__module__.split(".")[0]
    known = known_implementations.get(scheme)
    return known["class"].split(".")[0] if known else None


def parse_location(value: str | Path, variable: str = "ALEXNET_ARTIFACTS") -> Location:
    """Parse an artifacts location; raises ``UnsupportedStoreError`` for a URL no installed filesystem serves.

    ``variable`` names the setting in the error. An empty URL path
    (``s3://``) is refused too: the store needs at least a bucket.
    """
    text = str(value)
    match = _URL.match(text)
    if not match:
        return Location(text, None, str(Path(text).expanduser().resolve()))
    scheme, rest = match.group(1).lower(), match.group(2).rstrip("/")
    if scheme in LOCAL_SCHEMES:
        return Location(text, None, str(Path(rest or "/").expanduser().resolve()))
    package = filesystem_package(scheme)
    if package is None:
        raise UnsupportedStoreError(
            f"{variable}={text}: fsspec knows no filesystem for the scheme {scheme!r}; "
            f"use a local path or a URL such as s3://bucket/prefix"
        )
    if importlib.util.find_spec(package) is None:
        raise UnsupportedStoreError(
            f"{variable}={text}: the filesystem for {scheme}:// ({package}) is not installed; "
            f"pip install {package}, or use a local path or s3://bucket/prefix"
        )
    if not rest:
        raise UnsupportedStoreError(f"{variable}={text}: the URL names no bucket; expected {scheme}://bucket/prefix")
    return Location(text, scheme, rest)


# --------------------------------------------------------------------------- data folders on a store
CACHE_ENV = "ALEXNET_CACHE"
DEFAULT_CACHE = Path("~/.cache/alexnet-artifacts")
CONTENTS = "contents.json"  # a data folder's store manifest: each file's size and SHA-256
OBJECTS = "objects"  # a data folder's file contents on the store, each named by its SHA-256
CONTENTS_FORMAT = 1
CHUNK = 1 << 20

CONTENTS_SCHEMA = {
    "type": "object",
    "required": ["format", "key", "files"],
    "properties": {
        "format": {"const": CONTENTS_FORMAT},
        "key": {"type": "string", "minLength": 1},
        "files": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["size", "sha256"],
                "properties": {"size": {"type": "integer", "minimum": 0},
                               "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
            },
        },
    },
}


CONNECTION_ENV = "ALEXNET_ARTIFACTS_CONN_ID"
DEFAULT_CONNECTION = "aws_default"


def connection_id() -> str:
    """The Airflow connection of the store under Airflow: ``$ALEXNET_ARTIFACTS_CONN_ID`` or ``aws_default``."""
    return os.environ.get(CONNECTION_ENV) or DEFAULT_CONNECTION


def airflow_filesystem(location: Location, conn_id: str | None = None):
    """The fsspec filesystem of ``location`` with the credentials of an Airflow connection.

    Through Airflow's ``ObjectStoragePath`` (for ``s3://`` the Amazon
    provider's, from an ``aws`` connection: login and password as the key
    pair, ``endpoint_url`` and ``region_name`` in its extra). ``conn_id``
    defaults to ``connection_id()``. For a DAG's tasks; a step called from
    Python opens ``ObjectStore(location)`` with the library's own credentials.
    """
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(location.url, conn_id=conn_id or connection_id()).fs


class StoreContentError(PermanentError):
    """A store's data folder that contradicts its manifest, or a manifest that is not one: a rebuild cannot cure it."""


def cache_root() -> Path:
    """This host's cache of store files: ``$ALEXNET_CACHE`` or ``~/.cache/alexnet-artifacts``, absolute.

    It only ever holds copies that were checked against their manifest, and
    may be deleted at any time.
    """
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().resolve()


def file_digest(path: Path) -> tuple[int, str]:
    """``(size in bytes, SHA-256 hex digest)`` of a local file."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
        return handle.tell(), digest.hexdigest()


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"store key {key!r}: expected a relative path such as data/<source_md5>/shards-<key>")
    return key


class ObjectStore:
    """The data folders of an object-store artifacts root, through fsspec.

    ``location`` is a parsed URL (``parse_location("s3://bucket/prefix")``);
    ``filesystem`` an fsspec filesystem for it (default: fsspec's, with the
    library's usual credentials: for S3 the ``AWS_*`` variables, the shared
    files or the instance role, ``AWS_ENDPOINT_URL`` for another S3 server).

    A data folder ``<key>/`` on the store holds ``objects/<sha256>`` (every
    file's content) and ``contents.json`` (each relative file name's size and
    SHA-256), written last and only once (``If-None-Match: *``). Readers trust
    a key only through its ``contents.json``.
    """

    def __init__(self, location: Location, filesystem=None, client=None):
        if location.is_local:
            raise ValueError(f"{location.value}: a local folder, not an object store")
        if filesystem is None:
            import fsspec

            filesystem = fsspec.filesystem(location.scheme)
        self.location = location
        self.filesystem = filesystem
        self._client = client

    def path(self, key: str) -> str:
        """The filesystem path of ``key`` under the root: ``bucket/prefix/<key>``."""
        return f"{self.location.path}/{_check_key(key)}"

    def url(self, key: str) -> str:
        return f"{self.location.scheme}://{self.path(key)}"

    # ----------------------------------------------------------------- manifests
    def contents(self, key: str) -> dict | None:
        """The manifest of data folder ``key`` (``{"format", "key", "files": {name: {"size", "sha256"}}}``), or None.

        Raises ``StoreContentError`` naming its URL when it is not a manifest of ``key``.
        """
        import jsonschema

        try:
            raw = self.filesystem.cat_file(self.path(f"{key}/{CONTENTS}"))
        except FileNotFoundError:
            return None
        where = self.url(f"{key}/{CONTENTS}")
        try:
            contents = json.loads(raw)
            jsonschema.validate(contents, CONTENTS_SCHEMA)
        except (ValueError, jsonschema.ValidationError) as error:
            reason = getattr(error, "message", error)
            raise StoreContentError(f"{where}: not a data folder's manifest ({reason})") from None
        if contents["key"] != key:
            raise StoreContentError(f"{where}: the manifest of {contents['key']!r}, expected {key!r}")
        for name in contents["files"]:
            _check_key(name)
        return contents

    def put_folder(self, folder: Path, key: str) -> dict:
        """Upload every file under local ``folder`` as data folder ``key``; returns ``{"contents", "adopted"}``.

        Each file goes to ``objects/<sha256>``, then the manifest is created
        with a create-only write. When another builder created it first, its
        manifest wins: ``adopted`` is True, the objects only this call uploaded
        are removed again, and the caller must use the winner's files (for
        example through ``fetch_folder``). Raises ValueError for an empty or
        missing ``folder``.
        """
        folder = Path(folder)
        files = sorted(path for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else []
        if not files:
            raise ValueError(f"{folder}: expected a folder with files to put on the store as {key}")
        listed = {}
        for path in files:
            size, sha256 = file_digest(path)
            listed[path.relative_to(folder).as_posix()] = {"size": size, "sha256": sha256}
        mine = {"format": CONTENTS_FORMAT, "key": _check_key(key), "files": listed}
        uploaded = []
        for name, entry in listed.items():
            target = self.path(f"{key}/{OBJECTS}/{entry['sha256']}")
            if not self.filesystem.exists(target):
                self.filesystem.put_file(str(folder / name), target)
                uploaded.append(entry["sha256"])
        try:
            with self.filesystem.open(self.path(f"{key}/{CONTENTS}"), "xb") as handle:
                handle.write(json.dumps(mine, indent=1, sort_keys=True).encode())
            return {"contents": mine, "adopted": False}
        except FileExistsError:
            pass
        winner = self.contents(key)
        if winner is None:  # a create refused for a manifest nobody can read: the store is inconsistent
            raise StoreContentError(f"{self.url(f'{key}/{CONTENTS}')}: refused as existing, yet not readable")
        needed = {entry["sha256"] for entry in winner["files"].values()}
        for sha256 in set(uploaded) - needed:
            self.filesystem.rm_file(self.path(f"{key}/{OBJECTS}/{sha256}"))
        return {"contents": winner, "adopted": True}

    def fetch_folder(self, key: str, cache: Path | None = None, only: tuple[str, ...] | None = None) -> Path:
        """The local copy of data folder ``key`` under ``cache`` (default ``cache_root()``): ``<cache>/<key>``.

        ``only``: fetch just the files whose names start with one of these
        (``("extracted/", "source.json")``); default every file.

        Every file is checked against the store's manifest: a cached file is
        used only when its size and SHA-256 match, else it is fetched again
        (into a temporary name, checked, then renamed into place). Raises
        ``MissingInputError`` when the store has no manifest for ``key`` and
        ``StoreContentError`` when a stored object does not match it.
        """
        from alexnet_tasks.errors import MissingInputError

        contents = self.contents(key)
        if contents is None:
            raise MissingInputError(f"{self.url(key)}: no {CONTENTS} on the store; the step that builds it has not run")
        local = Path(cache or cache_root()) / key
        for name, entry in contents["files"].items():
            if only is not None and not name.startswith(only):
                continue
            target = local / name
            if target.is_file() and file_digest(target) == (entry["size"], entry["sha256"]):
                continue

            def matches(temporary: Path, name=name, entry=entry) -> None:
                found = file_digest(temporary)
                if found != (entry["size"], entry["sha256"]):
                    raise StoreContentError(
                        f"{self.url(f'{key}/{OBJECTS}/' + entry['sha256'])} ({name}): {found[0]} bytes with "
                        f"SHA-256 {found[1]}, expected {entry['size']} bytes with SHA-256 {entry['sha256']} "
                        f"as {self.url(f'{key}/{CONTENTS}')} lists"
                    )

            self._download(f"{key}/{OBJECTS}/{entry['sha256']}", target, matches)
        return local

    # ----------------------------------------------------------------- a run's files (mutable, not content-addressed)
    def _download(self, key: str, target: Path, check=None) -> None:
        """Download object ``key`` to ``target`` under a temporary name, ``check(temporary)`` it, then rename.

        A reader of ``target`` never sees half a file; a failed check (it raises) leaves nothing behind.
        """
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f"{target.name}.fetching-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            self.filesystem.get_file(self.path(key), str(temporary))
            if check is not None:
                check(temporary)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def put_file(self, local: Path, key: str) -> None:
        """Upload one local file as object ``key`` (a single PUT: readers see the old object or the new one)."""
        self.filesystem.put_file(str(local), self.path(key))

    def put_files(self, folder: Path, key: str, names: list[str] | None = None) -> list[str]:
        """Upload files of local ``folder`` under ``key/``: the relative ``names`` given (those that exist), else every file.

        Returns the relative names uploaded, in the order uploaded. Each
        object's ETag is noted in ``folder``'s ``.store-etags.json``, so that
        ``fetch_files`` on this host does not download what it uploaded.
        """
        folder = Path(folder)
        if names is None:
            names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                           if path.is_file() and path.name != ETAGS)
        uploaded, etags = [], {}
        for name in names:
            if (folder / name).is_file():
                self.put_file(folder / name, f"{key}/{_check_key(name)}")
                uploaded.append(name)
                etags[name] = self.filesystem.info(self.path(f"{key}/{name}")).get("ETag")
        note_etags(folder, etags)
        return uploaded

    def _listing(self, key: str) -> dict[str, dict]:
        """``{relative name: info}`` of every object under ``key/`` (size, ETag where the filesystem gives one)."""
        root = self.path(key)
        self.filesystem.invalidate_cache(root)
        try:
            found = self.filesystem.find(root, withdirs=False, detail=True)
        except FileNotFoundError:
            return {}
        return {path[len(root) + 1:]: info for path, info in found.items() if path.startswith(root + "/")}

    def list_files(self, key: str) -> list[str]:
        """The relative names of every object under ``key/`` (empty when there are none)."""
        return sorted(self._listing(key))

    def fetch_files(self, key: str, folder: Path, names: list[str] | None = None) -> list[str]:
        """Download objects under ``key/`` into local ``folder``: the relative ``names`` given (those that exist), else all.

        A local file whose noted ETag (``.store-etags.json``, from the last
        put or fetch on this host) and size match the object's is kept, not
        downloaded again. Each download goes to a temporary name and is
        renamed into place, so a reader of ``folder`` never sees half of a
        file. Returns the names downloaded.
        """
        folder = Path(folder)
        listing = self._listing(key)
        wanted = sorted(listing) if names is None else [name for name in names if name in listing]
        noted = noted_etags(folder)
        fetched, etags = [], {}
        for name in wanted:
            target, etag = folder / name, listing[name].get("ETag")
            if (etag is not None and noted.get(name) == etag and target.is_file()
                    and target.stat().st_size == listing[name].get("size")):
                continue
            self._download(f"{key}/{name}", target)
            fetched.append(name)
            etags[name] = etag
        note_etags(folder, etags)
        return fetched

    def read(self, key: str) -> bytes | None:
        """The bytes of object ``key``, or None when it does not exist."""
        try:
            return self.filesystem.cat_file(self.path(key))
        except FileNotFoundError:
            return None

    def remove(self, key: str) -> None:
        """Remove object ``key``, or every object under ``key/``; nothing there is not an error."""
        for name in self.list_files(key):
            self.filesystem.rm_file(self.path(f"{key}/{name}"))
        try:
            self.filesystem.rm_file(self.path(key))
        except FileNotFoundError:
            pass
        self.filesystem.invalidate_cache()

    # ----------------------------------------------------------------- conditional writes (S3's If-None-Match, If-Match)
    @property
    def client(self):
        """The boto3 S3 client of the conditional writes (fsspec exposes no compare-and-swap).

        Default: boto3's, with its usual credentials and ``AWS_ENDPOINT_URL``;
        ``open_store(..., conn_id=...)`` sets the one of an Airflow connection.
        Raises ``UnsupportedStoreError`` for a store that is not S3.
        """
        if self._client is None:
            if self.location.scheme not in ("s3", "s3a"):
                raise UnsupportedStoreError(
                    f"{self.location.value}: conditional writes (the training lease, the champion pointer) "
                    f"are implemented for s3:// only")
            import boto3

            self._client = boto3.client("s3")
        return self._client

    @property
    def bucket(self) -> str:
        return self.location.path.partition("/")[0]

    def object_key(self, key: str) -> str:
        """``key`` as the bucket's object key (the root's prefix before it)."""
        return self.path(key).partition("/")[2]

    def read_tagged(self, key: str) -> Tagged | None:
        """Object ``key`` with its ETag, its last change and the server's clock, or None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        from email.utils import parsedate_to_datetime

        headers = answer["ResponseMetadata"].get("HTTPHeaders", {})
        server_now = parsedate_to_datetime(headers["date"]) if "date" in headers else None
        return Tagged(answer["Body"].read(), answer["ETag"], answer["LastModified"], server_now)

    def _conditional_put(self, key: str, data: bytes, **condition) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=data, **condition)["ETag"]
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in CONFLICTS:
                return None
            raise

    def create(self, key: str, data: bytes) -> str | None:
        """Create object ``key`` only if it does not exist (``If-None-Match: *``); its ETag, or None when it existed."""
        return self._conditional_put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace object ``key`` only while its ETag is ``etag`` (``If-Match``); the new ETag, or None on a conflict."""
        return self._conditional_put(key, data, IfMatch=etag)

    def delete_object(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))


ETAGS = ".store-etags.json"  # in a local copy of a run's folder: the ETag of the object each file came from or went to


def noted_etags(folder: Path) -> dict:
    """``{file name: ETag}`` noted in ``folder``'s ``.store-etags.json``: the object each local file came from or went to."""
    try:
        noted = json.loads((Path(folder) / ETAGS).read_text())
    except (OSError, ValueError):
        return {}
    return noted if isinstance(noted, dict) else {}


def note_etags(folder: Path, etags: dict) -> None:
    """Add ``{file name: ETag}`` to ``folder``'s ``.store-etags.json`` (replaced in one rename)."""
    if not etags:
        return
    folder.mkdir(parents=True, exist_ok=True)
    noted = {**noted_etags(folder), **etags}
    temporary = folder / f"{ETAGS}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.write_text(json.dumps(noted, sort_keys=True))
    os.replace(temporary, folder / ETAGS)


# S3's answers to a conditional write that lost: 412, or 409 while another conditional write is in flight.
CONFLICTS = ("PreconditionFailed", "ConditionalRequestConflict")


@dataclass(frozen=True)
class Tagged:
    """An object read with what a conditional write needs: its bytes, its ETag, its last change, the server's clock."""

    data: bytes
    etag: str
    last_modified: datetime
    server_now: datetime | None


def open_store(location: Location, conn_id: str | None = None, airflow: bool = False) -> ObjectStore:
    """The ``ObjectStore`` of an object-store ``location``.

    With ``airflow`` (the DAG's tasks, the plugin), its credentials come from
    the Airflow connection ``conn_id`` (default ``connection_id()``): the
    filesystem through ``ObjectStoragePath``, the client of conditional
    writes through Airflow's S3 hook. Otherwise from the library's usual
    credentials (for S3 boto3's: ``AWS_*`` variables, shared files, the
    instance role; ``AWS_ENDPOINT_URL`` for a server other than AWS).
    """
    if not airflow:
        return ObjectStore(location)
    conn_id = conn_id or connection_id()
    client = None
    if location.scheme in ("s3", "s3a"):
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        client = S3Hook(aws_conn_id=conn_id).get_conn()
    return ObjectStore(location, airflow_filesystem(location, conn_id), client=client)


def store_cache(location: Location) -> Path:
    """This host's cache folder for one store: ``<cache_root()>/<scheme>/<bucket>/<prefix>``, the store's layout below it."""
    return cache_root() / location.scheme / location.path


# --------------------------------------------------------------------------- leases
LEASE_SECONDS_ENV = "ALEXNET_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 300


class LeaseHeldError(RuntimeError):
    """Another live owner holds the lease (a duplicate delivery of the task); a later try may take it over."""


class LeaseLostError(RuntimeError):
    """This owner's lease was taken over (it missed its renewals): it must stop writing under the lease."""


def lease_seconds() -> float:
    """How long a lease lives without a renewal: ``$ALEXNET_LEASE_SECONDS`` or 300 s."""
    return float(os.environ.get(LEASE_SECONDS_ENV) or DEFAULT_LEASE_SECONDS)


class Lease:
    """An exclusive, expiring claim on object ``key`` of ``store``: one owner at a time across hosts.

    ``acquire`` creates the object (``If-None-Match: *``) holding the owner
    (host, pid, what for) and ``seconds``, the lease's life without a renewal.
    A lease whose object has not changed for ``seconds`` by the store's own
    clock (its ``Last-Modified`` against the response's ``Date``, so the hosts'
    clocks never matter) has expired: the next owner replaces it,
    conditional on its ETag (``If-Match``), so two hosts taking over one
    expired lease cannot both win. While held, a thread renews it every
    third of ``seconds`` the same way; a renewal that loses (another owner
    took the lease over) marks it lost, and ``check`` then raises
    ``LeaseLostError``. ``release`` deletes the object if it is still this
    owner's. Use it as a context manager.
    """

    def __init__(self, store: ObjectStore, key: str, purpose: str, seconds: float | None = None):
        import socket

        self.store, self.key = store, key
        self.seconds = float(seconds if seconds is not None else lease_seconds())
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
                      "token": uuid.uuid4().hex, "seconds": self.seconds}
        self.etag: str | None = None
        self.lost: str | None = None
        self.took_over: dict | None = None  # the expired owner this lease replaced, if any
        self._stop = None
        self._thread = None
        self._renewals = 0
        import threading

        self._lock = threading.Lock()  # one renewal at a time: the thread's or renew()'s

    def _body(self, renewals: int) -> bytes:
        return json.dumps({**self.owner, "renewals": renewals}, sort_keys=True).encode()

    def acquire(self) -> Lease:
        """Take the lease or raise ``LeaseHeldError`` naming its live owner; starts the renewals."""
        for _ in range(10):
            etag = self.store.create(self.key, self._body(0))
            if etag is not None:
                self.etag = etag
                break
            current = self.store.read_tagged(self.key)
            if current is None:
                continue  # released between the create and the read: create again
            holder = _lease_holder(current.data)
            age = (current.server_now - current.last_modified).total_seconds() if current.server_now else 0.0
            life = float(holder.get("seconds") or self.seconds)
            if age <= life:
                raise LeaseHeldError(
                    f"{self.store.url(self.key)}: held by {holder.get('host')} pid {holder.get('pid')} "
                    f"({holder.get('purpose')}), renewed {age:.0f} s ago, expires in {life - age:.0f} s; refusing to "
                    f"run twice")
            etag = self.store.replace(self.key, self._body(0), current.etag)
            if etag is not None:
                self.etag, self.took_over = etag, {**holder, "silent_seconds": round(age, 1)}
                break
        else:
            raise LeaseHeldError(f"{self.store.url(self.key)}: still contended after 10 attempts")
        self._start_renewals()
        return self

    def _start_renewals(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_stopped, name=f"lease {self.key}", daemon=True)
        self._thread.start()

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as error:  # a store that cannot be reached: try again at the next renewal
                import logging

                logging.getLogger(__name__).warning("%s: renewal failed (%s)", self.store.url(self.key), error)

    def renew(self) -> None:
        """Renew the lease now, conditional on its ETag; raises ``LeaseLostError`` if another owner took it over.

        Call it right before a write that only the owner may make: the
        renewal proves the lease was still this owner's a moment ago, not at
        the thread's last renewal.
        """
        with self._lock:
            self.check()
            self._renewals += 1
            etag = self.store.replace(self.key, self._body(self._renewals), self.etag)
            if etag is None:
                self.lost = f"{self.store.url(self.key)}: taken over by another owner"
                self.check()
            self.etag = etag

    def check(self) -> None:
        """Raise ``LeaseLostError`` if another owner took the lease over."""
        if self.lost:
            raise LeaseLostError(f"{self.lost}; this owner ({self.owner['host']} pid {self.owner['pid']}) stops")

    def release(self) -> None:
        """Stop the renewals and delete the lease if it is still this owner's."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        if self.lost or self.etag is None:
            return
        current = self.store.read_tagged(self.key)
        if current is not None and _lease_holder(current.data).get("token") == self.owner["token"]:
            self.store.delete_object(self.key)
        self.etag = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lease_holder(data: bytes) -> dict:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}



@contextlib.contextmanager
def lease_slot(store: ObjectStore, folder: str, slots: int, purpose: str, poll_seconds: float = 2.0,
               seconds: float | None = None) -> Iterator[int]:
    """Hold one of ``slots`` leases ``<folder>/<n>.json`` on ``store`` while the block runs; yields its number.

    The object store's ``atomic.slot_lock``: at most ``slots`` holders run
    the block at once, on every host that reaches the store; the others
    wait, trying each slot every ``poll_seconds``. A holder that dies frees
    its slot once its lease expires (``seconds``, default ``lease_seconds()``).
    Raises ValueError when ``slots`` is below 1.
    """
    import logging
    import time

    if slots < 1:
        raise ValueError(f"slots must be 1 or more, got {slots}")
    log = logging.getLogger(__name__)
    started, announced = time.monotonic(), False
    while True:
        for number in range(slots):
            lease = Lease(store, f"{folder}/{number}.json", purpose, seconds)
            try:
                lease.acquire()
            except LeaseHeldError:
                continue
            if announced:
                log.info("waited %.1f s for one of %d slots in %s", time.monotonic() - started, slots,
                         store.url(folder))
            try:
                yield number
            finally:
                lease.release()
            return
        if not announced:
            log.info("all %d slots in %s are taken; waiting for one", slots, store.url(folder))
            announced = True
        time.sleep(poll_seconds)
