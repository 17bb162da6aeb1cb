"""The deployment: docker-compose.yaml (parsed) and the same topology run natively.

The cluster test starts api-server, scheduler, dag-processor, triggerer and two
Celery workers against this machine's PostgreSQL and Redis, triggers the DAG
through the authenticated REST API as the UI does, and checks where each task
ran from the workers' own records.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
import urllib.parse
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, native_cluster, wait_for_runs

sys.path.insert(0, str(ROOT / "scripts"))
import cluster  # noqa: E402

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]
SHARED = cluster.read_env_file(ROOT / "deploy" / "airflow.env")


def test_compose_has_the_airflow_3_services_plus_gpu_worker_and_tensorboard():
    assert set(SERVICES) == {
        "postgres", "redis", "airflow-init", "api-server", "scheduler", "dag-processor",
        "triggerer", "worker", "worker-gpu", "tensorboard",
    }
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        assert SERVICES[name]["command"] == name


def test_compose_workers_run_the_native_cluster_commands():
    for name, (arguments, extra) in cluster.WORKERS.items():
        assert SERVICES[name]["command"] == arguments
        assert SERVICES[name]["environment"]["ALEXNET_WORKER_NAME"] == extra["ALEXNET_WORKER_NAME"]
    gpu = shlex.split(SERVICES["worker-gpu"]["command"])
    assert gpu[gpu.index("--queues") + 1] == SHARED["ALEXNET_GPU_QUEUE"] == "gpu"
    assert gpu[gpu.index("--concurrency") + 1] == "1"
    default = shlex.split(SERVICES["worker"]["command"])
    assert default[default.index("--queues") + 1] == SHARED["AIRFLOW__OPERATORS__DEFAULT_QUEUE"]


def test_gpu_worker_reserves_nvidia_devices_and_uses_the_gpu_build():
    worker = SERVICES["worker-gpu"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["build"]["args"]["REQUIREMENTS"] == "requirements-gpu.txt"
    assert SERVICES["worker"]["build"]["args"]["REQUIREMENTS"] == "requirements.txt"


def test_every_airflow_service_reads_the_shared_settings_and_one_artifacts_volume():
    airflow_services = [n for n in SERVICES if n not in ("postgres", "redis", "tensorboard")]
    for name in airflow_services:
        service = SERVICES[name]
        assert service["env_file"] == ["deploy/airflow.env"], name
        assert "artifacts:/opt/alexnet-artifacts" in service["volumes"], name
        assert service["environment"]["ALEXNET_ARTIFACTS"] == "/opt/alexnet-artifacts"
        assert service["environment"]["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379")
        assert service["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert "artifacts:/opt/alexnet-artifacts:ro" in SERVICES["tensorboard"]["volumes"]
    assert "artifacts" in COMPOSE["volumes"]


def test_only_ui_and_tensorboard_are_published_on_localhost_by_default():
    published = {name: service.get("ports", []) for name, service in SERVICES.items() if service.get("ports")}
    assert set(published) == {"api-server", "tensorboard"}
    for ports in published.values():
        for port in ports:
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:")
    assert "ports" not in SERVICES["postgres"] and "ports" not in SERVICES["redis"]


def test_secrets_come_from_dotenv_and_are_never_baked_in():
    text = (ROOT / "docker-compose.yaml").read_text()
    for variable in ("AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "POSTGRES_PASSWORD"):
        assert f"${{{variable}:?" in text, variable
    assert "${AIRFLOW_ADMIN_PASSWORD:?" in text
    example = cluster.read_env_file(ROOT / ".env.example")
    assert set(cluster.SECRET_KEYS) <= set(example) and all(not example[k] for k in cluster.SECRET_KEYS)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"(FERNET|JWT|PASSWORD|SECRET)", dockerfile)
    assert "requirements" in dockerfile and "constraints.txt" in dockerfile
    for service in SERVICES.values():  # nothing is pip-installed when a container starts
        assert "pip install" not in json.dumps(service.get("command", "")) + json.dumps(service.get("entrypoint", ""))


def test_broker_redelivery_and_task_tokens_outlast_the_longest_training(monkeypatch):
    train_timeout = int(SHARED["ALEXNET_TRAIN_TIMEOUT_HOURS"]) * 3600
    assert int(SHARED["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"]) > train_timeout
    assert int(SHARED["AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME"]) > train_timeout
    assert SHARED["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    # The DAG reads the same timeout.
    monkeypatch.setenv("ALEXNET_TRAIN_TIMEOUT_HOURS", SHARED["ALEXNET_TRAIN_TIMEOUT_HOURS"])
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(str(ROOT / "dags")).dags["alexnet_cifar10"]
    assert dag.get_task("train").execution_timeout.total_seconds() == train_timeout


def test_native_cluster_reads_the_same_shared_settings():
    state = {"dir": "/tmp/x", "database": "d", "redis_db": 3, "port": 1234, "artifacts": "/a",
             "log_ports": {"triggerer": 1}, "secrets": {k: "s" for k in cluster.SECRET_KEYS}}
    env = cluster.environment(state)
    for key, value in SHARED.items():
        assert env[key] == value, key
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:1234/execution/"


# --------------------------------------------------------------------------- the cluster
def _executed_tasks(log: Path) -> set[tuple[str, str]]:
    """(run_id, task_id) of every workload a worker says it executed."""
    found = set()
    for match in re.finditer(r"Executing workload in Celery: .*?run_id=([^/]+)/task_id=([^/]+)/", log.read_text()):
        found.add((match.group(1), match.group(2)))
    return found


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


@pytest.mark.cluster
@pytest.mark.slow
def test_native_cluster_runs_the_dag_with_train_on_the_gpu_worker(served_archive):
    url, md5, artifacts = served_archive
    started = time.monotonic()
    with native_cluster(artifacts.parent / "cluster", "deploy", redis_db=11) as (state, api):
        conf = {"source_url": url, "source_md5": md5, "image_size": 67, "epochs": 1,
                "validation_size": 50, "batch_size": 16, "recipe": "reference",
                "publish_mode": "always"}  # both runs are published, whatever tiny data scores
        # Two triggers at once: max_active_runs=1 makes the second wait for the first.
        run_ids = [api.post("/api/v2/dags/alexnet_cifar10/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]
                   for _ in range(2)]

        def at_most_one_running(polled: list[dict]) -> None:
            running = [run["dag_run_id"] for run in polled if run["state"] == "running"]
            assert len(running) <= 1, f"two runs at once: {running}"

        runs = dict(zip(run_ids, wait_for_runs(api, run_ids, 1200, each_poll=at_most_one_running)))
        tiny_run_seconds = time.monotonic() - started
        print(f"cluster start + two tiny runs: {tiny_run_seconds:.0f} s")

        first, second = (runs[run_id] for run_id in run_ids)
        assert first["state"] == second["state"] == "success", runs
        ordered = sorted(runs.values(), key=lambda run: _parse_time(run["start_date"]))
        assert _parse_time(ordered[1]["start_date"]) >= _parse_time(ordered[0]["end_date"])

        logs = Path(state["dir"]) / "logs"
        gpu_worker, default_worker = _executed_tasks(logs / "worker-gpu.log"), _executed_tasks(logs / "worker.log")
        for run_id in run_ids:
            instances = api.get(f"/api/v2/dags/alexnet_cifar10/dagRuns/{urllib.parse.quote(run_id)}/taskInstances")
            by_task = {ti["task_id"]: ti for ti in instances["task_instances"]}
            assert set(by_task) == {"download", "split", "build_shards", "train", "evaluate", "gate", "publish"}
            for task_id, ti in by_task.items():
                assert ti["state"] == "success", (task_id, ti)
                expected = "worker-gpu" if task_id == "train" else "worker"
                assert ti["hostname"] == expected, (task_id, ti["hostname"])
                executed_by = gpu_worker if task_id == "train" else default_worker
                other = default_worker if task_id == "train" else gpu_worker
                assert (run_id, task_id) in executed_by and (run_id, task_id) not in other, task_id

        index = [json.loads(line) for line in (artifacts / "published" / "index.jsonl").read_text().splitlines()]
        assert sorted(line["run_id"] for line in index) == sorted(run_ids)
        latest = artifacts / "published" / "latest"
        assert json.loads((latest / "metrics.json").read_text())["test_images"] == 60
        assert (latest / "model.keras").is_file()
    for pid in state["pids"].values():
        assert not cluster._alive(pid)
