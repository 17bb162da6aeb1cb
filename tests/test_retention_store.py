"""Retention on an object-store artifacts root: old runs pruned from the store's ``runs/``, kept runs untouched.

Against the tests' S3 server (moto's S3 REST protocol; tests/s3_server.py).
The runs are the pipeline's own folders (tests/builders.py), put on the store
and published there by ``alexnet_tasks.ops.stored_steps.publish``. A run
looks old as a folder does after ``os.utime``: its objects' ``LastModified``
is moved back in the S3 server, which serves from this process; the
retention code reads it, and the server's clock, over the S3 protocol.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import pytest

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.layout import Layout, published_path
from alexnet_tasks.store import Lease, ObjectStore, parse_location, store_cache
from builders import fake_run, folder, write_decision

DAY = 24 * 3600
ACCURACY_FLOOR = 0.25


def age(bucket: str, prefix: str, seconds: float) -> None:
    """Make every object under ``prefix`` of ``bucket`` look last changed ``seconds`` earlier than now."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.core.utils import utcnow
    from moto.s3.models import s3_backends

    then = utcnow() - timedelta(seconds=seconds)
    for key in s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_bucket(bucket).keys.values():
        if key.name.startswith(prefix):
            key.last_modified = then


def objects(bucket: str, prefix: str = "") -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture
def layout(s3_bucket, tmp_path, monkeypatch) -> Layout:
    """The layout of ``s3://<bucket>/artifacts``: this host's cache under ``tmp_path``, the store it mirrors."""
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALEXNET_KEEP_RUNS", raising=False)
    location = parse_location(f"s3://{s3_bucket}/artifacts")
    return Layout(store_cache(location), ObjectStore(location))


def stored_run(layout: Layout, run_id: str, accuracy: float = 0.5, checkpoint_bytes: int = 0) -> Path:
    """A run as train and evaluate leave it (tests/builders.py ``fake_run``), in the cache and on the store.

    With ``checkpoint_bytes``, one epoch's checkpoint and the ``state.json`` that names it.
    """
    fingerprint = hashlib.sha256(run_id.encode()).hexdigest()
    run_dir = fake_run(layout.root, folder(run_id), accuracy, fingerprint=fingerprint)
    if checkpoint_bytes:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "epoch-0003.keras").write_bytes(os.urandom(checkpoint_bytes))
        (run_dir / "state.json").write_text(json.dumps({"epochs_done": 3, "checkpoint": "epoch-0003.keras"}))
    layout.store.put_files(run_dir, f"runs/{run_dir.name}")
    return run_dir


def gated_and_published(layout: Layout, run_id: str, blessed: bool, **options) -> dict:
    """The gate's decision put on the store with the run, then the store's publish step; returns its result."""
    from alexnet_tasks.ops import stored_steps

    run_dir = layout.run(run_id)
    failed = () if blessed else (f"test accuracy 0.1000 is below the floor {ACCURACY_FLOOR}",)
    write_decision(run_dir, failed, config=PipelineConfig(accuracy_floor=ACCURACY_FLOOR), run_id=run_id)
    layout.store.put_files(run_dir, f"runs/{run_dir.name}", ["decision.json"])
    return stored_steps.publish(PipelineConfig(accuracy_floor=ACCURACY_FLOOR), layout, run_id, **options)


def held_lease(layout: Layout, run_id: str, seconds: float) -> Lease:
    """A training's lease on the run that lives ``seconds`` without a renewal; its owner then stops renewing it."""
    lease = Lease(layout.store, f"runs/{folder(run_id)}/lease.json", f"training {run_id}", seconds=seconds).acquire()
    lease._stop.set()
    lease._thread.join()
    return lease


def test_publish_on_the_store_prunes_old_runs_nothing_keeps(layout, s3_bucket, caplog):
    """Old, never published or not blessed, not leased: pruned. Champion, blessed, newest and leased: kept."""
    from alexnet_tasks.ops import stored_steps

    old = ("old-never", "old-refused", "old-blessed", "old-champion", "old-leased", "old-dead-lease")
    for run_id in (*old, "newest-old"):
        stored_run(layout, run_id)
    gated_and_published(layout, "old-blessed", blessed=True)
    gated_and_published(layout, "old-refused", blessed=False)
    gated_and_published(layout, "old-champion", blessed=False)
    # The champion need not be blessed: made the champion by hand (the promote DAG's registry call).
    stored_steps.registry(layout).promote(published_path("old-champion"), "by_hand", user="alice",
                                          comment="its model reads trucks better")
    held_lease(layout, "old-leased", seconds=30 * DAY)  # a training alive, quiet for days: a long epoch
    held_lease(layout, "old-dead-lease", seconds=60)  # a training that died long ago
    for days, run_id in enumerate(old, start=4):
        age(s3_bucket, f"artifacts/runs/{folder(run_id)}/", days * DAY)
    age(s3_bucket, f"artifacts/runs/{folder('newest-old')}/", 2 * DAY)
    published_before = {key for key in objects(s3_bucket, "artifacts/published/") if not key.endswith(".jsonl")}
    entries_before = stored_steps.registry(layout).entries()

    new_run = stored_run(layout, "new", checkpoint_bytes=5000)
    caplog.set_level(logging.INFO, logger="alexnet_tasks.release.retention")
    # Not blessed, so the champion stays; the newest two runs are kept: new and newest-old.
    result = gated_and_published(layout, "new", blessed=False, keep_runs=2)

    pruned = ("old-never", "old-refused", "old-dead-lease")
    assert sorted(result["pruned_runs"]) == sorted(folder(run_id) for run_id in pruned)
    for run_id in pruned:
        assert objects(s3_bucket, f"artifacts/runs/{folder(run_id)}/") == [], run_id  # the dead lease too
        assert not layout.run(run_id).exists(), f"{run_id}: this host's cached copy goes with it"
    for run_id in ("old-blessed", "old-champion", "old-leased", "newest-old"):
        kept = objects(s3_bucket, f"artifacts/runs/{folder(run_id)}/")
        assert f"artifacts/runs/{folder(run_id)}/model.keras" in kept, run_id
        assert f"artifacts/runs/{folder(run_id)}/train_summary.json" in kept, run_id
        assert layout.run(run_id).is_dir(), run_id
    assert f"artifacts/runs/{folder('old-leased')}/lease.json" in objects(s3_bucket)  # its owner's, untouched
    where = f"s3://{s3_bucket}/artifacts/runs"
    assert f"retention: removed {where}/{folder('old-refused')} (published, not blessed" in caplog.text
    assert f"retention: removed {where}/{folder('old-never')} (never published" in caplog.text
    assert f"retention: keeping {where}/{folder('old-leased')}, its training is running" in caplog.text
    # published/ is untouched: every published object stays, the index gained the new run's line only.
    assert published_before <= set(objects(s3_bucket, "artifacts/published/"))
    assert stored_steps.registry(layout).entries()[:-1] == entries_before
    assert stored_steps.registry(layout).store.champion_path() == published_path("old-champion")

    # The new run's checkpoints are gone from the store and from this host's cache; its model and state stay.
    new_key = f"artifacts/runs/{new_run.name}"
    assert result["checkpoint_bytes_freed"] == 5000 and result["cache"]["checkpoint_bytes_freed"] == 5000
    assert not [key for key in objects(s3_bucket, new_key) if "/checkpoints/" in key]
    assert {f"{new_key}/model.keras", f"{new_key}/state.json"} <= set(objects(s3_bucket, new_key))
    assert not (new_run / "checkpoints").exists() and (new_run / "model.keras").is_file()
    assert "dropped the checkpoints of" in caplog.text


def test_runs_changed_within_a_day_by_the_stores_clock_are_kept(layout, s3_bucket):
    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.release.retention import prune_stored_runs

    for number in range(4):
        stored_run(layout, f"run-{number}")
    registry = stored_steps.registry(layout)
    assert prune_stored_runs(layout.store, registry, keep=1) == []  # all written just now
    age(s3_bucket, f"artifacts/runs/{folder('run-0')}/", DAY + 60)
    age(s3_bucket, f"artifacts/runs/{folder('run-1')}/", DAY - 600)
    assert prune_stored_runs(layout.store, registry, keep=1) == [folder("run-0")]
    assert prune_stored_runs(layout.store, registry, keep=1, min_idle_seconds=DAY - 3600) == [folder("run-1")]


class StoreThatFailsOnce(ObjectStore):
    """An ``ObjectStore`` whose connection breaks once, at its ``fails_at``-th deletion (the others reach the server)."""

    def __init__(self, location, fails_at: int):
        super().__init__(location)
        self.fails_at = fails_at
        self.deleted: list[str] = []
        self.attempts = 0

    def delete_object(self, key: str) -> None:
        from botocore.exceptions import EndpointConnectionError

        self.attempts += 1
        if self.attempts == self.fails_at:
            raise EndpointConnectionError(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        super().delete_object(key)
        self.deleted.append(key)


def test_a_removal_cut_short_leaves_a_run_that_is_neither_resumed_nor_trusted(layout, s3_bucket, caplog):
    """``state.json`` and ``train_summary.json`` go first; the next prune removes the rest."""
    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.release.retention import prune_stored_runs
    from alexnet_tasks.training.run_summary import read_train_summary

    stored_run(layout, "newest")
    old = stored_run(layout, "old", checkpoint_bytes=100)
    age(s3_bucket, f"artifacts/runs/{old.name}/", 3 * DAY)
    breaking = StoreThatFailsOnce(layout.store.location, fails_at=3)
    registry = stored_steps.registry(layout)
    with caplog.at_level(logging.WARNING, logger="alexnet_tasks.release.retention"):
        assert prune_stored_runs(breaking, registry, keep=1) == []
    assert f"retention: could not remove s3://{s3_bucket}/artifacts/runs/{old.name}" in caplog.text
    # Removed before the failure: state.json and train_summary.json; after it, only the lease (released).
    assert [key.rsplit("/", 1)[1] for key in breaking.deleted] == ["state.json", "train_summary.json", "lease.json"]
    left = objects(s3_bucket, f"artifacts/runs/{old.name}/")
    assert f"artifacts/runs/{old.name}/model.keras" in left and f"artifacts/runs/{old.name}/lease.json" not in left
    # What a retried training and publish would read of it: no committed epoch, no finished training.
    assert layout.store.read(f"runs/{old.name}/state.json") is None
    layout.store.fetch_files(f"runs/{old.name}", layout.root / "elsewhere")
    assert read_train_summary(layout.root / "elsewhere") is None
    assert prune_stored_runs(layout.store, registry, keep=1) == [old.name]
    assert objects(s3_bucket, f"artifacts/runs/{old.name}/") == []


def test_checkpoints_on_the_store_are_kept_while_training_or_unfinished(layout, s3_bucket):
    from alexnet_tasks.release.retention import drop_stored_checkpoints

    training = stored_run(layout, "training", checkpoint_bytes=300)
    lease = held_lease(layout, "training", seconds=600)
    assert drop_stored_checkpoints(layout.store, training.name) == 0
    assert f"artifacts/runs/{training.name}/checkpoints/epoch-0003.keras" in objects(s3_bucket)
    lease.release()
    assert drop_stored_checkpoints(layout.store, training.name) == 300
    assert not [key for key in objects(s3_bucket, f"artifacts/runs/{training.name}/") if "/checkpoints/" in key]

    unfinished = stored_run(layout, "unfinished", checkpoint_bytes=300)
    layout.store.delete_object(f"runs/{unfinished.name}/model.keras")
    assert drop_stored_checkpoints(layout.store, unfinished.name) == 0
    assert f"artifacts/runs/{unfinished.name}/checkpoints/epoch-0003.keras" in objects(s3_bucket)
    assert drop_stored_checkpoints(layout.store, "never-trained") == 0
