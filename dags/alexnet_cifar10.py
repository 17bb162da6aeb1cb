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

import logging
import os
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import Asset, ExceptionRetryPolicy, Param, RetryAction, RetryRule, dag, task

from alexnet_tasks.config import PipelineConfig, param_specs, settings_for_run
from alexnet_tasks.errors import PERMANENT, RETRYABLE, SETTINGS, SourceUnavailableError
from alexnet_tasks.layout import MODEL, Layout
from alexnet_tasks.ops.alerts import failure_notifier, run_deadline
from alexnet_tasks.progress import report

log = logging.getLogger(__name__)

GPU_QUEUE = os.environ.get("ALEXNET_GPU_QUEUE", "gpu")
# Nightly at 02:00 UTC; ALEXNET_SCHEDULE sets another cron expression, or "none" for manual runs only.
SCHEDULE = os.environ.get("ALEXNET_SCHEDULE", "0 2 * * *")
TRAIN_TIMEOUT = timedelta(hours=int(os.environ.get("ALEXNET_TRAIN_TIMEOUT_HOURS", "12")))
# A run someone watches on a terminal (`make run` sets it): a source that cannot be reached fails at
# once, with the way to use a local copy, instead of keeping the run alive through retries.
LOCAL_RUN = os.environ.get("ALEXNET_LOCAL_RUN", "") not in ("", "0")

# The form is generated from PipelineConfig's fields: defaults, bounds, titles and
# descriptions live there once (alexnet_tasks.config imports nothing heavy).
PARAMS = {name: Param(**spec) for name, spec in param_specs().items()}
# Every blessed model is an event on this asset; a downstream DAG runs on it with schedule=[MODEL_ASSET].
MODEL_ASSET = Asset("alexnet_cifar10_model")


def retry_policy(local_run: bool = False) -> ExceptionRetryPolicy:
    """Which failures the task's retries may cure, in the order of ``alexnet_tasks.errors.is_permanent``.

    The first matching rule wins: a ``PermanentError`` fails at once; any
    other ``OSError`` (network, disk, a failed read) takes the task's retries;
    a ``ValueError`` (settings that cannot fit the data) fails at once;
    everything else takes the retries. With ``local_run``, a source that
    cannot be reached (``SourceUnavailableError``) fails at once as well.
    """
    rules = [RetryRule(exception=list(PERMANENT), action=RetryAction.FAIL,
                       reason="fails the same way on every try (alexnet_tasks.errors.PermanentError)")]
    if local_run:
        rules.append(RetryRule(exception=SourceUnavailableError, action=RetryAction.FAIL,
                               reason="local run: a source that cannot be reached is not retried"))
    rules += [
        RetryRule(exception=list(RETRYABLE), action=RetryAction.DEFAULT),
        RetryRule(exception=list(SETTINGS), action=RetryAction.FAIL,
                  reason="settings that cannot fit the data fail the same way on every try"),
    ]
    return ExceptionRetryPolicy(rules=rules)


# Progress lines of every task (alexnet_tasks.progress): `make run` shows them on the terminal.
def _try(context) -> str:
    number = context["ti"].try_number
    return f" (try {number})" if number else ""  # `tasks test` runs try 0


def _error(context) -> str:
    error = context.get("exception")
    return f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)


def _step_started(context) -> None:
    report("%s: started%s", context["ti"].task_id, _try(context))


def _step_succeeded(context) -> None:
    report("%s: done", context["ti"].task_id)


def _step_skipped(context) -> None:
    reason = context.get("exception")
    report("%s: skipped%s", context["ti"].task_id, f": {reason}" if reason else "")


def _step_failed(context) -> None:
    report("%s: FAILED%s: %s", context["ti"].task_id, _try(context), _error(context))


def _step_retried(context) -> None:
    report("%s: failed%s, to be retried: %s", context["ti"].task_id, _try(context), _error(context))


def _settings(context) -> tuple[PipelineConfig, Layout, str]:
    """The validated config, the artifact layout and the run id of the running task, from its context.

    A scheduled (or backfill) run trains with a seed derived from its logical
    date; a manual or triggered run with the form's ``seed``.
    """
    # The run's params; a task's own params (approve's form) are not pipeline settings.
    form = PipelineConfig.from_dict({name: value for name, value in context["params"].items() if name in PARAMS})
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


class PromotionApproval(ApprovalOperator):
    """Asks a person whether a blessed run may become the champion (``publish_mode=approval``).

    Skipped (only itself: publish still runs) in the other publish modes and
    for a run the gate did not bless. Otherwise the question's body comes
    from the run's ``decision.json`` and the wait lasts ``approval_timeout``
    hours; no answer by then takes ``Reject`` (the scheduler's timeout). The
    answer is written to the run's ``approval.json`` and never skips publish:
    publish records the run either way and promotes it only when approved.
    """

    def __init__(self, **kwargs):
        super().__init__(subject="Make this run the champion?", defaults=self.REJECT, **kwargs)

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowSkipException

        from alexnet_tasks.release import approval
        from alexnet_tasks.release.publish import read_decision

        config, layout, run_id = _settings(context)
        if config.publish_mode != "approval":
            raise AirflowSkipException(f"publish_mode {config.publish_mode}: no approval asked")
        decision = read_decision(layout.run(run_id))
        if decision is None or not decision["blessed"]:
            raise AirflowSkipException("the gate did not bless the run: nothing to approve")
        self.response_timeout = timedelta(hours=config.approval_timeout)
        self.subject, self.body = approval.request(decision, run_id, config.approval_timeout, _ui_base_path())
        report("approve: waiting up to %g h for Approve or Reject (Browse -> Required actions)",
               config.approval_timeout)
        return super().execute(context)

    def execute_complete(self, context, event):
        from alexnet_tasks.release import approval
        from alexnet_tasks.release.publish import read_decision

        answer = HITLOperator.execute_complete(self, context=context, event=event)  # checks it; never skips
        chosen = answer["chosen_options"][0]
        outcome = "timed_out" if event.get("timedout") else "approved" if chosen == self.APPROVE else "rejected"
        user = answer["responded_by_user"]
        _, layout, run_id = _settings(context)
        run_dir = layout.run(run_id)
        decision = read_decision(run_dir) or {}
        recorded = approval.record(
            run_dir, outcome, decided_at=answer["responded_at"].isoformat(timespec="seconds"),
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
    # Alerts (the channels above) when a run has not finished in time: the recent average runtime plus
    # ALEXNET_RUN_DEADLINE_MARGIN_MINUTES, or ALEXNET_RUN_DEADLINE_MINUTES after it was queued.
    deadline=run_deadline(),
    default_args={
        "owner": "ml",
        "retries": 2,
        "retry_delay": timedelta(seconds=int(os.environ.get("ALEXNET_RETRY_DELAY_SECONDS", "120"))),
        "retry_exponential_backoff": True,
        # Permanent errors fail on their first try; the rest take the retries above.
        "retry_policy": retry_policy(LOCAL_RUN),
        "on_execute_callback": _step_started,
        "on_success_callback": _step_succeeded,
        "on_skipped_callback": _step_skipped,
        "on_retry_callback": _step_retried,
        # Mails and/or posts the failure after the last try (ALEXNET_ALERT_EMAIL, ALEXNET_ALERT_WEBHOOK);
        # a logged no-op when neither is set.
        "on_failure_callback": [_step_failed, failure_notifier()],
    },
    params=PARAMS,
    tags=["ml", "cifar10", "alexnet", "tensorflow"],
    doc_md=__doc__,
)
def alexnet_cifar10():
    @task
    def download(**context) -> dict:
        from alexnet_tasks.data.download import download

        config, layout, _ = _settings(context)
        result = download(config.source_url, config.source_md5, layout.root)
        config.check_against_source(result["train_images"])
        return result

    @task
    def split(**context) -> dict:
        from alexnet_tasks.data.split import split

        config, layout, _ = _settings(context)
        return split(layout.batches(config.source_md5), config, layout.root)

    @task
    def build_shards(**context) -> dict:
        from alexnet_tasks.data.shards import build_shards

        config, layout, _ = _settings(context)
        return build_shards(
            layout.batches(config.source_md5),
            layout.manifest(config),
            config,
            layout.root,
        )

    @task(queue=GPU_QUEUE, execution_timeout=TRAIN_TIMEOUT)
    def train(**context) -> dict:
        from alexnet_tasks.training.train import train

        config, layout, run_id = _settings(context)
        return train(layout.shards(config), layout.run(run_id), config)

    @task
    def evaluate(**context) -> dict:
        from alexnet_tasks.evaluate import evaluate

        config, layout, run_id = _settings(context)
        run_dir = layout.run(run_id)
        return evaluate(run_dir / MODEL, layout.shards(config), run_dir, config.source_md5,
                        test_time_augmentation=config.resolved_test_time_augmentation())

    @task
    def gate(**context) -> dict:
        from alexnet_tasks.release.gate import gate

        config, layout, run_id = _settings(context)
        return gate(layout.run(run_id), layout.published, config, layout.shards(config), run_id)

    # Runs after approve whether it asked (approved or not) or was skipped.
    @task(outlets=[MODEL_ASSET], trigger_rule="none_failed")
    def publish(outlet_events=None, **context) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from alexnet_tasks.release.publish import publish

        config, layout, run_id = _settings(context)
        result = publish(layout.run(run_id), run_id, layout.published, config, dag_id=context["dag"].dag_id)
        if result["blessed"] is False:
            # Recorded in the index, latest left on the champion: an expected outcome, not a failure,
            # that the alert channels (when configured) are told of.
            from alexnet_tasks.ops.alerts import notify_not_blessed
            from alexnet_tasks.release.publish import effective_decision

            notify_not_blessed(effective_decision(layout.run(run_id)), run_id)
            raise AirflowSkipException(f"not blessed, so not published as latest: {'; '.join(result['reasons'])}")
        outlet_events[MODEL_ASSET].extra = {
            "run_id": run_id,
            "test_accuracy": result["test_accuracy"],
            "published": result["published"],
            "fingerprint": result["fingerprint"],
        }
        return result

    approve = PromotionApproval(
        task_id="approve",
        params={"comment": Param("", type="string", maxLength=2000, title="Why (optional)",
                                 description="Your reason; it is recorded with the run.")},
    )
    download() >> split() >> build_shards() >> train() >> evaluate() >> gate() >> approve >> publish()


alexnet_cifar10()
