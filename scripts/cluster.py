#!/usr/bin/env python3
"""The docker-compose topology, natively: Airflow 3 with the CeleryExecutor on this host.

Starts api-server, scheduler, dag-processor, triggerer and two Celery workers
(queues ``default`` and ``gpu``) against a local PostgreSQL (its own database,
created if missing) and Redis, waits until every component is healthy, and
stops them cleanly. Settings come from ``deploy/airflow.env``, the file the
compose services read, plus the host-specific addresses and the secrets (from
``.env`` when present, else generated once per cluster folder).

    scripts/cluster.py start [--dir .cluster] [--port 8080] [--database alexnet_airflow] [--redis-db 7] [--gpu-workers 1]
    scripts/cluster.py trigger --conf '{"image_size": 67, "epochs": 1}' [--wait]
    scripts/cluster.py status
    scripts/cluster.py stop

The cluster folder (``.cluster/``, git-ignored) holds the secrets, the
passwords file, the Airflow home, the logs and ``cluster.json``. The Celery
broker uses a Redis database of its own (``--redis-db``, or ALEXNET_REDIS_DB;
7 by default): the cluster flushes it at start only when it is empty or holds
this project's leftovers, and never touches another database. ``--gpu-workers N``
starts N workers on the ``gpu`` queue (``worker-gpu``, ``worker-gpu-2``...) and
sets ``ALEXNET_GPU_WORKERS=N`` for every component, so a sweep trains N trials at once.
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
DEFAULT_DIR = REPO / ".cluster"
DEFAULT_REDIS_DB = 7
REDIS_OWNER_KEY = "alexnet-cifar10:cluster"  # marks a Redis db as a cluster's broker: {"dir": cluster folder}
SHARED_ENV = REPO / "deploy" / "airflow.env"
BIN = Path(sys.executable).parent

# name -> (airflow arguments, extra environment); the compose file runs the same commands.
WORKERS = {
    "worker": ("celery worker --queues default --concurrency 2", {"ALEXNET_WORKER_NAME": "worker"}),
    "worker-gpu": ("celery worker --queues gpu --concurrency 1", {"ALEXNET_WORKER_NAME": "worker-gpu"}),
}
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")


def workers(gpu_workers: int = 1) -> dict[str, tuple[str, dict[str, str]]]:
    """``WORKERS`` with ``gpu_workers`` workers on the gpu queue: ``worker-gpu``, then ``worker-gpu-2``..."""
    if gpu_workers < 1:
        raise ValueError(f"gpu_workers must be 1 or more, got {gpu_workers}")
    found = dict(WORKERS)
    arguments = WORKERS["worker-gpu"][0]
    for number in range(2, gpu_workers + 1):
        name = f"worker-gpu-{number}"
        found[name] = (arguments, {"ALEXNET_WORKER_NAME": name})
    return found


def _workers(state: dict) -> dict[str, tuple[str, dict[str, str]]]:
    return workers(int(state.get("gpu_workers", 1)))
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


def load_secrets(folder: Path) -> dict[str, str]:
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


def airflow_settings(*, home: Path, database_url: str, broker_url: str, api_url: str, secrets: dict[str, str],
                     passwords_file: Path, artifacts: str, gpu_workers: int = 1) -> dict[str, str]:
    """What every component of one deployment is given: ``deploy/airflow.env``, then its addresses and secrets.

    ``database_url`` is the metadata database's SQLAlchemy URL
    (``postgresql+psycopg2://...``; the Celery result backend uses the same
    database), ``broker_url`` the Celery broker's, ``api_url`` the api-server's
    (``http://host:port``: the UI's base URL and, under ``/execution/``, the
    workers' execution API). ``secrets`` holds ``SECRET_KEYS``. The DAGs,
    the plugins and ``alexnet_tasks`` come from this checkout.
    """
    values = read_env_file(SHARED_ENV)
    values.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=database_url,
        AIRFLOW__CELERY__RESULT_BACKEND=f"db+{database_url.replace('+psycopg2', '')}",
        AIRFLOW__CELERY__BROKER_URL=broker_url,
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{api_url}/execution/",
        AIRFLOW__API__BASE_URL=api_url,
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__CORE__FERNET_KEY=secrets["AIRFLOW_FERNET_KEY"],
        AIRFLOW__API_AUTH__JWT_SECRET=secrets["AIRFLOW_JWT_SECRET"],
        AIRFLOW__API__SECRET_KEY=secrets["AIRFLOW_API_SECRET_KEY"],
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords_file),
        ALEXNET_ARTIFACTS=artifacts,
        ALEXNET_GPU_WORKERS=str(gpu_workers),
        PYTHONPATH=str(REPO),
    )
    return values


def environment(state: dict) -> dict[str, str]:
    """This process's environment with the settings of the cluster ``state`` describes (all on 127.0.0.1)."""
    folder = Path(state["dir"])
    database = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{state['database']}"
    env = dict(os.environ)
    env.update(airflow_settings(
        home=folder / "home", database_url=database, broker_url=f"redis://127.0.0.1:6379/{state['redis_db']}",
        api_url=f"http://127.0.0.1:{state['port']}", secrets=state["secrets"],
        passwords_file=folder / "passwords.json", artifacts=state["artifacts"],
        gpu_workers=state.get("gpu_workers", 1)))
    env.update(
        AIRFLOW__API__PORT=str(state["port"]),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(state["log_ports"]["triggerer"]),
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


def _redis(db: int):
    import redis

    return redis.Redis(host="127.0.0.1", port=6379, db=db)


def _redis_owner(client) -> str | None:
    marker = client.get(REDIS_OWNER_KEY)
    return json.loads(marker)["dir"] if marker else None


def claim_redis(db: int, folder: Path) -> None:
    """Make Redis ``db`` this cluster's broker database, emptied of earlier runs' messages.

    Flushes it only when it is empty or marked as this project's cluster database
    and no other running cluster uses it; otherwise refuses, naming what is there.
    """
    folder = str(Path(folder).resolve())
    client = _redis(db)
    owner = _redis_owner(client)
    if owner is None and client.dbsize():
        sample = sorted(key.decode(errors="replace") for key in client.scan_iter(count=100))[:5]
        raise SystemExit(
            f"Redis db {db} holds keys this cluster did not write ({', '.join(sample)}, ...): "
            f"choose a free database with --redis-db or ALEXNET_REDIS_DB"
        )
    if owner is not None and owner != folder and _cluster_running(Path(owner)):
        raise SystemExit(f"Redis db {db} is in use by the cluster in {owner}: "
                         f"stop it or choose another database with --redis-db or ALEXNET_REDIS_DB")
    client.flushdb()
    client.set(REDIS_OWNER_KEY, json.dumps({"dir": folder}))


def release_redis(db: int, folder: Path) -> None:
    """Empty Redis ``db`` if this cluster claimed it; leave it alone otherwise."""
    client = _redis(db)
    if _redis_owner(client) == str(Path(folder).resolve()):
        client.flushdb()


def process_identity(pid: int) -> dict | None:
    """What tells a running process apart from any other that gets the same pid later.

    ``boot_id`` and ``start_time`` (field 22 of /proc/<pid>/stat, clock ticks
    after boot) identify it; ``exe`` is the program it runs and ``cmdline`` its
    command line at the time of the call. None when no such process runs (gone,
    or exited and not yet reaped).
    """
    proc = Path(f"/proc/{pid}")
    try:
        stat = (proc / "stat").read_text()
        exe = os.readlink(proc / "exe")
        cmdline = (proc / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name in (...) may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return {"pid": pid, "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "start_time": int(fields[19]), "exe": exe,
            "cmdline": [part.decode(errors="replace") for part in cmdline.split(b"\0")[:-1]]}


def started_identity(pid: int, timeout: float = 10) -> dict | None:
    """process_identity of a process that has just been started, once its exec has completed.

    For a moment after exec starts, /proc/<pid>/cmdline reads empty (or as empty
    strings) while the new program's memory is being set up.
    """
    deadline = time.monotonic() + timeout
    while True:
        identity = process_identity(pid)
        if identity is None or any(identity["cmdline"]) or time.monotonic() > deadline:
            return identity
        time.sleep(0.01)


def _ours(name: str, state: dict) -> bool:
    """Whether the process recorded as ``name`` still runs and is the one the cluster started.

    Same boot, same start time, same program. The command line recorded at start
    is kept for the record only: Airflow and Celery rewrite their process titles.
    """
    recorded = state.get("processes", {}).get(name)
    pid = state.get("pids", {}).get(name)
    if not recorded or recorded.get("pid") != pid:
        return False  # no record of what was started: never signal on a bare pid
    current = process_identity(pid)
    return current is not None and all(current[key] == recorded.get(key) for key in ("boot_id", "start_time", "exe"))


def _cluster_running(folder: Path) -> bool:
    path = folder / "cluster.json"
    if not path.is_file():
        return False
    state = json.loads(path.read_text())
    return any(_ours(name, state) for name in state.get("pids", {}))


def _spawn(name: str, argv: list[str], env: dict[str, str], folder: Path) -> tuple[int, dict]:
    """Start ``argv`` in a session of its own, logging to a fresh logs/<name>.log; (pid, identity).

    The previous start's log is kept as <name>.log.1, so a line it wrote (such
    as a worker's ``ready.``) never speaks for this start.
    """
    path = folder / "logs" / f"{name}.log"
    if path.exists():
        path.replace(path.with_name(path.name + ".1"))
    with open(path, "xb") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=folder,
        )
    identity = started_identity(process.pid) or {"pid": process.pid, "start_time": None}
    identity["cmdline"] = list(argv)  # the command line started (a script's reads as its interpreter's)
    return process.pid, identity


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


HEALTH_COMPONENTS = ("metadatabase", "scheduler", "triggerer", "dag-processor")


def api_health(base_url: str, components: tuple[str, ...] = HEALTH_COMPONENTS) -> dict[str, str | None]:
    """Each component's status as the api-server at ``base_url`` reports it ("healthy"), None when it cannot say."""
    try:
        with urllib.request.urlopen(f"{base_url}/api/v2/monitor/health", timeout=5) as reply:
            report = json.load(reply)
    except (urllib.error.URLError, OSError, ValueError):
        report = {}
    return {name: (report.get(name.replace("-", "_")) or {}).get("status") for name in components}


def worker_ready(log: Path) -> bool:
    """Whether the Celery worker logging to ``log`` has said it is ready to take tasks."""
    return log.is_file() and b" ready." in log.read_bytes()


def health(state: dict) -> dict:
    """The api-server's view of its components plus whether each worker said it is ready."""
    result = api_health(f"http://127.0.0.1:{state['port']}")
    for name in _workers(state):
        result[name] = "healthy" if worker_ready(Path(state["dir"]) / "logs" / f"{name}.log") else None
    for name in state["pids"]:
        if not _ours(name, state):
            result[name] = "dead"
    return result


def start(args) -> dict:
    folder = Path(args.dir).resolve()
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (folder / "home").mkdir(exist_ok=True)
    if _cluster_running(folder):
        raise SystemExit(f"a cluster is already running from {folder}; stop it first")
    state = {
        "dir": str(folder),
        "port": args.port or free_port(),
        "database": args.database,
        "redis_db": args.redis_db,
        "gpu_workers": getattr(args, "gpu_workers", 1),
        "artifacts": str(Path(os.environ.get("ALEXNET_ARTIFACTS") or (folder / "artifacts")).resolve()),
        "log_ports": {"triggerer": free_port(),
                      **{name: free_port() for name in workers(getattr(args, "gpu_workers", 1))}},
        "secrets": load_secrets(folder),
        "pids": {},
        "processes": {},
    }
    passwords = folder / "passwords.json"
    passwords.write_text(json.dumps({"admin": state["secrets"]["AIRFLOW_ADMIN_PASSWORD"]}))
    passwords.chmod(0o600)
    _create_database(state["database"])
    claim_redis(state["redis_db"], folder)
    env = environment(state)
    migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True)
    if migrate.returncode:
        raise SystemExit(f"airflow db migrate failed:\n{migrate.stdout[-3000:]}{migrate.stderr[-3000:]}")
    airflow = str(BIN / "airflow")
    for name in SERVICES:
        state["pids"][name], state["processes"][name] = _spawn(name, [airflow, name], env, folder)
    for name, (arguments, extra) in _workers(state).items():
        worker_env = {**env, **extra, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(state["log_ports"][name])}
        argv = [airflow, *shlex.split(arguments), "--celery-hostname", f"{name}@%h"]
        state["pids"][name], state["processes"][name] = _spawn(name, argv, worker_env, folder)
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
    # Only processes that are still the ones started (same boot, start time and
    # program) are signalled: after a crash or a reboot a recorded pid may name another program.
    ours = [name for name in state["pids"] if _ours(name, state)]
    for name in sorted(set(state["pids"]) - set(ours)):
        print(f"{name}: pid {state['pids'][name]} is gone or is no longer the process the cluster started; left alone")
    order = [name for name in [*_workers(state), *reversed(SERVICES)] if name in ours]
    for name in order:  # workers first, so no task is handed out while services stop
        os.killpg(state["pids"][name], signal.SIGTERM)

    def reap() -> None:
        # A recorded pid that is still our child (when start ran in this process) is
        # necessarily the process we started: reaping it is always safe.
        for pid in state["pids"].values():
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    deadline = time.monotonic() + 60
    while True:
        reap()
        running = [name for name in order if _ours(name, state)]
        if not running or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name in running:
        os.killpg(state["pids"][name], signal.SIGKILL)
    for name in order:  # every signalled process has exited or been killed: reap those that are our children
        try:
            os.waitpid(state["pids"][name], 0)
        except ChildProcessError:
            pass
    state["pids"] = {}
    state["processes"] = {}
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="state, logs and Airflow home (git-ignored)")
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start")
    start_parser.add_argument("--port", type=int, default=8080)
    start_parser.add_argument("--database", default="alexnet_airflow")
    start_parser.add_argument(
        "--redis-db", type=int, default=int(os.environ.get("ALEXNET_REDIS_DB") or DEFAULT_REDIS_DB),
        help="the Redis database of the Celery broker, the cluster's own (default: $ALEXNET_REDIS_DB or %(default)s)")
    start_parser.add_argument("--timeout", type=float, default=180)
    start_parser.add_argument("--gpu-workers", type=int, default=1,
                              help="workers on the gpu queue, each training one task at a time (default 1)")
    commands.add_parser("stop")
    commands.add_parser("status")
    trigger_parser = commands.add_parser("trigger")
    trigger_parser.add_argument("--conf", default="{}")
    trigger_parser.add_argument("--wait", action="store_true")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
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
