"""
### AlexNet on CIFAR-10

Downloads CIFAR-10, splits it, builds standardized HDF5 shards, trains AlexNet
(TensorFlow/Keras) on the `gpu` Celery queue, evaluates it on the official
test split and publishes the model, metrics and TensorBoard logs.

`download >> split >> build_shards >> train >> evaluate >> publish`

* Artifacts live under `$ALEXNET_ARTIFACTS` (default `~/alexnet-artifacts`).
  Data steps are content-addressed (source MD5 + the settings that shape
  them) and reused by later runs; training outputs live in `runs/<run_id>/`;
  `published/latest` points at the newest complete run.
* Every step is a plain function in `alexnet_tasks/`; this file only wires
  them. A single step runs alone with
  `airflow tasks test alexnet_cifar10 <task_id> <date>`: it finds its inputs
  from the params, without XCom.
* `recipe=reference` reproduces the tutorial (SGD lr 0.001, batch 32, 50
  epochs); `recipe=fast` (the scheduled default) adds augmentation, momentum,
  warm-up and cosine decay. Leave `epochs`, `batch_size` and `learning_rate`
  empty to take the recipe's values.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

GPU_QUEUE = os.environ.get("ALEXNET_GPU_QUEUE", "gpu")
# Nightly at 02:00 UTC; ALEXNET_SCHEDULE sets another cron expression, or "none" for manual runs only.
SCHEDULE = os.environ.get("ALEXNET_SCHEDULE", "0 2 * * *")
TRAIN_TIMEOUT = timedelta(hours=int(os.environ.get("ALEXNET_TRAIN_TIMEOUT_HOURS", "12")))

PARAMS = {
    "source_url": Param(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        type="string",
        minLength=1,
        maxLength=2048,
        title="Source URL",
        description="Where cifar-10-python.tar.gz comes from: an http(s):// or file:// URL, or a path on the worker.",
    ),
    "source_md5": Param(
        "c58f30108f718f92721af3b95e74349a",
        type="string",
        pattern="^[0-9a-f]{32}$",
        title="Source MD5",
        description="Expected MD5 of the archive (32 lowercase hex digits); it also keys the data cache.",
    ),
    "recipe": Param(
        "fast",
        type="string",
        enum=["fast", "reference"],
        title="Recipe",
        description="fast: augmentation, Nesterov momentum, warm-up + cosine decay. reference: the tutorial exactly.",
    ),
    "epochs": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=1000,
        title="Epochs",
        description="Passes over the training split; empty takes the recipe's (reference 50, fast 30).",
    ),
    "batch_size": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=8192,
        title="Batch size",
        description="Global batch size; empty takes the recipe's (reference 32, fast 256).",
    ),
    "learning_rate": Param(
        None,
        type=["null", "number"],
        exclusiveMinimum=0,
        maximum=10,
        title="Learning rate",
        description="Peak SGD learning rate; empty takes the recipe's (reference 0.001, fast 0.04).",
    ),
    "image_size": Param(
        227,
        type="integer",
        minimum=67,
        maximum=1024,
        title="Image size",
        description="Side the model resizes the 32x32 images to, on the device (227 as in the tutorial; 67 is the smallest).",
    ),
    "validation_size": Param(
        5000,
        type="integer",
        minimum=10,
        maximum=49000,
        title="Validation size",
        description="Images held out of the 50,000 training images for validation, stratified by class.",
    ),
    "seed": Param(
        42,
        type="integer",
        minimum=0,
        maximum=2147483647,
        title="Seed",
        description="Drives the split, the shuffle order and the weight initialisation.",
    ),
    "train_limit": Param(
        None,
        type=["null", "integer"],
        minimum=10,
        maximum=50000,
        title="Training image limit",
        description="Optional cap on training images (stratified) for a quick run; empty uses them all.",
    ),
    "max_train_minutes": Param(
        None,
        type=["null", "number"],
        exclusiveMinimum=0,
        maximum=100000,
        title="Training time budget (minutes)",
        description="Optional: stop training after the epoch whose successor would overrun this many minutes.",
    ),
}


def _settings():
    """The validated config, the artifact layout and the run id of the running task."""
    from alexnet_tasks.config import Layout, PipelineConfig

    context = get_current_context()
    config = PipelineConfig.from_dict(dict(context["params"]))
    run_id = context["run_id"]
    if run_id.startswith("__airflow_temporary_run_"):
        # `airflow tasks test` makes a new temporary run id per call; key its outputs by
        # the logical date instead, so that steps tested one by one find each other's.
        run_id = f"tasks_test__{context['logical_date'].isoformat()}"
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
    },
    params=PARAMS,
    tags=["ml", "cifar10", "alexnet", "tensorflow"],
    doc_md=__doc__,
)
def alexnet_cifar10():
    @task
    def download() -> dict:
        from alexnet_tasks.download import download

        config, layout, _ = _settings()
        result = download(config.source_url, config.source_md5, layout.root)
        config.check_against_source(result["train_images"])
        return result

    @task
    def split() -> dict:
        from alexnet_tasks.split import split

        config, layout, _ = _settings()
        return split(layout.batches(config.source_md5), config, layout.root)

    @task
    def build_shards() -> dict:
        from alexnet_tasks.shards import build_shards

        config, layout, _ = _settings()
        return build_shards(
            layout.batches(config.source_md5),
            layout.split(config) / "manifest.json",
            config,
            layout.root,
        )

    @task(queue=GPU_QUEUE, execution_timeout=TRAIN_TIMEOUT)
    def train() -> dict:
        from alexnet_tasks.train import train

        config, layout, run_id = _settings()
        return train(layout.shards(config), layout.run(run_id), config)

    @task
    def evaluate() -> dict:
        from alexnet_tasks.evaluate import evaluate

        config, layout, run_id = _settings()
        run_dir = layout.run(run_id)
        return evaluate(run_dir / "model.keras", layout.shards(config), run_dir, config.source_md5)

    @task
    def publish() -> dict:
        from alexnet_tasks.publish import publish

        _, layout, run_id = _settings()
        return publish(layout.run(run_id), run_id, layout.published)

    download() >> split() >> build_shards() >> train() >> evaluate() >> publish()


alexnet_cifar10()
