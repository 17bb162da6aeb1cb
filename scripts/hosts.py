#!/usr/bin/env python3
"""Isolated hosts on one Linux machine, and the pipeline deployed across them: no two hosts share a disk.

A host is a network namespace (``ip netns``) with one address on a private
subnet (10.231.0.0/24), joined to the others by a bridge that lives in a
namespace of its own: the machine's own network takes no part, and with no
default route a host reaches the other hosts' addresses and nothing else. The
hosts find each other by name through a hosts file mounted over
``/etc/hosts``. A command runs on a host as

    ip netns exec <namespace> unshare --mount --uts --propagation private sh -c '<setup>' <host> <command>...

where the setup names the host (``hostname``) and gives it its own view of
the files: every mount read-only, the project's code and virtualenv among
them (hosts share an image; where they lie under /tmp they are bound into the
host's /tmp at their paths), a fresh tmpfs on ``/tmp`` and ``/dev/shm``, and
the host's folder ``<dir>/<host>/`` writable at that same path: ``home/``
(``$HOME``), ``cache/`` (``$ALEXNET_CACHE``), ``logs/`` and what a service
keeps (PostgreSQL's data on the database host). A write anywhere else fails
with "Read-only file system", so what a host wrote is what its folder holds.

The deployment (``Deployment``) puts the docker-compose topology on such hosts:

* ``database``: its own PostgreSQL (initdb in its folder, run as ``postgres``)
  and Redis (no persistence), both listening on its address;
* ``store``: the tests' S3 server (tests/s3_server.py, moto) on port 9000, and
  ``python -m http.server`` on port 8000 serving ``<dir>/store/www/``;
* ``scheduler``: ``airflow scheduler``, ``dag-processor`` and ``api-server``
  (port 8080, the results plugin loaded from plugins/); no triggerer, so a
  ``publish_mode`` ``approval`` run would wait for ever;
* ``worker``: a Celery worker on the ``default`` queue; ``gpu-1``, ``gpu-2``...:
  one each on the ``gpu`` queue, one task at a time;
* ``client``: no services; where a person (``exec client``) or a test
  (``Network.joined``) reaches the others from.

Every Airflow host reads ``deploy/airflow.env`` (scripts/cluster.py's
``airflow_settings``), ``ALEXNET_ARTIFACTS=s3://<bucket>/artifacts`` and the
store's credentials only through the Airflow connection ``alexnet_store``.
Its settings make a dead host's task fail and retry within a minute (short
heartbeat timeout, lease and retry delay): these hosts exist to watch that.

    scripts/hosts.py start [--dir /tmp/alexnet-hosts] [--gpu-hosts 2] [--serve FILE]
    scripts/hosts.py exec [--dir ...] HOST -- COMMAND...   # exec client -- curl -s http://scheduler:8080/api/v2/version
    scripts/hosts.py stop [--dir ...]

Needs root (namespaces and mounts), iproute2, util-linux (unshare, runuser),
PostgreSQL's server (/usr/lib/postgresql/<version>/bin) and redis-server.
``stop`` ends every process on the hosts (they are the processes in the
hosts' network namespaces) and removes the namespaces; the folder stays for
reading.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster  # noqa: E402  (scripts/cluster.py: the settings, secrets, health checks and REST client it shares)

REPO = cluster.REPO
BIN = cluster.BIN
SUBNET = ipaddress.ip_network("10.231.0.0/24")
FIRST_ADDRESS = 10  # hosts get .10, .11, ... in the order given
NAMESPACE_PREFIX = "alexnet-hosts"
HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
HOST_FOLDERS = ("home", "cache", "logs")
DEFAULT_DIR = Path("/tmp/alexnet-hosts")
CLONE_NEWNET = 0x40000000  # setns(2): the calling thread's network namespace

# Filesystems that are the kernel's interfaces, not storage: left as they are on a host.
KERNEL_FILESYSTEMS = ("proc", "sysfs", "devpts", "cgroup", "cgroup2", "mqueue", "bpf", "tracefs", "debugfs",
                      "securityfs", "fusectl", "configfs", "pstore", "hugetlbfs", "binfmt_misc", "autofs", "nsfs",
                      "efivarfs", "rpc_pipefs")


class HostError(RuntimeError):
    """A host could not be set up, or a command on it failed; the message says which and why."""


def _ip(*arguments: str) -> str:
    """Run ``ip <arguments>``; its output, or HostError naming the command and what it said."""
    done = subprocess.run(["ip", *arguments], capture_output=True, text=True)
    if done.returncode:
        raise HostError(f"ip {' '.join(arguments)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def namespaces_available() -> str | None:
    """None when this process can create hosts here, else why not (not root, no ``ip netns``)."""
    if os.geteuid() != 0:
        return "isolated hosts need root (network namespaces, mounts)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "isolated hosts need iproute2's ip and util-linux's unshare"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode:
        return f"ip netns is unavailable here: {probe.stderr.strip()}"
    return None


def shared_folders() -> list[Path]:
    """What every host sees of this machine, read-only, even where it lies under /tmp: the code and the Python it runs.

    This checkout, the virtualenv (``sys.prefix``, its links resolved) and the
    Python installation it was made from.
    """
    found = {REPO, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    return sorted(found)


class Network:
    """Hosts ``names`` on one private subnet, their folders under ``folder``.

    ``create`` makes the namespaces and the bridge, ``destroy`` ends every
    process on the hosts and removes them (use the network as a context
    manager). ``start`` and ``run`` run a command on a host; ``kill`` ends
    every process on one; ``joined`` puts the calling thread on a host's
    network, so this process can reach the hosts by their addresses.
    """

    def __init__(self, folder: Path, names: list[str], name: str | None = None,
                 subnet: ipaddress.IPv4Network = SUBNET):
        for host in names:
            if not HOST_NAME.match(host) or host == "bridge":
                raise ValueError(f"host name {host!r}: expected lower-case letters, digits and '-' "
                                 f"(at most 31, not 'bridge')")
        if len(set(names)) != len(names):
            raise ValueError(f"host names {names}: each name once")
        if len(names) > subnet.num_addresses - FIRST_ADDRESS - 1:
            raise ValueError(f"{len(names)} hosts do not fit in {subnet}")
        self.folder = Path(folder).resolve()
        self.names = list(names)
        self.name = name or f"{NAMESPACE_PREFIX}-{secrets.token_hex(3)}"
        self.subnet = subnet
        self.addresses = {host: str(subnet.network_address + FIRST_ADDRESS + index)
                          for index, host in enumerate(names)}
        self.processes: dict[str, list[subprocess.Popen]] = {host: [] for host in names}
        self.shared = shared_folders()

    # ----------------------------------------------------------------- names and folders
    def namespace(self, host: str) -> str:
        self._check(host)
        return f"{self.name}-{host}"

    @property
    def bridge_namespace(self) -> str:
        return f"{self.name}-bridge"

    def address(self, host: str) -> str:
        self._check(host)
        return self.addresses[host]

    def host_folder(self, host: str) -> Path:
        """``<dir>/<host>``: the only folder the host can write besides its fresh /tmp."""
        self._check(host)
        return self.folder / host

    def home(self, host: str) -> Path:
        return self.host_folder(host) / "home"

    def cache(self, host: str) -> Path:
        return self.host_folder(host) / "cache"

    def logs(self, host: str) -> Path:
        return self.host_folder(host) / "logs"

    @property
    def hosts_file(self) -> Path:
        return self.folder / ".network" / "hosts"

    def _stage(self, host: str) -> Path:
        """An empty folder where the host's new /tmp is put together before it is moved over /tmp."""
        return self.folder / ".network" / f"stage-{host}"

    def _check(self, host: str) -> None:
        if host not in self.addresses:
            raise ValueError(f"no host {host!r} on network {self.name}; its hosts: {', '.join(self.names)}")

    # ----------------------------------------------------------------- life
    def create(self) -> Network:
        """Make the hosts: their folders, namespaces, addresses and the bridge between them."""
        (self.folder / ".network").mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{address} {host}" for host, address in self.addresses.items())]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        for host in self.names:
            for sub in HOST_FOLDERS:
                (self.host_folder(host) / sub).mkdir(parents=True, exist_ok=True)
            self.host_folder(host).chmod(0o755)  # its services' own users (postgres) reach their folders
            self._stage(host).mkdir(exist_ok=True)
        self.save()
        _ip("netns", "add", self.bridge_namespace)
        _ip("-n", self.bridge_namespace, "link", "set", "lo", "up")
        _ip("-n", self.bridge_namespace, "link", "add", "bridge0", "type", "bridge")
        _ip("-n", self.bridge_namespace, "link", "set", "bridge0", "up")
        for index, host in enumerate(self.names):
            namespace, port = self.namespace(host), f"port{index}"
            _ip("netns", "add", namespace)
            _ip("-n", self.bridge_namespace, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", namespace)
            _ip("-n", self.bridge_namespace, "link", "set", port, "master", "bridge0", "up")
            _ip("-n", namespace, "addr", "add", f"{self.addresses[host]}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        return self

    def destroy(self, grace: float = 30) -> None:
        """End every process on the hosts (SIGTERM, then SIGKILL after ``grace`` s) and remove the namespaces."""
        existing = set(_ip("netns", "list").split())
        hosts = [host for host in reversed(self.names) if self.namespace(host) in existing]
        for host in hosts:  # the last started first: workers before the services they talk to
            self.kill(host, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(self.pids(host) for host in hosts) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.5)
        for host in hosts:
            self.kill(host, signal.SIGKILL)
        while any(self.pids(host) for host in hosts):
            self._reap()
            time.sleep(0.1)
        for processes in self.processes.values():
            for process in processes:
                process.wait()
        for namespace in [*(self.namespace(host) for host in hosts), self.bridge_namespace]:
            if namespace in existing:
                _ip("netns", "delete", namespace)

    def __enter__(self) -> Network:
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc) -> None:
        self.destroy()

    def save(self) -> None:
        state = {"name": self.name, "names": self.names, "subnet": str(self.subnet)}
        (self.folder / ".network" / "network.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, folder: Path) -> Network:
        path = Path(folder).resolve() / ".network" / "network.json"
        if not path.is_file():
            raise HostError(f"{path}: no network was created in {folder}")
        state = json.loads(path.read_text())
        return cls(folder, state["names"], state["name"], ipaddress.ip_network(state["subnet"]))

    # ----------------------------------------------------------------- processes
    def setup_script(self, host: str) -> str:
        """The shell lines that give a new mount namespace the host's view of the files (see the module's doc).

        The host's folder keeps its own path, and nothing else of ``<dir>`` is
        seen: the folder is bound into a fresh tmpfs (with ``shared_folders``
        that lie under /tmp, read-only), that tmpfs is moved over /tmp, an
        empty tmpfs covers ``<dir>`` (unless /tmp already does), and the
        folder is moved to its path there.
        """
        folder, stage, network = (shlex.quote(str(path)) for path in (self.host_folder(host), self._stage(host),
                                                                        self.folder))
        kernel = "|".join(KERNEL_FILESYSTEMS)
        shared = []  # the code and the Python it runs, when under /tmp: at their paths in the new /tmp, read-only
        for path in self.shared:
            if str(path).startswith("/tmp/"):
                inside = shlex.quote(f"{self._stage(host)}/{str(path)[len('/tmp/'):]}")
                shared += [f"mkdir -p {inside}", f"mount -n --bind {shlex.quote(str(path))} {inside}",
                           f"mount -n -o remount,bind,ro {inside}"]
        hidden_by_tmp = str(self.folder).startswith("/tmp/")
        return "\n".join([
            "set -eu",
            f"hostname {shlex.quote(host)}",
            "# every mount read-only but the kernel's interfaces (mount point and type from mountinfo)",
            "mounts=$(awk '{ for (i = 7; $i != \"-\"; i++) ; print $(i + 1), $5 }' /proc/self/mountinfo)",
            'echo "$mounts" | while read -r type point; do',
            f"  case $type in {kernel}) continue;; esac",
            '  mount -n -o remount,bind,ro "$point" || { echo "cannot make $point read-only" >&2; exit 1; }',
            "done",
            f"mount -n --bind {shlex.quote(str(self.hosts_file))} /etc/hosts",
            "# a fresh /tmp holding, for a moment, the host's folder",
            f"mount -n -t tmpfs -o mode=1777 tmpfs {stage}",
            *shared,
            f"mkdir {stage}/.host",
            f"mount -n --bind {folder} {stage}/.host",
            f"mount -n -o remount,bind,rw {stage}/.host",
            f"mount -n --move {stage} /tmp",
            "# the folder at its own path, the rest of the hosts' folders hidden",
            *([] if hidden_by_tmp else [f"mount -n -t tmpfs -o mode=755 tmpfs {network}"]),
            f"mkdir -p {folder}",
            f"mount -n --move /tmp/.host {folder}",
            "rmdir /tmp/.host",
            *([] if hidden_by_tmp else [f"mount -n -o remount,ro {network}"]),
            "mount -n -t tmpfs -o mode=1777 tmpfs /dev/shm",
            f"cd {shlex.quote(str(self.home(host)))}",
            'exec "$@"',
        ])

    def command(self, host: str, argv: list[str], user: str | None = None) -> list[str]:
        """The command line that runs ``argv`` on ``host`` (as ``user`` when given, through runuser)."""
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        return ["ip", "netns", "exec", self.namespace(host), "unshare", "--mount", "--uts", "--propagation",
                "private", "sh", "-c", self.setup_script(host), host, *argv]

    def environment(self, host: str, **extra: str) -> dict[str, str]:
        """A host's own environment: nothing of this process's but the virtualenv on PATH."""
        return {"PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": str(self.home(host)), "LANG": "C.UTF-8", "TMPDIR": "/tmp", **extra}

    def start(self, host: str, argv: list[str], env: dict[str, str] | None = None, log: str | None = None,
              user: str | None = None) -> subprocess.Popen:
        """Start ``argv`` on ``host`` in a session of its own, its output in ``logs/<log>.log``."""
        path = self.logs(host) / f"{log or Path(argv[0]).name}.log"
        with open(path, "ab") as output:
            process = subprocess.Popen(self.command(host, argv, user), env=env or self.environment(host),
                                       stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        process.service = log or Path(argv[0]).name
        self.processes[host].append(process)
        return process

    def run(self, host: str, argv: list[str], env: dict[str, str] | None = None, user: str | None = None,
            timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host`` to its end; with ``check``, HostError (its output's end) if it fails."""
        done = subprocess.run(self.command(host, argv, user), env=env or self.environment(host),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode:
            raise HostError(f"{host}: {shlex.join(argv)}: exit {done.returncode}:\n"
                            f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    def pids(self, host: str) -> list[int]:
        """Every process on ``host`` (in its network namespace), this process excepted."""
        try:
            found = _ip("netns", "pids", self.namespace(host)).split()
        except HostError:
            return []
        return [int(pid) for pid in found if int(pid) != os.getpid()]

    def kill(self, host: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process on ``host`` (SIGKILL: the host dies); the pids signalled."""
        signalled = []
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                signalled.append(pid)
        return signalled

    def _reap(self) -> None:
        for processes in self.processes.values():
            for process in processes:
                process.poll()

    @contextlib.contextmanager
    def joined(self, host: str):
        """While inside, the calling thread's sockets are on ``host``'s network (its files stay this process's)."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.namespace(host)}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise HostError(f"cannot join {host}'s network: {os.strerror(ctypes.get_errno())}")
            try:
                yield self
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise HostError(f"cannot leave {host}'s network: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(target)
            os.close(own)


# --------------------------------------------------------------------------- the deployment
API_PORT, STORE_PORT, WEB_PORT = 8080, 9000, 8000
STORE_CONNECTION = "alexnet_store"
STORE_KEYS = ("alexnet", "alexnet-store-secret")  # the test S3 server takes any key pair
DEFAULT_BUCKET = "alexnet"
SCHEDULER_SERVICES = ("scheduler", "dag-processor", "api-server")
DEFAULT_QUEUE_WORKER = "celery worker --queues default --concurrency 1"
GPU_QUEUE_WORKER = cluster.WORKERS["worker-gpu"][0]  # celery worker --queues gpu --concurrency 1
# Beyond deploy/airflow.env: one task at a time per worker, manual runs only, and a host that dies
# mid-task noticed within half a minute: no heartbeat for 20 s fails its task (checked every 5 s),
# retried 2 s later, and its training lease (10 s) has expired by then.
QUICK_SETTINGS = {
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    "ALEXNET_LEASE_SECONDS": "10",
    "ALEXNET_RETRY_DELAY_SECONDS": "2",
    "ALEXNET_SCHEDULE": "none",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's server binaries (Debian's /usr/lib/postgresql/<version>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda path: [int(part) for part in path.parts[-3].split(".")])
    if not found:
        raise HostError("the database host needs PostgreSQL's server: no /usr/lib/postgresql/<version>/bin/postgres "
                        "(apt-get install postgresql)")
    return found[-1].parent


class Deployment:
    """The pipeline's Airflow deployment on isolated hosts (the module's doc lists them) under ``folder``.

    ``start`` brings every service up and waits until each is healthy;
    ``stop`` ends them and removes the hosts. ``settings`` are added to
    every Airflow host's environment (after ``QUICK_SETTINGS``).
    """

    def __init__(self, folder: Path, gpu_hosts: int = 2, bucket: str = DEFAULT_BUCKET,
                 settings: dict[str, str] | None = None, name: str | None = None):
        if gpu_hosts < 1:
            raise ValueError(f"gpu_hosts must be 1 or more, got {gpu_hosts}")
        self.gpu_hosts = [f"gpu-{number}" for number in range(1, gpu_hosts + 1)]
        self.workers = ["worker", *self.gpu_hosts]
        self.bucket = bucket
        self.settings = {**QUICK_SETTINGS, **(settings or {})}
        self.network = Network(folder, ["database", "store", "scheduler", *self.workers, "client"], name)
        self.secrets: dict[str, str] = {}

    @property
    def folder(self) -> Path:
        return self.network.folder

    @property
    def api_url(self) -> str:
        """The api-server by address: for this process, from the client host (``network.joined("client")``)."""
        return f"http://{self.network.address('scheduler')}:{API_PORT}"

    @property
    def store_url(self) -> str:
        return f"http://{self.network.address('store')}:{STORE_PORT}"

    @property
    def artifacts(self) -> str:
        return f"s3://{self.bucket}/artifacts"

    @property
    def www(self) -> Path:
        """What the store host serves over HTTP (``http://store:8000/<name>``)."""
        return self.network.host_folder("store") / "www"

    @property
    def passwords_file(self) -> Path:
        return self.network.home("scheduler") / "passwords.json"

    def serve(self, path: Path) -> str:
        """Put a file among what the store host serves; its URL as the hosts reach it."""
        self.www.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, self.www / Path(path).name)
        return f"http://store:{WEB_PORT}/{Path(path).name}"

    def environment(self, host: str) -> dict[str, str]:
        """An Airflow host's environment: the shared settings by host name, its own folders, the store's connection."""
        network = self.network
        env = network.environment(host)
        env.update(cluster.airflow_settings(
            home=network.home(host) / "airflow", database_url="postgresql+psycopg2://postgres@database:5432/airflow",
            broker_url="redis://database:6379/0", api_url=f"http://scheduler:{API_PORT}", secrets=self.secrets,
            passwords_file=self.passwords_file, artifacts=self.artifacts, gpu_workers=len(self.gpu_hosts)))
        env.update(
            AIRFLOW__API__PORT=str(API_PORT),
            AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(network.logs(host) / "airflow"),
            AIRFLOW__LOGGING__DAG_PROCESSOR_CHILD_PROCESS_LOG_DIRECTORY=str(network.logs(host) / "dag_processor"),
            ALEXNET_CACHE=str(network.cache(host)),
            ALEXNET_ARTIFACTS_CONN_ID=STORE_CONNECTION,
            AIRFLOW_CONN_ALEXNET_STORE=json.dumps({
                "conn_type": "aws", "login": STORE_KEYS[0], "password": STORE_KEYS[1],
                "extra": {"endpoint_url": f"http://store:{STORE_PORT}", "region_name": "us-east-1"}}),
        )
        env.update(self.settings)
        return env

    def client(self) -> cluster.Client:
        """The REST API as admin; call it, and use what it returns, inside ``network.joined("client")``."""
        return cluster.Client(self.api_url, "admin", self.secrets["AIRFLOW_ADMIN_PASSWORD"])

    def store_client(self):
        """A boto3 client of the store; use it inside ``network.joined("client")``."""
        import boto3

        return boto3.client("s3", endpoint_url=self.store_url, region_name="us-east-1",
                            aws_access_key_id=STORE_KEYS[0], aws_secret_access_key=STORE_KEYS[1])

    # ----------------------------------------------------------------- start and stop
    def start(self, timeout: float = 300) -> Deployment:
        """Create the hosts and start every service on them; returns once all are healthy.

        Raises HostError naming what did not come up (and where its log is),
        after stopping everything.
        """
        network = self.network
        network.create()
        try:
            self.secrets = cluster.load_secrets(network.folder / ".network")
            self.passwords_file.write_text(json.dumps({"admin": self.secrets["AIRFLOW_ADMIN_PASSWORD"]}))
            self.passwords_file.chmod(0o600)
            self.www.mkdir(exist_ok=True)
            self._save()
            deadline = time.monotonic() + timeout
            self._start_database()
            store = network.address("store")
            network.start("store", [sys.executable, str(REPO / "tests" / "s3_server.py"), "--host", store,
                                    "--port", str(STORE_PORT)], log="s3-server")
            network.start("store", [sys.executable, "-m", "http.server", str(WEB_PORT), "--bind", store,
                                    "--directory", str(self.www)], log="http-server")
            self._wait("the database", deadline, lambda: network.run(
                "database", [str(postgres_bin() / "pg_isready"), "-q", "-h", "database"], check=False).returncode == 0)
            network.run("database", [str(postgres_bin() / "createdb"), "-h", "database", "-U", "postgres", "airflow"])
            migrate = network.run("scheduler", [str(BIN / "airflow"), "db", "migrate"],
                                  env=self.environment("scheduler"), check=False,
                                  timeout=max(1, deadline - time.monotonic()))
            if migrate.returncode:
                raise HostError(f"airflow db migrate failed on the scheduler host:\n{migrate.stdout[-3000:]}"
                                f"{migrate.stderr[-3000:]}")
            airflow = str(BIN / "airflow")
            for service in SCHEDULER_SERVICES:
                network.start("scheduler", [airflow, service], env=self.environment("scheduler"), log=service)
            for host in self.workers:
                arguments = DEFAULT_QUEUE_WORKER if host == "worker" else GPU_QUEUE_WORKER
                network.start(host, [airflow, *shlex.split(arguments)], env=self.environment(host), log="worker")
            with network.joined("client"):
                self._wait("the store", deadline, self._bucket_made)
                self._wait("every service", deadline, lambda: not self.unhealthy())
        except BaseException:
            self.stop()
            raise
        return self

    def _start_database(self) -> None:
        """PostgreSQL (data in ``<dir>/database/postgres``, trusting the hosts' subnet) and Redis on ``database``."""
        network, pg = self.network, postgres_bin()
        data = network.host_folder("database") / "postgres"
        data.mkdir(mode=0o700, exist_ok=True)
        owner = pwd.getpwnam("postgres")
        os.chown(data, owner.pw_uid, owner.pw_gid)
        network.run("database", [str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync",
                                 "-E", "UTF8"], user="postgres")
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {network.subnet} trust\n")
        network.start("database", [str(pg / "postgres"), "-D", str(data), "-c",
                                   f"listen_addresses={network.address('database')}", "-c", "unix_socket_directories=",
                                   "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                      user="postgres", log="postgres")
        network.start("database", ["redis-server", "--bind", network.address("database"), "--port", "6379",
                                   "--save", "", "--appendonly", "no", "--dir", "/tmp", "--protected-mode", "no"],
                      log="redis")

    def _bucket_made(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.store_client().create_bucket(Bucket=self.bucket)
        except ClientError as error:
            return error.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
        except BotoCoreError:
            return False
        return True

    def unhealthy(self) -> dict[str, str | None]:
        """What is not healthy yet: api-server-reported components, workers not ready, processes that exited."""
        report = cluster.api_health(self.api_url, ("metadatabase", "scheduler", "dag-processor"))
        for host in self.workers:
            report[host] = "healthy" if cluster.worker_ready(self.network.logs(host) / "worker.log") else None
        for host, processes in self.network.processes.items():
            for process in processes:
                if process.poll() is not None:
                    report[f"{host} {process.service}"] = f"exited {process.returncode}"
        return {name: status for name, status in report.items() if status != "healthy"}

    def _wait(self, what: str, deadline: float, ready) -> None:
        while not ready():
            exited = {name: status for name, status in self.unhealthy().items() if str(status).startswith("exited")}
            if exited or time.monotonic() > deadline:
                raise HostError(f"{what} did not come up: {exited or self.unhealthy()}; "
                                f"logs in {self.folder}/<host>/logs")
            time.sleep(1)

    def stop(self) -> None:
        self.network.destroy()

    def _save(self) -> None:
        state = {"gpu_hosts": len(self.gpu_hosts), "bucket": self.bucket, "settings": self.settings}
        (self.folder / ".network" / "deployment.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, folder: Path) -> Deployment:
        network = Network.load(folder)
        state = json.loads((network.folder / ".network" / "deployment.json").read_text())
        deployment = cls(folder, state["gpu_hosts"], state["bucket"], state["settings"], network.name)
        deployment.secrets = cluster.load_secrets(network.folder / ".network")
        return deployment

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="the hosts' folders (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="create the hosts and start the deployment on them")
    start_parser.add_argument("--gpu-hosts", type=int, default=2)
    start_parser.add_argument("--serve", action="append", default=[], metavar="FILE",
                              help="a file for the store host to serve over HTTP (a CIFAR-10 archive)")
    start_parser.add_argument("--timeout", type=float, default=300)
    exec_parser = commands.add_parser("exec", help="run a command on one host, with its Airflow settings")
    exec_parser.add_argument("host")
    exec_parser.add_argument("argv", nargs=argparse.REMAINDER)
    commands.add_parser("stop", help="end every process on the hosts and remove them")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    reason = namespaces_available()
    if reason:
        raise SystemExit(reason)
    if args.command == "start":
        deployment = Deployment(Path(args.dir), args.gpu_hosts)
        urls = [deployment.serve(Path(path)) for path in args.serve]
        deployment.start(args.timeout)
        print(f"hosts up in {deployment.folder} (network {deployment.network.name}):")
        for host, address in deployment.network.addresses.items():
            print(f"  {host:10} {address}")
        print(f"api-server http://scheduler:{API_PORT} (admin, password in {deployment.passwords_file}); "
              f"artifacts {deployment.artifacts}; served: {', '.join(urls) or 'nothing'}")
        print(f"reach them from the client host: {sys.argv[0]} --dir {args.dir} exec client -- <command>")
        return 0
    if args.command == "exec":
        deployment = Deployment.load(Path(args.dir))
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            raise SystemExit("exec: expected a command after the host name")
        airflow_host = args.host in ("scheduler", *deployment.workers)
        env = deployment.environment(args.host) if airflow_host else deployment.network.environment(args.host)
        return subprocess.run(deployment.network.command(args.host, command), env=env).returncode
    Deployment.load(Path(args.dir)).stop()
    print(f"hosts in {args.dir} stopped; their folders are kept")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HostError as error:
        sys.exit(f"hosts.py: {error}")
