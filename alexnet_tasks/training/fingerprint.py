"""One fingerprint per run: what was trained, on which data, by which code.

``run_fingerprint`` hashes the resolved training hyperparameters, the data key
(source MD5 and shard key), the content of the shard set (each split's image
digest and labels) and the code version (package version, git commit and
whether the tree had uncommitted changes). Two runs with the same fingerprint
train the same thing; a checkpoint is resumed only under its own fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from functools import lru_cache
from pathlib import Path

PACKAGE = "alexnet-cifar10"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout: alexnet_tasks/training/ is two below it
GIT_TIMEOUT_SECONDS = 5


def _package_version() -> str | None:
    """The version in the pyproject.toml beside the code, else the installed distribution's."""
    pyproject = SOURCE_ROOT / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (ValueError, KeyError):
            pass
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), *args],
            capture_output=True, text=True, timeout=GIT_TIMEOUT_SECONDS,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict:
    """``{"package", "git_commit", "git_dirty"}`` of the code that is running.

    ``git_commit`` and ``git_dirty`` are None where the code is not a git
    checkout (an installed wheel, a container image without ``.git``).
    """
    commit = _git("rev-parse", "HEAD")
    commit = commit.strip() if commit else None
    dirty = None
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status.strip())
    return {"package": _package_version(), "git_commit": commit, "git_dirty": dirty}


def shards_sha256(shards_dir: Path) -> str:
    """SHA-256 over every split's recorded image digest and its labels."""
    import h5py

    from alexnet_tasks.data.shards import SPLITS, read_attrs, shard_path

    digest = hashlib.sha256()
    for name in SPLITS:
        path = shard_path(shards_dir, name)
        images = read_attrs(path).get("images_sha256")  # ShardError names a missing or unreadable shard
        with h5py.File(path, "r") as handle:
            labels = handle["labels"][...]
        digest.update(f"{name}:{images}:".encode())
        digest.update(hashlib.sha256(labels.astype("uint8").tobytes()).digest())
    return digest.hexdigest()


def run_fingerprint(config, hyperparameters, shards_dir: Path) -> dict:
    """``{"fingerprint": sha256 hex, "parts": {...}}`` for training ``hyperparameters`` on ``shards_dir``."""
    parts = {
        "settings": dataclasses.asdict(hyperparameters),  # the key saved runs were hashed with: kept
        "data_key": {"source_md5": config.source_md5, "shards_key": config.shards_key()},
        "shards_sha256": shards_sha256(Path(shards_dir)),
        "code_version": code_version(),
    }
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return {"fingerprint": hashlib.sha256(canonical.encode()).hexdigest(), "parts": parts}
