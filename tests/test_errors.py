"""Which failures are permanent (fail the task at once) and which a retry may cure.

Each error is produced by the real step on a real input; the DAG's task
wrapper turns the permanent ones into Airflow's no-retry failure.
"""

from __future__ import annotations

import http.server
import importlib.util
import pickle
import socket
import threading

import pytest

from alexnet_tasks.atomic import DiskFullError
from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.data.download import ArchiveError, download
from alexnet_tasks.errors import PermanentError, SourceUnavailableError, is_permanent
from alexnet_tasks.data.shards import ShardError, ShardReadError, load_split
from cifar_archive import archive_members, md5_of, write_tar
from builders import tar_member
from conftest import ROOT


def _raised(call) -> BaseException:
    try:
        call()
    except BaseException as error:  # noqa: BLE001 (the error is the result)
        return error
    raise AssertionError("expected an error")


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers every GET with ``status``; with ``cut``, promises more bytes than it sends."""

    status = 503
    cut = False

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.cut:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"\0" * 1000)
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_error(self.status)

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_server():
    servers = []

    def start(status: int = 503, cut: bool = False) -> str:
        handler = type("Handler", (_Answer,), {"status": status, "cut": cut})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/cifar.tar.gz"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bad_inputs_and_settings_are_permanent(small_archive, tmp_path):
    path, md5 = small_archive
    root = tmp_path / "artifacts"
    unsafe = write_tar(tmp_path / "unsafe.tar.gz", archive_members(),
                       extra=[tar_member("cifar-10-batches-py/../../escaped.txt")])
    members = archive_members()
    members["cifar-10-batches-py/data_batch_2"] = pickle.dumps({"data": print}, protocol=2)
    evil = write_tar(tmp_path / "evil.tar.gz", members)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    corrupt_shard = tmp_path / "train.h5"
    corrupt_shard.write_bytes(b"not an HDF5 file" * 64)
    errors = {
        "wrong MD5": _raised(lambda: download(str(path), "0" * 32, root)),
        "unsafe member": _raised(lambda: download(str(unsafe), md5_of(unsafe), root)),
        "forbidden pickle": _raised(lambda: download(str(evil), md5_of(evil), root)),
        "corrupt archive": _raised(lambda: download(str(truncated), md5_of(truncated), root)),
        "settings that cannot fit": _raised(
            lambda: PipelineConfig(source_md5=md5, validation_size=500).check_against_source(200)),
        "bad shard": _raised(lambda: load_split(corrupt_shard)),
    }
    assert isinstance(errors["unsafe member"], ArchiveError) and "escapes the folder" in str(errors["unsafe member"])
    assert "forbidden global" in str(errors["forbidden pickle"])
    assert isinstance(errors["bad shard"], ShardError)
    assert {name: is_permanent(error) for name, error in errors.items()} == dict.fromkeys(errors, True)
    assert all(isinstance(error, PermanentError) for name, error in errors.items() if name != "settings that cannot fit")


def test_network_failures_and_failed_reads_are_retryable(answering_server, tmp_path):
    root = tmp_path / "artifacts"
    md5 = "0" * 32
    errors = {
        "HTTP 503": _raised(lambda: download(answering_server(503), md5, root)),
        "HTTP 429": _raised(lambda: download(answering_server(429), md5, root)),
        "connection refused": _raised(lambda: download(f"http://127.0.0.1:{_closed_port()}/a.tar.gz", md5, root)),
        "transfer cut short": _raised(lambda: download(answering_server(cut=True), md5, root)),
        "failed read": ShardReadError(5, "train.h5: reading the shard failed"),
        "full disk": DiskFullError(28, "no space left"),
    }
    assert all(isinstance(errors[name], SourceUnavailableError) for name in list(errors)[:4]), errors
    assert "HTTP 503" in str(errors["HTTP 503"]) and "cannot connect" in str(errors["connection refused"])
    assert {name: is_permanent(error) for name, error in errors.items()} == dict.fromkeys(errors, False)
    # A missing file is still permanent: the server says the URL is wrong.
    assert is_permanent(_raised(lambda: download(answering_server(404), md5, root)))


def _dag_module():
    spec = importlib.util.spec_from_file_location("alexnet_dag_errors", ROOT / "dags" / "alexnet_cifar10.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retry_policy_fails_permanent_errors_at_once_and_lets_others_retry():
    from airflow.sdk import RetryAction

    module = _dag_module()
    policy = module.retry_policy()
    for task in module.alexnet_cifar10().tasks:  # every task has it (ALEXNET_LOCAL_RUN unset)
        assert task.retry_policy.serialize() == policy.serialize(), task.task_id

    class ValueAndOSError(ValueError, OSError):  # both at once: an I/O failure, retried
        pass

    permanent = [ArchiveError("cifar.tar.gz: refusing member that escapes the folder '../x'"),
                 ShardError("train.h5: bad labels"), ValueError("validation_size=500 leaves no training images")]
    retryable = [SourceUnavailableError("HTTP 503"), ShardReadError(5, "EIO"), DiskFullError(28, "no space"),
                 RuntimeError("lock held"), ValueAndOSError("both")]
    for error in permanent + retryable:
        decision = policy.evaluate(error, try_number=1, max_tries=3)
        expected = RetryAction.FAIL if is_permanent(error) else RetryAction.DEFAULT
        assert decision.action == expected, (error, decision)
    assert [is_permanent(error) for error in permanent + retryable] == [True] * 3 + [False] * 5
    assert "every try" in policy.evaluate(permanent[0], 1, 3).reason

    # A local run (make run) fails a source that cannot be reached at once; other retryable errors keep retrying.
    local = module.retry_policy(local_run=True)
    assert local.evaluate(SourceUnavailableError("cannot connect"), 1, 3).action == RetryAction.FAIL
    assert local.evaluate(ShardReadError(5, "EIO"), 1, 3).action == RetryAction.DEFAULT
    assert local.evaluate(permanent[0], 1, 3).action == RetryAction.FAIL
