#!/usr/bin/env bash
# Run the whole DAG in process on an embedded SQLite metadata database.
#   CONF='{"image_size": 67, "epochs": 1}' scripts/run_local.sh
# AIRFLOW_HOME defaults to ./airflow_home, ALEXNET_ARTIFACTS to ~/alexnet-artifacts.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export AIRFLOW_HOME=${AIRFLOW_HOME:-$here/airflow_home}
export AIRFLOW__CORE__DAGS_FOLDER=$here/dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export ALEXNET_ARTIFACTS=${ALEXNET_ARTIFACTS:-$HOME/alexnet-artifacts}
airflow=$here/.venv/bin/airflow
mkdir -p "$AIRFLOW_HOME"
"$airflow" db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { cat "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
echo "artifacts: $ALEXNET_ARTIFACTS   conf: ${CONF:-{\}}"
"$airflow" dags test alexnet_cifar10 -c "${CONF:-{\}}"
latest=$ALEXNET_ARTIFACTS/published/latest
if [ -f "$latest/metrics.json" ]; then
  echo "published: $(readlink -f "$latest")"
  "$here/.venv/bin/python" -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"test accuracy {m['test_accuracy']:.4f}  loss {m['test_loss']:.4f}\")" "$latest/metrics.json"
fi
