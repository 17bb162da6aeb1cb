"""Data folders through an object store: a step builds into this host's cache, the store keeps the result.

The data steps (``download``, ``split``, ``build_shards``) read and write
local paths (h5py needs them). With an object-store artifacts root, each runs
with this host's cache (``$ALEXNET_CACHE``) as its artifacts root, whose
layout mirrors the store's: ``<cache>/data/<source_md5>/shards-<key>`` is the
local copy of ``data/<source_md5>/shards-<key>`` on the store.
``stored_folder`` decides, per data key, whether to fetch or to build:

* the store lists the key (its ``contents.json`` exists): the folder is
  fetched into the cache, every file checked against the manifest, and
  nothing is built;
* it does not: the step builds the folder in the cache, every file is
  uploaded and the manifest created once; when another host created it first,
  this host adopts the winner's files (fetched over its own build).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from alexnet_tasks.store import ObjectStore, cache_root


def stored_folder(store: ObjectStore, key: str, build: Callable[[Path], object], cache: Path | None = None) -> dict:
    """The local, checked copy of data folder ``key``: fetched from ``store``, else built with ``build`` and put there.

    ``build(cache)`` runs the step with ``cache`` as its artifacts root and
    must leave the folder at ``<cache>/<key>``; its return value comes back as
    ``result`` (None when the folder was fetched). Returns ``{"folder",
    "built", "adopted", "result"}``. Raises ``FileNotFoundError`` naming the
    folder when ``build`` left nothing there, and what ``ObjectStore.fetch_folder``
    raises for a store that contradicts its manifest.
    """
    cache = Path(cache or cache_root())
    folder = cache / key
    if store.contents(key) is not None:
        store.fetch_folder(key, cache)
        return {"folder": folder, "built": False, "adopted": False, "result": None}
    result = build(cache)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the build of {store.url(key)} left no folder there")
    put = store.put_folder(folder, key)
    if put["adopted"]:
        store.fetch_folder(key, cache)
    return {"folder": folder, "built": True, "adopted": put["adopted"], "result": result}
