"""
### Make a published AlexNet run the champion

A manual DAG (no schedule) for rollbacks and for promoting by hand a run the
gate or a person refused: trigger it with `run_id` (a run in
`published/index.jsonl`) and `reason`. Its one task checks that the run's
published copy has its model and passes the gate's sanity checks (finite test
loss and accuracy, the champion's class names, the champion's test images),
points `published/latest` at it, appends the change to
`published/promotions.jsonl` (reason `by_hand`, the user who triggered the
run, the reason given, this DAG run) and emits an event on the asset
`alexnet_cifar10_model` with the same extra as the main DAG's publish.

With `ALEXNET_ARTIFACTS=s3://bucket/prefix` the same checks read the store's
`published/`, and `latest` and the history move there by conditional writes
(credentials from the Airflow connection `$ALEXNET_ARTIFACTS_CONN_ID`).

An unknown run, or one published without its model (not blessed), fails at
once without retries, with a message that names it. The results plugin links
here from every run page ("make champion"), with the run filled in.
"""

from __future__ import annotations

import getpass

import pendulum
from airflow.sdk import Asset, Param, dag, task

from alexnet_tasks.progress import report

DAG_ID = "alexnet_cifar10_promote"
MODEL_ASSET = Asset("alexnet_cifar10_model")  # the main DAG's asset: its consumers see a rollback too


def _user(dag_run) -> str:
    """Who triggered the run: the Airflow user, or the operating-system user of a CLI run without one."""
    name = getattr(dag_run, "triggering_user_name", None)
    return name if name else f"{getpass.getuser()} (command line)"


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml", "retries": 0},
    params={
        "run_id": Param(type="string", minLength=1, maxLength=1000, pattern=r"\S", title="Run id",
                        description="The published run to make the champion: its Airflow run id, as in "
                        "published/index.jsonl and the AlexNet runs page."),
        "reason": Param(type="string", minLength=1, maxLength=2000, pattern=r"\S", title="Reason",
                        description="Why, in a few words (a rollback, an incident...); recorded in the "
                        "promotion history with your user name."),
    },
    tags=["ml", "cifar10", "alexnet"],
    doc_md=__doc__,
)
def alexnet_cifar10_promote():
    @task(outlets=[MODEL_ASSET])
    def promote(outlet_events=None, **context) -> dict:
        from alexnet_tasks.dag_tasks import promote_step
        from alexnet_tasks.layout import artifacts_layout

        params = context["params"]
        report("promote: %s, by %s", params["run_id"], _user(context["dag_run"]))
        result = promote_step(artifacts_layout(airflow=True), run_id=params["run_id"], comment=params["reason"],
                              user=_user(context["dag_run"]), dag_id=DAG_ID, dag_run_id=context["run_id"])
        outlet_events[MODEL_ASSET].extra = {
            "run_id": result["run_id"],
            "test_accuracy": result["test_accuracy"],
            "published": result["published"],
            "fingerprint": result["fingerprint"],
        }
        return result

    promote()


alexnet_cifar10_promote()
