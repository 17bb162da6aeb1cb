"""The pipeline on an object-store artifacts root (alexnet_tasks.ops.stored_steps): every step, resumes, leases.

Against the tests' S3 server (moto's S3 REST protocol, conditional writes
included; tests/s3_server.py). Each "host" is a cache folder of its own
(``ALEXNET_CACHE``): what one host trained or built reaches another only
through the store.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from alexnet_tasks.layout import Layout, run_folder_name
from alexnet_tasks.store import Lease, LeaseHeldError, LeaseLostError, ObjectStore, parse_location, store_cache
from builders import SUBPROCESS_ENV, kill_after_first_epoch
from conftest import airflow_bin, airflow_env

pytestmark = pytest.mark.slow
AWS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture
def bucket(s3_bucket, monkeypatch) -> str:
    """A new bucket on the test S3 server, its endpoint and key pair also in the subprocesses' environment."""
    import os

    for name in AWS:
        monkeypatch.setitem(SUBPROCESS_ENV, name, os.environ[name])
    return s3_bucket


def _layout(bucket: str, cache: Path, monkeypatch) -> Layout:
    monkeypatch.setenv("ALEXNET_CACHE", str(cache))
    location = parse_location(f"s3://{bucket}/artifacts")
    return Layout(store_cache(location), ObjectStore(location))


def _objects(bucket: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


# --------------------------------------------------------------------------- leases
def test_a_lease_is_held_by_one_owner_and_names_it_to_the_next(bucket):
    store = ObjectStore(parse_location(f"s3://{bucket}/artifacts"))
    with Lease(store, "runs/a/lease.json", "training a", seconds=30) as first:
        with pytest.raises(LeaseHeldError, match=r"lease.json: held by .* pid \d+ \(training a\), renewed \d+ s ago"):
            Lease(store, "runs/a/lease.json", "training a", seconds=30).acquire()
        first.check()
    # Released: the next owner takes it at once.
    with Lease(store, "runs/a/lease.json", "training a", seconds=30) as second:
        assert second.took_over is None
    assert store.read("runs/a/lease.json") is None


def test_an_expired_lease_is_taken_over_and_its_old_owner_learns_it_lost(bucket):
    store = ObjectStore(parse_location(f"s3://{bucket}/artifacts"))
    stale = Lease(store, "runs/b/lease.json", "training b", seconds=3).acquire()
    stale._stop.set()  # its owner stops renewing, as a killed or frozen host does
    stale._thread.join()
    with pytest.raises(LeaseHeldError):
        Lease(store, "runs/b/lease.json", "training b", seconds=3).acquire()
    time.sleep(4.5)  # past its life by the store's own clock (Last-Modified against Date)
    with Lease(store, "runs/b/lease.json", "training b", seconds=3) as taker:
        assert taker.took_over["pid"] == stale.owner["pid"] and taker.took_over["silent_seconds"] > 3
        with pytest.raises(LeaseLostError):  # a commit of the old owner, before any renewal thread noticed
            stale.renew()
        stale.lost = None
        stale._start_renewals()  # the old owner wakes up: its next renewal loses
        deadline = time.monotonic() + 10
        while stale.lost is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(LeaseLostError, match="taken over by another owner"):
            stale.check()
        with pytest.raises(LeaseLostError):  # the synchronous renewal a commit makes first refuses as well
            stale.renew()
        taker.renew()
        taker.check()
        stale.release()  # does not delete the new owner's lease
        assert json.loads(store.read("runs/b/lease.json"))["token"] == taker.owner["token"]


def test_two_processes_taking_over_one_expired_lease_leave_one_owner(bucket):
    store = ObjectStore(parse_location(f"s3://{bucket}/artifacts"))
    stale = Lease(store, "runs/c/lease.json", "training c", seconds=2).acquire()
    stale._stop.set()
    stale._thread.join()
    time.sleep(3.5)
    code = (
        "import sys\n"
        "from alexnet_tasks.store import Lease, LeaseHeldError, ObjectStore, parse_location\n"
        f"store = ObjectStore(parse_location('s3://{bucket}/artifacts'))\n"
        "try:\n"
        "    lease = Lease(store, 'runs/c/lease.json', 'training c', seconds=60).acquire()\n"
        "    print('owner', lease.owner['token'], flush=True)\n"
        "    sys.stdin.read()\n"
        "except LeaseHeldError:\n"
        "    print('refused', flush=True)\n"
    )
    racers = [subprocess.Popen([*_python(), "-c", code], env=SUBPROCESS_ENV, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    answers = [racer.stdout.readline().split() for racer in racers]
    for racer in racers:
        racer.communicate("")
    owners = [answer[1] for answer in answers if answer[0] == "owner"]
    assert len(owners) == 1 and sum(answer[0] == "refused" for answer in answers) == 3, answers


def _python() -> list[str]:
    import sys

    return [sys.executable]


# --------------------------------------------------------------------------- the steps
def _prepare(small_archive, layout: Layout, **settings):
    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.ops import stored_steps

    path, md5 = small_archive
    config = PipelineConfig.from_dict({"source_url": path.as_uri(), "source_md5": md5, "image_size": 67,
                                       "validation_size": 50, "batch_size": 16, "recipe": "reference", **settings})
    stored_steps.download(config, layout)
    stored_steps.split(config, layout)
    stored_steps.build_shards(config, layout)
    return config


def test_a_training_killed_after_its_first_committed_epoch_resumes_on_another_host(small_archive, bucket,
                                                                                 tmp_path, monkeypatch):
    """Host one trains and is SIGKILLed after epoch 1 is on the store; host two resumes from it (its own cache)."""
    from alexnet_tasks.ops import stored_steps

    first_cache, second_cache = tmp_path / "host-one", tmp_path / "host-two"
    config = _prepare(small_archive, _layout(bucket, first_cache, monkeypatch), epochs=3)
    run_id, key = "manual__resume", f"artifacts/runs/{run_folder_name('manual__resume')}"
    code = (
        "import json\n"
        "from alexnet_tasks.config import PipelineConfig\n"
        "from alexnet_tasks.layout import Layout\n"
        "from alexnet_tasks.ops import stored_steps\n"
        "from alexnet_tasks.store import ObjectStore, parse_location, store_cache\n"
        f"location = parse_location('s3://{bucket}/artifacts')\n"
        "layout = Layout(store_cache(location), ObjectStore(location))\n"
        f"config = PipelineConfig.from_dict(json.loads({json.dumps(config.to_dict())!r}))\n"
        f"stored_steps.train(config, layout, {run_id!r})\n"
    )
    first_layout = _layout(bucket, first_cache, monkeypatch)
    watched = first_layout.run(run_id)  # host one's own copy: its state.json is written before the store's

    def on_the_store(process):
        deadline = time.monotonic() + 120
        while f"{key}/state.json" not in _objects(bucket) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"{key}/state.json" in _objects(bucket)

    monkeypatch.setitem(SUBPROCESS_ENV, "ALEXNET_CACHE", str(first_cache))
    monkeypatch.setitem(SUBPROCESS_ENV, "ALEXNET_LEASE_SECONDS", "4")
    kill_after_first_epoch(code, watched, epochs=3, while_alive=on_the_store)
    state = json.loads(ObjectStore(parse_location(f"s3://{bucket}/artifacts")).read(
        f"runs/{run_folder_name(run_id)}/state.json"))
    committed = state["epochs_done"]
    assert f"{key}/lease.json" in _objects(bucket)  # the killed owner never released it

    second = _layout(bucket, second_cache, monkeypatch)
    monkeypatch.setenv("ALEXNET_LEASE_SECONDS", "4")
    deadline = time.monotonic() + 30
    while True:
        try:
            result = stored_steps.train(config, second, run_id)
            break
        except LeaseHeldError:  # the dead owner's lease has not expired yet: a retry comes later
            assert time.monotonic() < deadline
            time.sleep(1)
    assert result["resumed_from"] == committed and result["epochs"] == 3
    history = json.loads((second.run(run_id) / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2, 3]  # each epoch once
    objects = _objects(bucket)
    assert {f"{key}/{name}" for name in ("model.keras", "history.json", "train_summary.json", "state.json")} \
        <= set(objects)
    assert [name for name in objects if name.startswith(f"{key}/checkpoints/")] == [
        f"{key}/checkpoints/epoch-0003.keras"]  # older epochs' checkpoints are gone
    assert f"{key}/lease.json" not in objects  # released at the end
    assert any(name.startswith(f"{key}/tensorboard/") for name in objects)


def test_a_whole_dag_run_on_the_store_publishes_there_and_writes_only_the_cache(small_archive, bucket,
                                                                              tmp_path):
    """``airflow dags test`` with ``ALEXNET_ARTIFACTS=s3://...`` and the store's credentials in an Airflow connection."""
    import boto3

    from alexnet_tasks.release.registry import Registry, S3Store

    path, md5 = small_archive
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    home = tmp_path / "home"
    env = airflow_env(home, tmp_path / "unused", ALEXNET_ARTIFACTS=f"s3://{bucket}/artifacts", ALEXNET_CACHE=str(cache),
                      ALEXNET_ARTIFACTS_CONN_ID="alexnet_store",
                      AIRFLOW_CONN_ALEXNET_STORE=json.dumps({
                          "conn_type": "aws", "login": "testing", "password": "testing",
                          "extra": {"endpoint_url": SUBPROCESS_ENV["AWS_ENDPOINT_URL"], "region_name": "us-east-1"}}))
    for name in AWS:
        env.pop(name, None)  # the connection alone reaches the store
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True, capture_output=True, cwd=work)
    conf = {"source_url": path.as_uri(), "source_md5": md5, "image_size": 67, "epochs": 1, "validation_size": 50,
            "batch_size": 16, "recipe": "reference", "publish_mode": "always"}
    run = subprocess.run([airflow_bin(), "dags", "test", "alexnet_cifar10", "-c", json.dumps(conf)], env=env,
                         capture_output=True, text=True, timeout=900, cwd=work)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    objects = _objects(bucket)
    registry = Registry(store=S3Store(parse_location(f"s3://{bucket}/artifacts"), boto3.client("s3"),
                                      cache=tmp_path / "reader-cache"))
    [entry] = registry.entries()
    assert entry["blessed"] is True and registry.store.champion_path() == entry["path"]
    published = f"artifacts/published/{entry['path']}"
    assert {f"{published}/{name}" for name in ("model.keras", "metrics.json", "decision.json", "history.json")} \
        <= set(objects)
    metrics = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=f"{published}/metrics.json")["Body"].read())
    assert metrics["test_images"] == 60 and entry["test_accuracy"] == metrics["test_accuracy"]
    run_key = f"artifacts/runs/{run_folder_name(entry['run_id'])}"
    assert f"{run_key}/metrics.json" in objects and f"{run_key}/model.keras" in objects
    assert not [name for name in objects if "/checkpoints/" in name or name.endswith("lease.json")]
    assert any(name.startswith(f"artifacts/data/{md5}/shards-") and name.endswith("contents.json") for name in objects)
    # Nothing outside the cache: no local artifacts root, nothing in the working directory.
    assert list(work.iterdir()) == [] and not (tmp_path / "unused").exists()
    assert (cache / "s3" / bucket / "artifacts" / "runs").is_dir()

    # TensorBoard's logs of the published run, mirrored from the store for TensorBoard to read.
    from alexnet_tasks.ops.tensorboard_logs import log_folder
    from builders import scalar_tags

    location = parse_location(f"s3://{bucket}/artifacts")
    reader = Layout(tmp_path / "reader", ObjectStore(location))
    logs = log_folder(reader, tmp_path / "logs")
    run_logs = logs / entry["path"].split("/")[-1] / "tensorboard"
    assert {"train/epoch_loss", "validation/epoch_accuracy"} <= scalar_tags(run_logs)
    assert log_folder(reader, tmp_path / "logs") == logs  # a second mirror fetches nothing new
