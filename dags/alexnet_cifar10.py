"""
### AlexNet on CIFAR-10

Downloads CIFAR-10, splits it, builds standardized HDF5 shards, trains AlexNet
(TensorFlow/Keras) on the `gpu` Celery queue, evaluates it on the official
test split and publishes the model, metrics and TensorBoard logs.

`download >> split >> build_shards >> train >> evaluate >> gate >> approve >> publish`

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
* With `publish_mode=approval`, a run the gate blesses waits in `approve`
  (a human-in-the-loop task: Browse -> Required actions, or the REST API)
  for Approve or Reject; its body carries the gate's figures and links to
  the run's page and to its comparison with the champion. Approve promotes;
  Reject, or no answer within `approval_timeout` hours, keeps the champion
  (the run is recorded as not blessed, with who rejected it). Who answered,
  when and why goes into `approval.json`, the index line and, when the
  champion changes, `published/promotions.jsonl`. In the other modes, and
  for a run the gate refused, `approve` is skipped.
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
import sys
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import Asset, Param, dag, task

from alexnet_tasks.config import param_specs
from alexnet_tasks.dag_tasks import (  # noqa: F401  (retry_policy: for tests and scripts)
    GPU_QUEUE,
    TRAIN_TIMEOUT,
    approval_decision,
    build_shards_step,
    default_args,
    download_step,
    evaluate_step,
    gate_step,
    publish_step,
    record_approval,
    retry_policy,
    split_step,
    task_config,
    train_step,
)
from alexnet_tasks.ops.alerts import run_deadline
from alexnet_tasks.progress import report

# Nightly at 02:00 UTC; ALEXNET_SCHEDULE sets another cron expression, or "none" for manual runs only.
SCHEDULE = os.environ.get("ALEXNET_SCHEDULE", "0 2 * * *")

# The form is generated from PipelineConfig's fields: defaults, bounds, titles and
# descriptions live there once (alexnet_tasks.config imports nothing heavy).
PARAMS = {name: Param(**spec) for name, spec in param_specs().items()}
# Parsed by `airflow dags test` (make run and the tests' in-process runs), not by a dag-processor.
DAGS_TEST = sys.argv[1:3] == ["dags", "test"]
# Every blessed model is an event on this asset; a downstream DAG runs on it with schedule=[MODEL_ASSET].
MODEL_ASSET = Asset("alexnet_cifar10_model")


class PromotionApproval(ApprovalOperator):
    """Asks a person whether a blessed run may become the champion (``publish_mode=approval``).

    Skipped (only itself: publish still runs) in the other publish modes and
    for a run the gate did not bless. Otherwise the question's body comes
    from the run's ``decision.json`` and the wait lasts ``approval_timeout``
    hours; no answer by then takes ``Reject`` (the scheduler's timeout). The
    answer is written to the run's ``approval.json`` and never skips publish:
    publish records the run either way and promotes it only when approved.
    On an object-store root both read the store's ``decision.json`` and the
    answer is put on the store (``dag_tasks.approval_decision``, ``record_approval``).
    """

    def __init__(self, **kwargs):
        super().__init__(subject="Make this run the champion?", defaults=self.REJECT, **kwargs)

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowSkipException

        from alexnet_tasks.release import approval

        config, layout, run_id = task_config(context)
        if config.publish_mode != "approval":
            raise AirflowSkipException(f"publish_mode {config.publish_mode}: no approval asked")
        decision = approval_decision(layout, run_id)
        if decision is None or not decision["blessed"]:
            raise AirflowSkipException("the gate did not bless the run: nothing to approve")
        self.response_timeout = timedelta(hours=config.approval_timeout)
        self.subject, self.body = approval.request(decision, run_id, config.approval_timeout, _ui_base_path())
        report("approve: waiting up to %g h for Approve or Reject (Browse -> Required actions)",
               config.approval_timeout)
        return super().execute(context)

    def execute_complete(self, context, event):
        from alexnet_tasks.release import approval

        answer = HITLOperator.execute_complete(self, context=context, event=event)  # checks it; never skips
        chosen = answer["chosen_options"][0]
        outcome = "timed_out" if event.get("timedout") else "approved" if chosen == self.APPROVE else "rejected"
        user = answer["responded_by_user"]
        _, layout, run_id = task_config(context)
        decision = approval_decision(layout, run_id) or {}
        recorded = record_approval(
            layout, run_id, outcome, decided_at=answer["responded_at"].isoformat(timespec="seconds"),
            user=user.get("name") or user.get("id") if user else None,
            comment=(answer["params_input"] or {}).get("comment"), fingerprint=decision.get("fingerprint"),
            dag_id=context["dag"].dag_id, dag_run_id=context["run_id"])
        report("approve: %s", approval.in_words(recorded, decision.get("approval_timeout")))
        return recorded


def _ui_base_path() -> str:
    """The path Airflow's UI is served under (``[api] base_url``), for relative links."""
    from urllib.parse import urlparse

    from airflow.configuration import conf

    return urlparse(conf.get("api", "base_url", fallback="/") or "/").path or "/"


@dag(
    dag_id="alexnet_cifar10",
    schedule=None if SCHEDULE.strip().lower() in ("", "none") else SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=int(os.environ.get("ALEXNET_MAX_ACTIVE_RUNS", "1")),
    # Alerts (the alert channels) when a run has not finished in time: the recent average runtime plus
    # ALEXNET_RUN_DEADLINE_MARGIN_MINUTES, or ALEXNET_RUN_DEADLINE_MINUTES after it was queued. Not under
    # `airflow dags test` (make run): no scheduler checks deadlines there, and Airflow 3.3's dags test fails
    # a finished run of a DAG that has one (DagRun.update_state looks its alerts up by ids it never stored).
    deadline=None if DAGS_TEST else run_deadline(),
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
        config, layout, _ = task_config(context)
        return download_step(config, layout)

    @task
    def split(**context) -> dict:
        config, layout, _ = task_config(context)
        return split_step(config, layout)

    @task
    def build_shards(**context) -> dict:
        config, layout, _ = task_config(context)
        return build_shards_step(config, layout)

    @task(queue=GPU_QUEUE, execution_timeout=TRAIN_TIMEOUT)
    def train(**context) -> dict:
        return train_step(*task_config(context))

    @task
    def evaluate(**context) -> dict:
        return evaluate_step(*task_config(context))

    @task
    def gate(**context) -> dict:
        return gate_step(*task_config(context))

    # Runs after approve whether it asked (approved or not) or was skipped.
    @task(outlets=[MODEL_ASSET], trigger_rule="none_failed")
    def publish(outlet_events=None, **context) -> dict:
        return publish_step(*task_config(context), outlet_events, MODEL_ASSET, dag_id=context["dag"].dag_id)

    approve = PromotionApproval(
        task_id="approve",
        params={"comment": Param("", type="string", maxLength=2000, title="Why (optional)",
                                 description="Your reason; it is recorded with the run.")},
    )
    download() >> split() >> build_shards() >> train() >> evaluate() >> gate() >> approve >> publish()


alexnet_cifar10()
