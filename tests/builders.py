"""Builders the test modules share, made from the pipeline's own functions and names.

A plain module, not a test module: test modules import from here (and from
conftest.py), never from one another (tests/test_layers.py checks that).

- ``write_train_summary``: ``train_summary.json`` as train's summary function writes it.
- ``fake_run``: a run folder as train and evaluate leave it (stand-in model, real layout and metrics fields).
- ``write_decision``: ``decision.json`` as the gate's decide phase makes it.
- ``index_entry``: an index line, by the registry's own ``index_line``.
- ``evaluate_gate_publish``: a copy of a really trained run, evaluated, gated and published by the pipeline.
- ``kill_after_first_epoch``: start a training, SIGKILL it once an epoch is committed.
- ``scalar_tags``, ``flip_one_image_byte``, ``tar_member``: small readers and damagers.
- the plugin: ``load_plugin_module``, ``plugin_env``, ``links``, ``quoted``.

Heavy modules (TensorFlow, the gate's h5py) are imported inside the builders that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable
from urllib.parse import quote

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.jsonio import load_json_object, save_json
from alexnet_tasks.layout import (
    CONFIG, DECISION, METRICS, MODEL, STATE, TENSORBOARD, TRAIN_SUMMARY, Layout, run_folder_name,
)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PLUGIN_FILE = ROOT / "plugins" / "alexnet_results.py"
# A fresh interpreter that imports this checkout's package, TensorFlow quiet.
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
TEST_CODE_VERSION = "0.1.0+test"  # what a builder's train_summary.json records as the code version


def folder(run_id: str) -> str:
    """The folder name of ``run_id`` under runs/ and published/runs/ (the layout's own)."""
    return run_folder_name(run_id)


# --------------------------------------------------------------------------- train, evaluate, gate, publish
def write_train_summary(run_dir: Path, fingerprint: str | None = None, *, epochs_run: int = 3,
                        epochs_planned: int = 3, stopped_reason: str = "time budget", seconds: float = 12.5,
                        replicas: int = 1, devices: str = "CPU", recipe: str = "fast", image_size: int = 67,
                        batch_size: int = 16, learning_rate: float = 0.01, seed: int = 42,
                        hyperparameters: dict | None = None, truncated: bool | None = None) -> dict:
    """``train_summary.json`` in ``run_dir`` as train writes it (train's own summary function); returns it.

    ``fingerprint``: 64 hex digits (default: the SHA-256 of ``run_dir``).
    The run is truncated when ``epochs_run < epochs_planned`` (``stopped_reason``
    then says why); ``truncated``, when given, must agree with that, else ValueError.
    ``seconds`` is the training time, spread evenly over the epochs run.
    """
    from alexnet_tasks.training.train import _summary

    if truncated is not None and truncated != (epochs_run < epochs_planned):
        raise ValueError(f"truncated={truncated} disagrees with epochs_run={epochs_run} of "
                         f"epochs_planned={epochs_planned}")
    fingerprint = fingerprint or hashlib.sha256(str(run_dir).encode()).hexdigest()
    settings = SimpleNamespace(recipe=recipe, image_size=image_size, batch_size=batch_size,
                               learning_rate=learning_rate, seed=seed)
    history = [{"epoch": epoch + 1, "epoch_seconds": seconds / max(epochs_run, 1)} for epoch in range(epochs_run)]
    progress = SimpleNamespace(history=history, epochs_planned=epochs_planned, stopped_reason=stopped_reason,
                               seconds_spent=lambda: seconds)
    parts = {"settings": hyperparameters or {"recipe": recipe}, "data_key": "d", "shards_sha256": "0" * 64,
             "code_version": TEST_CODE_VERSION}
    summary = _summary(settings, progress, {"fingerprint": fingerprint, "parts": parts}, replicas, devices)
    save_json(Path(run_dir) / TRAIN_SUMMARY, summary)
    return summary


def fake_run(root: Path, name: str, accuracy: float, fingerprint: str | None = None, truncated: bool = False,
             validation_accuracy: float | None = None, test_loss: float = 1.0) -> Path:
    """A run folder ``root/runs/name`` as train and evaluate leave it: a stand-in model, real names and fields.

    With a ``fingerprint`` it also holds train's ``train_summary.json``
    (truncated: 2 of 3 epochs); ``metrics.json`` repeats its fields as
    evaluate does (``training_fields``: all null without a summary).
    """
    from alexnet_tasks.training.run_summary import training_fields

    run = Path(root) / "runs" / name
    (run / TENSORBOARD / "train").mkdir(parents=True, exist_ok=True)
    (run / TENSORBOARD / "train" / "events.out.tfevents.1").write_bytes(b"events")
    (run / MODEL).write_bytes(b"model-" + name.encode())
    if fingerprint is not None:
        write_train_summary(run, fingerprint, epochs_run=2 if truncated else 3)
    metrics = {"test_accuracy": accuracy, "test_loss": test_loss, "validation_accuracy": validation_accuracy,
               **training_fields(run)}
    save_json(run / METRICS, metrics)
    save_json(run / CONFIG, {})
    return run


def write_decision(run_dir: Path, failed: list[str] | tuple[str, ...] = (), comparison: str = "no champion yet",
                   config: PipelineConfig | None = None, run_id: str | None = None) -> dict:
    """``decision.json`` in ``run_dir`` as the gate's decide phase makes it from these checks; returns it.

    ``failed``: the details of the checks that failed (none: blessed, the
    reasons are "sanity checks hold" and ``comparison``); ``config`` gives
    the floor, tolerance and publish mode (default: the defaults). The
    fingerprint and figures are the run's ``metrics.json``'s, as the gate reads them.
    """
    from alexnet_tasks.release.gate import _decide, _Gate

    metrics = load_json_object(Path(run_dir) / METRICS)
    checks = {f"check_{number}": {"passed": False, "detail": detail} for number, detail in enumerate(failed)}
    checks["not_worse_than_champion"] = {"passed": True, "detail": comparison}
    decision = _decide(_Gate(Path(run_dir), metrics, None, None, checks), config or PipelineConfig(), run_id)
    save_json(Path(run_dir) / DECISION, decision)
    return decision


def index_entry(run_id: str, accuracy: float = 0.5, blessed: bool | None = True, recipe: str = "fast",
                fingerprint: str | None = None) -> dict:
    """An index line as publish writes it (the registry's own ``index_line``), for a run gated as ``blessed``."""
    from alexnet_tasks.release.registry import index_line

    metrics = {"test_accuracy": accuracy, "test_loss": 1.0, "fingerprint": fingerprint}
    decision = None if blessed is None else {"blessed": blessed, "reasons": [f"decided {blessed}"]}
    return index_line(run_id, metrics, "2026-11-29T02:00:00+00:00", PipelineConfig(recipe=recipe), None, decision)


def s3_registry(bucket: str, cache: Path):
    """The registry of ``s3://<bucket>/artifacts/published``, caching its lookup table in ``cache``."""
    from alexnet_tasks.release.registry import Registry, S3Store
    from alexnet_tasks.store import parse_location

    return Registry(store=S3Store(parse_location(f"s3://{bucket}/artifacts"), cache=cache))


def evaluate_gate_publish(trained_dir: Path, shards_dir: Path, root: Path, run_id: str, config: PipelineConfig,
                          test_time_augmentation: str = "none", dag_id: str | None = None, registry=None) -> dict:
    """Copy a trained run folder to ``root``'s folder for ``run_id``, then evaluate, gate and publish it there.

    The pipeline's own steps, in the DAG's order, under ``root``'s layout
    (``dag_id``: the DAG publish names, as inside Airflow); returns the gate's decision.
    ``registry``: ``published/`` on an object store (``s3_registry``), as the
    store's steps gate and publish with ``root`` the host's cache.
    """
    from alexnet_tasks.evaluate import evaluate
    from alexnet_tasks.release.gate import gate
    from alexnet_tasks.release.publish import publish

    layout = Layout(root)
    run_dir = layout.run(run_id)
    shutil.copytree(trained_dir, run_dir)
    evaluate(run_dir / MODEL, shards_dir, run_dir, replace(config, test_time_augmentation=test_time_augmentation))
    decision = gate(shards_dir, layout.published, run_dir, config, run_id=run_id, registry=registry)
    publish(run_dir, layout.published, config, run_id=run_id, dag_id=dag_id, registry=registry)
    return decision


# --------------------------------------------------------------------------- processes
def run_python(code: str, what: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; assert it succeeds (``what`` names it in the failure)."""
    run = subprocess.run([sys.executable, "-c", code], env=SUBPROCESS_ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, f"{what}: {run.stderr[-3000:]}"
    return run


def committed_epochs(run_dir: Path) -> int:
    """The epochs a training in ``run_dir`` has committed (its ``state.json``); 0 before the first."""
    state = Path(run_dir) / STATE
    return json.loads(state.read_text())["epochs_done"] if state.is_file() else 0


def kill_after_first_epoch(code: str, run_dir: Path, epochs: int, timeout: float = 600,
                           while_alive: Callable[[subprocess.Popen], None] | None = None) -> int:
    """Start ``code`` (a training of ``run_dir``), SIGKILL it once an epoch is committed; return the epochs committed.

    ``while_alive(process)`` runs after the first epoch is committed and
    before the kill. Asserts the process was still training when killed
    and that it committed at least one but fewer than ``epochs`` epochs.
    """
    process = subprocess.Popen([sys.executable, "-c", code], env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None and committed_epochs(run_dir) < 1:
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        if while_alive is not None:
            while_alive(process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    done = committed_epochs(run_dir)
    assert 1 <= done < epochs, "training finished before it could be killed"
    return done


# --------------------------------------------------------------------------- readers and damagers
def scalar_tags(folder: Path) -> set[str]:
    """Tags of every summary value in the TensorBoard event files under ``folder``: ``<subfolder>/<tag>``."""
    import tensorflow as tf

    tags = set()
    for events in Path(folder).rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            tags.update(f"{events.parent.name}/{value.tag}" for value in event.summary.value)
    return tags


def flip_one_image_byte(path: Path) -> None:
    """Invert one byte inside the first chunk of an HDF5 shard's ``images`` (its checksum no longer holds)."""
    import h5py

    with h5py.File(path, "r") as handle:
        offset = handle["images"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as raw:
        raw.seek(offset + 1000)
        byte = raw.read(1)
        raw.seek(offset + 1000)
        raw.write(bytes([byte[0] ^ 0xFF]))


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    """A tar member header: a one-byte file, or an empty link or special member of ``kind``."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


# --------------------------------------------------------------------------- the plugin
def plugin_env(**extra: str) -> dict[str, str]:
    """Environment for an ``airflow`` command that loads this checkout's plugins and DAGs."""
    env = dict(os.environ)
    env.update(
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def load_plugin_module():
    """``plugins/alexnet_results.py`` loaded as Airflow's plugin loader does (once per process)."""
    if "alexnet_results" not in sys.modules:
        spec = importlib.util.spec_from_file_location("alexnet_results", PLUGIN_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["alexnet_results"] = module
        spec.loader.exec_module(module)
    return sys.modules["alexnet_results"]


@contextlib.contextmanager
def plugin_client(token: str):
    """A browser-like client of the plugin (artifacts from ``$ALEXNET_ARTIFACTS``): its app mounted at its
    prefix under an Airflow-like base URL, ``token`` as the ``_token`` cookie."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    module = load_plugin_module()
    parent = FastAPI()
    parent.mount(module.URL_PREFIX, module.app)
    with TestClient(parent, base_url="http://airflow.test") as client:
        client.cookies.set("_token", token)
        yield client


def assert_refused(client, routes: list[str]) -> None:
    """Every route answers 404 and leaks none of the planted contents (``secret``, the planted ``0.99``)."""
    for route in routes:
        response = client.get(route)
        assert response.status_code == 404, route
        assert b"secret" not in response.content and b"0.99" not in response.content, route


def quoted(run_id: str) -> str:
    """``run_id`` as one URL path segment."""
    return quote(run_id, safe="")


def links(page: str, attribute: str = "href") -> list[str]:
    """Every ``attribute="..."`` value in an HTML page, in order."""
    return re.findall(rf'{attribute}="([^"]*)"', page)
