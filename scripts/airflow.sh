#!/usr/bin/env bash
# The project's `airflow` with the local settings: SQLite metadata database in
# ./airflow_home (or $AIRFLOW_HOME), this repo's dags/ and plugins/, artifacts in $ALEXNET_ARTIFACTS.
#   scripts/airflow.sh tasks test alexnet_cifar10 train 2026-11-28 -t '{"image_size": 67}'
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export AIRFLOW_HOME=${AIRFLOW_HOME:-$here/airflow_home}
export AIRFLOW__CORE__DAGS_FOLDER=$here/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$here/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export ALEXNET_ARTIFACTS=${ALEXNET_ARTIFACTS:-$HOME/alexnet-artifacts}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
mkdir -p "$AIRFLOW_HOME"
if [ ! -f "$AIRFLOW_HOME/airflow.db" ]; then
  "$here/.venv/bin/airflow" db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 \
    || { cat "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
fi
exec "$here/.venv/bin/airflow" "$@"
