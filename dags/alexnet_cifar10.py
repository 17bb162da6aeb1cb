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
  shard content) fail their task at once, without retries; network errors, a
  failed read and a killed worker are retried (two retries, backoff).
* A task that fails after its last try is reported by e-mail
  (`ALEXNET_ALERT_EMAIL`, through the SMTP connection `ALEXNET_ALERT_SMTP_CONN`)
  and/or a JSON POST to `ALEXNET_ALERT_WEBHOOK`; alerts are off when neither is set.
* `split_seed` draws the split and keys the data folders; `seed` is the
  training seed. Scheduled runs derive the training seed from the logical
  date (a new model each night on the same shards); manual runs use the
  form's.
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from alexnet_tasks.ops.alerts import failure_notifier
from alexnet_tasks.config import PipelineConfig, param_specs, settings_for_run
from alexnet_tasks.layout import MODEL, Layout
from alexnet_tasks.errors import is_permanent

log = logging.getLogger(__name__)

GPU_QUEUE = os.environ.get("ALEXNET_GPU_QUEUE", "gpu")
# Nightly at 02:00 UTC; ALEXNET_SCHEDULE sets another cron expression, or "none" for manual runs only.
SCHEDULE = os.environ.get("ALEXNET_SCHEDULE", "0 2 * * *")
TRAIN_TIMEOUT = timedelta(hours=int(os.environ.get("ALEXNET_TRAIN_TIMEOUT_HOURS", "12")))

# The form is generated from PipelineConfig's fields: defaults, bounds, titles and
# descriptions live there once (alexnet_tasks.config imports nothing heavy).
PARAMS = {name: Param(**spec) for name, spec in param_specs().items()}
# Every blessed model is an event on this asset; a downstream DAG runs on it with schedule=[MODEL_ASSET].
MODEL_ASSET = Asset("alexnet_cifar10_model")


def _fail_at_once(step):
    """Run ``step``; a permanent error (``alexnet_tasks.errors.is_permanent``) fails the task without retries.

    It is raised again as ``AirflowFailException`` with the same message, the
    original error chained as its cause; every other error is left to the
    task's retries.
    """

    @functools.wraps(step)
    def run(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        except Exception as error:
            if is_permanent(error):
                raise AirflowFailException(f"{type(error).__name__}: {error}") from error
            raise

    return run


def _settings():
    """The validated config, the artifact layout and the run id of the running task.

    A scheduled (or backfill) run trains with a seed derived from its logical
    date; a manual or triggered run with the form's ``seed``.
    """
    context = get_current_context()
    form = PipelineConfig.from_dict(dict(context["params"]))
    dag_run = context.get("dag_run")
    run_type = getattr(dag_run, "run_type", None)
    config = settings_for_run(form, run_type, context.get("logical_date"))
    if config.seed != form.seed:
        log.info("%s run: training seed %d, derived from the logical date %s",
                 getattr(run_type, "value", run_type), config.seed, context.get("logical_date"))
    run_id = context["run_id"]
    if run_id.startswith("__airflow_temporary_run_"):
        # `airflow tasks test` makes a new temporary run id per call; key its outputs by the
        # logical date and the settings instead, so that steps tested one by one with the same
        # params find each other's outputs, and steps tested with other params never do.
        run_id = f"tasks_test__{context['logical_date'].isoformat()}__{config.settings_digest()[:8]}"
    return config, Layout(), run_id


@dag(
    dag_id="alexnet_cifar10",
    schedule=None if SCHEDULE.strip().lower() in ("", "none") else SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=int(os.environ.get("ALEXNET_MAX_ACTIVE_RUNS", "1")),
    default_args={
        "owner": "ml",
        "retries": 2,
        "retry_delay": timedelta(seconds=int(os.environ.get("ALEXNET_RETRY_DELAY_SECONDS", "120"))),
        "retry_exponential_backoff": True,
        # Mails and/or posts the failure after the last try (ALEXNET_ALERT_EMAIL, ALEXNET_ALERT_WEBHOOK);
        # a logged no-op when neither is set.
        "on_failure_callback": failure_notifier(),
    },
    params=PARAMS,
    tags=["ml", "cifar10", "alexnet", "tensorflow"],
    doc_md=__doc__,
)
def alexnet_cifar10():
    @task
    @_fail_at_once
    def download() -> dict:
        from alexnet_tasks.data.download import download

        config, layout, _ = _settings()
        result = download(config.source_url, config.source_md5, layout.root)
        config.check_against_source(result["train_images"])
        return result

    @task
    @_fail_at_once
    def split() -> dict:
        from alexnet_tasks.data.split import split

        config, layout, _ = _settings()
        return split(layout.batches(config.source_md5), config, layout.root)

    @task
    @_fail_at_once
    def build_shards() -> dict:
        from alexnet_tasks.data.shards import build_shards

        config, layout, _ = _settings()
        return build_shards(
            layout.batches(config.source_md5),
            layout.manifest(config),
            config,
            layout.root,
        )

    @task(queue=GPU_QUEUE, execution_timeout=TRAIN_TIMEOUT)
    @_fail_at_once
    def train() -> dict:
        from alexnet_tasks.training.train import train

        config, layout, run_id = _settings()
        return train(layout.shards(config), layout.run(run_id), config)

    @task
    @_fail_at_once
    def evaluate() -> dict:
        from alexnet_tasks.evaluate import evaluate

        config, layout, run_id = _settings()
        run_dir = layout.run(run_id)
        return evaluate(run_dir / MODEL, layout.shards(config), run_dir, config.source_md5,
                        test_time_augmentation=config.resolved_test_time_augmentation())

    @task
    @_fail_at_once
    def gate() -> dict:
        from alexnet_tasks.release.gate import gate

        config, layout, run_id = _settings()
        return gate(layout.run(run_id), layout.published, config, layout.shards(config), run_id)

    @task(outlets=[MODEL_ASSET])
    @_fail_at_once
    def publish() -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from alexnet_tasks.release.publish import publish

        config, layout, run_id = _settings()
        result = publish(layout.run(run_id), run_id, layout.published, config)
        if result["blessed"] is False:
            # Recorded in the index, latest left on the champion: an expected outcome, not a failure,
            # that the alert channels (when configured) are told of.
            from alexnet_tasks.ops.alerts import notify_not_blessed
            from alexnet_tasks.release.publish import read_decision

            notify_not_blessed(read_decision(layout.run(run_id)), run_id)
            raise AirflowSkipException(f"not blessed, so not published as latest: {'; '.join(result['reasons'])}")
        get_current_context()["outlet_events"][MODEL_ASSET].extra = {
            "run_id": run_id,
            "test_accuracy": result["test_accuracy"],
            "published": result["published"],
            "fingerprint": result["fingerprint"],
        }
        return result

    download() >> split() >> build_shards() >> train() >> evaluate() >> gate() >> publish()


alexnet_cifar10()
