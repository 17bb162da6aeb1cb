"""`make run`'s side: its params, progress on the terminal, its closing lines, a source it cannot reach, a step alone."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alexnet_tasks.config import PipelineConfig
from conftest import ROOT, airflow_env

SCRIPT = ROOT / "scripts" / "local_conf.py"


def _local_conf():
    spec = importlib.util.spec_from_file_location("local_conf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _closed_port_url() -> str:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/cifar-10-python.tar.gz"


def test_local_run_without_conf_takes_the_cpu_preset_only_without_a_gpu():
    local_conf = _local_conf()
    preset, local_run_conf = local_conf.CPU_PRESET, local_conf.local_run_conf
    for empty in ("", "  ", "{}"):
        params, note = local_run_conf(empty, gpus=0)
        assert params == preset == {"image_size": 67, "max_train_minutes": 15}
        assert "no GPU" in note and "CONF=" in note
        assert local_run_conf(empty, gpus=1) == ({}, None)  # the defaults: 227x227, the recipe's epochs
    # Explicit params are used as given, GPU or not; the preset's values pass validation.
    assert local_run_conf('{"epochs": 1, "image_size": 99}', gpus=0) == ({"epochs": 1, "image_size": 99}, None)
    PipelineConfig.from_dict(preset)
    for bad in ("[1]", "{epochs: 1}", "3"):
        with pytest.raises(ValueError, match="CONF must be a JSON object"):
            local_run_conf(bad, gpus=0)


def test_local_conf_script_detects_no_gpu_and_says_so():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, str(SCRIPT), ""], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"image_size": 67, "max_train_minutes": 15}
    assert "TensorFlow sees no GPU here: using the CPU preset" in run.stderr
    explicit = subprocess.run([sys.executable, str(SCRIPT), '{"epochs": 2}'], capture_output=True, text=True, env=env)
    assert json.loads(explicit.stdout) == {"epochs": 2} and "preset" not in explicit.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), "[1]"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "CONF must be a JSON object" in bad.stderr


def make_run_params(line: str) -> dict:
    """The params of a one-line ``make run CONF='...'``: it must be exactly three shell words, CONF one of them."""
    words = shlex.split(line.strip())
    assert words[:2] == ["make", "run"] and len(words) == 3 and words[2].startswith("CONF="), line
    return json.loads(words[2].removeprefix("CONF="))


def test_the_unreachable_source_message_names_the_url_the_error_and_runnable_commands():
    local_conf = _local_conf()
    message = local_conf.unreachable_source_message({"image_size": 67, "epochs": 1}, "cannot connect (refused)")
    assert message.splitlines()[0] == f"download: cannot reach {local_conf.OFFICIAL_URL}: cannot connect (refused)"
    commands = [line for line in message.splitlines() if line.strip().startswith("make run ")]
    assert len(commands) == 2
    for line in commands:
        params = make_run_params(line)
        assert params["image_size"] == 67 and params["epochs"] == 1  # the run's own params are kept
        PipelineConfig.from_dict(params)
    assert make_run_params(commands[0])["source_md5"] == local_conf.MAKE_ARCHIVE_MD5
    assert "make_archive.py " + local_conf.LOCAL_ARCHIVE in message


def _run_local(conf: dict, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    env = airflow_env(tmp_path / "home", tmp_path / "artifacts", CONF=json.dumps(conf))
    env.pop("ALEXNET_PROGRESS_FILE", None)
    return subprocess.run([str(ROOT / "scripts" / "run_local.sh")], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_make_run_shows_progress_keeps_the_rest_in_its_log_and_ends_with_where_to_look(small_archive, tmp_path):
    path, md5 = small_archive
    conf = {"source_url": str(path), "source_md5": md5, "image_size": 67, "epochs": 1, "validation_size": 50,
            "batch_size": 16, "accuracy_floor": 1.0}  # a floor no model reaches: the gate refuses it
    run = _run_local(conf, tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    log = Path(re.search(r"full log: (\S+)", run.stdout).group(1))
    assert log.is_file() and "DagRun Finished" in log.read_text()
    for step in ("download", "split", "build_shards", "train", "evaluate", "gate"):
        assert any(re.fullmatch(rf"[0-9:]{{8}}  {step}: done", line) for line in lines), (step, run.stdout)
    # Under the floor: the run is recorded, and publish ends skipped.
    assert any(re.match(r"[0-9:]{8}  publish: recorded .* without its model: not blessed", line) for line in lines)
    assert any(re.match(r"[0-9:]{8}  publish: skipped", line) for line in lines), run.stdout
    assert "gate: not blessed, recorded only (" in run.stdout
    assert re.search(r"download +100\.0% ", run.stdout), run.stdout
    # Airflow's and TensorFlow's own lines stay in the log file.
    for noise in ("[info", "[warning", "oneDNN", "graphviz", "DagRun Finished"):
        assert noise not in run.stdout, noise
    # The epoch line shows the rate the epoch trained at (the mean of its steps'), not the rate after it.
    [epoch] = [line for line in lines if "train: epoch" in line]
    assert float(re.search(r"  lr ([0-9.]+)", epoch).group(1)) > 0, epoch
    # The closing lines: both accuracies, the run's folder, the UI and TensorBoard commands.
    run_dir = Path(re.search(r"^run folder: (\S+)$", run.stdout, re.M).group(1))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    closing = "\n".join(lines[-5:])
    assert f"test accuracy {100 * metrics['test_accuracy_plain']:.2f}% (plain), " \
           f"{100 * metrics['test_accuracy']:.2f}% with test-time augmentation flip" in closing
    assert "scripts/airflow.sh standalone" in closing and "simple_auth_manager_passwords.json.generated" in closing
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in closing


@pytest.mark.slow
def test_make_run_fails_at_once_on_an_unreachable_source_with_the_way_round_it(tmp_path):
    url = _closed_port_url()
    conf = {"source_url": url, "image_size": 67, "epochs": 1}
    started = time.monotonic()
    run = _run_local(conf, tmp_path, timeout=300)
    seconds = time.monotonic() - started
    assert run.returncode == 1, run.stdout[-3000:]
    assert f"download: cannot reach {url}: cannot connect" in run.stdout, run.stdout
    [command] = [line for line in run.stdout.splitlines()
                 if line.strip().startswith("make run ") and "18c6e7d1617e846e1cbee435086bc6c8" in line]
    assert make_run_params(command)["source_url"] == "/tmp/cifar/cifar-10-python.tar.gz"
    assert "make_archive.py" in run.stdout and "the full log is" in run.stderr
    with sqlite3.connect(tmp_path / "home" / "airflow.db") as connection:
        tries = connection.execute("SELECT state, try_number FROM task_instance WHERE task_id = 'download'").fetchall()
        earlier = connection.execute("SELECT count(*) FROM task_instance_history").fetchone()[0]
    assert tries == [("failed", 1)] and earlier == 0, tries  # no retry in a local run
    assert seconds < 90, seconds  # the retries with their backoff would take minutes


@pytest.mark.slow
def test_a_step_whose_inputs_are_missing_fails_naming_them_and_the_step_that_makes_them(tmp_path):
    env = airflow_env(tmp_path / "home", tmp_path / "artifacts")
    env.pop("ALEXNET_PROGRESS_FILE", None)
    run = subprocess.run([str(ROOT / "scripts" / "airflow.sh"), "tasks", "test", "alexnet_cifar10", "build_shards",
                          "2026-11-28", "-t", '{"image_size": 67, "epochs": 1}'],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("task failed: build_shards: FAILED: MissingInputError: "), last
    assert "cifar-10-batches-py: missing; the download step makes it" in last
    assert "with the same source_url and source_md5" in last


def test_build_shards_before_split_names_the_manifest_the_split_step_and_the_params(small_archive, tmp_path):
    from alexnet_tasks.layout import Layout
    from alexnet_tasks.data.download import download
    from alexnet_tasks.data.shards import build_shards
    from alexnet_tasks.errors import MissingInputError, is_permanent

    path, md5 = small_archive
    layout = Layout(tmp_path / "artifacts")
    config = PipelineConfig(source_url=str(path), source_md5=md5, validation_size=50)
    download(str(path), md5, layout.root)
    manifest = layout.split(config) / "manifest.json"
    with pytest.raises(MissingInputError) as missing:
        build_shards(layout.batches(md5), manifest, layout.root, config)
    assert str(missing.value) == (
        f"{manifest}: missing; the split step makes it: run split first (or the whole DAG) with the same "
        "source_url, source_md5, validation_size, split_seed and train_limit")
    assert is_permanent(missing.value) and not layout.shards(config).exists()
