#!/usr/bin/env python3
"""The docker-compose topology, natively: Airflow 3 with the CeleryExecutor on this host.

Starts api-server, scheduler, dag-processor, triggerer and two Celery workers
(queues ``default`` and ``gpu``) against a local PostgreSQL (its own database,
created if missing) and Redis, waits until every component is healthy, and
stops them cleanly. Settings come from ``deploy/airflow.env``, the file the
compose services read, plus the host-specific addresses and the secrets (from
``.env`` when present, else generated once per cluster folder).

    scripts/cluster.py start [--dir .cluster] [--port 8080] [--database alexnet_airflow] [--redis-db 0]
    scripts/cluster.py trigger --conf '{"image_size": 67, "epochs": 1}' [--wait]
    scripts/cluster.py status
    scripts/cluster.py stop
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_ENV = REPO / "deploy" / "airflow.env"
BIN = Path(sys.executable).parent

# name -> (airflow arguments, extra environment); the compose file runs the same commands.
WORKERS = {
    "worker": ("celery worker --queues default --concurrency 2", {"ALEXNET_WORKER_NAME": "worker"}),
    "worker-gpu": ("celery worker --queues gpu --concurrency 1", {"ALEXNET_WORKER_NAME": "worker-gpu"}),
}
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
SECRET_KEYS = ("AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments ignored (the subset compose's env_file accepts)."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _secrets(folder: Path) -> dict[str, str]:
    """Secrets from .env when it sets them, else generated once and kept in the cluster folder."""
    dotenv = read_env_file(REPO / ".env") if (REPO / ".env").is_file() else {}
    stored_path = folder / "secrets.json"
    stored = json.loads(stored_path.read_text()) if stored_path.is_file() else {}
    values = {}
    for key in SECRET_KEYS:
        values[key] = dotenv.get(key) or stored.get(key) or base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    stored_path.write_text(json.dumps(values))
    stored_path.chmod(0o600)
    return values


def environment(state: dict) -> dict[str, str]:
    folder = Path(state["dir"])
    database = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{state['database']}"
    env = dict(os.environ)
    env.update(read_env_file(SHARED_ENV))
    env.update(
        AIRFLOW_HOME=str(folder / "home"),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=database,
        AIRFLOW__CELERY__RESULT_BACKEND=f"db+{database.replace('+psycopg2', '')}",
        AIRFLOW__CELERY__BROKER_URL=f"redis://127.0.0.1:6379/{state['redis_db']}",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{state['port']}/execution/",
        AIRFLOW__API__PORT=str(state["port"]),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{state['port']}",
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__CORE__FERNET_KEY=state["secrets"]["AIRFLOW_FERNET_KEY"],
        AIRFLOW__API_AUTH__JWT_SECRET=state["secrets"]["AIRFLOW_JWT_SECRET"],
        AIRFLOW__API__SECRET_KEY=state["secrets"]["AIRFLOW_API_SECRET_KEY"],
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(folder / "passwords.json"),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(state["log_ports"]["triggerer"]),
        ALEXNET_ARTIFACTS=state["artifacts"],
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
    )
    return env


def _create_database(name: str) -> None:
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()


def drop_database(name: str) -> None:
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    connection.close()


def flush_redis(db: int) -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()


def _spawn(name: str, arguments: str, env: dict[str, str], folder: Path) -> int:
    log = open(folder / "logs" / f"{name}.log", "ab")
    process = subprocess.Popen(
        [str(BIN / "airflow"), *shlex.split(arguments)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, cwd=folder,
    )
    return process.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def health(state: dict) -> dict:
    """The api-server's view of its components plus whether each worker said it is ready."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{state['port']}/api/v2/monitor/health", timeout=5) as reply:
            report = json.load(reply)
    except (urllib.error.URLError, OSError, ValueError):
        report = {}
    result = {
        name: (report.get(name.replace("-", "_")) or {}).get("status")
        for name in ("metadatabase", "scheduler", "triggerer", "dag-processor")
    }
    for name in WORKERS:
        log = Path(state["dir"]) / "logs" / f"{name}.log"
        result[name] = "healthy" if log.is_file() and b" ready." in log.read_bytes() else None
    for name, pid in state["pids"].items():
        if not _alive(pid):
            result[name] = "dead"
    return result


def start(args) -> dict:
    folder = Path(args.dir).resolve()
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (folder / "home").mkdir(exist_ok=True)
    if (folder / "cluster.json").is_file() and any(_alive(p) for p in json.loads((folder / "cluster.json").read_text())["pids"].values()):
        raise SystemExit(f"a cluster is already running from {folder}; stop it first")
    state = {
        "dir": str(folder),
        "port": args.port or free_port(),
        "database": args.database,
        "redis_db": args.redis_db,
        "artifacts": str(Path(os.environ.get("ALEXNET_ARTIFACTS") or (folder / "artifacts")).resolve()),
        "log_ports": {"triggerer": free_port(), **{name: free_port() for name in WORKERS}},
        "secrets": _secrets(folder),
        "pids": {},
    }
    passwords = folder / "passwords.json"
    passwords.write_text(json.dumps({"admin": state["secrets"]["AIRFLOW_ADMIN_PASSWORD"]}))
    passwords.chmod(0o600)
    _create_database(state["database"])
    flush_redis(state["redis_db"])
    env = environment(state)
    migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True)
    if migrate.returncode:
        raise SystemExit(f"airflow db migrate failed:\n{migrate.stdout[-3000:]}{migrate.stderr[-3000:]}")
    for name in SERVICES:
        state["pids"][name] = _spawn(name, name, env, folder)
    for name, (arguments, extra) in WORKERS.items():
        worker_env = {**env, **extra, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(state["log_ports"][name])}
        state["pids"][name] = _spawn(name, f"{arguments} --celery-hostname {name}@%h", worker_env, folder)
    (folder / "cluster.json").write_text(json.dumps(state, indent=2))
    (folder / "cluster.json").chmod(0o600)

    deadline = time.monotonic() + args.timeout
    while True:
        report = health(state)
        if all(status == "healthy" for status in report.values()):
            break
        if "dead" in report.values() or time.monotonic() > deadline:
            stop(argparse.Namespace(dir=str(folder)))
            raise SystemExit(f"cluster did not become healthy: {report}; logs in {folder / 'logs'}")
        time.sleep(1)
    print(f"cluster up: http://127.0.0.1:{state['port']} (admin / see {passwords}); logs in {folder / 'logs'}")
    return state


def stop(args) -> None:
    folder = Path(args.dir).resolve()
    path = folder / "cluster.json"
    if not path.is_file():
        print(f"no cluster in {folder}")
        return
    state = json.loads(path.read_text())
    order = [*WORKERS, *reversed(SERVICES)]
    for name in order:  # workers first, so no task is handed out while services stop
        pid = state["pids"].get(name)
        if pid and _alive(pid):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(pid) for pid in state["pids"].values()):
        time.sleep(0.5)
    for pid in state["pids"].values():
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    for pid in state["pids"].values():
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    state["pids"] = {}
    path.write_text(json.dumps(state, indent=2))
    print(f"cluster in {folder} stopped")


class Client:
    """The REST API as the UI uses it: a JWT from /auth/token, then /api/v2."""

    def __init__(self, base_url: str, username: str, password: str):
        self.base_url = base_url.rstrip("/")
        reply = self._call("POST", "/auth/token", {"username": username, "password": password}, token=None)
        self.token = reply["access_token"]

    def _call(self, method: str, path: str, body=None, token: str | None = "") -> dict:
        request = urllib.request.Request(
            self.base_url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"Bearer {self.token if token == '' else token}"} if token is not None else {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{method} {path}: HTTP {error.code}: {error.read().decode()[:2000]}") from None

    def get(self, path: str) -> dict:
        return self._call("GET", path)

    def post(self, path: str, body: dict) -> dict:
        return self._call("POST", path, body)

    def patch(self, path: str, body: dict) -> dict:
        return self._call("PATCH", path, body)


def client(state: dict) -> Client:
    return Client(f"http://127.0.0.1:{state['port']}", "admin", state["secrets"]["AIRFLOW_ADMIN_PASSWORD"])


def trigger(args) -> dict:
    state = json.loads((Path(args.dir).resolve() / "cluster.json").read_text())
    api = client(state)
    deadline = time.monotonic() + 120
    while True:  # the dag-processor may not have parsed the DAG yet
        try:
            api.get("/api/v2/dags/alexnet_cifar10")
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    api.patch("/api/v2/dags/alexnet_cifar10", {"is_paused": False})
    run = api.post("/api/v2/dags/alexnet_cifar10/dagRuns", {"logical_date": None, "conf": json.loads(args.conf)})
    print(f"triggered {run['dag_run_id']}")
    while args.wait and run["state"] not in ("success", "failed"):
        time.sleep(5)
        run = api.get(f"/api/v2/dags/alexnet_cifar10/dagRuns/{urllib.request.quote(run['dag_run_id'])}")
        print(f"{run['dag_run_id']}: {run['state']}")
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(REPO / ".cluster"), help="state, logs and Airflow home")
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start")
    start_parser.add_argument("--port", type=int, default=8080)
    start_parser.add_argument("--database", default="alexnet_airflow")
    start_parser.add_argument("--redis-db", type=int, default=0)
    start_parser.add_argument("--timeout", type=float, default=180)
    commands.add_parser("stop")
    commands.add_parser("status")
    trigger_parser = commands.add_parser("trigger")
    trigger_parser.add_argument("--conf", default="{}")
    trigger_parser.add_argument("--wait", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "start":
        start(args)
    elif args.command == "stop":
        stop(args)
    elif args.command == "status":
        state = json.loads((Path(args.dir).resolve() / "cluster.json").read_text())
        print(json.dumps(health(state), indent=2))
    else:
        trigger(args)


if __name__ == "__main__":
    main()
