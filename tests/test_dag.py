import contextlib
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alexnet_tasks.release.publish import read_index
from conftest import ROOT, airflow_bin, airflow_env
from test_train import scalar_tags

TASKS = ["download", "split", "build_shards", "train", "evaluate", "gate", "approve", "publish"]


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["alexnet_cifar10"]


def test_tasks_edges_and_queues(dag):
    assert sorted(task.task_id for task in dag.tasks) == sorted(TASKS)
    for upstream, downstream in zip(TASKS, TASKS[1:]):
        assert dag.get_task(upstream).downstream_task_ids == {downstream}
    assert dag.get_task("train").queue == "gpu"
    assert all(dag.get_task(t).queue != "gpu" for t in TASKS if t != "train")
    assert dag.get_task("train").execution_timeout is not None


def test_approve_asks_airflow_s_approval_question_and_publish_runs_whatever_it_answers(dag):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    approve = dag.get_task("approve")
    assert isinstance(approve, ApprovalOperator) and approve.options == ["Approve", "Reject"]
    assert approve.defaults == ["Reject"]  # no answer before approval_timeout: the champion stays
    assert list(approve.serialized_params) == ["comment"]  # the answer's "why", not the pipeline's params
    assert dag.get_task("publish").trigger_rule == "none_failed"  # after an approve that was skipped too


def test_schedule_and_run_policy(dag):
    assert dag.timetable.expression == "0 2 * * *" and str(dag.timetable.timezone) == "UTC"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.default_args["retries"] >= 2 and dag.default_args["retry_delay"].total_seconds() > 0
    assert dag.doc_md and "AlexNet" in dag.doc_md and dag.tags


def test_params_have_titles_descriptions_and_bounds(dag):
    expected = {
        "source_url", "source_md5", "recipe", "epochs", "batch_size", "learning_rate",
        "image_size", "validation_size", "split_seed", "seed", "train_limit", "max_train_minutes",
        "test_time_augmentation", "recipe_options", "accuracy_floor", "gate_tolerance", "publish_mode",
        "approval_timeout",
    }
    assert set(dag.params.keys()) == expected
    for name in expected:
        param = dag.params.get_param(name)
        assert param.schema.get("title") and param.description, name
    schema = {name: dag.params.get_param(name).schema for name in expected}
    assert schema["image_size"]["minimum"] == 67
    assert schema["epochs"]["minimum"] == 1 and schema["batch_size"]["minimum"] == 1
    assert schema["learning_rate"]["exclusiveMinimum"] == 0
    assert schema["validation_size"]["maximum"] < 50000
    assert schema["source_md5"]["pattern"] == "^[0-9a-f]{32}$"
    # The form's JSON editor refuses an unknown recipe option before any task runs.
    from airflow.sdk.definitions.param import ParamValidationError

    assert schema["recipe_options"]["additionalProperties"] is False
    assert schema["recipe_options"]["properties"]["decay"]["enum"] == ["constant", "cosine", "linear"]
    options = copy.deepcopy(dag.params.get_param("recipe_options"))  # resolve() keeps the value it checks
    options.resolve({"dropout": 0.3})
    for bad in ({"dropuot": 0.3}, {"dropout": 2}):
        with pytest.raises(ParamValidationError):
            options.resolve(bad)
    assert dag.params["accuracy_floor"] == 0.25 and schema["accuracy_floor"]["maximum"] == 1
    assert dag.params["gate_tolerance"] == 0 and dag.params["publish_mode"] == "gated"
    assert schema["publish_mode"]["enum"] == ["gated", "always", "approval"]
    assert dag.params["approval_timeout"] == 24 and schema["approval_timeout"]["exclusiveMinimum"] == 0


def test_publish_emits_the_model_asset_and_nothing_else_does(dag):
    from airflow.sdk import Asset

    assert dag.get_task("publish").outlets == [Asset("alexnet_cifar10_model")]
    assert all(not dag.get_task(task).outlets for task in TASKS if task != "publish")


def test_params_are_generated_from_the_config_fields(dag):
    from alexnet_tasks.config import PipelineConfig

    fields = dataclasses.fields(PipelineConfig)
    assert list(dag.params.keys()) == [field.name for field in fields]
    for field in fields:
        param, facts = dag.params.get_param(field.name), field.metadata
        assert param.value == field.default, field.name
        assert param.description == facts["description"], field.name
        assert param.schema["title"] == facts["title"], field.name
        assert param.schema["type"] == (["null", facts["type"]] if field.default is None else facts["type"])
        assert param.schema["section"] == facts["section"], field.name
        for key, value in facts["schema"].items():
            assert param.schema[key] == value, (field.name, key)


def test_the_form_shows_the_params_in_sections(dag):
    """Airflow's form groups params by ``section``, in the order the sections first appear."""
    from alexnet_tasks.config import GATE_PARAMS, SECTIONS

    sections = {}
    for name in dag.params:
        sections.setdefault(dag.params.get_param(name).schema["section"], []).append(name)
    assert list(sections) == list(SECTIONS) == ["Data", "Training", "Evaluation", "Gate and publish"]
    assert set(sections["Data"]) == {"source_url", "source_md5", "validation_size", "split_seed", "train_limit"}
    assert sections["Evaluation"] == ["test_time_augmentation"]
    assert tuple(sections["Gate and publish"]) == GATE_PARAMS  # what is published, not what is trained


def test_the_pipeline_checks_params_against_the_schemas_airflow_holds(dag, server_params):
    from alexnet_tasks.config import param_specs
    from alexnet_tasks.validation import param_schema

    for name, spec in param_specs().items():
        assert param_schema(spec) == dag.params.get_param(name).schema == server_params.get_param(name).schema, name


def test_form_and_config_accept_and_refuse_the_same_edge_values(dag):
    from airflow.sdk.definitions.param import ParamValidationError

    from alexnet_tasks.config import PipelineConfig

    for field in dataclasses.fields(PipelineConfig):
        param, schema = dag.params.get_param(field.name), field.metadata["schema"]
        edges = [schema[key] + step for key, steps in (("minimum", (0, -1)), ("maximum", (0, 1)))
                 if key in schema for step in steps]
        edges += [schema["exclusiveMinimum"]] if "exclusiveMinimum" in schema else []
        for value in edges + [None]:
            try:
                PipelineConfig.from_dict({field.name: value})
                config_accepts = True
            except ValueError:
                config_accepts = False
            try:
                param.resolve(value)
                form_accepts = True
            except ParamValidationError:
                form_accepts = False
            assert form_accepts == config_accepts, (field.name, value)


@pytest.fixture(scope="module")
def server_params(dag):
    """The params as the API server and scheduler hold them: the DAG serialized and read back."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(DagSerialization.to_dict(dag)).params


def _airflow_accepts(server_params, conf: dict) -> bool:
    """Airflow's check of a trigger's conf, the one it runs before it creates the run (``create_dagrun``)."""
    from airflow.sdk.definitions.param import ParamValidationError

    try:
        server_params.deep_merge(conf).validate()
    except ParamValidationError:
        return False
    return True


def _integer_settings():
    """``(conf, the same conf with integers)`` for every integer param and ``recipe_options`` key, at its minimum."""
    from alexnet_tasks.config import param_specs

    cases = []
    for name, spec in param_specs().items():
        kinds = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        if "integer" in kinds:
            cases.append(({name: float(spec["minimum"])}, {name: spec["minimum"]}))
        for option, schema in spec.get("properties", {}).items():
            if schema["type"] == "integer":
                cases.append(({name: {option: float(schema["minimum"])}}, {name: {option: schema["minimum"]}}))
    return cases


def test_an_integral_float_is_that_integer_for_airflow_and_the_pipeline(server_params):
    """JSON Schema counts 1.0 as an integer, so Airflow lets ``{"epochs": 1.0}`` through; the run takes it as 1."""
    from alexnet_tasks.config import PipelineConfig

    cases = _integer_settings()
    assert {"epochs", "image_size", "seed", "recipe_options"} <= {name for conf, _ in cases for name in conf}
    for conf, integers in cases:
        assert _airflow_accepts(server_params, conf), conf
        config = PipelineConfig.from_dict(conf)
        assert config == PipelineConfig.from_dict(integers), conf
        # The same folders and fingerprints as the integer: the value is stored as one.
        assert json.dumps(config.to_dict()) == json.dumps(PipelineConfig.from_dict(integers).to_dict()), conf
    for conf, _ in cases:  # and a fraction is refused by both
        name, value = next(iter(conf.items()))
        fraction = {name: {key: number + 0.5 for key, number in value.items()} if isinstance(value, dict)
                    else value + 0.5}
        assert not _airflow_accepts(server_params, fraction), fraction
        with pytest.raises(ValueError, match="must be an integer, got"):
            PipelineConfig.from_dict(fraction)


def _task_config(run_type: str, logical_date, params: dict):
    """What the DAG's ``task_config()`` resolves inside a task of a run of ``run_type``."""
    import importlib.util

    import pendulum
    from airflow.sdk.api.datamodels._generated import DagRun, DagRunState, DagRunType

    spec = importlib.util.spec_from_file_location("alexnet_dag_module", ROOT / "dags" / "alexnet_cifar10.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_id = f"{run_type}__2026-11-29T02:00:00+00:00"
    dag_run = DagRun(
        dag_id="alexnet_cifar10", run_id=run_id, logical_date=logical_date, data_interval_start=logical_date,
        data_interval_end=logical_date, run_after=logical_date or pendulum.now("UTC"), start_date=None,
        end_date=None, run_type=DagRunType(run_type), state=DagRunState.RUNNING, consumed_asset_events=[],
        partition_key=None,
    )
    context = {"params": params, "run_id": run_id, "dag_run": dag_run}
    if logical_date is not None:
        context["logical_date"] = logical_date
    return module.task_config(context)  # the context each task takes by keyword


def test_scheduled_runs_take_the_training_seed_from_the_logical_date_manual_runs_from_the_form():
    import pendulum

    from alexnet_tasks.config import PipelineConfig, seed_for_date

    night = pendulum.datetime(2026, 11, 29, 2, tz="UTC")
    form = {"seed": 5, "split_seed": 9, "image_size": 67}
    config, _, run_id = _task_config("scheduled", night, form)
    assert config == PipelineConfig(seed=seed_for_date(night), split_seed=9, image_size=67)
    assert run_id.startswith("scheduled__")
    next_night, _, _ = _task_config("scheduled", night.add(days=1), form)
    assert next_night.seed != config.seed and next_night.split_seed == 9  # new training seed, same data
    manual, _, _ = _task_config("manual", night, form)
    assert manual == PipelineConfig.from_dict(form)
    without_date, _, _ = _task_config("manual", None, form)
    assert without_date.seed == 5


@pytest.mark.parametrize(
    "name, value",
    [("image_size", 66), ("epochs", 0), ("epochs", "ten"), ("learning_rate", 0), ("source_md5", "xyz"),
     ("recipe", "turbo"), ("validation_size", 60000), ("train_limit", 5)],
)
def test_params_reject_bad_values_before_anything_runs(dag, name, value):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(value)


def test_parsing_is_light_and_fast():
    code = (
        "import sys, time\n"
        "import airflow.sdk\n"
        "from airflow.sdk import dag, task, Param, get_current_context\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('d', {str(ROOT / 'dags' / 'alexnet_cifar10.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "start = time.perf_counter(); spec.loader.exec_module(module); took = time.perf_counter() - start\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'h5py', 'numpy'))\n"
        "print(took); print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()
    took, heavy = float(out[-2]), out[-1]
    assert heavy == "", f"parsing imported {heavy}"
    assert took < 1.0, f"parsing took {took:.2f} s"


def _migrate(home: Path, artifacts: Path) -> dict:
    env = airflow_env(home, artifacts)
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True, capture_output=True)
    return env


def test_bad_params_through_dags_test_are_refused_naming_the_param(tmp_path):
    env = _migrate(tmp_path / "home", tmp_path / "artifacts")
    run = subprocess.run(
        [airflow_bin(), "dags", "test", "alexnet_cifar10", "-c", json.dumps({"image_size": 12})],
        env=env, capture_output=True, text=True,
    )
    assert run.returncode != 0
    assert "image_size" in run.stdout + run.stderr
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.slow
def test_full_dag_run_publishes_metrics_latest_and_tensorboard(small_archive, tmp_path):
    path, md5 = small_archive
    artifacts = tmp_path / "artifacts"
    env = _migrate(tmp_path / "home", artifacts)
    conf = {
        "source_url": path.as_uri(), "source_md5": md5, "image_size": 67, "epochs": 1,
        "validation_size": 50, "batch_size": 16, "recipe": "reference",
        "publish_mode": "always",  # one epoch on tiny data need not pass the gate's accuracy floor
    }
    run = subprocess.run(
        [airflow_bin(), "dags", "test", "alexnet_cifar10", "-c", json.dumps(conf)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    published = artifacts / "published"
    latest = published / "latest"
    assert latest.is_symlink()
    metrics = json.loads((latest / "metrics.json").read_text())
    assert metrics["test_images"] == 60 and 0 <= metrics["test_accuracy"] <= 1
    [line] = [json.loads(l) for l in (published / "index.jsonl").read_text().splitlines()]
    assert line["test_accuracy"] == metrics["test_accuracy"] and line["run_id"].startswith("manual__")
    from alexnet_tasks.config import PipelineConfig

    config = PipelineConfig.from_dict(conf)
    assert line["config"] == config.to_dict()  # the run's resolved settings; a manual run keeps the form's seed
    assert line["fingerprint"] == metrics["fingerprint"]  # null until train writes train_summary.json
    assert line["hyperparameters"]["epochs"] == 1 and line["hyperparameters"]["learning_rate"] == 0.001  # as resolved
    assert line["blessed"] is True and line["reasons"]  # publish_mode always, or the checks held
    assert line["code_version"]["git_commit"] and line["devices"] == "CPU" and line["seconds"] > 0
    assert line["epochs_run"] == line["epochs_planned"] == 1 and line["truncated"] is False
    # Lineage: the data it trained on, its validation accuracy, and its per-image test predictions.
    assert line["data_key"] == f"{md5}/shards-{config.shards_key()}"
    assert (artifacts / "data" / line["data_key"]).is_dir()
    history = json.loads((latest / "history.json").read_text())
    assert line["validation_accuracy"] == metrics["validation_accuracy"] == history[-1]["val_accuracy"]
    assert len(np.load(latest / "predictions.npy")) == 60
    assert (latest / "model.keras").is_file() and (latest / "confusion_matrix.png").is_file()
    tags = scalar_tags(latest / "tensorboard")
    assert {"train/epoch_loss", "train/epoch_accuracy", "validation/epoch_loss", "validation/epoch_accuracy"} <= tags
    assert "epoch   1/1" in run.stdout + run.stderr  # one progress line per epoch in the task log


@pytest.mark.slow
def test_each_step_runs_alone_with_tasks_test_and_finds_its_inputs(small_archive, tmp_path):
    path, md5 = small_archive
    artifacts = tmp_path / "artifacts"
    env = _migrate(tmp_path / "home", artifacts)
    params = {"source_url": str(path), "source_md5": md5, "image_size": 67, "epochs": 1,
              "validation_size": 50, "batch_size": 16, "recipe": "reference", "publish_mode": "always"}
    for task_id in TASKS:
        run = subprocess.run(
            [airflow_bin(), "tasks", "test", "alexnet_cifar10", task_id, "2026-11-28", "-t", json.dumps(params)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0 and "Traceback" not in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
    latest = artifacts / "published" / "latest"
    [run_dir] = [path for path in (artifacts / "runs").iterdir() if not path.name.startswith(".")]  # one run folder for every step
    assert run_dir.name.startswith("tasks_test__2026-11-28T00_00_00")
    assert os.readlink(latest) == f"runs/{run_dir.name}"
    assert json.loads((latest / "metrics.json").read_text())["test_images"] == 60


@pytest.mark.slow
def test_steps_tested_alone_share_a_run_folder_only_with_the_same_params(tmp_path):
    artifacts = tmp_path / "artifacts"
    env = _migrate(tmp_path / "home", artifacts)

    def run_folder(params: dict) -> str:
        # publish before evaluate fails at once, naming the run folder it looked in.
        run = subprocess.run(
            [airflow_bin(), "tasks", "test", "alexnet_cifar10", "publish", "2026-11-28", "-t", json.dumps(params)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        found = re.search(r"/runs/([^/\s]+)/metrics\.json: missing", run.stdout + run.stderr)
        assert found, (run.stdout + run.stderr)[-3000:]
        return found.group(1)

    first = run_folder({"image_size": 67, "epochs": 1})
    assert first.startswith("tasks_test__2026-11-28")
    assert run_folder({"epochs": 1, "image_size": 67}) == first
    assert run_folder({"image_size": 67.0, "epochs": 1.0}) == first  # JSON's 1.0 is the integer 1
    # The gate's settings decide what is published, not what is trained: the same run folder.
    assert run_folder({"image_size": 67, "epochs": 1, "accuracy_floor": 0.9, "publish_mode": "always"}) == first
    assert run_folder({"image_size": 67, "epochs": 2}) != first


def _dags_test(env: dict, conf: dict) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [airflow_bin(), "dags", "test", "alexnet_cifar10", "-c", json.dumps(conf)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run


def _query(home: Path, sql: str, *args) -> list[tuple]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(home / "airflow.db")) as db:
        return db.execute(sql, args).fetchall()


@pytest.mark.slow
def test_a_diverged_run_is_recorded_not_published_and_only_the_blessed_model_is_an_asset_event(
        small_archive, tmp_path, smtp):
    path, md5 = small_archive
    home, artifacts = tmp_path / "home", tmp_path / "artifacts"
    env = _migrate(home, artifacts)
    env.update(  # alerts go to the SMTP server on 127.0.0.1
        AIRFLOW_CONN_ALEXNET_TEST_SMTP=json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
            "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 10}}),
        ALEXNET_ALERT_SMTP_CONN="alexnet_test_smtp", ALEXNET_ALERT_EMAIL="ml-team@example.com",
    )
    published = artifacts / "published"
    base = {"source_url": path.as_uri(), "source_md5": md5, "image_size": 67, "epochs": 1,
            "validation_size": 50, "batch_size": 16, "recipe": "reference"}
    # A good run with no champion yet: sanity alone decides (the floor is lowered, as one epoch on
    # 150 tiny images need not reach 25%).
    _dags_test(env, {**base, "seed": 1, "accuracy_floor": 0.0})
    [good] = read_index(published)
    assert good["blessed"] is True and os.readlink(published / "latest") == good["path"]
    assert (published / good["path"] / "model.keras").is_file()
    assert smtp.messages == [], "a blessed model is no alert"

    # A second run, another training seed, a learning rate of 10: it diverges.
    run = _dags_test(env, {**base, "seed": 2, "learning_rate": 10.0, "accuracy_floor": 0.0})
    good_line, diverged = read_index(published)
    assert good_line == good  # the champion's line is untouched
    assert diverged["blessed"] is False and "not finite" in "; ".join(diverged["reasons"])
    assert diverged["test_loss"] is None and diverged["config"]["learning_rate"] == 10.0
    assert os.readlink(published / "latest") == good["path"]  # latest stays on the champion
    run_dir = artifacts / "runs" / Path(diverged["path"]).name
    assert (run_dir / "model.keras").is_file()  # the run folder is kept...
    assert not (published / diverged["path"] / "model.keras").exists()  # ...its published record has no model
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finite"] is False and "test_loss" in metrics["nonfinite"] and metrics["test_loss"] is None
    decision = json.loads((published / diverged["path"] / "decision.json").read_text())
    assert decision["blessed"] is False and decision["checks"]["finite_loss"]["passed"] is False
    assert decision["champion"] == good["run_id"] and decision["champion_accuracy"] == good["test_accuracy"]
    paired = decision["paired"]
    assert paired["images"] == 60
    assert paired["only_challenger_right"] - paired["only_champion_right"] == round(
        (diverged["test_accuracy"] - good["test_accuracy"]) * 60)
    assert 0 < paired["mcnemar_p"] <= 1
    assert "gate: NOT blessed" in run.stdout + run.stderr
    [mail] = smtp.messages  # the team is told, with the gate's reason
    assert mail.recipients == ["ml-team@example.com"]
    assert diverged["run_id"] in mail.body() and "not finite" in mail.body()
    assert "not blessed" in str(mail.message["Subject"]).lower()

    # Airflow: the diverged run succeeded with its publish task skipped; the good one published.
    states = dict(_query(home, "SELECT run_id, state FROM dag_run WHERE dag_id = 'alexnet_cifar10'"))
    assert states == {good["run_id"]: "success", diverged["run_id"]: "success"}
    tasks = {(run_id, task): state for run_id, task, state in _query(
        home, "SELECT run_id, task_id, state FROM task_instance WHERE task_id IN ('gate', 'publish')")}
    assert tasks == {(good["run_id"], "gate"): "success", (good["run_id"], "publish"): "success",
                     (diverged["run_id"], "gate"): "success", (diverged["run_id"], "publish"): "skipped"}
    # One asset event, for the blessed model, with what a downstream DAG needs in its extra.
    events = _query(home, "SELECT e.source_run_id, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                          "WHERE a.name = 'alexnet_cifar10_model'")
    assert [run_id for run_id, _ in events] == [good["run_id"]]
    extra = json.loads(events[0][1])
    assert extra == {"run_id": good["run_id"], "test_accuracy": good["test_accuracy"],
                     "published": str(published / good["path"]), "fingerprint": good["fingerprint"]}
    # Two training seeds, one shard set.
    assert len(list((artifacts / "data" / md5).glob("shards-*"))) == 1
    assert good["data_key"] == diverged["data_key"] and good["fingerprint"] != diverged["fingerprint"]

    # A third run trains the champion's settings again: the same model, so not worse, so blessed.
    _dags_test(env, {**base, "seed": 1, "accuracy_floor": 0.0})
    *_, again = read_index(published)
    assert again["blessed"] is True and again["fingerprint"] == good["fingerprint"]
    assert again["test_accuracy"] == good["test_accuracy"] and os.readlink(published / "latest") == again["path"]
    decision = json.loads((published / again["path"] / "decision.json").read_text())
    assert decision["champion"] == good["run_id"]  # compared with the first run, not the refused one
    assert decision["paired"]["only_challenger_right"] == decision["paired"]["only_champion_right"] == 0
    assert decision["paired"]["mcnemar_p"] == 1.0
    events = _query(home, "SELECT e.source_run_id FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                          "WHERE a.name = 'alexnet_cifar10_model' ORDER BY e.id")
    assert [run_id for (run_id,) in events] == [good["run_id"], again["run_id"]]


def test_the_readme_consumer_dag_runs_on_the_model_asset(tmp_path):
    """The downstream DAG docs/nightly-retraining.md shows parses and is scheduled on the asset publish emits."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import Asset

    page = (ROOT / "docs" / "nightly-retraining.md").read_text()
    [example] = [block for block in re.findall(r"```python\n(.*?)```", page, re.S) if "schedule=[MODEL]" in block]
    (tmp_path / "deploy_alexnet.py").write_text(example)
    bag = DagBag(str(tmp_path))
    assert bag.import_errors == {}
    consumer = bag.dags["deploy_alexnet"]
    assert list(consumer.timetable.asset_condition.objects) == [Asset("alexnet_cifar10_model")]
