"""Concurrent builders of one artifact: real processes sharing one artifacts root.

Two processes run download, split and build_shards for the same key at the
same moment, or the second one while the first is midway through: both
succeed on their first try, the artifact is built once, and the result is
byte-identical to a build made alone. A builder never removes another live
builder's temporary, and an unusable shard folder is moved aside, never
deleted under its readers.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from alexnet_tasks.atomic import TEMP_MARK, remove_stale_temps
from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.layout import Layout
from alexnet_tasks.data.download import download
from alexnet_tasks.data.shards import ShardError, build_shards, load_split, shard_path
from alexnet_tasks.data.split import split
from cifar_archive import write_archive
from builders import flip_one_image_byte
from conftest import ROOT, prepare_shards

STEPS = ("download", "split", "build_shards")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def medium_archive(tmp_path_factory):
    """3,600 images: each step takes long enough for a second process to arrive midway."""
    return write_archive(tmp_path_factory.mktemp("medium") / "cifar-10-python.tar.gz",
                         train_per_batch=600, test_count=600, seed=3)


def _final(root: Path, step: str, config: PipelineConfig) -> Path:
    layout = Layout(root)
    return {"download": layout.source(config.source_md5), "split": layout.split(config),
            "build_shards": layout.shards(config)}[step]


def _run_step(step: str, root: Path, config: PipelineConfig) -> dict:
    layout = Layout(root)
    if step == "download":
        return download(config.source_url, config.source_md5, root)
    if step == "split":
        return split(layout.batches(config.source_md5), root, config)
    return build_shards(layout.batches(config.source_md5), layout.split(config) / "manifest.json", root, config)


def _digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _builder(name: str, root: str, settings: dict, go: list, results) -> None:
    """One process: run each step when its ``go`` event is set; report the result or the traceback."""
    config = PipelineConfig(**settings)
    for step, event in zip(STEPS, go):
        if not event.wait(timeout=300):
            results.put((name, step, None, "never told to start"))
            return
        try:
            summary = _run_step(step, Path(root), config)
            results.put((name, step, {"reused": summary["reused"],
                                      "digests": _digests(_final(Path(root), step, config))}, None))
        except BaseException:
            results.put((name, step, None, traceback.format_exc()))


def _temp_of(final: Path) -> bool:
    return any(final.parent.glob(f"{final.name}{TEMP_MARK}*")) if final.parent.is_dir() else False


@pytest.mark.parametrize("start", ["together", "second_midway"])
def test_two_processes_build_the_same_data_once_and_both_succeed(medium_archive, tmp_path, start):
    path, md5 = medium_archive
    settings = {"source_url": str(path), "source_md5": md5, "validation_size": 500}
    config = PipelineConfig(**settings)
    root = tmp_path / "shared"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    go = {name: [context.Event() for _ in STEPS] for name in ("a", "b")}
    processes = [context.Process(target=_builder, args=(name, str(root), settings, go[name], results))
                 for name in ("a", "b")]
    for process in processes:
        process.start()
    outcomes: dict[str, dict[str, tuple]] = {"a": {}, "b": {}}
    midway: dict[str, bool] = {}
    try:
        for index, step in enumerate(STEPS):
            if start == "together":
                go["a"][index].set()
                go["b"][index].set()
            else:
                # b starts once a is midway: a's temporary exists and a has not finished.
                go["a"][index].set()
                final = _final(root, step, config)
                deadline = time.monotonic() + 120
                while not _temp_of(final) and results.empty() and time.monotonic() < deadline:
                    time.sleep(0.002)
                midway[step] = _temp_of(final) and results.empty()
                go["b"][index].set()
            for _ in range(2):
                name, done_step, outcome, error = results.get(timeout=300)
                outcomes[name][done_step] = (outcome, error)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    failures = {f"{name}/{step}": error for name, steps in outcomes.items()
                for step, (_, error) in steps.items() if error}
    assert not failures, "\n".join(f"{key}:\n{error}" for key, error in failures.items())
    if start == "second_midway":
        assert midway == dict.fromkeys(STEPS, True), f"the second process did not arrive midway: {midway}"

    reference_root = tmp_path / "alone"
    for step in STEPS:
        first, second = outcomes["a"][step][0], outcomes["b"][step][0]
        assert first["digests"] == second["digests"], step
        assert sorted([first["reused"], second["reused"]]) == [False, True], f"{step} was not built exactly once"
        alone = _run_step(step, reference_root, config)
        assert alone["reused"] is False
        if step != "download":  # source.json names its own root; the archive and batches must match
            assert _digests(_final(reference_root, step, config)) == first["digests"], step
        else:
            theirs = _digests(_final(reference_root, step, config))
            assert {k: v for k, v in theirs.items() if k != "source.json"} == \
                   {k: v for k, v in first["digests"].items() if k != "source.json"}
    leftovers = [p for p in root.rglob("*") if TEMP_MARK in p.name or ".broken-" in p.name]
    assert leftovers == []


# --------------------------------------------------------------------------- owners of temporaries
_HOLD_A_TEMPORARY = """
import sys
from pathlib import Path
from alexnet_tasks.atomic import atomic_directory
with atomic_directory(Path(sys.argv[1])) as work:
    (work / "part").write_bytes(b"half written")
    print(work, flush=True)
    sys.stdin.readline()
"""


def _holder(final: Path) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen([sys.executable, "-c", _HOLD_A_TEMPORARY, str(final)], env=ENV,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().strip()
    assert line, "the holder did not start"
    return process, Path(line)


def test_a_live_owners_temporary_is_kept_a_dead_owners_is_removed(tmp_path):
    final = tmp_path / "data" / "artifact"
    live, live_temp = _holder(final)
    dead, dead_temp = _holder(final)
    dead.kill()
    dead.wait()
    try:
        assert live_temp.is_dir() and dead_temp.is_dir()
        remove_stale_temps(final)
        assert live_temp.is_dir() and (live_temp / "part").read_bytes() == b"half written"
        assert not dead_temp.exists()
    finally:
        live.stdin.write("\n")
        live.stdin.close()
        assert live.wait(timeout=60) == 0
    assert (final / "part").read_bytes() == b"half written"  # the live owner finished its rename


def test_an_owner_seen_only_through_its_lock_is_kept(tmp_path):
    """A temporary whose name names no process here (another pid namespace, an older name) is
    kept while a process holds its lock, and removed once none does."""
    final = tmp_path / "artifact"
    foreign = final.with_name(f"{final.name}{TEMP_MARK}1-0-deadbeef")
    foreign.mkdir(parents=True)
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_SH)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(foreign)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    try:
        remove_stale_temps(final)
        assert foreign.is_dir()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    remove_stale_temps(final)
    assert not foreign.exists()


# --------------------------------------------------------------------------- unusable shard folders
def test_an_unusable_shard_folder_is_moved_aside_not_deleted(small_archive, tmp_path):
    config, shards_dir = prepare_shards(small_archive, tmp_path)
    train_shard = shard_path(shards_dir, "train")
    flip_one_image_byte(train_shard)
    corrupt = train_shard.read_bytes()
    with open(train_shard, "rb") as reader:  # a run still reading the old set
        layout = Layout(tmp_path)
        rebuilt = build_shards(layout.batches(config.source_md5), layout.split(config) / "manifest.json",
                               tmp_path, config)
        assert reader.read() == corrupt
    assert rebuilt["reused"] is False and load_split(train_shard)[0].shape == (150, 32, 32, 3)
    [aside] = shards_dir.parent.glob(f"{shards_dir.name}.broken-*")
    assert (aside / "train.h5").read_bytes() == corrupt
    with pytest.raises(ShardError, match="shard data is corrupt"):
        load_split(aside / "train.h5")


def test_a_failed_read_of_good_shards_keeps_them_and_can_be_retried(small_archive, tmp_path, monkeypatch):
    from alexnet_tasks.data import shards as shards_module
    from alexnet_tasks.errors import PermanentError
    from alexnet_tasks.data.shards import ShardReadError

    config, shards_dir = prepare_shards(small_archive, tmp_path)
    before = _digests(shards_dir)
    real_file = shards_module.h5py.File

    def failing_file(path, *args, **kwargs):
        if Path(path).name == "validation.h5":
            raise OSError(errno.EIO, f"Unable to synchronously open file (file read failed: errno = 5, "
                                     f"error message = 'Input/output error'): {path}")
        return real_file(path, *args, **kwargs)

    monkeypatch.setattr(shards_module.h5py, "File", failing_file)
    layout = Layout(tmp_path)
    with pytest.raises(ShardReadError, match="validation.h5") as raised:
        build_shards(layout.batches(config.source_md5), layout.split(config) / "manifest.json", tmp_path, config)
    assert not isinstance(raised.value, PermanentError)
    assert _digests(shards_dir) == before and not list(shards_dir.parent.glob("*.broken-*"))
    monkeypatch.setattr(shards_module.h5py, "File", real_file)
    again = build_shards(layout.batches(config.source_md5), layout.split(config) / "manifest.json", tmp_path, config)
    assert again["reused"] is True
