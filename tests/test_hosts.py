"""The pipeline on isolated hosts that share no disk (scripts/hosts.py): a run, a host killed mid-training, the plugin.

Seven hosts made of one machine's Linux namespaces: ``database`` (its own
PostgreSQL and Redis), ``store`` (the S3 server, and the archive over HTTP),
``scheduler`` (scheduler, dag-processor, api-server with the plugin),
``worker`` (queue ``default``), ``gpu-1`` and ``gpu-2`` (queue ``gpu``), and
``client``, where this test's own requests come from. Each host can write only
its folder, its /tmp and its /dev/shm (every other mount is read-only on it),
reaches only the other hosts' addresses, and knows the store's credentials
only through an Airflow connection: a run's data and results travel between
hosts through the store alone.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from alexnet_tasks.layout import run_folder_name
from conftest import ROOT, wait_for_runs

sys.path.insert(0, str(ROOT / "scripts"))
import hosts  # noqa: E402

UNAVAILABLE = hosts.namespaces_available()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))]

RUNS = "/api/v2/dags/alexnet_cifar10/dagRuns"
EPOCHS = 3


def _object(s3, bucket: str, key: str) -> bytes | None:
    from botocore.exceptions import ClientError

    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _page(api, path: str) -> tuple[int, str]:
    """A plugin page through the api-server, as the logged-in admin: (status, body)."""
    request = urllib.request.Request(api.base_url + path, headers={"Authorization": f"Bearer {api.token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _wait(check, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(interval)


def _written(folder: Path) -> dict[str, list[str]]:
    """Every file under ``folder`` by the top folder it is in: {"cache": [...], "logs": [...], ...}."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() or path.is_symlink():
            relative = path.relative_to(folder)
            found.setdefault(relative.parts[0], []).append(relative.as_posix())
    return found


def test_a_run_across_hosts_resumes_on_the_other_gpu_host_when_the_training_one_dies(small_archive, tmp_path):
    path, md5 = small_archive
    started = time.monotonic()
    deployment = hosts.Deployment(tmp_path / "hosts", gpu_hosts=2)
    network = deployment.network
    source_url = deployment.serve(path)  # http://store:8000/cifar-10-python.tar.gz
    bucket = deployment.bucket
    with deployment:
        # A host writes only its own folders and reaches only the hosts' subnet.
        probe = network.run("gpu-2", ["sh", "-c", (
            f"touch {ROOT}/written-by-a-host 2>&1; touch /etc/written-by-a-host 2>&1; "
            f"ls {network.host_folder('gpu-1')} 2>&1; ip -4 route; "
            "python3 -c 'import socket; socket.create_connection((\"192.0.2.1\", 80), timeout=5)' 2>&1 | tail -n1; "
            "getent hosts store")], check=False).stdout
        assert probe.count("Read-only file system") == 2, probe
        assert "No such file or directory" in probe  # gpu-1's folder does not exist on gpu-2
        assert [line.split()[0] for line in probe.splitlines() if " dev " in line] == [str(network.subnet)], probe
        assert "Network is unreachable" in probe and f"{network.address('store')} " in probe, probe

        with network.joined("client"):
            api = deployment.client()
            s3 = deployment.store_client()
            _wait(lambda: _registered(api), 180, "alexnet_cifar10 from the dag-processor", interval=2)
            api.patch("/api/v2/dags/alexnet_cifar10", {"is_paused": False})
            conf = {"source_url": source_url, "source_md5": md5, "image_size": 67, "recipe": "reference",
                    "validation_size": 50, "batch_size": 8, "epochs": EPOCHS, "publish_mode": "always"}
            run_id = api.post(RUNS, {"logical_date": None, "conf": conf})["dag_run_id"]
            key = f"artifacts/runs/{run_folder_name(run_id)}"

            # The gpu host that trains commits epoch 1 to the store; then it dies: SIGKILL to every process on
            # it, the Celery worker's process group and the task's own (Airflow's supervisor gives it one).
            _wait(lambda: _object(s3, bucket, f"{key}/state.json"), 600, "epoch committed to the store")
            trainer = json.loads(_object(s3, bucket, f"{key}/lease.json"))["host"]
            assert trainer in deployment.gpu_hosts, trainer
            killed = network.kill(trainer)
            assert killed, f"nothing was running on {trainer}"
            _wait(lambda: not network.pids(trainer), 30, f"end of every process on {trainer}", interval=0.1)
            committed = json.loads(_object(s3, bucket, f"{key}/state.json"))["epochs_done"]
            assert 1 <= committed < EPOCHS, "training finished before its host could be killed"
            other = next(host for host in deployment.gpu_hosts if host != trainer)

            [run] = wait_for_runs(api, [run_id], 600)
            quoted = urllib.parse.quote(run_id)
            states = {ti["task_id"]: (ti["state"], ti["try_number"], ti["hostname"])
                      for ti in api.get(f"{RUNS}/{quoted}/taskInstances")["task_instances"]}
            assert run["state"] == "success", (run, states)
            assert states["train"] == ("success", 2, other), states
            tries = api.get(f"{RUNS}/{quoted}/taskInstances/train/tries")["task_instances"]
            assert [(ti["try_number"], ti["hostname"]) for ti in tries] == [(1, trainer), (2, other)], tries
            assert {states[task][2] for task in ("download", "split", "build_shards", "evaluate", "gate", "publish")} \
                == {"worker"}, states
            # The second try's log, fetched by the api-server from the log server of the host that ran it.
            log = json.dumps(api.get(f"{RUNS}/{quoted}/taskInstances/train/logs/2"))
            assert f"resuming from the checkpoint of epoch {committed}/{EPOCHS}" in log, log[-3000:]
            assert f"took over the lease of {trainer}" in log, log[-3000:]

            # The store holds the run: each epoch once, the index line, the champion; no lease, no checkpoints.
            history = json.loads(_object(s3, bucket, f"{key}/history.json"))
            assert [entry["epoch"] for entry in history] == list(range(1, EPOCHS + 1))
            index = [json.loads(line) for line in _object(s3, bucket, "artifacts/published/index.jsonl").splitlines()]
            assert [(entry["run_id"], entry["blessed"]) for entry in index] == [(run_id, True)]
            assert _object(s3, bucket, "artifacts/published/latest").decode().strip() == index[0]["path"]
            objects = _keys(s3, bucket, "artifacts/")
            assert f"artifacts/published/{index[0]['path']}/model.keras" in objects
            assert not [name for name in objects if name.endswith("/lease.json") or "/checkpoints/" in name], objects

            # The plugin on the scheduler host lists the run it reads from the store.
            plugin_status, plugin_page = _page(api, "/alexnet/runs")

    # Every host wrote only its own folder: its home, its cache of the store, its logs, a service's data.
    allowed = {host: {"home", "cache", "logs"} for host in network.names}
    allowed["database"].add("postgres")
    allowed["store"].add("www")  # the archive it serves, put there before it started
    written = {host: _written(network.host_folder(host)) for host in network.names}
    for host, folders in written.items():
        assert set(folders) <= allowed[host], (host, sorted(folders))
        stray = [name for name in folders.get("cache", []) if not name.startswith(f"cache/s3/{bucket}/artifacts/")]
        assert not stray, (host, stray)
    run_cache = f"cache/s3/{bucket}/artifacts/runs/{run_folder_name(run_id)}"
    assert f"{run_cache}/state.json" in written[trainer]["cache"]  # it trained until it died
    assert f"{run_cache}/model.keras" in written[other]["cache"]
    assert not written["client"]
    counts = {host: {top: len(files) for top, files in folders.items()} for host, folders in written.items()}
    print(f"files written per host: {counts}; {time.monotonic() - started:.0f} s in all")

    assert plugin_status == 200, plugin_page[-2000:]
    assert f'data-run-id="{run_id}"' in plugin_page, plugin_page[-2000:]


def _registered(api) -> bool:
    try:
        api.get("/api/v2/dags/alexnet_cifar10")
    except RuntimeError:
        return False
    return True
