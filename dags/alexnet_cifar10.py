"""
### AlexNet on CIFAR-10

Downloads CIFAR-10, splits it, builds standardized HDF5 shards, trains AlexNet
(TensorFlow/Keras) on the `gpu` Celery queue, evaluates it on the official
test split and publishes the model, metrics and TensorBoard logs.

`download >> split >> build_shards >> train >> evaluate >> gate >> publish`

* Artifacts live under `$ALEXNET_ARTIFACTS` (default `~/alexnet-artifacts`).
  Data steps are content-addressed (source MD5 + the settings that shape
  them) and reused by later runs; training outputs live in `runs/<run>/`
  (the run id made safe for a folder name plus a short hash of it);
  `published/latest` points at the champion: the newest run the gate
  blessed.
* `gate` checks the run (finite test loss, test accuracy at least
  `accuracy_floor`, not truncated, the champion's class names) and compares
  it image by image with the champion; it is blessed when it is sane and its
  test accuracy is at least the champion's minus `gate_tolerance`
  (`publish_mode=always` blesses whatever the checks say). Its
  `decision.json` goes into the run folder. A blessed run is published,
  becomes `latest` and `publish` emits an event on the asset
  `alexnet_cifar10_model`; a run that is not blessed is recorded in the
  index and `publish` ends skipped, with the DAG run successful.
* Every step is a plain function in `alexnet_tasks/`; this file only wires
  them. A single step runs alone with
  `airflow tasks test alexnet_cifar10 <task_id> <date>`: it finds its inputs
  from the params, without XCom; steps tested for the same date with the same
  params share one run folder.
* `recipe=reference` reproduces the tutorial exactly (SGD lr 0.001, batch 32,
  50 epochs, no augmentation, no XLA); `recipe=fast` (the scheduled default)
  adds augmentation, momentum, weight decay, label smoothing, dropout 0.3,
  warm-up and cosine decay, and averages each test image's prediction with
  its mirror image's (`test_time_augmentation`); `recipe_options` changes
  its settings one by one. `batch_size` is the global batch and `learning_rate` the peak
  rate for it, on any number of devices. Leave `epochs`, `batch_size` and
  `learning_rate` empty to take the recipe's values. Every param's default,
  bounds and description come from `alexnet_tasks.config.PipelineConfig`.
* Errors that fail the same way on every try (a wrong MD5, an unsafe or
  corrupt archive, a forbidden pickle, settings that cannot fit the data, bad
  shard content) fail their task at once, without retries (the DAG's
  `retry_policy`); network errors, a failed read and a killed worker are
  retried (two retries, backoff). A local run (`make run`,
  `ALEXNET_LOCAL_RUN=1`) fails a source that cannot be reached at once too.
* A task that fails after its last try is reported by e-mail
  (`ALEXNET_ALERT_EMAIL`, through the SMTP connection `ALEXNET_ALERT_SMTP_CONN`)
  and/or a JSON POST to `ALEXNET_ALERT_WEBHOOK`; alerts are off when neither is set.
* `split_seed` draws the split and keys the data folders; `seed` is the
  training seed. Scheduled runs derive the training seed from the logical
  date (a new model each night on the same shards); manual runs use the
  form's.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import Asset, Param, dag, task

from alexnet_tasks.config import param_specs
from alexnet_tasks.dag_tasks import (  # noqa: F401  (retry_policy, task_settings as _settings: for tests and scripts)
    GPU_QUEUE,
    TRAIN_TIMEOUT,
    build_shards_step,
    default_args,
    download_step,
    evaluate_step,
    gate_step,
    publish_step,
    retry_policy,
    split_step,
    task_settings,
    train_step,
)

_settings = task_settings

# Nightly at 02:00 UTC; ALEXNET_SCHEDULE sets another cron expression, or "none" for manual runs only.
SCHEDULE = os.environ.get("ALEXNET_SCHEDULE", "0 2 * * *")

# The form is generated from PipelineConfig's fields: defaults, bounds, titles and
# descriptions live there once (alexnet_tasks.config imports nothing heavy).
PARAMS = {name: Param(**spec) for name, spec in param_specs().items()}
# Every blessed model is an event on this asset; a downstream DAG runs on it with schedule=[MODEL_ASSET].
MODEL_ASSET = Asset("alexnet_cifar10_model")


@dag(
    dag_id="alexnet_cifar10",
    schedule=None if SCHEDULE.strip().lower() in ("", "none") else SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=int(os.environ.get("ALEXNET_MAX_ACTIVE_RUNS", "1")),
    # Two retries with backoff under the retry policy (permanent errors fail at once), progress lines,
    # failure alerts (alexnet_tasks.dag_tasks.default_args).
    default_args=default_args(),
    params=PARAMS,
    tags=["ml", "cifar10", "alexnet", "tensorflow"],
    doc_md=__doc__,
)
def alexnet_cifar10():
    @task
    def download(**context) -> dict:
        config, layout, _ = task_settings(context)
        return download_step(config, layout)

    @task
    def split(**context) -> dict:
        config, layout, _ = task_settings(context)
        return split_step(config, layout)

    @task
    def build_shards(**context) -> dict:
        config, layout, _ = task_settings(context)
        return build_shards_step(config, layout)

    @task(queue=GPU_QUEUE, execution_timeout=TRAIN_TIMEOUT)
    def train(**context) -> dict:
        return train_step(*task_settings(context))

    @task
    def evaluate(**context) -> dict:
        return evaluate_step(*task_settings(context))

    @task
    def gate(**context) -> dict:
        return gate_step(*task_settings(context))

    @task(outlets=[MODEL_ASSET])
    def publish(outlet_events=None, **context) -> dict:
        return publish_step(*task_settings(context), outlet_events, MODEL_ASSET)

    download() >> split() >> build_shards() >> train() >> evaluate() >> gate() >> publish()


alexnet_cifar10()
