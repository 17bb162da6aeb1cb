"""Sweeps: the grid, the trials' checks, the choice on validation, and whole sweeps through `airflow dags test`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.layout import Layout
from alexnet_tasks.release.registry import Registry, read_index
from alexnet_tasks.release.sweeps import read_sweep
from alexnet_tasks.sweeps import (
    TRIAL_PARAMS,
    best_trial,
    expand_grid,
    plan_trials,
    setting_value,
    swept_params,
    trial_label,
    trial_run_id,
)
from alexnet_tasks.ui.charts import setting_chart
from alexnet_tasks.ui.sweeps import load_sweep
from builders import load_plugin_module
from conftest import ROOT, airflow_bin, airflow_env, native_cluster, wait_for_runs

DAG_ID = "alexnet_cifar10_sweep"


# --------------------------------------------------------------------------- the DAG
@pytest.fixture(scope="module")
def sweep_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def test_the_sweep_dag_runs_the_data_steps_once_then_one_train_per_trial_on_the_gpu_queue(sweep_dag):
    tasks = {task.task_id: task for task in sweep_dag.tasks}
    assert set(tasks) == {"plan", "download", "split", "build_shards", "train", "select", "evaluate", "gate",
                          "publish"}
    assert tasks["download"].upstream_task_ids == {"plan"}
    assert tasks["train"].upstream_task_ids == {"plan", "build_shards"}
    assert tasks["train"].queue == "gpu" and tasks["train"].max_active_tis_per_dagrun == 1  # ALEXNET_GPU_WORKERS
    assert "trial_name" in tasks["train"].map_index_template
    assert tasks["select"].trigger_rule == "all_done" and "train" in tasks["select"].upstream_task_ids
    assert type(sweep_dag.timetable).__name__ == "NullTimetable"  # manual trigger only
    params = sweep_dag.params
    for name in ("trials", "max_trials", "parallel", "image_size", "learning_rate", "source_url"):
        assert name in params
    assert params["parallel"] == 1
    assert plan_trials(dict(params))  # the form's defaults make a sweep


def test_the_sweep_dag_parses_without_tensorflow_numpy_or_h5py():
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('d', {str(ROOT / 'dags' / 'alexnet_cifar10_sweep.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'h5py', 'numpy'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()
    assert out[-1] == ""


# --------------------------------------------------------------------------- the grid
def test_a_grid_expands_to_every_combination_the_first_key_slowest():
    grid = {"learning_rate": [0.02, 0.04], "recipe_options.dropout": [0.3, 0.5], "seed": [1, 2, 3]}
    trials = expand_grid(grid)
    assert len(trials) == 2 * 2 * 3
    assert trials[0] == {"learning_rate": 0.02, "recipe_options": {"dropout": 0.3}, "seed": 1}
    assert trials[-1] == {"learning_rate": 0.04, "recipe_options": {"dropout": 0.5}, "seed": 3}
    assert [trial["learning_rate"] for trial in trials[:6]] == [0.02] * 6
    assert len({json.dumps(trial, sort_keys=True) for trial in trials}) == len(trials)


def test_dotted_keys_of_one_object_merge():
    [trial] = expand_grid({"recipe_options.dropout": [0.5], "recipe_options.max_shift": [2]})
    assert trial == {"recipe_options": {"dropout": 0.5, "max_shift": 2}}


@pytest.mark.parametrize("grid, named", [
    ({}, "empty grid"),
    ({"learning_rate": 0.02}, "trials.learning_rate"),
    ({"learning_rate": []}, "trials.learning_rate"),
    ({"recipe_options": [{"dropout": 0.3}], "recipe_options.dropout": [0.5]}, "recipe_options"),
])
def test_a_grid_that_does_not_expand_is_refused_naming_the_key(grid, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        expand_grid(grid)


# --------------------------------------------------------------------------- the trials
def test_each_trial_is_the_main_params_with_its_overrides_validated_whole():
    base = {"image_size": 67, "recipe_options": {"max_shift": 2}, "validation_size": 100}
    trials = plan_trials({**base, "trials": {"learning_rate": [0.02, 0.04], "recipe_options.dropout": [0.3, 0.5]}})
    assert [trial["index"] for trial in trials] == [0, 1, 2, 3]
    assert trials[1]["label"] == "learning_rate=0.02, recipe_options.dropout=0.5"
    for trial in trials:
        config = PipelineConfig.from_dict(trial["params"])
        assert config.image_size == 67 and config.validation_size == 100
        assert config.recipe_options["max_shift"] == 2  # the form's options kept, the trial's merged in
        assert config.recipe_options["dropout"] == trial["overrides"]["recipe_options"]["dropout"]
        assert config.learning_rate == trial["overrides"]["learning_rate"]
    assert swept_params(trials) == ["learning_rate", "recipe_options.dropout"]
    assert [setting_value(trial, "recipe_options.dropout") for trial in trials] == [0.3, 0.5, 0.3, 0.5]


def test_a_list_of_trials_keeps_its_order_and_an_empty_object_is_the_base():
    trials = plan_trials({"trials": [{"batch_size": 64}, {}, {"epochs": 2.0}]})
    assert [trial["label"] for trial in trials] == ["batch_size=64", "base", "epochs=2.0"]
    assert trials[2]["params"]["epochs"] == 2 and isinstance(trials[2]["params"]["epochs"], int)


@pytest.mark.parametrize("params, message", [
    ({"trials": [{}, {"learning_rate": -1}]}, r"trial 2 \(learning_rate=-1\): learning_rate must be in \(0, 10\]"),
    ({"trials": [{"validation_size": 100}]}, r"trial 1 \(validation_size=100\): 'validation_size' is not a training"),
    ({"trials": [{"epochs": "ten"}]}, r"trial 1 \(epochs=\"ten\"\): epochs must be an integer"),
    ({"trials": [{"recipe_options": {"dropout": 2}}]}, r"trial 1 .*recipe_options\.dropout must be between 0 and 0\.9"),
    ({"trials": [{"recipe_options": {"drop": 0.5}}]}, r"trial 1 .*recipe_options: unknown key\(s\) 'drop'"),
    ({"trials": [{"batch_size": 0}]}, r"trial 1 \(batch_size=0\): batch_size must be"),
    ({"trials": ["fast"]}, r"trial 1: expected an object of settings"),
    ({"trials": [{"seed": 1}, {"seed": 1}]}, r"trial 2 \(seed=1\): the same settings as trial 1"),
    ({"trials": {"seed": [1, 2, 3]}, "max_trials": 2}, r"3 trials exceed max_trials=2"),
    ({"trials": []}, r"trials: an empty list"),
    ({"trials": "fast"}, r"trials must be a JSON list or a JSON object"),
    ({"max_trials": 0}, r"max_trials must be between 1 and 100, got 0"),
    ({"parallel": 0}, r"parallel must be between 1 and 64, got 0"),
    ({"image_size": 12}, r"image_size must be between 67 and 1024"),
    ({"colour": "red"}, r"unknown setting\(s\) 'colour'"),
])
def test_bad_trials_are_refused_before_anything_runs_naming_the_trial_and_the_key(params, message):
    with pytest.raises(ValueError, match=message):
        plan_trials(params)


def test_a_trial_may_change_every_training_setting_and_no_data_setting():
    assert set(TRIAL_PARAMS) >= {"learning_rate", "batch_size", "epochs", "seed", "recipe_options", "recipe"}
    assert not set(TRIAL_PARAMS) & {"source_url", "source_md5", "validation_size", "split_seed", "train_limit"}


def test_labels_and_run_ids_name_the_trial():
    assert trial_label({"learning_rate": 0.02, "recipe_options": {"dropout": 0.5}}) == (
        "learning_rate=0.02, recipe_options.dropout=0.5")
    assert trial_label({}) == "base"
    assert trial_run_id("manual__2026", 3) == "manual__2026__trial03"
    assert Layout(Path("/a")).run(trial_run_id("r", 0)) != Layout(Path("/a")).run(trial_run_id("r", 1))


# --------------------------------------------------------------------------- the choice
def test_the_best_trial_has_the_highest_validation_accuracy_then_the_lower_loss_then_comes_first():
    results = [
        {"index": 0, "validation_accuracy": 0.5, "validation_loss": 1.2},
        {"index": 1, "validation_accuracy": 0.6, "validation_loss": 1.5},
        {"index": 2, "validation_accuracy": 0.6, "validation_loss": 1.1},
        {"index": 3, "validation_accuracy": 0.6, "validation_loss": 1.1},
        {"index": 4, "validation_accuracy": math.nan, "validation_loss": 0.1},
        {"index": 5, "validation_accuracy": None, "validation_loss": None},
    ]
    assert best_trial(results)["index"] == 2
    assert best_trial(results[:2])["index"] == 1
    assert best_trial(results[4:]) is None
    assert best_trial([]) is None


def test_a_setting_chart_puts_numbers_on_a_scale_and_words_one_tick_each():
    numeric = setting_chart("learning_rate", [(0.01, 0.3), (0.04, 0.5), (0.02, None)], chosen=1)
    assert numeric.count("<circle") == 2 and 'r="5"' in numeric and "polyline" not in numeric
    words = setting_chart("recipe_options.decay", [("cosine", 0.4), ("linear", 0.45), ("cosine", 0.42)])
    assert words.count("<circle") == 3 and ">cosine<" in words and ">linear<" in words


# --------------------------------------------------------------------------- whole sweeps
def _sweep(tmp_path: Path, archive, trials, timeout: float = 1500, **params) -> tuple[subprocess.CompletedProcess, Path, Path]:
    path, md5 = archive
    artifacts, home = tmp_path / "artifacts", tmp_path / "home"
    env = airflow_env(home, artifacts)
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True, capture_output=True)
    conf = {
        "source_url": path.as_uri(), "source_md5": md5, "image_size": 67, "epochs": 1, "validation_size": 50,
        "batch_size": 16, "recipe": "reference", "publish_mode": "always", "trials": trials, **params,
    }
    run = subprocess.run([airflow_bin(), "dags", "test", DAG_ID, "-c", json.dumps(conf)],
                         env=env, capture_output=True, text=True, timeout=timeout)
    return run, artifacts, home


def _task_instances(home: Path, task_id: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(home / "airflow.db")) as db:
        return db.execute("SELECT map_index, state, rendered_map_index, run_id FROM task_instance "
                          "WHERE dag_id = ? AND task_id = ? ORDER BY map_index", (DAG_ID, task_id)).fetchall()


def _last_epoch(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.json").read_text())[-1]


@pytest.mark.slow
def test_a_sweep_trains_every_trial_tests_only_the_best_on_validation_and_publishes_it(
        small_archive, tmp_path, monkeypatch):
    trials = {"learning_rate": [0.001, 0.01, 0.05]}
    run, artifacts, home = _sweep(tmp_path, small_archive, trials)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    trained = _task_instances(home, "train")
    assert [(index, state) for index, state, _, _ in trained] == [(0, "success"), (1, "success"), (2, "success")]
    assert [name for _, _, name, _ in trained] == [
        "1: learning_rate=0.001", "2: learning_rate=0.01", "3: learning_rate=0.05"]
    sweep_run_id = trained[0][3]
    layout = Layout(artifacts)
    folders = [layout.run(trial_run_id(sweep_run_id, index)) for index in range(3)]
    summaries = [json.loads((folder / "train_summary.json").read_text()) for folder in folders]
    assert len({summary["fingerprint"] for summary in summaries}) == 3  # three trainings, each its own
    assert [summary["learning_rate"] for summary in summaries] == [0.001, 0.01, 0.05]
    # Chosen on the validation split alone: the last epoch's accuracy, then loss, then order.
    epochs = [_last_epoch(folder) for folder in folders]
    expected = min(range(3), key=lambda index: (-epochs[index]["val_accuracy"], epochs[index]["val_loss"], index))
    record = read_sweep(layout.published, sweep_run_id)
    assert record["chosen"] == expected and record["swept"] == ["learning_rate"]
    assert [trial["validation_accuracy"] for trial in record["trials"]] == [epoch["val_accuracy"] for epoch in epochs]
    assert all(trial["finished"] and "test_accuracy" not in trial for trial in record["trials"])
    # Only the chosen trial saw the test split; it went through the gate and publish.
    assert [(folder / "metrics.json").is_file() for folder in folders] == [index == expected for index in range(3)]
    [line] = read_index(layout.published)
    assert line["run_id"] == trial_run_id(sweep_run_id, expected) == record["chosen_run_id"]
    assert line["sweep"] == sweep_run_id and line["trial"] == f"learning_rate={[0.001, 0.01, 0.05][expected]}"
    assert line["validation_accuracy"] == epochs[expected]["val_accuracy"] and line["blessed"] is True
    assert (layout.published / "latest").resolve() == (layout.published / line["path"]).resolve()
    assert Registry(layout.published).page(sweep=sweep_run_id).total == 1
    assert Registry(layout.published).page(sweep="another sweep").total == 0

    # The sweep page: the trials best first, the chosen one marked, a chart per swept setting; it is the
    # sweep run's Results tab.
    view = load_sweep(layout.published, sweep_run_id)
    order = sorted(range(3), key=lambda index: (-epochs[index]["val_accuracy"], epochs[index]["val_loss"], index))
    assert [trial.number - 1 for trial in view.trials] == order and view.chosen.number - 1 == expected
    assert [trial.params for trial in sorted(view.trials, key=lambda trial: trial.number)] == [
        {"learning_rate": 0.001}, {"learning_rate": 0.01}, {"learning_rate": 0.05}]
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(artifacts))
    plugin = load_plugin_module()
    tab = plugin.run_tab(DAG_ID, sweep_run_id).body.decode()
    assert tab.count('<tr class="trial') == 3 and tab.count('<tr class="trial chosen"') == 1
    assert f'data-trial="{expected + 1}"' in tab.split('<tr class="trial chosen"')[1].split(">")[0]
    assert "Validation accuracy against learning_rate" in tab and tab.count("<circle") == 3
    assert plugin.sweep_page(sweep_run_id).body.decode().count('<tr class="trial') == 3
    listed = plugin.list_page(sweep=sweep_run_id).body.decode()
    assert listed.count('<tr class="run"') == 1 and trial_run_id(sweep_run_id, expected) in listed


@pytest.mark.slow
def test_a_trial_that_fails_at_training_leaves_the_others_and_the_best_of_them_is_published(small_archive, tmp_path):
    # 150 training images: a batch of 1000 is refused by train itself, not by the form.
    trials = [{"learning_rate": 0.01}, {"batch_size": 1000}, {"learning_rate": 0.002}]
    run, artifacts, home = _sweep(tmp_path, small_archive, trials)
    output = run.stdout + run.stderr
    assert [(index, state) for index, state, _, _ in _task_instances(home, "train")] == [
        (0, "success"), (1, "failed"), (2, "success")], output[-4000:]
    assert "batch_size=1000 exceeds the 150 training images" in output
    [(_, state, _, sweep_run_id)] = _task_instances(home, "publish")
    assert state == "success"
    layout = Layout(artifacts)
    record = read_sweep(layout.published, sweep_run_id)
    assert [trial["finished"] for trial in record["trials"]] == [True, False, True]
    assert record["trials"][1]["validation_accuracy"] is None
    epochs = {index: _last_epoch(layout.run(trial_run_id(sweep_run_id, index))) for index in (0, 2)}
    expected = min(epochs, key=lambda index: (-epochs[index]["val_accuracy"], epochs[index]["val_loss"], index))
    assert record["chosen"] == expected
    [line] = read_index(layout.published)
    assert line["run_id"] == trial_run_id(sweep_run_id, expected) and line["sweep"] == sweep_run_id


@pytest.mark.slow
def test_a_sweep_in_which_every_trial_failed_fails_and_records_them(small_archive, tmp_path):
    run, artifacts, home = _sweep(tmp_path, small_archive, [{"batch_size": 1000}, {"batch_size": 2000}])
    output = run.stdout + run.stderr
    assert [state for _, state, _, _ in _task_instances(home, "train")] == ["failed", "failed"], output[-4000:]
    [(_, state, _, sweep_run_id)] = _task_instances(home, "select")
    assert state == "failed"
    assert [state for _, state, _, _ in _task_instances(home, "evaluate")] == ["upstream_failed"]
    record = read_sweep(Layout(artifacts).published, sweep_run_id)
    assert record["chosen"] is None and [trial["finished"] for trial in record["trials"]] == [False, False]
    assert read_index(Layout(artifacts).published) == []


@pytest.mark.slow
def test_bad_trials_through_dags_test_are_refused_before_the_data_steps(small_archive, tmp_path):
    run, artifacts, home = _sweep(tmp_path, small_archive, [{"learning_rate": 0.01}, {"dropout": 0.5}], timeout=300)
    assert run.returncode != 0 or _task_instances(home, "plan")[0][1] == "failed"
    assert "trial 2 (dropout=0.5): 'dropout' is not a training setting" in run.stdout + run.stderr
    assert [state for _, state, _, _ in _task_instances(home, "download")] != ["success"]
    assert [state for _, state, _, _ in _task_instances(home, "select")] == ["failed"]  # at once, not retried
    assert not (artifacts / "data").exists()


@pytest.mark.cluster
@pytest.mark.slow
def test_two_gpu_workers_train_two_trials_at_once(served_archive):
    from urllib.parse import quote

    url, md5, artifacts = served_archive
    with native_cluster(artifacts.parent / "cluster", "sweep", redis_db=12, gpu_workers=2, dag_id=DAG_ID) as (
            state, api):
        conf = {"source_url": url, "source_md5": md5, "image_size": 67, "epochs": 2, "validation_size": 50,
                "batch_size": 16, "recipe": "reference", "publish_mode": "always",
                "trials": {"learning_rate": [0.001, 0.01]}, "parallel": 2}
        run_id = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]
        [run] = wait_for_runs(api, [run_id], 1200, dag_id=DAG_ID)
        instances = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id)}/taskInstances")["task_instances"]
        assert run["state"] == "success", [(ti["task_id"], ti["map_index"], ti["state"]) for ti in instances]
        trains = sorted((ti for ti in instances if ti["task_id"] == "train"), key=lambda ti: ti["map_index"])
        assert [ti["state"] for ti in trains] == ["success", "success"]
        assert {ti["hostname"] for ti in trains} == {"worker-gpu", "worker-gpu-2"}
        assert [ti["rendered_map_index"] for ti in trains] == ["1: learning_rate=0.001", "2: learning_rate=0.01"]
        starts = [datetime.fromisoformat(ti["start_date"].replace("Z", "+00:00")) for ti in trains]
        ends = [datetime.fromisoformat(ti["end_date"].replace("Z", "+00:00")) for ti in trains]
        overlap = (min(ends) - max(starts)).total_seconds()
        print(f"two trials' training intervals overlap by {overlap:.1f} s")
        assert overlap > 0, list(zip(starts, ends))
        [line] = read_index(artifacts / "published")
        assert line["sweep"] == run_id
