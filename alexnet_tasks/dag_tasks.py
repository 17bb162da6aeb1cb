"""What the DAGs' tasks share: the retry policy, the progress callbacks, the config of a task, the step bodies.

The DAGs (``dags/alexnet_cifar10*.py``) wire thin ``@task`` functions;
each calls one function here with its context's config and layout, which
runs the step on the local artifacts root or, for an object-store root, the
step of ``ops.stored_steps`` (this host's cache between a fetch and a put).
The step modules are imported inside the functions, so importing this
module (at DAG parse time, on every worker) loads no TensorFlow, h5py or
NumPy. The top layer of the package: it knows Airflow's task context.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import timedelta

from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule

from alexnet_tasks.config import PipelineConfig, config_for_run
from alexnet_tasks.errors import PERMANENT, RETRYABLE, SETTINGS, SourceUnavailableError
from alexnet_tasks.layout import APPROVAL, MODEL, Layout, artifacts_layout
from alexnet_tasks.progress import report

log = logging.getLogger(__name__)
_FIELDS = {field.name for field in dataclasses.fields(PipelineConfig)}

GPU_QUEUE = os.environ.get("ALEXNET_GPU_QUEUE", "gpu")
TRAIN_TIMEOUT = timedelta(hours=int(os.environ.get("ALEXNET_TRAIN_TIMEOUT_HOURS", "12")))
# A run someone watches on a terminal (`make run` sets it): a source that cannot be reached fails at
# once, with the way to use a local copy, instead of keeping the run alive through retries.
LOCAL_RUN = os.environ.get("ALEXNET_LOCAL_RUN", "") not in ("", "0")


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
def _name(context) -> str:
    ti = context["ti"]
    index = getattr(ti, "map_index", -1)
    return ti.task_id if index is None or index < 0 else f"{ti.task_id}[{index}]"


def _try(context) -> str:
    number = context["ti"].try_number
    return f" (try {number})" if number else ""  # `tasks test` runs try 0


def _error(context) -> str:
    error = context.get("exception")
    return f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)


def step_started(context) -> None:
    report("%s: started%s", _name(context), _try(context))


def step_succeeded(context) -> None:
    report("%s: done", _name(context))


def step_skipped(context) -> None:
    reason = context.get("exception")
    report("%s: skipped%s", _name(context), f": {reason}" if reason else "")


def step_failed(context) -> None:
    report("%s: FAILED%s: %s", _name(context), _try(context), _error(context))


def step_retried(context) -> None:
    report("%s: failed%s, to be retried: %s", _name(context), _try(context), _error(context))


def default_args() -> dict:
    """The tasks' defaults: two retries with backoff under ``retry_policy``, progress lines, failure alerts."""
    from alexnet_tasks.ops.alerts import failure_notifier

    return {
        "owner": "ml",
        "retries": 2,
        "retry_delay": timedelta(seconds=int(os.environ.get("ALEXNET_RETRY_DELAY_SECONDS", "120"))),
        "retry_exponential_backoff": True,
        # Permanent errors fail on their first try; the rest take the retries above.
        "retry_policy": retry_policy(LOCAL_RUN),
        "on_execute_callback": step_started,
        "on_success_callback": step_succeeded,
        "on_skipped_callback": step_skipped,
        "on_retry_callback": step_retried,
        # Mails and/or posts the failure after the last try (ALEXNET_ALERT_EMAIL, ALEXNET_ALERT_WEBHOOK);
        # a logged no-op when neither is set.
        "on_failure_callback": [step_failed, failure_notifier()],
    }


def task_config(context, params: dict | None = None) -> tuple[PipelineConfig, Layout, str]:
    """The validated config, the artifact layout and the run id of the running task, from its context.

    ``params`` replaces the context's params (a sweep's trial). A scheduled
    (or backfill) run trains with a seed derived from its logical date; a
    manual or triggered run with the form's ``seed``.
    """
    given = context["params"] if params is None else params
    # The run's params; a task's own params (approve's form) are not pipeline settings.
    form = PipelineConfig.from_dict({name: value for name, value in given.items() if name in _FIELDS})
    dag_run = context.get("dag_run")
    run_type = getattr(dag_run, "run_type", None)
    config = config_for_run(form, run_type, context.get("logical_date"))
    if config.seed != form.seed:
        log.info("%s run: training seed %d, derived from the logical date %s",
                 getattr(run_type, "value", run_type), config.seed, context.get("logical_date"))
    run_id = context["run_id"]
    if run_id.startswith("__airflow_temporary_run_"):
        # `airflow tasks test` makes a new temporary run id per call; key its outputs by the
        # logical date and the settings instead, so that steps tested one by one with the same
        # params find each other's outputs, and steps tested with other params never do.
        run_id = f"tasks_test__{context['logical_date'].isoformat()}__{config.config_digest()[:8]}"
    return config, artifacts_layout(airflow=True), run_id


# --------------------------------------------------------------------------- the steps
# With an object-store root (``layout.store``), each step runs on this host's cache between a fetch
# and a put (alexnet_tasks.ops.stored_steps); with a local root, on the folder itself.
def download_step(config: PipelineConfig, layout: Layout) -> dict:
    from alexnet_tasks.data.download import download
    from alexnet_tasks.ops import stored_steps

    if layout.store is not None:
        result = stored_steps.download(config, layout)
    else:
        result = download(config.source_url, config.source_md5, layout.root)
    config.check_against_source(result["train_images"])
    return result


def split_step(config: PipelineConfig, layout: Layout) -> dict:
    from alexnet_tasks.data.split import split
    from alexnet_tasks.ops import stored_steps

    if layout.store is not None:
        return stored_steps.split(config, layout)
    return split(layout.batches(config.source_md5), layout.root, config)


def build_shards_step(config: PipelineConfig, layout: Layout) -> dict:
    from alexnet_tasks.data.shards import build_shards
    from alexnet_tasks.ops import stored_steps

    if layout.store is not None:
        return stored_steps.build_shards(config, layout)
    return build_shards(layout.batches(config.source_md5), layout.manifest(config), layout.root, config)


def train_step(config: PipelineConfig, layout: Layout, run_id: str) -> dict:
    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.training.train import train

    if layout.store is not None:
        return stored_steps.train(config, layout, run_id)
    return train(layout.shards(config), layout.run(run_id), config)


def evaluate_step(config: PipelineConfig, layout: Layout, run_id: str) -> dict:
    from alexnet_tasks.evaluate import evaluate
    from alexnet_tasks.ops import stored_steps

    if layout.store is not None:
        return stored_steps.evaluate(config, layout, run_id)
    run_dir = layout.run(run_id)
    return evaluate(run_dir / MODEL, layout.shards(config), run_dir, config)


def gate_step(config: PipelineConfig, layout: Layout, run_id: str) -> dict:
    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.release.gate import gate

    if layout.store is not None:
        return stored_steps.gate(config, layout, run_id)
    return gate(layout.shards(config), layout.published, layout.run(run_id), config, run_id=run_id)


def publish_step(config: PipelineConfig, layout: Layout, run_id: str, outlet_events, model_asset,
                 sweep: dict | None = None, dag_id: str | None = None) -> dict:
    """Publish as the gate decided; a run not blessed ends the task skipped (after the alert), a blessed one
    is an event on ``model_asset``."""
    from airflow.sdk.exceptions import AirflowSkipException

    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.release.publish import publish

    if layout.store is not None:
        result = stored_steps.publish(config, layout, run_id, dag_id=dag_id, sweep=sweep)
    else:
        result = publish(layout.run(run_id), layout.published, config, run_id=run_id, dag_id=dag_id, sweep=sweep)
    if result["blessed"] is False:
        # Recorded in the index, latest left on the champion: an expected outcome, not a failure,
        # that the alert channels (when configured) are told of.
        from alexnet_tasks.ops.alerts import notify_not_blessed
        from alexnet_tasks.release.publish import effective_decision

        notify_not_blessed(effective_decision(layout.run(run_id)), run_id)
        raise AirflowSkipException(f"not blessed, so not published as latest: {'; '.join(result['reasons'])}")
    outlet_events[model_asset].extra = {
        "run_id": run_id,
        "test_accuracy": result["test_accuracy"],
        "published": result["published"],
        "fingerprint": result["fingerprint"],
        **({} if sweep is None else sweep),
    }
    return result


# --------------------------------------------------------------------------- promote, approval, predict, sweeps
def promote_step(layout: Layout, **request) -> dict:
    """Make a published run the champion by hand (``release.promote.promote_run``'s keywords), on the layout's root."""
    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.release.promote import promote_run

    if layout.store is not None:
        return stored_steps.promote(layout, **request)
    return promote_run(layout.published, **request)


def approval_decision(layout: Layout, run_id: str) -> dict | None:
    """The gate's ``decision.json`` of the run (the store's, on an object-store root), or None when it has none."""
    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.release.publish import read_decision

    run_dir = stored_steps.fetch_decision(layout, run_id) if layout.store is not None else layout.run(run_id)
    return read_decision(run_dir)


def record_approval(layout: Layout, run_id: str, outcome: str, **fields) -> dict:
    """Write the answer as the run's ``approval.json`` (``release.approval.record``); on a store, put it there."""
    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.release import approval

    recorded = approval.record(layout.run(run_id), outcome, **fields)
    if layout.store is not None:
        stored_steps.put_run(layout, run_id, [APPROVAL])
    return recorded


def predict_step(layout: Layout, run_id: str, input_folder: str = "", output_dir: str = "") -> dict:
    """Score images with the champion: ``input_folder`` (default the root's ``inbox/``) into ``output_dir``
    (default ``scored/<run>/``)."""
    from pathlib import Path

    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.serving.predict import predict

    if layout.store is not None:
        return stored_steps.predict(layout, run_id, input_folder or None, Path(output_dir) if output_dir else None)
    output = Path(output_dir) if output_dir else layout.scored(run_id)
    return predict(input_folder or str(layout.inbox), layout.published, output)


def select_step(trials: list[dict], layout: Layout, sweep_run_id: str, dag_id: str | None = None) -> dict:
    """Choose a sweep's best trial on validation and record the sweep (``release.sweeps.select_trial``)."""
    from alexnet_tasks.ops import stored_steps
    from alexnet_tasks.release.sweeps import select_trial

    if layout.store is not None:
        return stored_steps.select_trial(trials, layout, sweep_run_id=sweep_run_id, dag_id=dag_id)
    return select_trial(trials, layout, sweep_run_id=sweep_run_id, dag_id=dag_id)
