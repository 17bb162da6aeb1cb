"""
### Score images with the champion
Runs on every event of the asset `alexnet_cifar10_model` (each blessed
publish of `alexnet_cifar10`) and on a manual trigger. It scores every PNG
or JPEG image under `input` (any size, any colour mode; resized to 32x32
and standardized exactly as the training shards) with the champion
(`published/latest`) and writes `predictions.csv` (file, predicted class,
the probability of each class) and `summary.json` (images found, scored and
skipped, per class) to `output`.

* `input` empty: `$ALEXNET_ARTIFACTS/inbox`; `output` empty:
  `$ALEXNET_ARTIFACTS/scored/<run>` (the run id made safe for a folder name).
* With `ALEXNET_ARTIFACTS=s3://bucket/prefix` the champion's model is fetched
  from the store into this host's cache (`$ALEXNET_CACHE`), so is the store's
  `inbox/` when `input` is empty, and with `output` empty the predictions go
  to `scored/<run>/` on the store.
* An unreadable image is named in the log and in `summary.json`'s `skipped`,
  and left out; it never fails the run. No champion, or an `input` that is not
  a folder, fails at once without retries.
"""

from __future__ import annotations

import pendulum

from airflow.sdk import Asset, Param, dag, task

# The asset alexnet_cifar10's publish emits for every blessed run.
MODEL_ASSET = Asset("alexnet_cifar10_model")

PARAMS = {
    "input": Param("", type="string", title="Images to score",
                   description="A folder of PNG or JPEG images (searched recursively); empty: $ALEXNET_ARTIFACTS/inbox."),
    "output": Param("", type="string", title="Output folder",
                    description="Where predictions.csv and summary.json go; empty: $ALEXNET_ARTIFACTS/scored/<run>."),
}


@dag(
    dag_id="alexnet_cifar10_predict",
    schedule=[MODEL_ASSET],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    doc_md=__doc__,
    tags=["alexnet", "cifar10"],
    default_args={"owner": "ml", "retries": 0},
)
def alexnet_cifar10_predict():
    @task
    def predict(**context) -> dict:
        from alexnet_tasks.dag_tasks import predict_step
        from alexnet_tasks.layout import artifacts_layout

        params = context["params"]
        summary = predict_step(artifacts_layout(airflow=True), context["run_id"], params["input"], params["output"])
        return {key: summary[key] for key in ("champion", "images", "scored", "predictions", "summary")} | {
            "skipped": len(summary["skipped"])}

    predict()


alexnet_cifar10_predict()
