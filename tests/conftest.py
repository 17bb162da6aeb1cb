"""Shared fixtures: small official-format archives, a real HTTP server, an isolated Airflow home."""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

# Keep TensorFlow quiet, and give in-process Airflow imports an isolated home.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="alexnet-airflow-home-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"

# After the environment above: builders copies it for the subprocesses it starts.
from builders import plugin_env  # noqa: E402
from cifar_archive import write_archive  # noqa: E402



def pytest_sessionfinish(session, exitstatus):
    """Remove the session's Airflow home, unless a test failed (pytest keeps the folders of failed tests too)."""
    if exitstatus == 0:
        shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The groups of pytest-xdist's ``--dist loadgroup`` (``make test``): each group runs on one worker.

    The tests that start the native cluster form one group, so they run one
    after another: each cluster is several Airflow processes, and two at once
    would starve the 2 cores the suite is sized for. Every other test is grouped
    with its module, so a module's fixtures (a training, an api-server, the
    Redis databases a module's tests take turns with) are made once and never
    used by two workers at the same time.
    """
    for item in items:
        group = "cluster" if item.get_closest_marker("cluster") is not None else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def grouped(request):
    """On a ``--dist loadgroup`` worker, fail each test whose group pytest-xdist did not write.

    pytest-xdist groups by a ``@group`` suffix it writes into each node id; where
    pytest keeps the id elsewhere (9.2) the write is lost and every group is
    spread over the workers without a word: two clusters at once, a module's
    fixtures made twice.
    """
    if getattr(request.config.option, "loadgroup", False) and "@" not in request.node.nodeid.rpartition("]")[2]:
        pytest.fail(f"--dist loadgroup did not group {request.node.nodeid}: pytest-xdist could not write the group "
                    "into the node id; use the pytest that requirements-base.txt pins", pytrace=False)


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory) -> tuple[Path, str]:
    """A 200-train / 60-test image archive in the official format: (path, md5)."""
    return write_archive(tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz")


@pytest.fixture
def artifacts(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "artifacts"
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(root))
    return root


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output readable
        pass


@pytest.fixture
def http_server(tmp_path):
    """Serve ``tmp_path / 'www'`` on 127.0.0.1; yields (folder, base_url)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 (the S3 REST protocol, conditional writes included) on a free 127.0.0.1 port (tests/s3_server.py).

    Yields its endpoint URL (``http://127.0.0.1:<port>``); it serves one
    request at a time, so conditional writes are atomic as on S3, keeps its
    objects in memory and stops with the session.
    """
    from s3_server import S3Server

    server = S3Server().start()
    try:
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request) -> str:
    """A new empty bucket on the test S3 server; returns its name.

    The test's environment holds what the AWS libraries read by themselves
    (endpoint, region, key pair), as a host configured for the store does, so
    boto3, s3fs and subprocesses reach the test server unchanged.
    """
    import hashlib

    import boto3

    for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    bucket = "test-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def airflow_env(home: Path, artifacts: Path | str, **extra: str) -> dict[str, str]:
    """Environment for an isolated Airflow (SQLite) running this project's DAGs on ``artifacts`` (a folder or a URL)."""
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        ALEXNET_ARTIFACTS=str(artifacts),
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.update(extra)
    return env


def store_airflow_env(home: Path, bucket: str, cache: Path, **extra: str) -> dict[str, str]:
    """Environment for an isolated Airflow whose artifacts root is ``s3://<bucket>/artifacts`` on the test S3 server.

    The store is reached through the Airflow connection ``alexnet_store``
    alone (its key pair, and the endpoint in its extra): the ``AWS_*``
    variables are left out. ``cache`` is this host's cache of the store.
    """
    env = airflow_env(home, f"s3://{bucket}/artifacts", ALEXNET_CACHE=str(cache),
                      ALEXNET_ARTIFACTS_CONN_ID="alexnet_store", AIRFLOW_CONN_ALEXNET_STORE=json.dumps({
                          "conn_type": "aws", "login": os.environ["AWS_ACCESS_KEY_ID"],
                          "password": os.environ["AWS_SECRET_ACCESS_KEY"],
                          "extra": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "region_name": "us-east-1"}}),
                      **extra)
    for name in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)
    return env


def airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def prepare_shards(archive: tuple[Path, str], root: Path, **settings):
    """Run download, split and build_shards for ``archive``; return (config, shards_dir)."""
    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.layout import Layout
    from alexnet_tasks.data.download import download
    from alexnet_tasks.data.shards import build_shards
    from alexnet_tasks.data.split import split

    path, md5 = archive
    config = PipelineConfig(**{"source_url": str(path), "source_md5": md5, "validation_size": 50, **settings})
    batch_dir = Path(download(str(path), md5, root)["batch_dir"])
    manifest = split(batch_dir, root, config)["manifest"]
    build_shards(batch_dir, manifest, root, config)
    return config, Layout(root).shards(config)


@pytest.fixture(scope="session")
def trained_run(small_archive, tmp_path_factory):
    """One tiny real training (fast recipe, image_size 67, 3 epochs) shared by several tests."""
    from alexnet_tasks.training.train import train

    root = tmp_path_factory.mktemp("trained")
    config, shards_dir = prepare_shards(small_archive, root, image_size=67, epochs=3, batch_size=16, learning_rate=0.01, recipe="fast")
    run_dir = root / "runs" / "tiny"
    result = train(shards_dir, run_dir, config)
    return config, shards_dir, run_dir, result


@contextlib.contextmanager
def native_cluster(folder: Path, name: str, redis_db: int, gpu_workers: int = 1, dag_id: str = "alexnet_cifar10"):
    """Start scripts/cluster.py's cluster in ``folder``; yield (state, REST client) with the DAG unpaused.

    Settings come from the environment (ALEXNET_ARTIFACTS, ALEXNET_SCHEDULE, ...),
    so set those first. Stops the cluster and drops its database and Redis db after.
    """
    sys.path.insert(0, str(ROOT / "scripts"))
    import cluster

    database = f"alexnet_{name}_{os.getpid()}"
    args = argparse.Namespace(dir=str(folder), port=cluster.free_port(), database=database,
                              redis_db=redis_db, timeout=300, gpu_workers=gpu_workers)
    state = cluster.start(args)
    try:
        api = cluster.client(state)
        deadline = time.monotonic() + 180
        while True:
            try:
                api.get(f"/api/v2/dags/{dag_id}")
                break
            except RuntimeError:
                assert time.monotonic() < deadline, f"the dag-processor never registered {dag_id}"
                time.sleep(2)
        api.patch(f"/api/v2/dags/{dag_id}", {"is_paused": False})
        yield state, api
    finally:
        cluster.stop(argparse.Namespace(dir=args.dir))
        cluster.drop_database(database)
        cluster.release_redis(redis_db, folder)


@pytest.fixture
def served_archive(small_archive, http_server, tmp_path, monkeypatch) -> tuple[str, str, Path]:
    """The small archive on the HTTP server, and a cluster environment for it: (url, md5, artifacts).

    Artifacts go to ``tmp_path / 'artifacts'`` and the nightly schedule is off,
    so a cluster runs only the runs a test triggers.
    """
    path, md5 = small_archive
    folder, base = http_server
    shutil.copy(path, folder / "cifar.tar.gz")
    artifacts = tmp_path / "artifacts"
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(artifacts))
    monkeypatch.setenv("ALEXNET_SCHEDULE", "none")
    return f"{base}/cifar.tar.gz", md5, artifacts


def wait_for_runs(api, run_ids: list[str], timeout: float, each_poll=None, dag_id: str = "alexnet_cifar10") -> list[dict]:
    """Poll the REST API until every run has finished; ``each_poll(runs)`` sees every poll."""
    from urllib.parse import quote

    deadline = time.monotonic() + timeout
    while True:
        runs = [api.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}") for run_id in run_ids]
        if each_poll is not None:
            each_poll(runs)
        if all(run["state"] in ("success", "failed") for run in runs):
            return runs
        assert time.monotonic() < deadline, f"runs did not finish: {runs}"
        time.sleep(1)


def train_script(shards_dir: Path, run_dir: Path, config, prelude: str = "", call_arguments: str = "") -> str:
    """Python source that trains ``run_dir`` in a fresh interpreter (for kills and device setups)."""
    return (
        "import json, logging; logging.basicConfig(level=logging.INFO)\n"
        f"{prelude}"
        "from pathlib import Path\n"
        "from alexnet_tasks.config import PipelineConfig\n"
        "from alexnet_tasks.training.train import train\n"
        f"result = train(Path({str(shards_dir)!r}), Path({str(run_dir)!r}), "
        f"PipelineConfig(**{config.to_dict()!r}){call_arguments})\n"
        "print('RESULT', json.dumps(result))\n"
    )


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    """JWTs of Airflow's simple auth manager by role (``viewer``, ``admin``), the test home's database migrated."""
    import subprocess

    migrate = subprocess.run([airflow_bin(), "db", "migrate"], capture_output=True, text=True, env=plugin_env())
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    manager = init_auth_manager()
    return {role: manager.generate_jwt(SimpleAuthManagerUser(username=role, role=role)) for role in ("viewer", "admin")}


@pytest.fixture
def smtp():
    """A real SMTP server on 127.0.0.1 that keeps what it receives (``.messages``)."""
    from smtp_server import SMTPServer

    server = SMTPServer().start()
    yield server
    server.stop()
