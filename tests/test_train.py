import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.train import RECIPE_DEFAULTS, ShuffledBatches, resolve_settings
from conftest import ROOT, prepare_shards, train_script

pytestmark = pytest.mark.slow


def scalar_tags(folder: Path) -> set[str]:
    """Tags of every summary value in the TensorBoard event files under ``folder``."""
    import tensorflow as tf

    tags = set()
    for events in folder.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            tags.update(f"{events.parent.name}/{value.tag}" for value in event.summary.value)
    return tags


def test_recipes_resolve_with_explicit_overrides():
    reference = resolve_settings(PipelineConfig(recipe="reference"))
    assert (reference.epochs, reference.batch_size, reference.learning_rate) == (50, 32, 0.001)
    assert reference.momentum == 0 and not reference.augment and reference.label_smoothing == 0
    fast = resolve_settings(PipelineConfig(recipe="fast", epochs=3))
    assert fast.epochs == 3 and fast.batch_size == RECIPE_DEFAULTS["fast"]["batch_size"] and fast.augment
    assert not fast.mixed_precision and resolve_settings(PipelineConfig(recipe="fast"), gpus=1).mixed_precision


def test_batches_cover_each_image_once_per_epoch_in_a_seeded_order():
    images = np.arange(10, dtype=np.float32)[:, None]
    labels = np.arange(10)
    batches = ShuffledBatches(images, labels, batch_size=4, seed=1)
    first = np.concatenate([batches[i][1] for i in range(len(batches))])
    assert len(batches) == 3 and sorted(first) == list(range(10))
    batches.on_epoch_end()
    second = np.concatenate([batches[i][1] for i in range(len(batches))])
    assert sorted(second) == list(range(10)) and list(first) != list(second)
    resumed = ShuffledBatches(images, labels, batch_size=4, seed=1, first_epoch=1)
    assert list(np.concatenate([resumed[i][1] for i in range(3)])) == list(second)


def test_training_writes_model_history_config_and_tensorboard(trained_run):
    import keras

    config, shards_dir, run_dir, result = trained_run
    assert result["epochs"] == 3 and result["resumed_from"] == 0
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(history[0])
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["pipeline"]["image_size"] == 67 and saved["train"]["recipe"] == "fast"
    model = keras.models.load_model(run_dir / "model.keras")
    assert model.input_shape == (None, 32, 32, 3) and "augmentation" not in [layer.name for layer in model.layers]
    tags = scalar_tags(run_dir / "tensorboard")
    assert {"train/epoch_loss", "train/epoch_accuracy", "validation/epoch_loss", "validation/epoch_accuracy"} <= tags
    assert "train/epoch_learning_rate" in tags


def test_tiny_training_learns_above_chance(trained_run):
    history = json.loads((trained_run[2] / "history.json").read_text())
    # Ten classes of distinct colours: three epochs must beat the 10% of guessing.
    assert history[-1]["val_accuracy"] > 0.2


def test_killed_training_resumes_from_its_last_completed_epoch(small_archive, tmp_path):
    config, shards_dir = prepare_shards(
        small_archive, tmp_path, image_size=67, epochs=4, batch_size=8, recipe="reference"
    )
    run_dir = tmp_path / "runs" / "killed"
    code = train_script(shards_dir, run_dir, config)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = run_dir / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["epochs_done"] >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    time.sleep(0.5)  # into the next epoch
    from alexnet_tasks.train import train

    # A duplicate delivery of the same task is refused while the first one lives.
    with pytest.raises(RuntimeError, match=rf"train.lock: process {process.pid} is already training this run"):
        train(shards_dir, run_dir, config)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = json.loads(state.read_text())["epochs_done"]
    assert 1 <= done < 4

    result = train(shards_dir, run_dir, config)
    assert result["resumed_from"] == done
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2, 3, 4]
    assert len(list((run_dir / "checkpoints").glob("*.keras"))) == 1


def test_mirrored_strategy_on_two_logical_cpus_trains_and_saves_a_plain_model(small_archive, tmp_path):
    import keras

    config, shards_dir = prepare_shards(
        small_archive, tmp_path, image_size=67, epochs=1, batch_size=8, recipe="reference"
    )
    run_dir = tmp_path / "runs" / "mirrored"
    code = train_script(
        shards_dir, run_dir, config,
        prelude=(
            "import tensorflow as tf\n"
            "cpu = tf.config.list_physical_devices('CPU')[0]\n"
            "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        ),
        call_arguments=", devices=['/cpu:0', '/cpu:1']",
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["replicas"] == 2
    assert saved["train"]["batch_size"] == 16 and saved["train"]["learning_rate"] == pytest.approx(0.002)
    assert saved["train"]["jit_compile"] is False
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    model = keras.models.load_model(run_dir / "model.keras")  # no strategy scope here
    probabilities = np.asarray(model.predict(np.zeros((3, 32, 32, 3), np.float32), verbose=0))
    assert probabilities.shape == (3, 10)


def test_time_budget_stops_after_the_epoch_that_would_overrun(small_archive, tmp_path):
    from alexnet_tasks.train import train

    config, shards_dir = prepare_shards(
        small_archive, tmp_path, image_size=67, epochs=5, batch_size=16, recipe="reference",
        max_train_minutes=0.001,  # 0.06 s: less than any epoch
    )
    result = train(shards_dir, tmp_path / "runs" / "budget", config)
    assert result["epochs"] == 1
    assert (tmp_path / "runs" / "budget" / "model.keras").is_file()
