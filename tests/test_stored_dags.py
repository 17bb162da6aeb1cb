"""The approve task and the promote, predict and sweep DAGs on an object-store artifacts root.

Against the tests' S3 server (tests/s3_server.py). The runs are published on
the store from one tiny real training by the pipeline's own evaluate, gate
and publish, from a cache of their own; each DAG then runs through
``airflow dags test`` with ``ALEXNET_ARTIFACTS=s3://...``, the store reached
through an Airflow connection alone and another cache folder, so what it
reads and writes goes through the store.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from alexnet_tasks.layout import Layout, run_folder_name
from alexnet_tasks.store import ObjectStore, parse_location, store_cache
from builders import SUBPROCESS_ENV, evaluate_gate_publish, fake_run, s3_registry, write_decision
from conftest import airflow_bin, airflow_env, store_airflow_env

AWS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
FIRST = "manual__2026-11-20T10:00:00+00:00"
SECOND = "manual__2026-11-21T10:00:00+00:00"
REFUSED = "manual__2026-11-22T10:00:00+00:00"


@pytest.fixture
def bucket(s3_bucket, monkeypatch) -> str:
    """A new bucket on the test S3 server, its endpoint and key pair also in the subprocesses' environment."""
    for name in AWS:
        monkeypatch.setitem(SUBPROCESS_ENV, name, os.environ[name])
    return s3_bucket


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    """One migrated Airflow home (SQLite) for the module's ``dags test`` runs."""
    home = tmp_path_factory.mktemp("airflow-home")
    subprocess.run([airflow_bin(), "db", "migrate"], env=airflow_env(home, home / "unused"), check=True,
                   capture_output=True)
    return home


def _writer(bucket: str, cache: Path, monkeypatch) -> Layout:
    """The store as a host that publishes onto it sees it: its cache of its own, the library's credentials."""
    monkeypatch.setenv("ALEXNET_CACHE", str(cache))
    location = parse_location(f"s3://{bucket}/artifacts")
    return Layout(store_cache(location), ObjectStore(location))


def _publish_on_the_store(trained_run, layout: Layout, run_ids: dict[str, float]) -> None:
    """Evaluate, gate and publish the tiny training as each run id, on the store, with its accuracy floor."""
    from alexnet_tasks.ops import stored_steps

    config, shards_dir, trained_dir, _ = trained_run
    for run_id, floor in run_ids.items():
        evaluate_gate_publish(trained_dir, shards_dir, layout.root, run_id, replace(config, accuracy_floor=floor),
                              dag_id="alexnet_cifar10", registry=stored_steps.registry(layout))


def _dags_test(home: Path, env: dict, dag_id: str, conf: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    run = subprocess.run([airflow_bin(), "dags", "test", dag_id, "-c", json.dumps(conf)], env=env,
                         capture_output=True, text=True, timeout=timeout, cwd=home)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run


def _object(bucket: str, key: str) -> bytes | None:
    import boto3

    client = boto3.client("s3")
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def _objects(bucket: str, prefix: str = "") -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


# --------------------------------------------------------------------------- a sweep's slots
def test_a_trial_waits_for_one_of_the_sweeps_slot_leases_on_the_store(bucket, tmp_path, monkeypatch):
    import threading
    import time

    from alexnet_tasks.sweeps import trial_slot

    layout = _writer(bucket, tmp_path / "cache", monkeypatch)
    slots = f"artifacts/sweeps/{run_folder_name('manual__sweep')}/slots"
    events = []

    def second_trial():
        with trial_slot(layout, "manual__sweep", 1) as number:
            events.append(("second holds", number, time.monotonic()))

    with trial_slot(layout, "manual__sweep", 1) as number:
        assert number == 0 and _objects(bucket, slots) == [f"{slots}/0.json"]
        assert json.loads(_object(bucket, f"{slots}/0.json"))["purpose"] == "a trial of the sweep manual__sweep"
        waiter = threading.Thread(target=second_trial)
        waiter.start()
        time.sleep(3)  # the second trial polls every 2 s and finds the only slot held
        assert events == []
        released = time.monotonic()
    waiter.join(30)
    assert [(what, number) for what, number, _ in events] == [("second holds", 0)] and events[0][2] >= released
    assert _objects(bucket, slots) == [], "released"
    with pytest.raises(ValueError, match="slots must be 1 or more, got 0"):
        with trial_slot(layout, "manual__sweep", 0):
            pass


# --------------------------------------------------------------------------- approve
def test_the_approve_task_reads_the_decision_from_the_store_and_puts_the_answer_there(bucket, tmp_path,
                                                                                      monkeypatch):
    """The operator's own execute and execute_complete, with Airflow's wait for the answer left out."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.standard.operators.hitl import HITLOperator

    from conftest import ROOT

    run_id = "manual__2026-11-30T10:00:00+00:00"
    gated = fake_run(tmp_path / "gated", run_folder_name(run_id), 0.41, fingerprint="f" * 64)
    decision = write_decision(gated, comparison="as the store's decision says", run_id=run_id)
    writer = _writer(bucket, tmp_path / "writer-cache", monkeypatch)
    writer.store.put_files(gated, f"runs/{run_folder_name(run_id)}", ["decision.json"])

    for name, value in store_airflow_env(tmp_path / "home", bucket, tmp_path / "worker-cache").items():
        if name.startswith(("ALEXNET_", "AIRFLOW_CONN_")):
            monkeypatch.setenv(name, value)
    dag = DagBag(str(ROOT / "dags" / "alexnet_cifar10.py")).dags["alexnet_cifar10"]
    approve = dag.get_task("approve")
    asked = []
    monkeypatch.setattr(HITLOperator, "execute", lambda self, context: asked.append(self.body) or "deferred")
    context = {"params": {"publish_mode": "approval", "approval_timeout": 2}, "run_id": run_id, "dag_run": None,
               "logical_date": datetime(2026, 11, 30, 10, tzinfo=timezone.utc), "dag": dag}

    assert approve.execute(context) == "deferred"
    [body] = asked
    assert f"The gate blessed **{run_id}**" in body and "as the store's decision says" in body
    recorded = approve.execute_complete(context, {
        "chosen_options": ["Approve"], "params_input": {"comment": "fine"},
        "responded_at": datetime(2026, 11, 30, 11, tzinfo=timezone.utc),
        "responded_by_user": {"id": "7", "name": "alice"}})

    stored = json.loads(_object(bucket, f"artifacts/runs/{run_folder_name(run_id)}/approval.json"))
    assert stored == recorded
    assert (stored["outcome"], stored["user"], stored["comment"]) == ("approved", "alice", "fine")
    assert stored["fingerprint"] == decision["fingerprint"] == "f" * 64
    assert stored["decided_at"] == "2026-11-30T11:00:00+00:00"

    # A run the gate refused on the store is not asked about, whatever this host's cache holds.
    refused = "manual__2026-11-30T12:00:00+00:00"
    write_decision(fake_run(tmp_path / "gated", run_folder_name(refused), 0.1), ["accuracy below the floor"])
    writer.store.put_files(tmp_path / "gated" / "runs" / run_folder_name(refused), f"runs/{run_folder_name(refused)}",
                           ["decision.json"])
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException, match="did not bless"):
        approve.execute({**context, "run_id": refused})
    assert len(asked) == 1


# --------------------------------------------------------------------------- promote
@pytest.mark.slow
def test_the_promote_dag_moves_the_champion_on_the_store_and_appends_the_history_there(
        trained_run, bucket, tmp_path, airflow_home, monkeypatch):
    from alexnet_tasks.errors import PermanentError
    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.release.promote import promote_run

    writer = _writer(bucket, tmp_path / "writer-cache", monkeypatch)
    _publish_on_the_store(trained_run, writer, {FIRST: 0.0, SECOND: 0.0, REFUSED: 1.0})
    reader = s3_registry(bucket, tmp_path / "reader-cache")
    assert reader.champion()["run_id"] == SECOND
    before = _object(bucket, "artifacts/published/promotions.jsonl")
    assert before.count(b"\n") == 2

    # Published without its model: refused on the store as on a local root, nothing changed.
    with pytest.raises(PermanentError, match=re.escape(f"run '{REFUSED}' has no model in ")):
        promote_run(writer.published, run_id=REFUSED, comment="override the gate", user="alice",
                    registry=stored_steps.registry(writer))

    env = store_airflow_env(airflow_home, bucket, tmp_path / "worker-cache")
    _dags_test(airflow_home, env, "alexnet_cifar10_promote", {"run_id": FIRST, "reason": "second misbehaves"})

    assert reader.store.champion_path() == f"runs/{run_folder_name(FIRST)}" and reader.champion()["run_id"] == FIRST
    after = _object(bucket, "artifacts/published/promotions.jsonl")
    assert after.startswith(before) and after.count(b"\n") == 3, "appended, not rewritten"
    newest = reader.history()[0]
    assert (newest["run_id"], newest["previous_run_id"], newest["reason"]) == (FIRST, SECOND, "by_hand")
    assert newest["comment"] == "second misbehaves" and newest["dag_id"] == "alexnet_cifar10_promote"
    with sqlite3.connect(airflow_home / "airflow.db") as database:
        extras = [json.loads(extra) for (extra,) in database.execute(
            "SELECT e.extra FROM asset_event e WHERE e.source_dag_id = 'alexnet_cifar10_promote'").fetchall()]
    assert [extra["run_id"] for extra in extras] == [FIRST]
    assert extras[0]["published"].endswith(f"runs/{run_folder_name(FIRST)}")
    # The task read the store through its connection into its own cache, not the publisher's.
    assert (tmp_path / "worker-cache" / "s3" / bucket / "artifacts" / "published").is_dir()


# --------------------------------------------------------------------------- predict
@pytest.mark.slow
def test_the_predict_dag_scores_the_stores_inbox_and_puts_the_predictions_there(
        trained_run, bucket, tmp_path, airflow_home, monkeypatch):
    import io

    import boto3
    import numpy as np
    from PIL import Image

    writer = _writer(bucket, tmp_path / "writer-cache", monkeypatch)
    _publish_on_the_store(trained_run, writer, {FIRST: 0.0})
    client = boto3.client("s3")

    def png(value: int) -> bytes:
        data = io.BytesIO()
        Image.fromarray(np.full((40, 50, 3), value, dtype=np.uint8)).save(data, format="PNG")
        return data.getvalue()

    for key, body in (("inbox/light.png", png(200)), ("inbox/more/dark.png", png(30)),
                      ("inbox/broken.jpg", b"not a jpeg")):
        client.put_object(Bucket=bucket, Key=f"artifacts/{key}", Body=body)
    cache = tmp_path / "worker-cache"
    stale = cache / "s3" / bucket / "artifacts" / "inbox" / "gone.png"  # in this host's cache, no longer on the store
    stale.parent.mkdir(parents=True)
    stale.write_bytes(png(100))

    env = store_airflow_env(airflow_home, bucket, cache)
    _dags_test(airflow_home, env, "alexnet_cifar10_predict", {})

    [summary_key] = [key for key in _objects(bucket, "artifacts/scored/") if key.endswith("/summary.json")]
    folder = summary_key.removesuffix("/summary.json")
    summary = json.loads(_object(bucket, summary_key))
    inbox = f"s3://{bucket}/artifacts/inbox"
    assert summary["champion"] == FIRST and summary["input"] == inbox
    assert (summary["images"], summary["scored"]) == (3, 2), "the stale cached file is not scored"
    assert [item["file"] for item in summary["skipped"]] == [f"{inbox}/broken.jpg"]
    rows = _object(bucket, f"{folder}/predictions.csv").decode().splitlines()
    assert rows[0].startswith("file,predicted_class,probability_")
    assert sorted(row.split(",")[0] for row in rows[1:]) == [f"{inbox}/light.png", f"{inbox}/more/dark.png"]
    assert not stale.exists()


# --------------------------------------------------------------------------- sweep
@pytest.mark.slow
def test_a_sweep_on_the_store_trains_both_trials_there_and_publishes_only_the_chosen_one(
        small_archive, bucket, tmp_path, airflow_home):
    from alexnet_tasks.release.sweeps import read_sweep
    from alexnet_tasks.sweeps import trial_run_id

    path, md5 = small_archive
    conf = {"source_url": path.as_uri(), "source_md5": md5, "image_size": 67, "epochs": 1, "validation_size": 50,
            "batch_size": 16, "recipe": "reference", "publish_mode": "always",
            "trials": {"learning_rate": [0.001, 0.01]}}
    env = store_airflow_env(airflow_home, bucket, tmp_path / "worker-cache")
    _dags_test(airflow_home, env, "alexnet_cifar10_sweep", conf, timeout=1500)

    with sqlite3.connect(airflow_home / "airflow.db") as database:
        [(sweep_run_id,)] = database.execute(
            "SELECT run_id FROM dag_run WHERE dag_id = 'alexnet_cifar10_sweep'").fetchall()
    reader = s3_registry(bucket, tmp_path / "reader-cache")
    record = read_sweep(None, sweep_run_id, registry=reader)
    assert record is not None and [trial["finished"] for trial in record["trials"]] == [True, True]
    chosen = record["chosen"]
    keys = [f"artifacts/runs/{run_folder_name(trial_run_id(sweep_run_id, index))}" for index in range(2)]
    objects = set(_objects(bucket))
    for index, key in enumerate(keys):
        summary = json.loads(_object(bucket, f"{key}/train_summary.json"))
        history = json.loads(_object(bucket, f"{key}/history.json"))
        assert summary["learning_rate"] == [0.001, 0.01][index]
        assert record["trials"][index]["validation_accuracy"] == history[-1]["val_accuracy"]
        assert (f"{key}/metrics.json" in objects) == (index == chosen), "only the chosen trial is tested"
    [entry] = reader.entries()
    assert entry["run_id"] == record["chosen_run_id"] == trial_run_id(sweep_run_id, chosen)
    assert entry["sweep"] == sweep_run_id and entry["blessed"] is True
    assert reader.store.champion_path() == entry["path"]
    assert f"artifacts/published/{entry['path']}/model.keras" in objects
    assert not [key for key in objects if key.startswith("artifacts/sweeps/")], "every slot's lease released"
    assert not [key for key in objects if key.endswith("lease.json")]
