import contextlib
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from alexnet_tasks.release.publish import read_index
from conftest import ROOT, airflow_bin, airflow_env
from builders import scalar_tags

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


# --------------------------------------------------------------------------- three runs through the gate
def _after(published: Path, smtp, run: subprocess.CompletedProcess) -> SimpleNamespace:
    """What one ``dags test`` left: the index, where latest points, the mails so far and the run's log."""
    return SimpleNamespace(index=read_index(published), latest=os.readlink(published / "latest"),
                           mails=list(smtp.messages), log=run.stdout + run.stderr)


@pytest.fixture(scope="module")
def three_runs(small_archive, tmp_path_factory) -> SimpleNamespace:
    """Three ``airflow dags test`` runs in one Airflow home, alerts to a real SMTP server on 127.0.0.1.

    1. ``good``: no champion yet, sanity alone decides (the floor is lowered,
       as one epoch on 150 tiny images need not reach 25%): the champion.
    2. ``diverged``: another training seed and a learning rate of 10; the gate refuses it.
    3. ``again``: the champion's settings trained again: the same model, so not worse.

    Holds ``home``, ``artifacts``, ``published``, ``md5``, the three index
    lines (``good``, ``diverged``, ``again``) and, after each run (``first``,
    ``second``, ``third``), what it left (``_after``).
    """
    from smtp_server import SMTPServer

    path, md5 = small_archive
    folder = tmp_path_factory.mktemp("three-runs")
    home, artifacts = folder / "home", folder / "artifacts"
    published = artifacts / "published"
    base = {"source_url": path.as_uri(), "source_md5": md5, "image_size": 67, "epochs": 1,
            "validation_size": 50, "batch_size": 16, "recipe": "reference"}
    smtp = SMTPServer().start()
    try:
        env = _migrate(home, artifacts)
        env.update(  # alerts go to the SMTP server on 127.0.0.1
            AIRFLOW_CONN_ALEXNET_TEST_SMTP=json.dumps({
                "conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
                "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 10}}),
            ALEXNET_ALERT_SMTP_CONN="alexnet_test_smtp", ALEXNET_ALERT_EMAIL="ml-team@example.com",
        )
        first = _after(published, smtp, _dags_test(env, {**base, "seed": 1, "accuracy_floor": 0.0}))
        second = _after(published, smtp, _dags_test(env, {**base, "seed": 2, "learning_rate": 10.0,
                                                          "accuracy_floor": 0.0}))
        third = _after(published, smtp, _dags_test(env, {**base, "seed": 1, "accuracy_floor": 0.0}))
    finally:
        smtp.stop()
    good, diverged, again = third.index
    return SimpleNamespace(home=home, artifacts=artifacts, published=published, md5=md5,
                           good=good, diverged=diverged, again=again, first=first, second=second, third=third)


def _decision(runs: SimpleNamespace, line: dict) -> dict:
    return json.loads((runs.published / line["path"] / "decision.json").read_text())


def _model_events(runs: SimpleNamespace) -> list[tuple[str, str]]:
    """(source run id, extra) of every asset event of the model, oldest first."""
    return _query(runs.home, "SELECT e.source_run_id, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                             "WHERE a.name = 'alexnet_cifar10_model' ORDER BY e.id")


@pytest.mark.slow
def test_a_first_run_without_a_champion_is_blessed_published_whole_and_made_latest(three_runs):
    [good] = three_runs.first.index
    assert good == three_runs.good and good["blessed"] is True
    assert three_runs.first.latest == good["path"]
    assert (three_runs.published / good["path"] / "model.keras").is_file()


@pytest.mark.slow
def test_a_blessed_model_is_no_alert(three_runs):
    assert three_runs.first.mails == []


@pytest.mark.slow
def test_a_diverged_run_is_recorded_unblessed_with_its_reason_and_the_champions_line_untouched(three_runs):
    assert three_runs.second.index == [three_runs.good, three_runs.diverged]  # the champion's line is untouched
    diverged = three_runs.diverged
    assert diverged["blessed"] is False and "not finite" in "; ".join(diverged["reasons"])
    assert diverged["test_loss"] is None and diverged["config"]["learning_rate"] == 10.0
    assert "gate: NOT blessed" in three_runs.second.log


@pytest.mark.slow
def test_latest_stays_on_the_champion_after_a_refused_run(three_runs):
    assert three_runs.second.latest == three_runs.good["path"]


@pytest.mark.slow
def test_a_refused_run_keeps_its_run_folder_but_its_published_record_has_no_model(three_runs):
    path = three_runs.diverged["path"]
    assert (three_runs.artifacts / "runs" / Path(path).name / "model.keras").is_file()
    assert (three_runs.published / path / "decision.json").is_file()
    assert not (three_runs.published / path / "model.keras").exists()


@pytest.mark.slow
def test_a_diverged_runs_metrics_are_valid_json_with_the_figures_that_are_not_finite_named(three_runs):
    run_dir = three_runs.artifacts / "runs" / Path(three_runs.diverged["path"]).name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finite"] is False and "test_loss" in metrics["nonfinite"] and metrics["test_loss"] is None


@pytest.mark.slow
def test_the_refused_runs_decision_names_the_failed_check_and_the_champion_it_was_compared_with(three_runs):
    good, diverged = three_runs.good, three_runs.diverged
    decision = _decision(three_runs, diverged)
    assert decision["blessed"] is False and decision["checks"]["finite_loss"]["passed"] is False
    assert decision["champion"] == good["run_id"] and decision["champion_accuracy"] == good["test_accuracy"]


@pytest.mark.slow
def test_the_refused_run_is_compared_with_the_champion_image_by_image(three_runs):
    good, diverged = three_runs.good, three_runs.diverged
    paired = _decision(three_runs, diverged)["paired"]
    assert paired["images"] == 60
    assert paired["only_challenger_right"] - paired["only_champion_right"] == round(
        (diverged["test_accuracy"] - good["test_accuracy"]) * 60)
    assert 0 < paired["mcnemar_p"] <= 1


@pytest.mark.slow
def test_the_team_is_told_of_a_refused_run_with_the_gates_reason(three_runs):
    diverged = three_runs.diverged
    [mail] = three_runs.second.mails
    assert mail.recipients == ["ml-team@example.com"]
    assert diverged["run_id"] in mail.body() and "not finite" in mail.body()
    assert "not blessed" in str(mail.message["Subject"]).lower()
    assert three_runs.third.mails == three_runs.second.mails, "the blessed third run is no alert"


@pytest.mark.slow
def test_both_runs_succeed_in_airflow_with_the_refused_runs_publish_skipped(three_runs):
    good, diverged = three_runs.good["run_id"], three_runs.diverged["run_id"]
    states = dict(_query(three_runs.home, "SELECT run_id, state FROM dag_run WHERE dag_id = 'alexnet_cifar10'"))
    assert (states[good], states[diverged]) == ("success", "success")
    tasks = {(run_id, task): state for run_id, task, state in _query(
        three_runs.home, "SELECT run_id, task_id, state FROM task_instance WHERE task_id IN ('gate', 'publish') "
        "AND run_id IN (?, ?)", good, diverged)}
    assert tasks == {(good, "gate"): "success", (good, "publish"): "success",
                     (diverged, "gate"): "success", (diverged, "publish"): "skipped"}


@pytest.mark.slow
def test_only_blessed_models_are_asset_events_with_what_a_downstream_dag_needs(three_runs):
    good, again = three_runs.good, three_runs.again
    events = _model_events(three_runs)
    assert [run_id for run_id, _ in events] == [good["run_id"], again["run_id"]]
    assert json.loads(events[0][1]) == {"run_id": good["run_id"], "test_accuracy": good["test_accuracy"],
                                        "published": str(three_runs.published / good["path"]),
                                        "fingerprint": good["fingerprint"]}


@pytest.mark.slow
def test_two_training_seeds_share_one_shard_set(three_runs):
    good, diverged = three_runs.good, three_runs.diverged
    assert len(list((three_runs.artifacts / "data" / three_runs.md5).glob("shards-*"))) == 1
    assert good["data_key"] == diverged["data_key"] and good["fingerprint"] != diverged["fingerprint"]


@pytest.mark.slow
def test_the_champions_settings_trained_again_are_the_same_model_so_blessed_and_latest(three_runs):
    good, again = three_runs.good, three_runs.again
    assert again["blessed"] is True and again["fingerprint"] == good["fingerprint"]
    assert again["test_accuracy"] == good["test_accuracy"] and three_runs.third.latest == again["path"]


@pytest.mark.slow
def test_a_retrained_run_is_compared_with_the_champion_not_with_the_refused_run(three_runs):
    decision = _decision(three_runs, three_runs.again)
    assert decision["champion"] == three_runs.good["run_id"]
    assert decision["paired"]["only_challenger_right"] == decision["paired"]["only_champion_right"] == 0
    assert decision["paired"]["mcnemar_p"] == 1.0


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
