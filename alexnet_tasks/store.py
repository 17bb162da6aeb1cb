"""Where the artifacts root lives: a local folder (the default) or an object-store URL.

``$ALEXNET_ARTIFACTS`` holds either a local path (``~/alexnet-artifacts``,
``/srv/artifacts``; ``file:///srv/artifacts`` is the same folder) or a URL
``<scheme>://<bucket>/<prefix>`` served by an fsspec filesystem (``s3://``
through s3fs; ``gs://``, ``az://``... through theirs once installed). A URL
whose scheme has no installed filesystem is refused here, naming the value
and the package to install, instead of being taken for a relative folder
named ``s3:``.

Nothing heavy is imported: the filesystem's package is looked up, not loaded.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
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
