"""Faults injected into real processes: kills, corruption, a full disk, reruns, concurrent runs.

Bad archives (wrong MD5, truncated, HTML, unsafe members, forbidden pickle
globals) are covered in test_download.py; bad params through
``airflow dags test -c`` in test_dag.py and through the REST API below.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from alexnet_tasks.atomic import DiskFullError
from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.layout import Layout
from alexnet_tasks.data.download import download
from alexnet_tasks.release.publish import publish, read_index
from alexnet_tasks.data.shards import ShardError, build_shards, load_split, shard_path
from alexnet_tasks.data.split import split
from builders import SUBPROCESS_ENV, committed_epochs, fake_run, flip_one_image_byte, tar_member
from cifar_archive import archive_members, md5_of, write_archive, write_tar
from conftest import airflow_bin, airflow_env, native_cluster, prepare_shards, wait_for_runs



def _temps(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if ".tmp-" in path.name]


def _wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process ended before {what}: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- 2. killed build_shards
@pytest.fixture(scope="module")
def big_archive(tmp_path_factory):
    """12,000 images: big enough that building shards takes a moment."""
    return write_archive(tmp_path_factory.mktemp("big") / "cifar-10-python.tar.gz", train_per_batch=2000, test_count=2000, seed=5)


def test_killed_build_shards_leaves_nothing_trusted_and_rebuilds_identically(big_archive, tmp_path):
    path, md5 = big_archive
    root = tmp_path / "killed"
    config = PipelineConfig(source_url=str(path), source_md5=md5, validation_size=1000)
    batch_dir = Path(download(str(path), md5, root)["batch_dir"])
    manifest = split(batch_dir, root, config)["manifest"]
    code = (
        "from pathlib import Path\n"
        "from alexnet_tasks.config import PipelineConfig\n"
        "from alexnet_tasks.data.shards import build_shards\n"
        f"build_shards(Path({str(batch_dir)!r}), Path({manifest!r}), Path({str(root)!r}), PipelineConfig(**{config.to_dict()!r}))\n"
    )
    final = Layout(root).shards(config)
    process = subprocess.Popen([sys.executable, "-c", code], env=SUBPROCESS_ENV, stderr=subprocess.PIPE)
    # Kill once the partial train.h5 holds data.
    def partial_shard() -> bool:
        return any(
            (temp / "train.h5").is_file() and (temp / "train.h5").stat().st_size > 5_000_000
            for temp in final.parent.glob(f"{final.name}.tmp-*")
        )

    _wait_for(partial_shard, 120, "a partial shard", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not final.exists(), "a killed build left a complete-looking shard folder"
    assert _temps(final.parent), "expected the killed build's temporary folder"
    with pytest.raises(ShardError, match="shard is missing"):
        load_split(shard_path(final, "train"))

    rebuilt = build_shards(batch_dir, Path(manifest), root, config)
    assert rebuilt["reused"] is False and not _temps(final.parent)
    reference = build_shards(batch_dir, Path(manifest), tmp_path / "uninterrupted", config)
    for name in ("train", "validation", "test"):
        ours, theirs = load_split(rebuilt[name]), load_split(reference[name])
        assert hashlib.sha256(ours[0].tobytes()).digest() == hashlib.sha256(theirs[0].tobytes()).digest()
        assert (ours[1] == theirs[1]).all()
    assert (final / "images_sha256.json").read_text() == (Path(reference["shards_dir"]) / "images_sha256.json").read_text()


# --------------------------------------------------------------------------- 3. corrupted shard
def test_training_refuses_a_corrupted_shard_naming_it(small_archive, tmp_path):
    from alexnet_tasks.training.train import train

    config, shards_dir = prepare_shards(small_archive, tmp_path, image_size=67, epochs=1, batch_size=16)
    train_shard = shard_path(shards_dir, "train")
    flip_one_image_byte(train_shard)
    with pytest.raises(ShardError, match=f"{train_shard}: shard data is corrupt"):
        train(shards_dir, tmp_path / "runs" / "r", config)
    # The next run's build_shards notices, rebuilds, and training can go on.
    batch_dir = Layout(tmp_path).batches(config.source_md5)
    rebuilt = build_shards(batch_dir, Layout(tmp_path).split(config) / "manifest.json", tmp_path, config)
    assert rebuilt["reused"] is False and load_split(train_shard)[0].shape == (150, 32, 32, 3)


# --------------------------------------------------------------------------- 4. killed publish
def test_killed_publish_keeps_latest_on_the_previous_run(tmp_path):
    published = tmp_path / "published"
    publish(fake_run(tmp_path, "previous", 0.5), published, run_id="previous")
    big = fake_run(tmp_path, "big", 0.9)
    with open(big / "model.keras", "wb") as handle:  # a large model makes the copy take a while
        for _ in range(400):
            handle.write(os.urandom(1 << 20))
    code = (
        "from pathlib import Path\n"
        "from alexnet_tasks.release.publish import publish\n"
        f"publish(Path({str(big)!r}), Path({str(published)!r}), run_id='big')\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], env=SUBPROCESS_ENV, stderr=subprocess.PIPE)
    _wait_for(lambda: _temps(published / "runs"), 60, "the publish copy to start", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    previous_folder, big_folder = (Layout(tmp_path).run(run_id).name for run_id in ("previous", "big"))
    assert os.readlink(published / "latest") == f"runs/{previous_folder}"
    assert [line["run_id"] for line in read_index(published)] == ["previous"]
    assert (published / "index.jsonl").read_text().endswith("\n")
    assert not (published / "runs" / big_folder).exists()
    # Publishing again completes and cleans up the killed attempt.
    publish(big, published, run_id="big")
    assert os.readlink(published / "latest") == f"runs/{big_folder}" and not _temps(published)
    assert [line["run_id"] for line in read_index(published)] == ["previous", "big"]


# --------------------------------------------------------------------------- 7. full disk
@pytest.fixture
def small_filesystem(tmp_path):
    """A 3 MiB tmpfs; skipped where this process may not mount one."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"needs the privilege to mount a tmpfs (root in a sandbox that allows mount): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_gives_a_clear_error_and_no_truncated_artifact(small_archive, small_filesystem):
    path, md5 = small_archive  # 0.8 MB archive, 1.6 MB extracted source, 4.5 MB of shards
    root = small_filesystem / "artifacts"
    config = PipelineConfig(source_url=str(path), source_md5=md5, validation_size=50)
    batch_dir = Path(download(str(path), md5, root)["batch_dir"])
    manifest = split(batch_dir, root, config)["manifest"]
    with pytest.raises(DiskFullError, match=r"no space left on the filesystem of .* while writing shards-"):
        build_shards(batch_dir, Path(manifest), root, config)
    assert not Layout(root).shards(config).exists() and not _temps(root)
    # What was complete before stays complete and usable.
    assert split(batch_dir, root, config)["reused"] is True
    assert download(str(path), md5, root)["reused"] is True
    # A download that cannot fit fails the same way and leaves no source folder.
    filler = small_filesystem / "filler"
    free = shutil.disk_usage(small_filesystem).free
    filler.write_bytes(b"\0" * max(free - 300_000, 0))
    other, other_md5 = write_archive(small_filesystem.parent / "other.tar.gz", seed=9)
    with pytest.raises(DiskFullError, match="no space left"):
        download(str(other), other_md5, root)
    assert not Layout(root).source(other_md5).exists() and not _temps(root)


# --------------------------------------------------------------------------- 8. reruns
def test_reruns_reuse_identical_data_artifacts(small_archive, tmp_path):
    path, md5 = small_archive
    config = PipelineConfig(source_url=str(path), source_md5=md5, validation_size=50, seed=11)

    def data_steps(root: Path) -> tuple[dict, dict, dict]:
        source = download(str(path), md5, root)
        manifest = split(Path(source["batch_dir"]), root, config)
        shards = build_shards(Path(source["batch_dir"]), Path(manifest["manifest"]), root, config)
        return source, manifest, shards

    first = data_steps(tmp_path / "a")
    again = data_steps(tmp_path / "a")
    assert [step["reused"] for step in first] == [False, False, False]
    assert [step["reused"] for step in again] == [True, True, True]
    elsewhere = data_steps(tmp_path / "b")
    assert _file_digest(first[1]["manifest"]) == _file_digest(elsewhere[1]["manifest"])
    for name in ("train", "validation", "test"):
        assert _file_digest(first[2][name]) == _file_digest(elsewhere[2][name]), name


# --------------------------------------------------------------------------- 1, 6, 9 on a real cluster
class _SlowHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder at about 200 kB/s, so that a download of the small archive lasts seconds."""

    def copyfile(self, source, outputfile):
        while block := source.read(64 * 1024):
            outputfile.write(block)
            outputfile.flush()
            time.sleep(0.3)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _slow_server(folder: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_SlowHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.cluster
@pytest.mark.slow
def test_cluster_kill_retry_resume_bad_params_and_concurrent_runs(served_archive, monkeypatch):
    url, md5, artifacts = served_archive
    monkeypatch.setenv("ALEXNET_RETRY_DELAY_SECONDS", "2")
    monkeypatch.setenv("ALEXNET_MAX_ACTIVE_RUNS", "2")  # case 9 needs two runs at once
    with native_cluster(artifacts.parent / "cluster", "faults", redis_db=12) as (state, api):
        conf = {"source_url": url, "source_md5": md5, "image_size": 67,
                "validation_size": 50, "batch_size": 8, "recipe": "reference",
                "publish_mode": "always"}  # every run is published, whatever tiny data scores
        runs_url = "/api/v2/dags/alexnet_cifar10/dagRuns"

        # 6. Bad params through the REST API: refused, naming the param; nothing runs.
        for bad in ({"image_size": 12}, {"epochs": "ten"}, {"learning_rate": -1}):
            with pytest.raises(RuntimeError, match=rf"HTTP 400.*{next(iter(bad))}"):
                api.post(runs_url, {"logical_date": None, "conf": {**conf, **bad}})
        assert api.get(runs_url)["total_entries"] == 0

        # 1. SIGKILL the training process mid-epoch; the retry resumes from the last completed epoch.
        run_id = api.post(runs_url, {"logical_date": None, "conf": {**conf, "epochs": 3}})["dag_run_id"]
        run_dir = Layout(artifacts).run(run_id)
        lock = run_dir / "train.lock"
        _wait_for(lambda: committed_epochs(run_dir) >= 1, 600, "epoch 1")
        time.sleep(0.3)
        done_at_kill = committed_epochs(run_dir)
        assert done_at_kill < 3, "training finished before it could be killed"
        os.kill(int(lock.read_text()), signal.SIGKILL)
        [run] = wait_for_runs(api, [run_id], 900)
        assert run["state"] == "success", run
        train_ti = api.get(f"{runs_url}/{urllib.parse.quote(run_id)}/taskInstances/train")
        assert train_ti["try_number"] == 2, train_ti
        history = json.loads((run_dir / "history.json").read_text())
        assert [entry["epoch"] for entry in history] == [1, 2, 3]
        attempt_log = next((Path(state["dir"]) / "home" / "logs").rglob("task_id=train/attempt=2.log")).read_text()
        assert f"resuming from the checkpoint of epoch {done_at_kill}/3" in attempt_log

        # 9. Two runs at once (max_active_runs=2) keep their outputs apart.
        # Same data settings on an archive no run has fetched yet, served slowly so that both
        # downloads are under way together (both race to build the same content-addressed data),
        # other learning rates.
        (artifacts.parent / "slow").mkdir()
        pair_md5 = write_archive(artifacts.parent / "slow" / "pair.tar.gz", seed=4)[1]
        with _slow_server(artifacts.parent / "slow") as slow_url:
            pair_conf = {**conf, "source_url": f"{slow_url}/pair.tar.gz", "source_md5": pair_md5,
                         "epochs": 1, "seed": 7}
            pair = [api.post(runs_url, {"logical_date": None, "conf": {**pair_conf, "learning_rate": rate}})["dag_run_id"]
                    for rate in (0.001, 0.002)]
            finished = wait_for_runs(api, pair, 900)
        assert [run["state"] for run in finished] == ["success", "success"], finished
        # Neither builder broke the other's work: every data task succeeded on its first try.
        for concurrent_id in pair:
            for task_id in ("download", "split", "build_shards"):
                ti = api.get(f"{runs_url}/{urllib.parse.quote(concurrent_id)}/taskInstances/{task_id}")
                assert (ti["state"], ti["try_number"]) == ("success", 1), (concurrent_id, ti)
        starts = sorted(finished, key=lambda run: run["start_date"])
        assert starts[1]["start_date"] < starts[0]["end_date"], "the two runs did not overlap"
        models = [_file_digest(Layout(artifacts).run(run_id) / "model.keras") for run_id in pair]
        assert models[0] != models[1]
        for concurrent_id in pair:
            published = artifacts / "published" / "runs" / Layout(artifacts).run(concurrent_id).name
            assert json.loads((published / "metrics.json").read_text())["test_images"] == 60
        assert sorted(line["run_id"] for line in read_index(artifacts / "published")) == sorted([run_id, *pair])
        assert not _temps(artifacts)




# --------------------------------------------------------------------------- permanent errors fail at once
class _UnavailableOnce(http.server.SimpleHTTPRequestHandler):
    """Answers the first request with 503, then serves the folder."""

    answered = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).answered += 1
        if type(self).answered == 1:
            self.send_error(503, "busy")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    """One migrated SQLite Airflow home for the runs below."""
    home = tmp_path_factory.mktemp("airflow-home")
    subprocess.run([airflow_bin(), "db", "migrate"], env=airflow_env(home, home / "unused"), check=True,
                   capture_output=True)
    return home


def _dags_test(home: Path, artifacts: Path, conf: dict) -> tuple[dict[str, tuple[str, int]], list, str]:
    """``airflow dags test`` with retries 1 s apart and every step after download marked done.

    Returns {task_id: (state, try_number)}, the (task_id, try_number, state)
    of every earlier try, and the output.
    """
    before = _run_ids(home)
    run = subprocess.run(
        [airflow_bin(), "dags", "test", "alexnet_cifar10", "-c", json.dumps(conf),
         "--mark-success-pattern", "split|build_shards|train|evaluate|gate|publish"],
        env=airflow_env(home, artifacts, ALEXNET_RETRY_DELAY_SECONDS="1"),
        capture_output=True, text=True, timeout=300,
    )
    output = run.stdout + run.stderr
    new = _run_ids(home) - before
    assert len(new) == 1, output[-3000:]
    with sqlite3.connect(home / "airflow.db") as connection:
        tasks = {task: (state, tries) for task, state, tries in connection.execute(
            "SELECT task_id, state, try_number FROM task_instance WHERE run_id = ?", tuple(new))}
        earlier = sorted(connection.execute(
            "SELECT task_id, try_number, state FROM task_instance_history WHERE run_id = ?", tuple(new)))
    return tasks, earlier, output


def _run_ids(home: Path) -> set[str]:
    with sqlite3.connect(home / "airflow.db") as connection:
        return {row[0] for row in connection.execute("SELECT run_id FROM dag_run")}


@pytest.mark.slow
def test_permanent_errors_fail_on_the_first_try_network_errors_are_retried(small_archive, tmp_path, airflow_home):
    path, md5 = small_archive
    conf = {"image_size": 67, "epochs": 1, "validation_size": 50, "batch_size": 16}

    # An archive with a `../` member is refused on try 1, and the run fails without waiting for retries.
    unsafe = write_tar(tmp_path / "unsafe.tar.gz", archive_members(), extra=[tar_member("cifar-10-batches-py/../../x")])
    started = time.monotonic()
    tasks, earlier, output = _dags_test(airflow_home, tmp_path / "a1", {**conf, "source_url": str(unsafe),
                                                                        "source_md5": md5_of(unsafe)})
    assert tasks["download"] == ("failed", 1), (tasks, output[-3000:])
    assert earlier == [], f"the permanent error was retried: {earlier}"
    assert "refusing member that escapes the folder" in output and "Retry policy decision" in output
    assert time.monotonic() - started < 120

    # A source answering 503 once is retried, and the retry succeeds.
    folder = tmp_path / "www"
    folder.mkdir()
    shutil.copy(path, folder / "cifar.tar.gz")
    handler = type("Handler", (_UnavailableOnce,), {"answered": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cifar.tar.gz"
        tasks, earlier, output = _dags_test(airflow_home, tmp_path / "a2", {**conf, "source_url": url,
                                                                            "source_md5": md5})
    finally:
        server.shutdown()
        server.server_close()
    assert tasks["download"] == ("success", 2), (tasks, output[-3000:])
    assert earlier == [("download", 1, "failed")], earlier  # the first try, kept when the retry began
    assert "HTTP 503" in output
