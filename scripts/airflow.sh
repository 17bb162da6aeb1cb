#!/usr/bin/env bash
# The project's `airflow` with the local settings: SQLite metadata database in
# ./airflow_home (or $AIRFLOW_HOME), this repo's dags/ and plugins/, artifacts in $ALEXNET_ARTIFACTS.
#   scripts/airflow.sh tasks test alexnet_cifar10 train 2026-11-28 -t '{"image_size": 67}'
#   scripts/airflow.sh standalone    # the local UI with all its parts: api-server, scheduler, dag-processor, triggerer
# The API server binds 127.0.0.1 unless AIRFLOW__API__HOST says otherwise (a local SQLite setup with
# the simple auth manager is a development one: no production warning).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export AIRFLOW_HOME=${AIRFLOW_HOME:-$here/airflow_home}
export AIRFLOW__CORE__DAGS_FOLDER=$here/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$here/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__API__HOST=${AIRFLOW__API__HOST:-127.0.0.1}
export PATH=$here/.venv/bin:$PATH  # `standalone` starts its parts as `airflow ...`
export ALEXNET_ARTIFACTS=${ALEXNET_ARTIFACTS:-$HOME/alexnet-artifacts}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
mkdir -p "$AIRFLOW_HOME"
if [ ! -f "$AIRFLOW_HOME/airflow.db" ]; then
  "$here/.venv/bin/airflow" db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 \
    || { cat "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
fi
if [ "${1:-}" = tasks ] && [ "${2:-}" = test ]; then
  # `airflow tasks test` exits 0 when its task failed: exit 1 then, with the task's error as the last line.
  progress=$(mktemp "${TMPDIR:-/tmp}/alexnet-tasks-test.XXXXXX")
  trap 'rm -f "$progress"' EXIT
  status=0
  ALEXNET_PROGRESS_FILE=$progress "$here/.venv/bin/airflow" "$@" || status=$?
  failed=$(grep -E "^[0-9:]+  [a-z_]+: (FAILED|failed)( \(try [0-9]+\))?(, to be retried)?: " "$progress" | tail -n 1 | cut -c11-)
  if [ -n "$failed" ]; then
    echo "task failed: $failed" >&2
    exit 1
  fi
  exit "$status"
fi
exec "$here/.venv/bin/airflow" "$@"
