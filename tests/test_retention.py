"""Retention on real folders: checkpoints dropped after publish, old runs pruned, kept runs untouched."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from alexnet_tasks.atomic import exclusive_pid_lock
from alexnet_tasks.release.publish import publish
from alexnet_tasks.release.retention import drop_checkpoints, folder_bytes, keep_runs, prune_runs
from builders import fake_run, folder, index_entry

DAY = 24 * 3600


def add_checkpoint(run: Path, size: int = 4096) -> Path:
    """A checkpoint as train leaves it after an epoch (stand-in bytes) and its state.json."""
    (run / "checkpoints").mkdir(exist_ok=True)
    checkpoint = run / "checkpoints" / "epoch-0003.keras"
    checkpoint.write_bytes(os.urandom(size))
    (run / "state.json").write_text(json.dumps({"epochs_done": 3, "checkpoint": checkpoint.name}))
    return checkpoint


def age(run: Path, seconds: float) -> None:
    """Make ``run`` look last changed ``seconds`` ago."""
    then = time.time() - seconds
    for path in [*run.iterdir(), run]:
        os.utime(path, (then, then), follow_symlinks=False)


def write_index(published: Path, lines: list[dict], champion: str | None) -> None:
    published.mkdir(parents=True, exist_ok=True)
    (published / "index.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if champion is not None:
        os.symlink(f"runs/{folder(champion)}", published / "latest")


# --------------------------------------------------------------------------- drop_checkpoints
def test_dropping_checkpoints_keeps_everything_else(tmp_path):
    run = fake_run(tmp_path, "r", 0.5)
    checkpoint = add_checkpoint(run, 10_000)
    others = sorted(p.relative_to(run) for p in run.rglob("*") if "checkpoints" not in p.parts)
    assert drop_checkpoints(run) == 10_000
    assert not (run / "checkpoints").exists() and not checkpoint.exists()
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == others  # model, metrics, logs, state...
    assert drop_checkpoints(run) == 0  # nothing left to drop


def test_checkpoints_of_a_run_without_its_model_or_in_training_are_kept(tmp_path):
    unfinished = tmp_path / "runs" / "unfinished"
    unfinished.mkdir(parents=True)
    add_checkpoint(unfinished)
    assert drop_checkpoints(unfinished) == 0 and (unfinished / "checkpoints").is_dir()

    training = fake_run(tmp_path, "training", 0.5)
    add_checkpoint(training)
    with exclusive_pid_lock(training / "train.lock", "training this run"):
        assert drop_checkpoints(training) == 0 and (training / "checkpoints").is_dir()
    assert drop_checkpoints(training) > 0 and not (training / "checkpoints").exists()


def test_leftovers_of_a_killed_drop_are_removed(tmp_path):
    run = fake_run(tmp_path, "r", 0.5)
    leftover = run / "checkpoints.tmp-123-abcdef12"
    leftover.mkdir()
    (leftover / "epoch-0001.keras").write_bytes(b"x")
    drop_checkpoints(run)
    assert not leftover.exists()


@pytest.mark.slow
def test_a_trained_run_without_checkpoints_still_evaluates_and_is_smaller(trained_run, tmp_path):
    from alexnet_tasks.evaluate import evaluate

    config, shards_dir, trained, _ = trained_run
    run = tmp_path / "runs" / "copy"
    shutil.copytree(trained, run)  # the session's trained run stays as other tests expect it
    before = folder_bytes(run)
    checkpoints = folder_bytes(run / "checkpoints")
    assert checkpoints > folder_bytes(run / "model.keras")  # weights and optimizer state
    assert drop_checkpoints(run) == checkpoints
    assert folder_bytes(run) == before - checkpoints
    for name in ("model.keras", "history.json", "config.json", "state.json", "train_summary.json", "tensorboard"):
        assert (run / name).exists(), name
    metrics = evaluate(run / "model.keras", shards_dir, run, replace(config, test_time_augmentation="none"))
    assert 0 <= metrics["test_accuracy"] <= 1


# --------------------------------------------------------------------------- prune_runs
def test_old_runs_that_are_neither_champion_nor_blessed_are_pruned(tmp_path, caplog):
    artifacts = tmp_path / "artifacts"
    published = artifacts / "published"
    # Twelve runs, r00 oldest. The index: r01 blessed, r02 not blessed, r03 published before the gate
    # (no blessed field), r04 the champion (not blessed: published with publish_mode always, say).
    runs = {}
    for number in range(12):
        runs[number] = fake_run(artifacts, folder(f"r{number:02d}"), 0.5)
        add_checkpoint(runs[number])
    write_index(published, [index_entry("r01", blessed=True), index_entry("r02", blessed=False),
                            index_entry("r03", blessed=None), index_entry("r04", blessed=False)], champion="r04")
    for number, run in runs.items():
        age(run, (20 - number) * DAY)
    caplog.set_level(logging.INFO, logger="alexnet_tasks.release.retention")
    pruned = prune_runs(published, artifacts / "runs", keep=5)
    assert sorted(pruned) == sorted(folder(f"r{n:02d}") for n in (0, 2, 5, 6))
    left = sorted(path.name for path in (artifacts / "runs").iterdir() if not path.name.startswith("."))
    assert left == sorted(folder(f"r{n:02d}") for n in (1, 3, 4, 7, 8, 9, 10, 11))
    assert f"retention: removed {artifacts / 'runs' / folder('r02')} (published, not blessed" in caplog.text
    assert f"retention: removed {artifacts / 'runs' / folder('r00')} (never published" in caplog.text
    assert (published / "index.jsonl").read_text().count("\n") == 4  # the index and published/ are untouched
    assert prune_runs(published, artifacts / "runs", keep=5) == []


def test_runs_being_written_or_trained_are_never_pruned(tmp_path):
    runs_root = tmp_path / "runs"
    newest = fake_run(tmp_path, "newest", 0.5)
    recent = runs_root / "recent-unfinished"  # beyond the newest run, but changed an hour ago
    recent.mkdir()
    (recent / "config.json").write_text("{}")
    age(recent, 3600)
    old = [fake_run(tmp_path, f"old{n}", 0.5) for n in range(3)]
    for n, run in enumerate(old):
        age(run, (10 + n) * DAY)
    with exclusive_pid_lock(old[0] / "train.lock", "training this run"):
        age(old[0], 10 * DAY)  # a long epoch: nothing written for days, but the training is alive
        pruned = prune_runs(tmp_path / "published", runs_root, keep=1)
    assert sorted(pruned) == ["old1", "old2"]
    assert newest.is_dir() and recent.is_dir() and old[0].is_dir()
    assert prune_runs(tmp_path / "published", runs_root, keep=1, min_idle_seconds=1800) == [
        "recent-unfinished", "old0"]


def test_protected_runs_and_stray_entries_are_left_alone_and_killed_prunes_finished(tmp_path):
    runs_root = tmp_path / "runs"
    runs = [fake_run(tmp_path, f"r{n}", 0.5) for n in range(3)]
    for n, run in enumerate(runs):
        age(run, (10 - n) * DAY)
    (runs_root / "notes.txt").write_text("a file, not a run")
    building = runs_root / "r9.tmp-1-abcdef12"
    building.mkdir()
    killed = runs_root / f".gone{'.pruned-'}1-abcdef12"
    killed.mkdir()
    (killed / "model.keras").write_bytes(b"x")
    assert prune_runs(tmp_path / "published", runs_root, keep=1, protect=["r0"]) == ["r1"]
    assert runs[0].is_dir() and building.is_dir() and (runs_root / "notes.txt").is_file()
    assert not killed.exists()


def test_keep_comes_from_the_environment_and_bad_values_are_refused(monkeypatch):
    monkeypatch.delenv("ALEXNET_KEEP_RUNS", raising=False)
    assert keep_runs() == 10
    monkeypatch.setenv("ALEXNET_KEEP_RUNS", "3")
    assert keep_runs() == 3 and keep_runs(7) == 7
    for bad in ("0", "-2", "ten", "2.5"):
        monkeypatch.setenv("ALEXNET_KEEP_RUNS", bad)
        with pytest.raises(ValueError, match=f"ALEXNET_KEEP_RUNS='{bad}': expected a whole number of runs"):
            keep_runs()


def test_publish_drops_the_runs_checkpoints_and_prunes_old_runs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ALEXNET_KEEP_RUNS", "2")
    published = tmp_path / "published"
    old = [fake_run(tmp_path, folder(f"old{n}"), 0.5) for n in range(4)]
    for n, run in enumerate(old):
        age(run, (30 - n) * DAY)
    first = publish(old[0], published, run_id="old0", keep_runs=10)  # no gate decision: blessed, as before the gate
    assert first["pruned_runs"] == [] and first["checkpoint_bytes_freed"] == 0
    age(old[0], 30 * DAY)
    new = fake_run(tmp_path, folder("new"), 0.6)
    checkpoint = add_checkpoint(new, 5000)
    caplog.set_level(logging.INFO, logger="alexnet_tasks.release.retention")
    result = publish(new, published, run_id="new")
    assert result["checkpoint_bytes_freed"] == 5000 and not checkpoint.exists()
    # newest two: new and old3; old0 is published (blessed), old1 and old2 were never published.
    assert sorted(result["pruned_runs"]) == sorted([folder("old1"), folder("old2")])
    assert old[0].is_dir() and old[3].is_dir() and (new / "model.keras").is_file()
    assert "dropped the checkpoints of" in caplog.text and "retention: removed" in caplog.text
    monkeypatch.setenv("ALEXNET_KEEP_RUNS", "none")
    with pytest.raises(ValueError, match="ALEXNET_KEEP_RUNS"):
        publish(new, published, run_id="new")


@pytest.mark.slow
def test_a_dag_run_drops_its_checkpoints_and_prunes_an_old_failed_run(small_archive, tmp_path):
    import subprocess

    from conftest import airflow_bin, airflow_env

    path, md5 = small_archive
    artifacts = tmp_path / "artifacts"
    failed = artifacts / "runs" / "scheduled__2026-10-01T02_00_00_00_00-0badc0de"  # a run that died in train
    failed.mkdir(parents=True)
    (failed / "config.json").write_text("{}")
    add_checkpoint(failed)
    age(failed, 30 * DAY)
    env = airflow_env(tmp_path / "home", artifacts, ALEXNET_KEEP_RUNS="1")
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True, capture_output=True)
    conf = {"source_url": path.as_uri(), "source_md5": md5, "image_size": 67, "epochs": 1,
            "validation_size": 50, "batch_size": 16, "publish_mode": "always"}  # tiny data: no gate
    run = subprocess.run([airflow_bin(), "dags", "test", "alexnet_cifar10", "-c", json.dumps(conf)],
                         env=env, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    [run_dir] = [entry for entry in (artifacts / "runs").iterdir() if not entry.name.startswith(".")]
    assert run_dir.name.startswith("manual__") and not (run_dir / "checkpoints").exists()
    assert (run_dir / "model.keras").is_file() and (run_dir / "state.json").is_file()
    assert f"dropped the checkpoints of {run_dir.name}" in output
    assert f"retention: removed {failed} (never published" in output
    assert (artifacts / "published" / "latest" / "model.keras").is_file()
