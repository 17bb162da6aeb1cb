import json
import subprocess
import sys
import time

import numpy as np
import pytest

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.training.recipe import learning_rate_at, onednn_enabled, per_replica_batch, precision_policy, xla_pays
from alexnet_tasks.recipes import RECIPE_DEFAULTS
from alexnet_tasks.training.train import ShuffledBatches, resolve_hyperparameters
from builders import SUBPROCESS_ENV, kill_after_first_epoch, run_python, scalar_tags
from conftest import prepare_shards, train_script

TWO_LOGICAL_CPUS = (
    "import tensorflow as tf\n"
    "cpu = tf.config.list_physical_devices('CPU')[0]\n"
    "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
)
DETERMINISTIC = "import tensorflow as tf\ntf.config.experimental.enable_op_determinism()\n"


def test_recipes_resolve_with_explicit_overrides():
    reference = resolve_hyperparameters(PipelineConfig(recipe="reference"))
    assert (reference.epochs, reference.batch_size, reference.learning_rate) == (50, 32, 0.001)
    assert reference.momentum == 0 and not reference.augment and reference.label_smoothing == 0
    # The tutorial exactly: no XLA, float32 even on a GPU.
    assert not reference.jit_compile and reference.decay == "constant" and reference.warmup_epochs == 0
    assert resolve_hyperparameters(PipelineConfig(recipe="reference"), 1, (9, 0)).precision == "float32"
    fast = resolve_hyperparameters(PipelineConfig(recipe="fast", epochs=3))
    assert fast.epochs == 3 and fast.batch_size == RECIPE_DEFAULTS["fast"]["batch_size"] and fast.augment
    assert (fast.batch_size, fast.learning_rate, fast.jit_compile, fast.precision) == (128, 0.04, False, "float32")
    on_gpu = resolve_hyperparameters(PipelineConfig(recipe="fast"), 1, (9, 0))
    assert (on_gpu.precision, on_gpu.jit_compile) == ("mixed_bfloat16", True)


@pytest.mark.parametrize(
    "wanted, replicas, capability, onednn, xla",
    [(True, 1, None, True, False), (True, 1, None, False, True), (True, 1, (7, 0), True, True),
     (True, 1, (9, 0), False, True), (True, 2, (9, 0), True, False), (True, 2, None, False, False),
     (False, 1, (9, 0), True, False), (False, 1, None, False, False)],
)
def test_xla_compiles_the_step_on_one_gpu_or_on_a_cpu_without_onednn(wanted, replicas, capability, onednn, xla):
    # On the CPU the step runs faster on oneDNN's kernels than XLA-compiled, and slower on Eigen's
    # (docs/performance.md).
    assert xla_pays(wanted, replicas, capability, onednn) is xla
    config = PipelineConfig(recipe="fast" if wanted else "reference")
    assert resolve_hyperparameters(config, replicas, capability, onednn).jit_compile is xla


def test_onednn_is_read_from_tensorflow_and_decides_the_cpu_step():
    from tensorflow.python.util import _pywrap_util_port

    assert onednn_enabled() is bool(_pywrap_util_port.IsMklEnabled())
    code = "from alexnet_tasks.training.recipe import onednn_enabled; print(onednn_enabled())"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**SUBPROCESS_ENV, "TF_ENABLE_ONEDNN_OPTS": value}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected


def test_batch_size_and_learning_rate_are_global_whatever_the_replicas():
    config = PipelineConfig(recipe="fast", batch_size=64, learning_rate=0.02)
    mirrored = resolve_hyperparameters(config, replicas=4)
    assert (mirrored.batch_size, mirrored.learning_rate, mirrored.jit_compile) == (64, 0.02, False)
    assert per_replica_batch(mirrored, 4) == 16
    with pytest.raises(ValueError, match="batch_size=64 does not split evenly over 3 replicas"):
        per_replica_batch(mirrored, 3)


@pytest.mark.parametrize(
    "capability, policy",
    [(None, "float32"), ((6, 1), "float32"), ((7, 0), "mixed_float16"), ((7, 5), "mixed_float16"),
     ((8, 0), "mixed_bfloat16"), ((8, 9), "mixed_bfloat16"), ((9, 0), "mixed_bfloat16")],
)
def test_mixed_precision_follows_the_compute_capability(capability, policy):
    assert precision_policy(capability) == policy


def test_bfloat16_on_the_cpu_where_onednn_has_amx_or_amds_avx512_bf16(tmp_path):
    from alexnet_tasks.training.recipe import cpu_bfloat16_pays, cpu_flags, cpu_vendor

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
                       "\nprocessor\t: 1\n")
    flags = cpu_flags(str(cpuinfo))
    assert {"amx_bf16", "avx512_bf16"} <= flags and cpu_flags(str(tmp_path / "missing")) == set()
    assert cpu_vendor(str(cpuinfo)) == "GenuineIntel" and cpu_vendor(str(tmp_path / "missing")) == ""
    assert cpu_bfloat16_pays(True, flags, "GenuineIntel") and not cpu_bfloat16_pays(False, flags, "GenuineIntel")
    # AVX512-BF16 without AMX: AMD's (EPYC Zen 4) pays, Intel's (Cooper Lake) runs the step at half speed.
    assert cpu_bfloat16_pays(True, {"avx512f", "avx512_bf16"}, "AuthenticAMD")
    assert not cpu_bfloat16_pays(False, {"avx512f", "avx512_bf16"}, "AuthenticAMD")
    assert not cpu_bfloat16_pays(True, {"avx512f", "avx512_bf16"}, "GenuineIntel")
    assert not cpu_bfloat16_pays(True, {"avx2", "fma"}, "AuthenticAMD")  # no native bfloat16 (EPYC Zen 3)
    fast = PipelineConfig(recipe="fast")
    assert resolve_hyperparameters(fast, cpu_bfloat16=True).precision == "mixed_bfloat16"
    assert resolve_hyperparameters(fast, cpu_bfloat16=False).precision == "float32"
    assert resolve_hyperparameters(PipelineConfig(recipe="reference"), cpu_bfloat16=True).precision == "float32"
    pinned = PipelineConfig(recipe="fast", recipe_options={"precision": "float32"})
    assert resolve_hyperparameters(pinned, cpu_bfloat16=True).precision == "float32"
    assert resolve_hyperparameters(pinned, 1, (9, 0)).precision == "float32"


def test_mixed_float16_training_scales_the_loss():
    import keras

    from alexnet_tasks.training.model import build_alexnet
    from alexnet_tasks.training.recipe import compile_model

    hyperparameters = resolve_hyperparameters(PipelineConfig(recipe="fast", image_size=67), 1, (7, 5))
    keras.mixed_precision.set_global_policy(hyperparameters.precision)
    try:
        model = build_alexnet(67, augment=True, seed=1)
        compile_model(model, hyperparameters)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


def test_schedule_warms_up_then_decays_to_zero_at_the_planned_end():
    hyperparameters = resolve_hyperparameters(PipelineConfig(recipe="fast", epochs=10, learning_rate=0.1))
    steps = 20
    assert learning_rate_at(hyperparameters, 0, steps, 10) == pytest.approx(0.01)
    assert learning_rate_at(hyperparameters, steps, steps, 10) == pytest.approx(0.1)  # warm-up ends after one epoch
    for planned in (3, 10):
        rates = [learning_rate_at(hyperparameters, step, steps, planned) for step in range(planned * steps)]
        assert rates[steps - 1] < rates[steps] and all(a >= b for a, b in zip(rates[steps:], rates[steps + 1:]))
        assert rates[-1] < 0.002 and learning_rate_at(hyperparameters, planned * steps, steps, planned) == 0
    # The first epoch does not depend on the plan (a budget fixes the plan after it).
    assert [learning_rate_at(hyperparameters, s, steps, 3) for s in range(steps)] == [
        learning_rate_at(hyperparameters, s, steps, 10) for s in range(steps)]
    reference = resolve_hyperparameters(PipelineConfig(recipe="reference"))
    assert {learning_rate_at(reference, step, 5, 2) for step in range(10)} == {0.001}


def test_the_epoch_line_shows_the_rate_the_epoch_trained_at_not_the_rate_after_it():
    from alexnet_tasks.training.callbacks import Progress, epoch_learning_rate

    hyperparameters = resolve_hyperparameters(PipelineConfig(recipe="fast", epochs=1, learning_rate=0.04))
    steps = 20
    progress = Progress(hyperparameters, steps_per_epoch=steps, epochs_planned=1, plan_fixed=True, budget_seconds=None)
    rates = [learning_rate_at(hyperparameters, step, steps, 1) for step in range(steps)]
    assert learning_rate_at(hyperparameters, steps, steps, 1) == 0  # the optimizer's rate once the only epoch ends
    assert epoch_learning_rate(progress, 0) == pytest.approx(sum(rates) / steps) and min(rates) > 0
    two = Progress(hyperparameters, steps_per_epoch=steps, epochs_planned=2, plan_fixed=True, budget_seconds=None)
    assert epoch_learning_rate(two, 1) == pytest.approx(
        sum(learning_rate_at(hyperparameters, step, steps, 2) for step in range(steps, 2 * steps)) / steps)


def test_every_recipe_option_is_a_training_setting_and_overrides_the_recipe():
    import dataclasses

    from alexnet_tasks.config import RECIPE_OPTIONS
    from alexnet_tasks.training.recipe import Hyperparameters

    fields = {field.name for field in dataclasses.fields(Hyperparameters)}
    assert set(RECIPE_OPTIONS) <= fields
    options = {"dropout": 0.3, "decay": "linear", "max_shift": 2, "batchnorm_momentum": 0.9,
               "kernel_initializer": "he_normal", "weight_decay_norm_and_bias": False, "ema_momentum": 0.99,
               "label_smoothing": 0.0, "warmup_epochs": 0.5}
    hyperparameters = resolve_hyperparameters(PipelineConfig(recipe="fast", recipe_options=options))
    assert {name: getattr(hyperparameters, name) for name in options} == options
    assert hyperparameters.momentum == RECIPE_DEFAULTS["fast"]["momentum"]  # what no option names stays the recipe's
    assert resolve_hyperparameters(PipelineConfig(recipe="fast")).test_time_augmentation == "flip"
    assert resolve_hyperparameters(PipelineConfig(recipe="fast", test_time_augmentation="none")).test_time_augmentation \
        == "none"


def test_linear_decay_falls_on_a_line_to_zero_at_the_planned_end():
    hyperparameters = resolve_hyperparameters(PipelineConfig(recipe="fast", epochs=4, learning_rate=0.1,
                                               recipe_options={"decay": "linear", "warmup_epochs": 0}))
    steps = 10
    rates = [learning_rate_at(hyperparameters, step, steps, 4) for step in range(40)]
    assert rates[0] == pytest.approx(0.1) and rates[20] == pytest.approx(0.05)
    assert np.allclose(np.diff(rates), -0.1 / 40)
    constant = resolve_hyperparameters(PipelineConfig(recipe="fast", recipe_options={"decay": "constant"}))
    assert learning_rate_at(constant, 10_000, steps, 4) == pytest.approx(0.04)


def test_weight_decay_can_spare_batchnorm_and_biases():
    import keras

    from alexnet_tasks.training.model import build_alexnet
    from alexnet_tasks.training.recipe import compile_model

    decayed = {}
    for spare in (False, True):
        hyperparameters = resolve_hyperparameters(PipelineConfig(recipe="fast", image_size=67,
                                                   recipe_options={"weight_decay_norm_and_bias": not spare}))
        model = build_alexnet(67, seed=1)
        compile_model(model, hyperparameters)
        model.optimizer.build(model.trainable_variables)
        decayed[spare] = {v.path for v in model.trainable_variables if model.optimizer._use_weight_decay(v)}
    kernels = {path for path in decayed[False] if path.endswith("kernel")}
    assert len(kernels) == 8 and decayed[True] == kernels  # 5 convolutions, 3 dense layers
    assert any(path.endswith(("gamma", "beta", "bias")) for path in decayed[False])
    assert isinstance(model, keras.Model)


def test_batchnorm_statistics_are_recomputed_as_the_mean_over_batches():
    import keras

    from alexnet_tasks.training.model import build_alexnet
    from alexnet_tasks.training.train import recompute_batchnorm_statistics

    model = build_alexnet(67, seed=1)
    images = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype("float32")
    hyperparameters = resolve_hyperparameters(PipelineConfig(recipe="fast", image_size=67, batch_size=16))
    assert recompute_batchnorm_statistics(model, images, hyperparameters) == 64
    norm = model.get_layer("bn1")
    assert norm.momentum == 0.99  # restored
    # The same mean, by hand: bn1 sees conv1's output; the batch means averaged over the 4 batches.
    order = np.random.default_rng(hyperparameters.seed).permutation(64)
    upto_conv1 = keras.Sequential(model.layers[:2])
    means = [np.asarray(upto_conv1(images[np.sort(order[i:i + 16])])).mean(axis=(0, 1, 2)) for i in range(0, 64, 16)]
    np.testing.assert_allclose(np.asarray(norm.moving_mean), np.mean(means, axis=0), rtol=1e-4, atol=1e-5)


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


@pytest.mark.slow
def test_training_writes_model_history_config_and_tensorboard(trained_run):
    import keras

    config, shards_dir, run_dir, result = trained_run
    assert result["epochs"] == 3 and result["resumed_from"] == 0
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(history[0])
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["pipeline"]["image_size"] == 67 and saved["train"]["recipe"] == "fast"
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert set(summary) == {
        "fingerprint", "fingerprint_parts", "epochs_planned", "epochs_run", "truncated", "stopped_reason",
        "seconds", "replicas", "devices", "recipe", "image_size", "batch_size", "learning_rate", "seed",
    }
    assert (summary["epochs_planned"], summary["epochs_run"], summary["truncated"], summary["stopped_reason"]) == (3, 3, False, None)
    assert (summary["replicas"], summary["devices"], summary["batch_size"], summary["learning_rate"]) == (1, "CPU", 16, 0.01)
    assert summary["fingerprint"] == result["fingerprint"] == saved["fingerprint"] and result["truncated"] is False
    assert json.loads((run_dir / "state.json").read_text())["fingerprint"] == summary["fingerprint"]
    assert summary["fingerprint_parts"]["settings"] == saved["train"] and summary["seconds"] > 0
    model = keras.models.load_model(run_dir / "model.keras")
    assert model.input_shape == (None, 32, 32, 3) and "augmentation" not in [layer.name for layer in model.layers]
    tags = scalar_tags(run_dir / "tensorboard")
    assert {"train/epoch_loss", "train/epoch_accuracy", "validation/epoch_loss", "validation/epoch_accuracy"} <= tags
    assert "train/epoch_learning_rate" in tags


@pytest.mark.slow
def test_tiny_training_learns_above_chance(trained_run):
    history = json.loads((trained_run[2] / "history.json").read_text())
    # Ten classes of distinct colours: three epochs must beat the 10% of guessing.
    assert history[-1]["val_accuracy"] > 0.2


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_completed_epoch(small_archive, tmp_path):
    config, shards_dir = prepare_shards(
        small_archive, tmp_path, image_size=67, epochs=4, batch_size=8, recipe="reference"
    )
    run_dir = tmp_path / "runs" / "killed"
    code = train_script(shards_dir, run_dir, config)
    from alexnet_tasks.training.train import train

    def duplicate_delivery_is_refused(process):
        """A duplicate delivery of the same task is refused while the first one lives."""
        time.sleep(0.5)  # into the next epoch
        with pytest.raises(RuntimeError, match=rf"train.lock: process {process.pid} is already training this run"):
            train(shards_dir, run_dir, config)

    done = kill_after_first_epoch(code, run_dir, 4, timeout=240, while_alive=duplicate_delivery_is_refused)

    result = train(shards_dir, run_dir, config)
    assert result["resumed_from"] == done
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2, 3, 4]
    assert len(list((run_dir / "checkpoints").glob("*.keras"))) == 1


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus_trains_and_saves_a_plain_model(small_archive, tmp_path):
    import keras

    config, shards_dir = prepare_shards(
        small_archive, tmp_path, image_size=67, epochs=1, batch_size=8, recipe="reference"
    )
    run_dir = tmp_path / "runs" / "mirrored"
    code = train_script(
        shards_dir, run_dir, config,
        prelude=TWO_LOGICAL_CPUS,
        call_arguments=", devices=['/cpu:0', '/cpu:1']",
    )
    run = run_python(code, "mirrored training", timeout=600)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["replicas"] == 2 and saved["devices"] == "2 x CPU"
    # Global batch and rate, as given: 4 images per replica.
    assert saved["train"]["batch_size"] == 8 and saved["train"]["learning_rate"] == pytest.approx(0.001)
    assert saved["train"]["jit_compile"] is False
    assert "global batch 8 (4 per replica) on 2 replica(s)" in run.stderr
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    model = keras.models.load_model(run_dir / "model.keras")  # no strategy scope here
    probabilities = np.asarray(model.predict(np.zeros((3, 32, 32, 3), np.float32), verbose=0))
    assert probabilities.shape == (3, 10)


@pytest.mark.slow
def test_time_budget_below_one_epoch_plans_one_epoch_and_is_not_truncated(small_archive, tmp_path):
    from alexnet_tasks.training.train import train

    config, shards_dir = prepare_shards(
        small_archive, tmp_path, image_size=67, epochs=5, batch_size=16, recipe="reference",
        max_train_minutes=0.001,  # 0.06 s: less than any epoch
    )
    run_dir = tmp_path / "runs" / "budget"
    result = train(shards_dir, run_dir, config)
    assert result["epochs"] == 1 and result["truncated"] is False
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert (summary["epochs_planned"], summary["epochs_run"], summary["truncated"]) == (1, 1, False)
    assert (run_dir / "model.keras").is_file()


@pytest.mark.slow
def test_time_budget_sizes_the_schedule_to_end_inside_it(small_archive, tmp_path):
    from alexnet_tasks.training.callbacks import PLAN_HEADROOM, TIME_BUDGET
    from alexnet_tasks.training.train import train

    # Epoch 1 (with the tracing, and on a GPU the XLA compile) takes 0.2 s to 20 s depending on the
    # machine and its load, so the plan is checked against the first epoch this run measured.
    budget_seconds = 45.0
    config, shards_dir = prepare_shards(
        small_archive, tmp_path, image_size=67, epochs=200, batch_size=16, learning_rate=0.01, recipe="fast",
        max_train_minutes=budget_seconds / 60,
    )
    run_dir = tmp_path / "runs" / "budget"
    result = train(shards_dir, run_dir, config)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    state = json.loads((run_dir / "state.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    first_epoch = history[0]["epoch_seconds"]
    expected = max(1, min(200, int(budget_seconds // (first_epoch * PLAN_HEADROOM))))
    assert summary["epochs_planned"] == state["epochs_planned"] == expected < 200
    # The callback expects each next epoch to take the mean so far: one slower last epoch may overrun by itself.
    assert summary["seconds"] < budget_seconds + max(entry["epoch_seconds"] for entry in history)
    if summary["truncated"]:  # later epochs ran slower than the first: stopped before overrunning
        assert summary["stopped_reason"] == TIME_BUDGET and summary["epochs_run"] < expected
        return
    assert summary["epochs_run"] == summary["epochs_planned"] == result["epochs"]
    assert summary["stopped_reason"] is None
    if expected == 1:  # a loaded machine: the plan, made after epoch 1, had no epoch left to decay over
        assert len(history) == 1
        return
    # The rate of the last step: the cosine has decayed to (almost) nothing inside the budget.
    assert history[-1]["learning_rate"] < 0.03 * 0.01


def test_time_budget_callback_plans_from_the_first_epoch_and_marks_an_overrun_truncated():
    import keras

    from alexnet_tasks.training.callbacks import Progress, TimeBudget

    hyperparameters = resolve_hyperparameters(PipelineConfig(recipe="fast", epochs=30))
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    progress = Progress(hyperparameters, 10, hyperparameters.epochs, plan_fixed=False, budget_seconds=100.0)
    budget = TimeBudget(progress)
    budget.set_model(model)
    model.stop_training = False  # as fit sets it
    budget.on_epoch_end(0, {"epoch_seconds": 11.0})  # 100 s // (11 s + 5% headroom): 8 epochs fit, not 9
    assert (progress.epochs_planned, progress.plan_fixed, model.stop_training) == (8, True, False)
    progress.history = [{"epoch": e, "epoch_seconds": 12.0} for e in range(1, 6)]
    # One slow epoch (the machine was busy) is not the next one's length: 60 + 25 s spent, 85 / 6
    # = 14.2 s an epoch on average, so the next one still fits and the plan goes on.
    budget.on_epoch_end(5, {"epoch_seconds": 25.0})
    assert not model.stop_training and progress.stopped_reason is None
    progress.history.append({"epoch": 6, "epoch_seconds": 25.0})
    budget.on_epoch_end(6, {"epoch_seconds": 13.0})  # 98 s spent, 14 s an epoch: the next would overrun
    assert model.stop_training and progress.stopped_reason == "time budget"


@pytest.mark.slow
def test_killed_mirrored_training_resumes_on_both_replicas(small_archive, tmp_path):
    config, shards_dir = prepare_shards(
        small_archive, tmp_path, image_size=67, epochs=3, batch_size=8, recipe="reference"
    )
    run_dir = tmp_path / "runs" / "mirrored"
    code = train_script(shards_dir, run_dir, config, prelude=TWO_LOGICAL_CPUS,
                        call_arguments=", devices=['/cpu:0', '/cpu:1']")
    done = kill_after_first_epoch(code, run_dir, 3)
    resumed = run_python(code, "resumed run")
    assert f"resuming from the checkpoint of epoch {done}/3" in resumed.stderr
    # Logged from model.distribute_strategy as fit starts: the restored model trains on both devices.
    assert "fit on 2 replica(s)" in resumed.stderr and "fit on 1 replica(s)" not in resumed.stderr
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert (summary["replicas"], summary["devices"], summary["epochs_run"], summary["truncated"]) == (2, "2 x CPU", 3, False)
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2, 3] and all(np.isfinite(e["loss"]) for e in history)


@pytest.mark.slow
def test_killed_fast_run_resumes_exactly_like_an_uninterrupted_one(small_archive, tmp_path):
    import keras

    config, shards_dir = prepare_shards(
        small_archive, tmp_path, image_size=67, epochs=3, batch_size=16, learning_rate=0.01, recipe="fast"
    )
    straight, killed = tmp_path / "runs" / "straight", tmp_path / "runs" / "killed"
    run_python(train_script(shards_dir, straight, config, prelude=DETERMINISTIC), "uninterrupted run")
    code = train_script(shards_dir, killed, config, prelude=DETERMINISTIC)
    done = kill_after_first_epoch(code, killed, 3)
    resumed = run_python(code, "resumed run")
    assert f"resuming from the checkpoint of epoch {done}/3" in resumed.stderr

    histories = [json.loads((run / "history.json").read_text()) for run in (straight, killed)]
    for ours, theirs in zip(*histories):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            assert ours[key] == theirs[key], (ours["epoch"], key)
    weights = [keras.models.load_model(run / "model.keras").get_weights() for run in (straight, killed)]
    for ours, theirs in zip(*weights):
        np.testing.assert_array_equal(ours, theirs)
    fingerprints = [json.loads((run / "train_summary.json").read_text())["fingerprint"] for run in (straight, killed)]
    assert fingerprints[0] == fingerprints[1]


@pytest.mark.slow
def test_weight_averaging_trains_saves_the_averaged_weights_and_resumes(small_archive, tmp_path):
    """EMA on real tiny training: the saved model holds the averaged weights, with recomputed statistics."""
    import keras

    from alexnet_tasks.training.train import train

    config, shards_dir = prepare_shards(
        small_archive, tmp_path, image_size=67, epochs=2, batch_size=16, learning_rate=0.01, recipe="fast",
        recipe_options={"ema_momentum": 0.9, "batchnorm_momentum": 0.9, "kernel_initializer": "he_normal",
                        "dropout": 0.3, "max_shift": 2},
    )
    run_dir = tmp_path / "runs" / "ema"
    result = train(shards_dir, run_dir, config)
    assert result["epochs"] == 2
    saved = json.loads((run_dir / "config.json").read_text())["train"]
    assert (saved["ema_momentum"], saved["dropout"], saved["kernel_initializer"]) == (0.9, 0.3, "he_normal")
    model = keras.models.load_model(run_dir / "model.keras")
    checkpoint = keras.models.load_model(next((run_dir / "checkpoints").glob("epoch-*.keras")), compile=True)
    averages = checkpoint.optimizer._model_variables_moving_average
    by_path = {variable.path: variable for variable in checkpoint.trainable_variables}
    kernel = model.get_layer("fc7").kernel
    average = next(a for a, v in zip(averages, checkpoint.trainable_variables) if v.path == by_path[kernel.path].path)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(average), rtol=1e-6)
    assert not np.allclose(np.asarray(kernel), np.asarray(by_path[kernel.path]))  # raw weights differ
    # A retry that finds every epoch done writes the same averaged model.
    before = {w.path: np.asarray(w) for w in model.weights}
    train(shards_dir, run_dir, config)
    after = keras.models.load_model(run_dir / "model.keras")
    for weight in after.weights:
        np.testing.assert_allclose(np.asarray(weight), before[weight.path], rtol=1e-5, atol=1e-6)
