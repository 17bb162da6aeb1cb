"""
### AlexNet on CIFAR-10: a sweep

Trains several settings of the pipeline at once, on every worker of the
`gpu` queue, chooses the best on the validation split and tests only that
one (docs/sweeps.md).

`plan >> download >> split >> build_shards >> train (one per trial) >> select >> evaluate >> gate >> publish`

* The params are the main DAG's (`alexnet_cifar10`) plus `trials` (a list of
  objects overriding training settings, or a grid object such as
  `{"learning_rate": [0.02, 0.04], "recipe_options.dropout": [0.3, 0.5]}`),
  `max_trials` and `parallel`. `plan` checks every trial whole (the main
  form's schemas) before anything else runs, naming the trial and the key.
* The data steps run once. `train` is mapped over the trials (one task
  instance per trial, named by what it changes), at most `parallel` at once
  (and at most `ALEXNET_GPU_WORKERS`, the DAG's `max_active_tis_per_dagrun`);
  each trial trains in its own run folder (`runs/<run id>__trial<NN>`) and
  resumes there on retry. A trial waits for one of `parallel` slots in
  `sweeps/<run>/slots/`: lock files, or leases on an object store.
* `select` runs whatever the trials did: it reads each finished trial's last
  validation accuracy, chooses the best (ties: lower validation loss, then the
  earlier trial), writes the sweep's record `published/sweeps/<run>.json`
  with every trial, and fails when no trial finished. Only the chosen trial is
  evaluated on the test split, gated and published like a run of the main
  DAG; its index line names the sweep and the trial.
* With `ALEXNET_ARTIFACTS=s3://bucket/prefix` every step runs on the store as
  the main DAG's do (alexnet_tasks.ops.stored_steps): the trials train under
  their leases with each epoch committed there, `select` reads their
  summaries and histories there and writes the record there.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from alexnet_tasks.config import param_specs
from alexnet_tasks.dag_tasks import (
    GPU_QUEUE,
    TRAIN_TIMEOUT,
    build_shards_step,
    default_args,
    download_step,
    evaluate_step,
    gate_step,
    publish_step,
    select_step,
    split_step,
    task_config,
    train_step,
)
from alexnet_tasks.progress import report
from alexnet_tasks.sweeps import gpu_workers, split_params, sweep_param_specs, trial_run_id, trial_slot

# The gpu workers: the most trials that train at once, and the default of `parallel`.
GPU_WORKERS = gpu_workers()
PARAMS = {name: Param(**spec) for name, spec in {**param_specs(), **sweep_param_specs(GPU_WORKERS)}.items()}
# A blessed sweep is a new champion like any run of the main DAG: the same asset.
MODEL_ASSET_NAME = "alexnet_cifar10_model"


def _pipeline_config(context, params: dict | None = None):
    """The task's config, layout and run id; the sweep's own params left out."""
    pipeline, _ = split_params(dict(context["params"]) if params is None else params)
    return task_config(context, pipeline)


@dag(
    dag_id="alexnet_cifar10_sweep",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=int(os.environ.get("ALEXNET_MAX_ACTIVE_RUNS", "1")),
    default_args=default_args(),
    params=PARAMS,
    tags=["ml", "cifar10", "alexnet", "tensorflow", "sweep"],
    doc_md=__doc__,
)
def alexnet_cifar10_sweep():
    from airflow.sdk import Asset

    model_asset = Asset(MODEL_ASSET_NAME)

    @task
    def plan(**context) -> list[dict]:
        from alexnet_tasks.sweeps import plan_trials

        trials = plan_trials(dict(context["params"]), GPU_WORKERS)
        for trial in trials:
            report("plan: trial %d of %d: %s", trial["index"] + 1, len(trials), trial["label"])
        return trials

    @task
    def download(**context) -> dict:
        config, layout, _ = _pipeline_config(context)
        return download_step(config, layout)

    @task
    def split(**context) -> dict:
        config, layout, _ = _pipeline_config(context)
        return split_step(config, layout)

    @task
    def build_shards(**context) -> dict:
        config, layout, _ = _pipeline_config(context)
        return build_shards_step(config, layout)

    @task(queue=GPU_QUEUE, execution_timeout=TRAIN_TIMEOUT, max_active_tis_per_dagrun=GPU_WORKERS,
          map_index_template="{{ trial_name }}")
    def train(trial: dict, **context) -> dict:
        get_current_context()["trial_name"] = f"{trial['index'] + 1}: {trial['label']}"
        config, layout, run_id = _pipeline_config(context, trial["params"])
        parallel = int(context["params"].get("parallel") or GPU_WORKERS)
        with trial_slot(layout, run_id, parallel):
            return train_step(config, layout, trial_run_id(run_id, trial["index"]))

    @task(trigger_rule="all_done")
    def select(**context) -> dict:
        from alexnet_tasks.sweeps import plan_trials

        # The trials again from the params, not from plan's XCom: when plan refused them there is none,
        # and the same ValueError fails this task at once (retry_policy). No finished trial:
        # NoTrialFinishedError, a PermanentError, fails it at once too.
        trials = plan_trials(dict(context["params"]), GPU_WORKERS)
        _, layout, run_id = _pipeline_config(context)
        return select_step(trials, layout, run_id, dag_id=context["dag"].dag_id)

    @task
    def evaluate(chosen: dict, **context) -> dict:
        config, layout, _ = _pipeline_config(context, chosen["params"])
        return evaluate_step(config, layout, chosen["run_id"])

    @task
    def gate(chosen: dict, **context) -> dict:
        config, layout, _ = _pipeline_config(context, chosen["params"])
        return gate_step(config, layout, chosen["run_id"])

    @task(outlets=[model_asset])
    def publish(chosen: dict, outlet_events=None, **context) -> dict:
        config, layout, run_id = _pipeline_config(context, chosen["params"])
        return publish_step(config, layout, chosen["run_id"], outlet_events, model_asset,
                            sweep={"sweep": run_id, "trial": chosen["label"]})

    trials = plan()
    shards = build_shards()
    trials >> download() >> split() >> shards
    trained = train.expand(trial=trials)
    shards >> trained
    chosen = select()
    [trials, trained] >> chosen
    evaluate(chosen) >> gate(chosen) >> publish(chosen)


alexnet_cifar10_sweep()
