#!/usr/bin/env bash
# `make run`: the whole DAG in process on an embedded SQLite metadata database (`airflow dags test`).
#   CONF='{"image_size": 67, "epochs": 1}' scripts/run_local.sh
#   scripts/run_local.sh    # no CONF: the defaults on a GPU, the CPU preset (67, 15 minutes) without one
#   ALEXNET_DAG=alexnet_cifar10_sweep CONF='{"trials": ...}' scripts/run_local.sh   # `make sweep`: a sweep
# AIRFLOW_HOME defaults to ./airflow_home, ALEXNET_ARTIFACTS to ~/alexnet-artifacts.
# The terminal shows the pipeline's progress (steps, download bytes, one line per epoch); everything
# else (Airflow's and TensorFlow's own output) goes to the log file named on the first line.
# A source that cannot be reached fails at once (ALEXNET_LOCAL_RUN=1), with the way to use a local copy.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=$here/.venv/bin/python
# Without CONF (or with `{}`), a machine where TensorFlow sees no GPU takes the CPU preset.
conf=$("$python" "$here/scripts/local_conf.py" "${CONF:-}") || exit 2
export ALEXNET_ARTIFACTS=${ALEXNET_ARTIFACTS:-$HOME/alexnet-artifacts}
export AIRFLOW_HOME=${AIRFLOW_HOME:-$here/airflow_home}
export ALEXNET_LOCAL_RUN=1
mkdir -p "$AIRFLOW_HOME/logs/make-run"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log=$AIRFLOW_HOME/logs/make-run/$stamp.log
export ALEXNET_PROGRESS_FILE=$AIRFLOW_HOME/logs/make-run/$stamp.progress
: >"$ALEXNET_PROGRESS_FILE"
started=$(date +%s)
echo "params: $conf"
echo "artifacts: $ALEXNET_ARTIFACTS   full log: $log"
tail -n +1 -s 0.2 -f "$ALEXNET_PROGRESS_FILE" &
follower=$!
"$here/scripts/airflow.sh" dags test "${ALEXNET_DAG:-alexnet_cifar10}" -c "$conf" >"$log" 2>&1
status=$?
sleep 0.5
kill "$follower" 2>/dev/null
wait "$follower" 2>/dev/null
if [ "$status" != 0 ]; then
  unreachable=$(grep -m1 -o "download: FAILED (try [0-9]*): SourceUnavailableError: .*" "$ALEXNET_PROGRESS_FILE" \
                | sed 's/^download: FAILED (try [0-9]*): SourceUnavailableError: //')
  if [ -n "$unreachable" ]; then
    echo
    "$python" "$here/scripts/local_conf.py" unreachable "$unreachable" "$conf"
  fi
  echo "the run failed; the full log is $log" >&2
  exit 1
fi
echo
"$python" "$here/scripts/local_conf.py" closing "$ALEXNET_ARTIFACTS" "$started" "$AIRFLOW_HOME"
