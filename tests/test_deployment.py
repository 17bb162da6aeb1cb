"""The deployment: docker-compose.yaml (parsed) and the same topology run natively.

The compose file is read as compose reads it, without a Docker engine: its
``${...}`` variables resolved from a .env (``compose_project``), the services of
inactive profiles left out, and an optional dependency on one of them dropped.

The cluster test starts api-server, scheduler, dag-processor, triggerer and two
Celery workers against this machine's PostgreSQL and Redis, triggers the DAG
through the authenticated REST API as the UI does, and checks where each task
ran from the workers' own records.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
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
AIRFLOW_SERVICES = ("airflow-init", "api-server", "scheduler", "dag-processor", "triggerer", "worker", "worker-gpu")
OBJECTSTORE_SERVICES = ("minio", "minio-init")
# .env.example filled in as a user fills it: every empty value set (the MinIO key pair too).
DOTENV = {key: value or f"{key.lower().replace('_', '-')}-value"
          for key, value in cluster.read_env_file(ROOT / ".env.example").items()}
DOTENV["ALEXNET_COMPOSE_ARTIFACTS"] = ""  # the default: the shared volume
STORE_URL = "s3://alexnet/artifacts"  # what docs/deploy.md tells a user to put in .env


_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(value, variables: dict[str, str]):
    """``value`` (a string, or lists and mappings of them) with compose's variables resolved.

    ``$$`` is a literal ``$``; ``${NAME:-default}`` takes the default when NAME is
    unset or empty (``-`` only when unset); ``${NAME:?message}`` raises ValueError
    when NAME is unset or empty (``?`` only when unset); ``${NAME}`` and ``$NAME``
    are empty when unset.
    """
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        escaped, name, operator, argument, bare = match.groups()
        if escaped:
            return "$"
        name = name or bare
        present = bool(variables.get(name)) if operator and operator.startswith(":") else name in variables
        if operator and operator.endswith("-"):
            return variables[name] if present else argument
        if operator and operator.endswith("?") and not present:
            raise ValueError(f"required variable {name} is missing a value: {argument}")
        return variables.get(name, "")

    return _VARIABLE.sub(replace, value)


def compose_project(profiles: tuple[str, ...] = (), variables: dict[str, str] = DOTENV) -> dict[str, dict]:
    """The services ``docker compose --profile ... up`` runs: interpolated, inactive profiles left out.

    Like compose, the whole file is interpolated first (a ``:?`` variable of a
    service of an inactive profile fails too); a dependency on a service left
    out is dropped when marked ``required: false`` and an error otherwise.
    """
    services = interpolate(SERVICES, variables)
    active = {name: service for name, service in services.items()
              if not service.get("profiles") or set(service["profiles"]) & set(profiles)}
    for name, service in active.items():
        for dependency, condition in list(service.get("depends_on", {}).items()):
            if dependency in active:
                continue
            if condition.get("required", True):
                raise ValueError(f"service {name} requires {dependency}, which profiles {profiles} leave out")
            del service["depends_on"][dependency]
    return active


def test_compose_has_the_airflow_3_services_plus_gpu_worker_and_tensorboard():
    assert set(compose_project()) == {
        "postgres", "redis", "airflow-init", "api-server", "scheduler", "dag-processor",
        "triggerer", "worker", "worker-gpu", "tensorboard",
    } == {*AIRFLOW_SERVICES, "postgres", "redis", "tensorboard"}
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
    default = compose_project()
    for name in AIRFLOW_SERVICES:
        service = SERVICES[name]
        assert service["env_file"] == ["deploy/airflow.env"], name
        assert "artifacts:/opt/alexnet-artifacts" in service["volumes"], name
        assert default[name]["environment"]["ALEXNET_ARTIFACTS"] == "/opt/alexnet-artifacts"
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
    assert env["ALEXNET_GPU_WORKERS"] == "1"


def test_native_cluster_starts_as_many_gpu_workers_as_asked_and_tells_the_dags():
    assert list(cluster.workers()) == list(cluster.WORKERS) == ["worker", "worker-gpu"]
    three = cluster.workers(3)
    assert list(three) == ["worker", "worker-gpu", "worker-gpu-2", "worker-gpu-3"]
    assert three["worker-gpu-3"] == (cluster.WORKERS["worker-gpu"][0], {"ALEXNET_WORKER_NAME": "worker-gpu-3"})
    assert cluster.build_parser().parse_args(["start", "--gpu-workers", "2"]).gpu_workers == 2
    state = {"dir": "/tmp/x", "database": "d", "redis_db": 3, "port": 1234, "artifacts": "/a", "gpu_workers": 3,
             "log_ports": {"triggerer": 1}, "secrets": {k: "s" for k in cluster.SECRET_KEYS}}
    assert cluster.environment(state)["ALEXNET_GPU_WORKERS"] == "3"
    with pytest.raises(ValueError, match="gpu_workers must be 1 or more, got 0"):
        cluster.workers(0)


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
            assert set(by_task) == {"download", "split", "build_shards", "train", "evaluate", "gate", "approve",
                                    "publish"}
            assert by_task.pop("approve")["state"] == "skipped"  # publish_mode always: no approval asked
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


# --------------------------------------------------------------------------- cluster.py's own safety
def test_cluster_folder_with_its_secrets_is_git_ignored():
    assert cluster.DEFAULT_DIR == ROOT / ".cluster"
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("secrets.json", "passwords.json", "cluster.json", "logs/worker.log", "home/airflow.cfg"):
        check = subprocess.run(["git", "check-ignore", "-q", str(cluster.DEFAULT_DIR / name)], cwd=ROOT)
        assert check.returncode == 0, f".cluster/{name} is not git-ignored"


def test_cluster_takes_a_redis_db_of_its_own_by_default(monkeypatch):
    monkeypatch.delenv("ALEXNET_REDIS_DB", raising=False)
    assert cluster.build_parser().parse_args(["start"]).redis_db == 7
    monkeypatch.setenv("ALEXNET_REDIS_DB", "9")
    assert cluster.build_parser().parse_args(["start"]).redis_db == 9
    assert cluster.build_parser().parse_args(["start", "--redis-db", "5"]).redis_db == 5


@pytest.fixture
def redis_dbs():
    """Two scratch Redis databases (13 and 14) on 127.0.0.1:6379, emptied of this test's keys after."""
    redis = pytest.importorskip("redis")
    clients = [redis.Redis(host="127.0.0.1", port=6379, db=db) for db in (13, 14)]
    try:
        clients[0].ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    for client in clients:
        assert client.dbsize() == 0, f"Redis db {client.connection_pool.connection_kwargs['db']} is not empty"
    yield clients
    for client in clients:
        client.flushdb()


def test_cluster_flushes_only_the_redis_db_it_was_given(redis_dbs, tmp_path):
    other, mine = redis_dbs
    other.set("someone-else", "keep")
    cluster.claim_redis(14, tmp_path)
    mine.set("_kombu.binding.default", "left over by this cluster")
    cluster.release_redis(14, tmp_path)
    cluster.claim_redis(14, tmp_path)  # a restart cleans up after itself
    assert mine.get("_kombu.binding.default") is None
    cluster.release_redis(14, tmp_path)
    assert mine.dbsize() == 0
    assert other.get("someone-else") == b"keep"


def test_cluster_refuses_a_redis_db_holding_someone_elses_keys(redis_dbs, tmp_path):
    _, mine = redis_dbs
    mine.set("someone-else", "keep")
    with pytest.raises(SystemExit, match=r"Redis db 14 .*someone-else.*--redis-db"):
        cluster.claim_redis(14, tmp_path)
    cluster.release_redis(14, tmp_path)  # never claimed: nothing is flushed
    assert mine.get("someone-else") == b"keep"


def test_cluster_refuses_a_redis_db_claimed_by_another_running_cluster(redis_dbs, tmp_path):
    _, mine = redis_dbs
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (first / "cluster.json").write_text(json.dumps({"pids": {"worker": sleeper.pid},
                                                        "processes": {"worker": cluster.started_identity(sleeper.pid)}}))
        cluster.claim_redis(14, first)
        mine.set("_kombu.binding.default", "in use")
        with pytest.raises(SystemExit, match=f"Redis db 14 is in use by the cluster in {first}"):
            cluster.claim_redis(14, second)
        assert mine.get("_kombu.binding.default") == b"in use"
        cluster.release_redis(14, second)
        assert mine.get("_kombu.binding.default") == b"in use"
    finally:
        sleeper.kill()
        sleeper.wait()
    cluster.claim_redis(14, second)  # that cluster is gone: its leftovers may go
    assert mine.get("_kombu.binding.default") is None


def _stale_state(folder: Path, pid: int, processes: dict | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {"dir": str(folder), "pids": {"worker": pid}}
    if processes is not None:
        state["processes"] = processes
    (folder / "cluster.json").write_text(json.dumps(state))


@pytest.mark.parametrize("recorded", ["other start time", "other boot", "other program", "no record"])
def test_stop_leaves_alone_an_unrelated_process_that_got_a_recorded_pid(tmp_path, recorded):
    """After a crash the pid in cluster.json may belong to another program: stop must not kill it."""
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)  # its own process group, like a worker
    try:
        identity = cluster.started_identity(sleeper.pid)
        assert identity["cmdline"] == ["sleep", "300"] and identity["start_time"] > 0
        if recorded == "other start time":
            processes = {"worker": {**identity, "start_time": identity["start_time"] - 1}}
        elif recorded == "other boot":
            processes = {"worker": {**identity, "boot_id": "00000000-0000-0000-0000-000000000000"}}
        elif recorded == "other program":
            processes = {"worker": {**identity, "exe": sys.executable, "cmdline": ["airflow", "celery", "worker"]}}
        else:
            processes = None
        _stale_state(tmp_path / "cluster", sleeper.pid, processes)
        cluster.stop(argparse.Namespace(dir=str(tmp_path / "cluster")))
        time.sleep(0.5)
        assert sleeper.poll() is None, "stop killed a process the cluster did not start"
        assert json.loads((tmp_path / "cluster" / "cluster.json").read_text())["pids"] == {}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stop_signals_the_processes_the_cluster_started_even_after_they_retitle_themselves(tmp_path):
    folder = tmp_path / "cluster"
    (folder / "logs").mkdir(parents=True)
    retitle = "import setproctitle, time; setproctitle.setproctitle('[celeryd: worker@host:MainProcess]'); time.sleep(300)"
    pid, identity = cluster._spawn("worker", [sys.executable, "-c", retitle], dict(os.environ), folder)
    assert identity["cmdline"] == [sys.executable, "-c", retitle]
    assert identity["exe"] == os.path.realpath(sys.executable)
    deadline = time.monotonic() + 30
    while cluster.process_identity(pid)["cmdline"][:1] != ["[celeryd: worker@host:MainProcess]"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (folder / "cluster.json").write_text(json.dumps({"dir": str(folder), "pids": {"worker": pid},
                                                     "processes": {"worker": identity}}))
    cluster.stop(argparse.Namespace(dir=str(folder)))
    assert cluster.process_identity(pid) is None


def test_a_ready_line_from_an_earlier_start_does_not_make_a_restarted_worker_healthy(tmp_path):
    folder = tmp_path / "cluster"
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "worker.log").write_bytes(b"[2026-01-01] celery@worker ready.\n")
    pid, identity = cluster._spawn("worker", ["sleep", "300"], dict(os.environ), folder)
    try:
        state = {"dir": str(folder), "port": cluster.free_port(), "pids": {"worker": pid},
                 "processes": {"worker": identity}}
        assert cluster.health(state)["worker"] is None
        (folder / "logs" / "worker.log").open("ab").write(b"[2026-01-02] celery@worker ready.\n")
        assert cluster.health(state)["worker"] == "healthy"
        assert b"2026-01-01" in (folder / "logs" / "worker.log.1").read_bytes()  # the earlier log is kept
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# --------------------------------------------------------------------------- compose: users and volumes
AIRFLOW_USER = "${AIRFLOW_UID:-50000}:0"
VOLUME_MOUNTS = {"artifacts": "/opt/alexnet-artifacts", "airflow-logs": "/opt/airflow/logs",
                 "airflow-auth": "/opt/airflow/auth"}
IMAGE_AIRFLOW_HOME = "/opt/airflow"  # ENV AIRFLOW_HOME of the apache/airflow image
INIT_SCRIPT = "/opt/alexnet/deploy/airflow-init.sh"


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Named volume -> (path in the container, read-only)."""
    mounts = {}
    for entry in service.get("volumes", []):
        volume, path, *mode = entry.split(":")
        mounts[volume] = (path, mode == ["ro"])
    return mounts


def test_every_service_runs_as_airflow_uid_and_only_init_starts_as_root():
    for name, service in SERVICES.items():
        if name in ("postgres", "redis", *OBJECTSTORE_SERVICES):  # their images' own users
            assert "user" not in service, name
        elif name == "airflow-init":
            assert service["user"] == "0:0"
        else:
            assert service["user"] == AIRFLOW_USER, name
    # init hands the volumes to the same user the services run as
    assert SERVICES["airflow-init"]["environment"]["AIRFLOW_UID"] == AIRFLOW_USER.removesuffix(":0")
    assert cluster.read_env_file(ROOT / ".env.example")["AIRFLOW_UID"] == "50000"


def test_named_volumes_are_mounted_where_the_settings_point():
    assert set(COMPOSE["volumes"]) == {"postgres-db", "minio-data", *VOLUME_MOUNTS}
    for name, service in compose_project().items():
        if name in ("postgres", "redis", "tensorboard"):
            continue
        assert _mounts(service) == {volume: (path, False) for volume, path in VOLUME_MOUNTS.items()}, name
        environment = service["environment"]
        assert environment["ALEXNET_ARTIFACTS"] == VOLUME_MOUNTS["artifacts"]
        passwords = environment["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
        assert str(Path(passwords).parent) == VOLUME_MOUNTS["airflow-auth"]
        assert VOLUME_MOUNTS["airflow-logs"] == f"{IMAGE_AIRFLOW_HOME}/logs"
        assert "AIRFLOW__LOGGING__BASE_LOG_FOLDER" not in environment and "AIRFLOW_HOME" not in environment
    assert _mounts(SERVICES["tensorboard"]) == {"artifacts": (VOLUME_MOUNTS["artifacts"], True)}
    assert _mounts(SERVICES["postgres"]) == {"postgres-db": ("/var/lib/postgresql/data", False)}


def test_init_runs_the_script_the_image_ships():
    init = SERVICES["airflow-init"]
    assert init["entrypoint"] == "/bin/bash" and init["command"] == [INIT_SCRIPT]
    assert (ROOT / "deploy" / Path(INIT_SCRIPT).name).is_file()
    assert "COPY --chown=airflow:root deploy /opt/alexnet/deploy" in (ROOT / "Dockerfile").read_text()
    for name, service in SERVICES.items():  # the services wait for it
        if name not in ("postgres", "redis", "airflow-init", "worker", "worker-gpu", *OBJECTSTORE_SERVICES):
            assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully", name


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv, as in the image")
def test_init_script_hands_the_named_volumes_and_the_files_it_writes_to_airflow_uid():
    """deploy/airflow-init.sh run natively as root, with compose's paths moved under a scratch folder.

    The volumes start as new named volumes do (root-owned, plus a root-owned file
    and the 0600 password file an earlier init wrote as root); ``airflow`` is a
    stand-in that records who ran it.
    """
    uid = "50123"
    root = Path(tempfile.mkdtemp(prefix="alexnet-init-", dir="/tmp"))
    try:
        root.chmod(0o755)  # the scratch folder must be reachable by AIRFLOW_UID, as / is in the container
        rebase = lambda path: str(root / path.lstrip("/"))  # noqa: E731
        volumes = {volume: Path(rebase(path)) for volume, path in VOLUME_MOUNTS.items()}
        for folder in volumes.values():
            folder.mkdir(parents=True)
            folder.chmod(0o755)
        (volumes["artifacts"] / "runs").mkdir()
        (volumes["artifacts"] / "runs" / "old.json").write_text("{}")
        old_passwords = volumes["airflow-auth"] / "passwords.json"
        old_passwords.write_text('{"admin": "old"}')
        old_passwords.chmod(0o600)
        fake_bin = root / "bin"
        fake_bin.mkdir()
        (fake_bin / "airflow").write_text(f'#!/bin/sh\necho "$(id -u):$(id -g) $*" >> {root}/airflow-calls\n')
        (fake_bin / "airflow").chmod(0o755)
        (fake_bin / "python").symlink_to("/usr/bin/python3")
        (root / "airflow-calls").touch(mode=0o666)
        (root / "airflow-calls").chmod(0o666)

        compose_env = compose_project()["airflow-init"]["environment"]
        env = {key: rebase(value) for key, value in compose_env.items()
               if isinstance(value, str) and any(value.startswith(path) for path in VOLUME_MOUNTS.values())}
        env.update(PATH=f"{fake_bin}:/usr/bin:/bin", AIRFLOW_HOME=rebase(IMAGE_AIRFLOW_HOME),
                   AIRFLOW_UID=uid, AIRFLOW_ADMIN_PASSWORD="s3cret")
        run = subprocess.run(["bash", str(ROOT / "deploy" / "airflow-init.sh")], env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr

        assert (root / "airflow-calls").read_text() == f"{uid}:0 db migrate\n"
        for volume, folder in volumes.items():
            for path in [folder, *folder.rglob("*")]:
                assert (path.stat().st_uid, path.stat().st_gid) == (int(uid), 0), (volume, path)
            assert folder.stat().st_mode & 0o070 == 0o070, volume  # group 0 may write, as in the image
        passwords = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
        assert passwords == old_passwords
        assert json.loads(passwords.read_text()) == {"admin": "s3cret"}
        assert stat.S_IMODE(passwords.stat().st_mode) == 0o600
        assert sorted(p.name for p in volumes["airflow-auth"].iterdir()) == ["passwords.json"]

        # What the services then do, as AIRFLOW_UID:0: read the password file, write artifacts and logs.
        as_airflow = ["setpriv", f"--reuid={uid}", "--regid=0", "--clear-groups", "--"]
        assert subprocess.run([*as_airflow, "cat", str(passwords)], capture_output=True).returncode == 0
        for folder in (volumes["artifacts"], volumes["airflow-logs"], volumes["artifacts"] / "runs"):
            assert subprocess.run([*as_airflow, "touch", str(folder / "written")]).returncode == 0, folder

        # A second start (compose up again) changes nothing and still succeeds.
        again = subprocess.run(["bash", str(ROOT / "deploy" / "airflow-init.sh")], env=env,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        shutil.rmtree(root)


def test_init_script_refuses_root_as_the_service_user(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "AIRFLOW_UID": "0", "AIRFLOW_ADMIN_PASSWORD": "x",
           "ALEXNET_ARTIFACTS": str(tmp_path / "a"),
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp_path / "auth" / "passwords.json")}
    run = subprocess.run(["bash", str(ROOT / "deploy" / "airflow-init.sh")], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "AIRFLOW_UID=0" in run.stderr
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- compose: the objectstore profile
OBJECTSTORE = ("objectstore",)
STORE_DOTENV = {**DOTENV, "ALEXNET_COMPOSE_ARTIFACTS": STORE_URL}
OFFICIAL_RELEASE = r"RELEASE\.\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z"  # MinIO's release tags


def _bucket_created_at_init() -> str:
    """The bucket minio-init makes: ``mc mb --ignore-existing <alias>/<bucket>``."""
    init = SERVICES["minio-init"]
    arguments = init["entrypoint"] + init["command"]
    assert arguments[:3] == ["mc", "mb", "--ignore-existing"] and len(arguments) == 4, arguments
    alias, bucket = arguments[3].split("/")
    assert f"MC_HOST_{alias}" in init["environment"], init["environment"]
    return bucket


def test_the_objectstore_services_exist_only_under_their_profile():
    assert {name for name, service in SERVICES.items() if "profiles" in service} == set(OBJECTSTORE_SERVICES)
    for name in OBJECTSTORE_SERVICES:
        assert SERVICES[name]["profiles"] == list(OBJECTSTORE)
    default, store = compose_project(), compose_project(OBJECTSTORE, STORE_DOTENV)
    assert not set(default) & set(OBJECTSTORE_SERVICES)
    assert set(store) == set(default) | set(OBJECTSTORE_SERVICES)
    # Without the profile the Airflow services drop the dependency on the bucket, and start as before.
    for name in AIRFLOW_SERVICES:
        assert "minio-init" not in default[name]["depends_on"], name
        assert store[name]["depends_on"]["minio-init"] == {"condition": "service_completed_successfully",
                                                           "required": False}, name
    # Every other service uses MinIO's volume: nothing else does.
    users = {name for name, service in SERVICES.items() if "minio-data" in _mounts(service)}
    assert users == {"minio"} and _mounts(SERVICES["minio"]) == {"minio-data": ("/data", False)}


def test_without_the_profile_the_artifacts_stay_on_the_shared_volume():
    default = compose_project()
    for name in AIRFLOW_SERVICES:
        environment = default[name]["environment"]
        assert environment["ALEXNET_ARTIFACTS"] == VOLUME_MOUNTS["artifacts"], name
        assert _mounts(default[name])["artifacts"] == (VOLUME_MOUNTS["artifacts"], False), name
    assert _mounts(default["tensorboard"]) == {"artifacts": (VOLUME_MOUNTS["artifacts"], True)}
    # The MinIO key pair may stay empty without the profile: no `:?` on it anywhere.
    compose_project((), {**DOTENV, "MINIO_ROOT_USER": "", "MINIO_ROOT_PASSWORD": ""})
    # An ALEXNET_ARTIFACTS of this machine's shell (make run's) is not what compose reads.
    assert "${ALEXNET_ARTIFACTS" not in (ROOT / "docker-compose.yaml").read_text()


def test_the_objectstore_images_are_the_official_ones_pinned_to_a_release():
    assert re.fullmatch(f"minio/minio:{OFFICIAL_RELEASE}", SERVICES["minio"]["image"])
    assert re.fullmatch(f"minio/mc:{OFFICIAL_RELEASE}", SERVICES["minio-init"]["image"])
    assert "build" not in SERVICES["minio"] and "build" not in SERVICES["minio-init"]


def test_the_bucket_is_created_by_mc_once_minio_is_healthy():
    minio, init = SERVICES["minio"], SERVICES["minio-init"]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert minio["restart"] == "always"
    assert init["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert init.get("restart", "no") == "no"  # one shot
    bucket = _bucket_created_at_init()
    assert STORE_URL == f"s3://{bucket}/artifacts"
    environment = compose_project(OBJECTSTORE, STORE_DOTENV)["minio-init"]["environment"]
    [url] = environment.values()
    assert url == f"http://{DOTENV['MINIO_ROOT_USER']}:{DOTENV['MINIO_ROOT_PASSWORD']}@minio:9000", url


def test_every_airflow_service_reaches_the_store_through_the_minio_connection():
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from airflow.sdk import Connection

    from alexnet_tasks.store import parse_location

    store = compose_project(OBJECTSTORE, STORE_DOTENV)
    assert parse_location(STORE_URL).url == STORE_URL
    for name in AIRFLOW_SERVICES:
        environment = store[name]["environment"]
        assert environment["ALEXNET_ARTIFACTS"] == STORE_URL, name
        conn_id = environment["ALEXNET_ARTIFACTS_CONN_ID"]
        variable = f"AIRFLOW_CONN_{conn_id.upper()}"
        # Airflow itself reads the connection from the variable, as the service does.
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(variable, environment[variable])
            connection = Connection.get(conn_id)
            hook_config = S3Hook(aws_conn_id=conn_id).conn_config
        assert connection.conn_type == "aws", name
        assert (connection.login, connection.password) == (DOTENV["MINIO_ROOT_USER"], DOTENV["MINIO_ROOT_PASSWORD"])
        endpoint = urllib.parse.urlsplit(connection.extra_dejson["endpoint_url"])
        assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "minio", 9000), name
        assert endpoint.hostname in store and "--address" not in store["minio"]["command"][0]  # MinIO's API port
        assert connection.extra_dejson["region_name"] == "us-east-1"
        assert (hook_config.endpoint_url, hook_config.region_name) == ("http://minio:9000", "us-east-1")
        # Each container's own cache: a folder of its own filesystem, on no shared volume.
        cache = Path(environment["ALEXNET_CACHE"])
        assert cache.is_absolute(), name
        assert not any(cache.is_relative_to(path) for path, _ in _mounts(store[name]).values()), name


def test_the_minio_key_pair_comes_from_dotenv_and_minio_refuses_to_start_without_it(tmp_path):
    text = (ROOT / "docker-compose.yaml").read_text()
    uses = re.findall(r"\$\{(MINIO_ROOT_USER|MINIO_ROOT_PASSWORD)([^}]*)\}", text)
    assert {name for name, _ in uses} == {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    assert all(default == ":-" for _, default in uses), uses  # no default value: nothing baked in
    assert "minioadmin" not in text.lower()
    example = cluster.read_env_file(ROOT / ".env.example")
    assert example["MINIO_ROOT_USER"] == example["MINIO_ROOT_PASSWORD"] == ""
    assert example["ALEXNET_COMPOSE_ARTIFACTS"] == ""

    # MinIO would fall back to its default key pair: its start-up line refuses to, before it runs.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "minio").write_text(f'#!/bin/sh\necho "$*" > {tmp_path}/minio-ran\n')
    (fake_bin / "minio").chmod(0o755)
    minio = compose_project(OBJECTSTORE, STORE_DOTENV)["minio"]
    start = minio["entrypoint"] + minio["command"]
    assert start[:2] == ["/bin/sh", "-c"]

    def started(user: str, password: str) -> subprocess.CompletedProcess:
        env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "MINIO_ROOT_USER": user, "MINIO_ROOT_PASSWORD": password}
        return subprocess.run(start, env=env, capture_output=True, text=True, timeout=30)

    for user, password, named in (("", "", "MINIO_ROOT_USER"), ("alexnet", "", "MINIO_ROOT_PASSWORD"),
                                  ("alexnet", 'with"quote', "MINIO_ROOT_PASSWORD"),
                                  ("alex@net", "a" * 40, "MINIO_ROOT_USER")):
        run = started(user, password)
        assert run.returncode != 0 and f"{named} in .env" in run.stderr, (user, password, run.stderr)
        assert not (tmp_path / "minio-ran").exists()
        assert not password or password not in run.stderr  # the secret is not printed
    run = started("alexnet", "0123456789abcdef-_XYZ")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "minio-ran").read_text() == "server /data\n"


def test_the_objectstore_profile_publishes_nothing():
    for name in OBJECTSTORE_SERVICES:
        assert "ports" not in SERVICES[name], name
    store = compose_project(OBJECTSTORE, STORE_DOTENV)
    published = {name for name, service in store.items() if service.get("ports")}
    assert published == {"api-server", "tensorboard"}


def test_the_deploy_page_tells_the_objectstore_lines_compose_reads():
    page = (ROOT / "docs" / "deploy.md").read_text()
    section = page[page.index("## Object store (MinIO)"):]
    assert "docker compose --profile objectstore up -d" in section
    text = (ROOT / "docker-compose.yaml").read_text()
    example = cluster.read_env_file(ROOT / ".env.example")
    lines = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", section, re.M))
    assert {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "ALEXNET_COMPOSE_ARTIFACTS"} <= set(lines)
    for key in lines:
        assert key in example and f"${{{key}:-" in text, key
    assert lines["ALEXNET_COMPOSE_ARTIFACTS"] == STORE_URL
    assert f"s3://{_bucket_created_at_init()}/" in STORE_URL
    assert "deploy.md#object-store-minio" in (ROOT / "docs" / "several-hosts.md").read_text()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv, as in the image")
def test_init_script_prepares_no_folder_for_an_object_store_root():
    uid = "50123"
    root = Path(tempfile.mkdtemp(prefix="alexnet-init-", dir="/tmp"))
    try:
        root.chmod(0o755)  # reachable by AIRFLOW_UID, as / is in the container
        fake_bin = root / "bin"
        fake_bin.mkdir()
        (fake_bin / "airflow").write_text("#!/bin/sh\nexit 0\n")
        (fake_bin / "airflow").chmod(0o755)
        (fake_bin / "python").symlink_to("/usr/bin/python3")
        workdir = root / "workdir"
        workdir.mkdir()
        environment = compose_project(OBJECTSTORE, STORE_DOTENV)["airflow-init"]["environment"]
        env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "AIRFLOW_UID": uid, "AIRFLOW_ADMIN_PASSWORD": "s3cret",
               "AIRFLOW_HOME": str(root / "airflow"), "ALEXNET_ARTIFACTS": environment["ALEXNET_ARTIFACTS"],
               "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "auth" / "passwords.json")}
        run = subprocess.run(["bash", str(ROOT / "deploy" / "airflow-init.sh")], env=env, cwd=workdir,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"ALEXNET_ARTIFACTS={STORE_URL}: an object store, no local folder to prepare" in run.stdout
        assert list(workdir.iterdir()) == []  # no folder named s3:
        for folder in (root / "airflow" / "logs", root / "auth"):
            assert folder.stat().st_uid == int(uid), folder
        assert json.loads((root / "auth" / "passwords.json").read_text()) == {"admin": "s3cret"}
    finally:
        shutil.rmtree(root)


# --------------------------------------------------------------------------- pinned GPU image
def _pins(path: Path) -> dict[str, str]:
    """Canonical name -> version of a constraints file in which every line is NAME==VERSION."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^=\s;]+)", line.strip())
        assert match, f"{path.name}: {line!r} is not pinned with =="
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = match.group(2)
    return pins


def _requirements(path: Path) -> list:
    from packaging.requirements import Requirement

    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("-r")]


def test_gpu_constraints_pin_tensorflow_every_cuda_library_and_the_rest_as_the_cpu_ones():
    from importlib.metadata import distribution

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    gpu, cpu = _pins(ROOT / "constraints-gpu.txt"), _pins(ROOT / "constraints.txt")
    [tensorflow] = _requirements(ROOT / "requirements-gpu.txt")
    assert tensorflow.name == "tensorflow" and tensorflow.extras == {"and-cuda"}
    assert gpu["tensorflow"] in tensorflow.specifier and gpu["tensorflow"] == cpu["tensorflow-cpu"]

    # tensorflow-cpu of the same release declares the same dependencies and the same
    # and-cuda extra as tensorflow: every one of them is pinned, within its bounds.
    metadata = distribution("tensorflow-cpu")
    assert metadata.version == gpu["tensorflow"]
    environment = default_environment()
    cuda = []
    for requirement in map(Requirement, metadata.requires):
        wanted_by_gpu = requirement.marker is None or requirement.marker.evaluate({**environment, "extra": "and-cuda"})
        if not wanted_by_gpu:
            continue
        name = canonicalize_name(requirement.name)
        assert name in gpu, f"constraints-gpu.txt does not pin {name}"
        assert gpu[name] in requirement.specifier, (name, gpu[name], str(requirement.specifier))
        if requirement.marker is not None and "extra" in str(requirement.marker):
            cuda.append(name)
    assert len(cuda) >= 10 and all(name.startswith("nvidia-") for name in cuda), cuda
    assert {name for name in gpu if name.startswith("nvidia-")} >= set(cuda)

    # What both images install has one version; the GPU image adds only TensorFlow's CUDA build.
    for name in set(gpu) & set(cpu):
        assert gpu[name] == cpu[name], (name, gpu[name], cpu[name])
    extra = set(gpu) - set(cpu)
    assert extra <= {"tensorflow", "setuptools", "wheel"} | {name for name in extra if name.startswith("nvidia-")}, extra
    assert set(cpu) - set(gpu) == {"tensorflow-cpu"}
    for requirement in _requirements(ROOT / "requirements-base.txt"):
        assert gpu[canonicalize_name(requirement.name)] in requirement.specifier, requirement


def test_gpu_image_installs_with_the_gpu_constraints():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG CONSTRAINTS=constraints.txt" in dockerfile
    assert re.search(r"pip install .*-r /opt/alexnet/\$\{REQUIREMENTS\} -c /opt/alexnet/\$\{CONSTRAINTS\}", dockerfile)
    copied = re.search(r"COPY --chown=airflow:root (requirements.*) /opt/alexnet/\n", dockerfile).group(1).split()
    assert {"constraints.txt", "constraints-gpu.txt", "requirements-gpu.txt"} <= set(copied)
    assert SERVICES["worker-gpu"]["build"]["args"] == {"REQUIREMENTS": "requirements-gpu.txt",
                                                       "CONSTRAINTS": "constraints-gpu.txt"}
    for name, service in SERVICES.items():  # every other image is the CPU build with the CPU pins
        if name not in ("postgres", "redis", "worker-gpu") and "build" in service:
            assert service["build"]["args"] == {"REQUIREMENTS": "requirements.txt"}, name
    assert "scripts/pin_gpu_constraints.py" in (ROOT / "constraints-gpu.txt").read_text()
